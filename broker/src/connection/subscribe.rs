//! SUBSCRIBE and UNSUBSCRIBE: limits, authorization, shared groups, retained messages,
//! and subscriptions authorized again when the plugin chain changes.

use std::time::Instant;

use crate::codec::{Packet, QoS, Subscribe, TopicFilter, Unsubscribe};
use crate::message::Delivery;
use crate::plugins::Verdict;
use crate::plugins::events::Event;
use crate::session::{Permit, SubscribeLimits, Subscription};

use super::Conn;

impl Conn {
    /// Asks the authorize chain again about every subscription the session holds (at
    /// resume, and whenever the chain changed): a filter now denied is unsubscribed
    /// (logged, and an `unsubscribed` event), one now allowed at a lower QoS is lowered,
    /// and deliveries queued through removed filters alone are dropped.
    #[cold]
    #[inline(never)]
    pub(super) fn reauthorize_subscriptions(&mut self) {
        self.gate.subscriptions_authorized();
        if !self.gate.checks_subscriptions() || self.state.subscriptions.is_empty() {
            return;
        }
        let held: Vec<(TopicFilter, Subscription)> = (self.state.subscriptions.iter())
            .map(|(f, s)| (f.clone(), *s))
            .collect();
        let asked: Vec<_> = (held.iter()).map(|(f, s)| (f, s.options.qos)).collect();
        let verdicts = self.gate.check_subscriptions(&asked);
        drop(asked);
        let sub = self.state.subscriber();
        let mut removed = 0;
        for ((filter, mut s), verdict) in held.into_iter().zip(verdicts) {
            match verdict {
                Verdict::Deny(reason) => {
                    tracing::info!(filter = %filter.as_str(), ?reason, "subscription no longer authorized: removed");
                    self.state.revoke(&filter, None);
                    self.broker.router.unsubscribe(self.state.key, &filter);
                    if self.broker.plugins.wants_events() {
                        self.broker.plugins.emit(Event::Unsubscribed {
                            client: self.gate.client().clone(),
                            filter: filter.as_str().to_owned(),
                        });
                    }
                    removed += 1;
                }
                Verdict::Allow(Some(q)) if q < s.options.qos => {
                    s.options.qos = q;
                    self.broker.router.subscribe(&sub, &filter, s.options, s.id);
                    self.state.revoke(&filter, Some(q));
                }
                Verdict::Allow(_) => {}
            }
        }
        if removed > 0 {
            // What was queued through a removed subscription (and through no remaining
            // one) is not delivered: checked as it leaves the queue, which may hold it on
            // disk.
            self.revoked = true;
        }
    }

    pub(super) fn on_subscribe(&mut self, mut s: Subscribe) {
        if self.bridge {
            for (_, o) in &mut s.filters {
                o.no_local = true;
                o.retain_as_published = true;
            }
        }
        let permits: Vec<Permit> = if self.gate.checks_subscriptions() {
            let asked: Vec<_> = (s.filters.iter()).map(|(f, o)| (f, o.qos)).collect();
            (self.gate.check_subscriptions(&asked).into_iter())
                .map(|v| match v {
                    Verdict::Allow(cap) => Ok(cap),
                    Verdict::Deny(reason) => Err(reason),
                })
                .collect()
        } else {
            Vec::new()
        };
        let cfg = &self.config.mqtt;
        let limits = SubscribeLimits {
            max_subscriptions: cfg.max_subscriptions,
            max_topic_length: cfg.max_topic_length,
            max_topic_levels: cfg.max_topic_levels,
        };
        let out = self.state.subscribe(s, &permits, &limits);
        let sub = self.state.subscriber();
        let events = self.broker.plugins.wants_events();
        // Retained messages are collected only while the session's queue has room for them.
        let (mut room, mut room_bytes) = self.state.mailbox.room_left();
        let now = Instant::now();
        let mut retained = Vec::new();
        for g in &out.granted {
            let Subscription { options, id } = g.subscription;
            self.broker.router.subscribe(&sub, &g.filter, options, id);
            if events {
                self.broker.plugins.emit(Event::Subscribed {
                    client: self.gate.client().clone(),
                    filter: g.filter.as_str().to_owned(),
                    qos: options.qos,
                });
            }
            if g.send_retained {
                self.broker
                    .router
                    .for_each_retained(g.filter.filter(), now, |m| {
                        let size = m.size();
                        if room == 0 || size > room_bytes {
                            return false;
                        }
                        room -= 1;
                        room_bytes -= size;
                        retained.push(Delivery {
                            qos: m.qos.min(options.qos),
                            msg: m.clone(),
                            retain: true,
                            sub_ids: id.into_iter().collect(),
                            shared: None,
                            store_id: None,
                            hooked: false,
                        });
                        true
                    });
            }
        }
        self.send_after(out.after, &Packet::SubAck(out.ack));
        if self.gate.active() && !retained.is_empty() {
            retained = self.authorize_retained(retained);
        }
        for d in retained {
            if self.state.mailbox.push(d).is_err() {
                break;
            }
        }
    }

    /// Keeps the retained messages the authorize hook lets this client receive.
    pub(super) fn authorize_retained(&mut self, retained: Vec<Delivery>) -> Vec<Delivery> {
        let requests: Vec<_> = retained
            .iter()
            .map(|d| crate::plugins::Request {
                action: crate::plugins::Action::Retained,
                topic: d.msg.topic.as_str(),
                qos: d.qos,
                retain: true,
            })
            .collect();
        let verdicts = self.gate.check_many(&requests);
        drop(requests);
        retained
            .into_iter()
            .zip(verdicts)
            .filter_map(|(mut d, v)| match v {
                Verdict::Allow(q) => {
                    d.qos = d.qos.min(q.unwrap_or(QoS::ExactlyOnce));
                    Some(d)
                }
                Verdict::Deny(_) => {
                    tracing::debug!(topic = %d.msg.topic.as_str(), "retained message not authorized");
                    None
                }
            })
            .collect()
    }

    pub(super) fn on_unsubscribe(&mut self, u: Unsubscribe) {
        let out = self.state.unsubscribe(u);
        for filter in &out.removed {
            self.broker.router.unsubscribe(self.state.key, filter);
            if self.broker.plugins.wants_events() {
                self.broker.plugins.emit(Event::Unsubscribed {
                    client: self.gate.client().clone(),
                    filter: filter.as_str().to_owned(),
                });
            }
        }
        self.send_after(out.after, &Packet::UnsubAck(out.ack));
    }
}
