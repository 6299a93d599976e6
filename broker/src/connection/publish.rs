//! Inbound PUBLISH: topic aliases, authorization and transforms by plugins, durable
//! acceptance of QoS 1/2, routing, and the acknowledgement.

use std::sync::Arc;

use crate::codec::{Ack, Packet, Publish, PublishQoS, QoS, ReasonCode};
use crate::message::Draft;
use crate::message::Message;
use crate::metrics;
use crate::pipeline::Origin;
use crate::plugins::events::{DropReason, Event};

use super::{Close, Conn, Ticket};

/// Most publishes handed to the transform hook in one call.
const TRANSFORM_BATCH: usize = 64;

impl Conn {
    /// The message a draft becomes once routed.
    pub(super) fn message(&self, d: Draft) -> Arc<Message> {
        d.into_message(Some(self.state.key))
    }

    /// Where this connection's messages come from, for the pipeline.
    pub(super) fn origin(&self) -> Origin<'_> {
        Origin::Client {
            session: self.state.key,
            client: self.gate.client(),
        }
    }

    /// Tells the events hook that a message was dropped (for `client_id`, or for everyone).
    pub(super) fn dropped(&self, client_id: String, topic: &str, reason: DropReason) {
        if self.broker.plugins.wants_events() {
            self.broker.plugins.emit(Event::MessageDropped {
                client_id,
                topic: topic.to_owned(),
                reason,
            });
        }
    }

    pub(super) fn on_publish(&mut self, p: Publish) -> Result<(), ReasonCode> {
        metrics::inc(metrics::received(p.qos.qos()));
        metrics::add(metrics::received_bytes(p.qos.qos()), p.payload.len() as u64);
        let cfg = &self.config.mqtt;
        let topic =
            (self.alias_in).resolve(p.topic, p.properties.topic_alias, cfg.topic_alias_maximum)?;
        if !p.properties.subscription_identifiers.is_empty() {
            // MQTT-3.3.4-6: only the server sends Subscription Identifiers.
            tracing::info!("PUBLISH from a client with a subscription identifier");
            return Err(ReasonCode::ProtocolError);
        }
        if p.retain && !cfg.retain_available {
            return Err(ReasonCode::RetainNotSupported);
        }
        if !cfg.topic_limits().fits(topic.as_str()) {
            // Not routed. MQTT 5 refuses a QoS 1/2 message with PUBACK / PUBREC 0x90 and
            // keeps the connection; QoS 0 has no acknowledgement, so it gets DISCONNECT
            // 0x90; MQTT 3.x can only be closed.
            tracing::info!(
                len = topic.as_str().len(),
                "topic over the length or level limit"
            );
            let id = match p.qos {
                PublishQoS::AtLeastOnce(id) | PublishQoS::ExactlyOnce(id)
                    if self.version.is_v5() =>
                {
                    id
                }
                _ => return Err(ReasonCode::TopicNameInvalid),
            };
            let mut ack = Ack::success(id);
            ack.reason = ReasonCode::TopicNameInvalid;
            let ack = if matches!(p.qos, PublishQoS::AtLeastOnce(_)) {
                Packet::PubAck(ack)
            } else {
                Packet::PubRec(ack)
            };
            self.send(&ack);
            return Ok(());
        }
        let mut max_qos = QoS::ExactlyOnce;
        if self.gate.active() {
            let action = crate::plugins::Action::Publish;
            match self
                .gate
                .check(action, topic.as_str(), p.qos.qos(), p.retain)
            {
                crate::plugins::Verdict::Allow(q) => max_qos = q.unwrap_or(max_qos),
                crate::plugins::Verdict::Deny(code) => return self.refuse_publish(p.qos, code),
            }
        }
        let draft = Draft {
            topic,
            payload: p.payload,
            qos: p.qos.qos().min(max_qos),
            retain: p.retain,
            properties: p.properties.message,
        };
        if self.broker.pipeline.transforms() {
            if let PublishQoS::ExactlyOnce(id) = p.qos
                && self.state.flows.holds(id)
            {
                // A resent QoS 2 message already accepted: answered, not transformed again.
                if let Some(Close::Error(reason)) = self.flush_pending() {
                    return Err(reason);
                }
                return self.accept_publish(None, p.qos);
            }
            // Transformed together with the rest of this read (one plugin call).
            self.pending.push((draft, p.qos));
            if self.pending.len() >= TRANSFORM_BATCH
                && let Some(Close::Error(reason)) = self.flush_pending()
            {
                return Err(reason);
            }
            return Ok(());
        }
        let msg = self.message(draft);
        self.accept_publish(Some(&msg), p.qos)
    }

    /// Routes an accepted message (`None`: accepted and dropped) and acknowledges it.
    pub(super) fn accept_publish(
        &mut self,
        msg: Option<&Arc<Message>>,
        flow: PublishQoS,
    ) -> Result<(), ReasonCode> {
        let unretained;
        let mut msg = msg;
        if let Some(m) = msg
            && m.topic.is_sys()
        {
            // Only the broker publishes its status (MQTT 5: 0x87; 3.x: dropped).
            tracing::info!(topic = %m.topic, "PUBLISH under $SYS refused: only the broker publishes there");
            return self.refuse_publish(flow, ReasonCode::NotAuthorized);
        }
        let repeat = matches!(flow, PublishQoS::ExactlyOnce(id) if self.state.flows.holds(id));
        if let Some(m) = msg
            && m.retain
            && !repeat
            && !self.broker.router.retain_room(m)
        {
            // The retained store is full: MQTT 5 refuses a QoS 1/2 message with 0x97; MQTT
            // 3.x (which cannot refuse one) and QoS 0 have it routed as an ordinary message.
            tracing::info!(topic = %m.topic, "retained store full: message not retained");
            if self.version.is_v5() && flow != PublishQoS::AtMostOnce {
                return self.refuse_publish(flow, ReasonCode::QuotaExceeded);
            }
            unretained = Arc::new(m.unretained());
            msg = Some(&unretained);
        }
        if let Some(m) = msg
            && flow != PublishQoS::AtMostOnce
            && !repeat
            && let Some(why) = self.cannot_make_durable(m, flow)
        {
            // A message whose acknowledgement promises it is durable, and it cannot be
            // made so now: refused (MQTT 5: 0x97); MQTT 3.x cannot refuse one, so it is
            // left unacknowledged (the client sends it again on its next connection).
            tracing::debug!(topic = %m.topic, why, "QoS 1/2 message refused");
            if self.version.is_v5() {
                return self.refuse_publish(flow, ReasonCode::QuotaExceeded);
            }
            return Ok(());
        }
        let route = |me: &mut Self| {
            let Some(m) = msg else {
                return Ticket::default();
            };
            let routed = me.broker.pipeline.route(&me.origin(), m);
            me.handed_on |= routed.delivered > 0;
            let ticket = Ticket::routed(&routed);
            me.pause_for(routed.congested);
            ticket
        };
        match flow {
            PublishQoS::AtMostOnce => {
                route(self);
            }
            PublishQoS::AtLeastOnce(id) => {
                // PUBACK only once the message is durable in every persistent
                // subscriber's queue (and as retained message, and for other nodes).
                let ticket = route(self);
                self.send_when(ticket, &Packet::PubAck(Ack::success(id)));
            }
            PublishQoS::ExactlyOnce(id) => {
                // Routed once, however often the client sends it before PUBREL.
                let max = self.config.mqtt.receive_maximum;
                let pipeline = &self.broker.pipeline;
                let origin = Origin::Client {
                    session: self.state.key,
                    client: self.gate.client(),
                };
                let mut congested = None;
                let mut delivered = 0;
                let mut replicated = 0;
                let received = self.state.receive_exactly_once(id, max, || {
                    let routed = pipeline.route(&origin, msg?);
                    congested = routed.congested;
                    delivered = routed.delivered;
                    replicated = routed.replicated.unwrap_or(0);
                    routed.ticket
                });
                self.handed_on |= delivered > 0;
                self.pause_for(congested);
                match received {
                    Ok(ticket) => {
                        let ticket = Ticket {
                            store: ticket.unwrap_or(0),
                            replicated,
                        };
                        self.send_when(ticket, &Packet::PubRec(Ack::success(id)));
                    }
                    Err(reason) => {
                        tracing::info!(
                            "more QoS 2 messages awaiting PUBREL than our Receive Maximum"
                        );
                        return Err(reason);
                    }
                }
            }
        }
        Ok(())
    }

    /// Why `msg` (QoS 1/2) cannot be made durable now, if it cannot: the store fails to
    /// write and the message needs it, or other nodes take it and JetStream cannot hold it
    /// (NATS away, the cluster's queue full).
    fn cannot_make_durable(&self, msg: &Message, flow: PublishQoS) -> Option<&'static str> {
        if self.broker.store.is_failing() && self.needs_store(msg, flow) {
            return Some("the store is failing");
        }
        if let Some(cluster) = &self.broker.cluster
            && cluster.refuses(msg)
        {
            return Some("the cluster cannot make it durable");
        }
        None
    }

    /// Whether accepting `msg` would write to the store: it is retained, a persistent
    /// session or a sink takes it, or it is QoS 2 from a persistent session (its packet id
    /// is kept until PUBREL).
    pub(super) fn needs_store(&self, msg: &Message, flow: PublishQoS) -> bool {
        msg.retain
            || (matches!(flow, PublishQoS::ExactlyOnce(_)) && self.state.mailbox.is_persistent())
            || self.broker.router.reaches_persistent(msg)
            || self.broker.plugins.sink_selects(msg.topic.as_str())
    }

    /// A PUBLISH an authorize plugin refused: MQTT 5 QoS 1/2 get PUBACK / PUBREC with the
    /// plugin's reason code; QoS 0 and MQTT 3.x are acknowledged as usual and dropped, as
    /// 3.x has no way to refuse one message (MQTT-3.3.5-2).
    pub(super) fn refuse_publish(
        &mut self,
        qos: PublishQoS,
        reason: ReasonCode,
    ) -> Result<(), ReasonCode> {
        tracing::debug!(?reason, "PUBLISH not authorized: dropped");
        let (id, rec) = match qos {
            PublishQoS::AtMostOnce => return Ok(()),
            PublishQoS::AtLeastOnce(id) => (id, false),
            PublishQoS::ExactlyOnce(id) => (id, true),
        };
        let mut ack = Ack::success(id);
        if self.version.is_v5() {
            ack.reason = reason;
        }
        self.send(&if rec {
            Packet::PubRec(ack)
        } else {
            Packet::PubAck(ack)
        });
        Ok(())
    }
}
