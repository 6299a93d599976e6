//! Outbound messages: from the mailbox through the deliver hook to PUBLISH packets,
//! inflight tracking, resend after reconnect, and completion on PUBACK/PUBCOMP.

use std::collections::VecDeque;
use std::time::Instant;

use crate::codec::{self, Ack, Packet, Publish, PublishProperties, PublishQoS, QoS};
use crate::message::{Delivery, Stage};
use crate::metrics::{self, C};
use crate::plugins::events::DropReason;
use crate::session::Naming;

use super::{Conn, OUT_HIGH_WATER};

/// Most deliveries taken from the mailbox in one go.
const DRAIN_BATCH: usize = 256;

impl Conn {
    /// Resends, with DUP, every unacknowledged PUBLISH and PUBREL of a resumed session
    /// (MQTT-4.4.0-1).
    pub(super) fn resend_inflight(&mut self) {
        let inflight = self.state.flows.take_inflight();
        let now = Instant::now();
        for f in &inflight {
            match f.stage {
                Stage::AwaitComp => self.send(&Packet::PubRel(Ack::success(f.id))),
                Stage::AwaitAck | Stage::AwaitRec => {
                    if let Some(p) = self.build_publish(&f.delivery, Some(f.id), true, now) {
                        self.send(&Packet::Publish(p));
                    }
                }
            }
        }
        self.state.flows.restore(inflight);
    }

    /// Drops the deliveries of `batch` that no held subscription still brings (queued
    /// through a subscription a policy change removed). Kept out of `fill`'s loop, whose
    /// code every delivery runs.
    #[cold]
    #[inline(never)]
    pub(super) fn drop_revoked(&mut self, batch: &mut VecDeque<Delivery>) {
        let mut kept = VecDeque::with_capacity(batch.len());
        for d in batch.drain(..) {
            if self.still_subscribed(&d) {
                kept.push_back(d);
            } else {
                tracing::debug!(topic = %d.msg.topic, "queued through a revoked subscription: dropped");
                self.state.mailbox.forget(&d);
            }
        }
        *batch = kept;
        if self.state.mailbox.is_empty() {
            // Everything queued before the revocation has been through here.
            self.revoked = false;
        }
    }

    /// Whether a delivery still comes through a subscription the session holds.
    pub(super) fn still_subscribed(&self, d: &Delivery) -> bool {
        let subs = &self.state.subscriptions;
        match &d.shared {
            Some(f) => subs.contains_key(f),
            None => subs.keys().any(|f| {
                f.share_group().is_none() && codec::filter_matches(f.filter(), d.msg.topic.as_str())
            }),
        }
    }

    /// Moves deliveries from the mailbox into the write buffer, within the inflight window.
    pub(super) fn fill(&mut self) {
        // Without plugins that check subscriptions everything held is allowed: the one
        // load of the hook mask (hot, read below too) spares the chain's generation.
        if self.gate.checks_subscriptions() && self.gate.subscriptions_outdated() {
            self.reauthorize_subscriptions();
        }
        if self.out.len() >= OUT_HIGH_WATER {
            return;
        }
        let credits = usize::from(self.window).saturating_sub(self.state.flows.in_flight());
        let mut batch = std::mem::take(&mut self.batch);
        self.waiting_for_store = !self.state.mailbox.drain(&mut batch, DRAIN_BATCH, credits);
        if self.broker.plugins.hooks() & crate::plugins::Hooks::DELIVER != 0 {
            let plugins = self.broker.plugins.clone();
            for d in plugins.deliver(self.gate.client(), &mut batch) {
                self.dropped(
                    self.gate.client().client_id.to_string(),
                    d.msg.topic.as_str(),
                    DropReason::Plugin,
                );
                metrics::inc(C::DroppedPlugin);
                self.state.mailbox.forget(&d);
            }
        }
        if self.revoked {
            self.drop_revoked(&mut batch);
        }
        let (drained, written) = (batch.len(), self.out.len());
        let now = Instant::now();
        while let Some(d) = batch.pop_front() {
            self.deliver(d, now);
            if self.out.len() >= OUT_HIGH_WATER * 4 {
                break;
            }
        }
        if drained > 0
            && self.out.len() == written
            && batch.is_empty()
            && !self.waiting_for_store
            && !self.state.mailbox.is_empty()
        {
            // Every delivery taken was dropped (expired, refused by a plugin, revoked):
            // nothing was written to bring us back, so look at the rest on the next turn.
            self.state.mailbox.wake();
        }
        self.batch = batch;
        if !self.batch.is_empty() {
            // Hand the rest back so order holds and a later fill takes them first.
            let rest = std::mem::take(&mut self.batch);
            self.state.mailbox.unshift(rest.into_iter());
        }
    }

    /// Sends one delivery: drops it if expired or too large for the client, otherwise
    /// assigns a packet identifier (QoS 1/2) and encodes it.
    pub(super) fn deliver(&mut self, d: Delivery, now: Instant) {
        if d.msg.is_expired(now) {
            metrics::inc(C::DroppedExpired);
            self.dropped(
                self.gate.client().client_id.to_string(),
                d.msg.topic.as_str(),
                DropReason::Expired,
            );
            self.state.mailbox.forget(&d);
            return;
        }
        let id = if d.qos == QoS::AtMostOnce {
            None
        } else {
            match self.state.flows.allocate_id() {
                Some(id) => Some(id),
                None => return,
            }
        };
        let Some(p) = self.build_publish(&d, id, false, now) else {
            self.state.mailbox.forget(&d);
            return;
        };
        metrics::inc(metrics::sent(d.qos));
        metrics::add(metrics::sent_bytes(d.qos), d.msg.payload.len() as u64);
        let ticket = id.and_then(|id| self.state.sent(id, d));
        self.send_after(ticket, &Packet::Publish(p));
    }

    /// Builds the PUBLISH for a delivery, or `None` if it exceeds the client's Maximum
    /// Packet Size (then it is dropped for this client only, MQTT-3.1.2-25).
    pub(super) fn build_publish(
        &mut self,
        d: &Delivery,
        id: Option<crate::codec::PacketId>,
        dup: bool,
        now: Instant,
    ) -> Option<Publish> {
        let qos = match id {
            Some(id) => PublishQoS::with_id(d.qos, id),
            None => PublishQoS::AtMostOnce,
        };
        let mut properties = PublishProperties::default();
        if self.version.is_v5() {
            properties.message = d.msg.properties.clone();
            properties.message.message_expiry_interval = d.msg.remaining_expiry(now);
            properties.subscription_identifiers = d.sub_ids.clone();
        }
        let mut p = Publish {
            dup: dup && qos != PublishQoS::AtMostOnce,
            qos,
            retain: d.retain,
            topic: Some(d.msg.topic.clone()),
            payload: d.msg.payload.clone(),
            properties,
        };
        if codec::publish_len(&p, self.version) > self.client_max_packet {
            metrics::inc(C::DroppedTooLarge);
            self.dropped(
                self.gate.client().client_id.to_string(),
                d.msg.topic.as_str(),
                DropReason::TooLarge,
            );
            tracing::debug!(topic = %d.msg.topic, "message larger than the client's maximum packet size: dropped");
            return None;
        }
        if let Some(aliases) = &mut self.alias_out
            && !dup
        {
            match aliases.name(&d.msg.topic) {
                Naming::Topic => {}
                Naming::Define(alias) => p.properties.topic_alias = Some(alias),
                Naming::Alias(alias) => {
                    p.topic = None;
                    p.properties.topic_alias = Some(alias);
                }
            }
        }
        Some(p)
    }
}
