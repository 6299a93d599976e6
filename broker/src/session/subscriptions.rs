//! SUBSCRIBE and UNSUBSCRIBE as the session sees them: which filters it holds, what each
//! packet is answered with, and which changes are written to the store. No I/O and no
//! policy: the caller brings the authorize chain's verdicts and applies the result to the
//! router (and sends the retained messages the result asks for).

use std::collections::HashMap;

use crate::codec::{
    QoS, ReasonCode, RetainHandling, SubAck, Subscribe, TopicFilter, UnsubAck, Unsubscribe,
};

use super::{SessionState, Subscription};

/// The limits a SUBSCRIBE is checked against.
#[derive(Debug, Clone, Copy)]
pub struct SubscribeLimits {
    /// Most subscriptions one session may hold.
    pub max_subscriptions: usize,
    /// Longest filter, in bytes.
    pub max_topic_length: usize,
    /// Most levels in a filter.
    pub max_topic_levels: usize,
}

/// What the authorize chain said of one filter: allowed (up to a QoS, if it says one), or
/// refused with a reason code.
pub type Permit = Result<Option<QoS>, ReasonCode>;

/// A subscription a SUBSCRIBE granted, for the caller to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    /// The filter, as sent (with any share prefix).
    pub filter: TopicFilter,
    /// The subscription as held now (QoS lowered to what was granted).
    pub subscription: Subscription,
    /// Whether retained messages matching it are to be sent now (MQTT 5 Retain Handling;
    /// never for a shared subscription, MQTT 5 §4.8.2).
    pub send_retained: bool,
}

/// The session's answer to a SUBSCRIBE.
#[derive(Debug)]
pub struct Subscribed {
    /// The SUBACK, one reason code per filter in the packet's order.
    pub ack: SubAck,
    /// The store ticket the SUBACK waits for (`None`: nothing written).
    pub after: Option<u64>,
    /// The subscriptions granted, in the packet's order (a repeated filter once).
    pub granted: Vec<Granted>,
}

/// The session's answer to an UNSUBSCRIBE.
#[derive(Debug)]
pub struct Unsubscribed {
    /// The UNSUBACK.
    pub ack: UnsubAck,
    /// The store ticket the UNSUBACK waits for (`None`: nothing written).
    pub after: Option<u64>,
    /// The filters the session held and no longer does.
    pub removed: Vec<TopicFilter>,
}

impl SessionState {
    /// Answers a SUBSCRIBE. `permits` holds one verdict per filter of the packet (empty:
    /// every filter allowed). A filter repeated in one packet takes effect once, as its last
    /// occurrence (as if the occurrences came one packet after the other), and every
    /// occurrence is answered with that one's code. Each changed subscription is one small
    /// row in the store of a persistent session; a subscription sent again unchanged writes
    /// nothing.
    pub fn subscribe(
        &mut self,
        s: Subscribe,
        permits: &[Permit],
        limits: &SubscribeLimits,
    ) -> Subscribed {
        let id = s.properties.subscription_identifier;
        let n = s.filters.len();
        let effective: Vec<usize> = {
            let mut last: HashMap<&str, usize> = HashMap::with_capacity(n);
            for (i, (f, _)) in s.filters.iter().enumerate() {
                last.insert(f.as_str(), i);
            }
            (s.filters.iter())
                .enumerate()
                .map(|(i, (f, _))| last.get(f.as_str()).copied().unwrap_or(i))
                .collect()
        };
        let mut reasons = vec![ReasonCode::UnspecifiedError; n];
        let mut granted = Vec::new();
        let mut after = None;
        for (i, (filter, mut options)) in s.filters.into_iter().enumerate() {
            if effective.get(i) != Some(&i) {
                continue;
            }
            let reason = match permits.get(i).copied().unwrap_or(Ok(None)) {
                Err(reason) => reason,
                Ok(cap) => {
                    if let Some(q) = cap {
                        options.qos = options.qos.min(q);
                    }
                    if filter.as_str().len() > limits.max_topic_length
                        || filter.filter().split('/').count() > limits.max_topic_levels
                    {
                        tracing::info!(
                            len = filter.as_str().len(),
                            "topic filter over the length or level limit"
                        );
                        ReasonCode::TopicFilterInvalid
                    } else if self.subscriptions.len() >= limits.max_subscriptions
                        && !self.subscriptions.contains_key(&filter)
                    {
                        tracing::info!(
                            max_subs = limits.max_subscriptions,
                            "subscription limit reached"
                        );
                        ReasonCode::QuotaExceeded
                    } else {
                        let subscription = Subscription { options, id };
                        let old = self.subscriptions.insert(filter.clone(), subscription);
                        if old != Some(subscription) {
                            after = after.max(self.save_subscription(&filter, Some(subscription)));
                        }
                        let send_retained = filter.share_group().is_none()
                            && match options.retain_handling {
                                RetainHandling::SendAtSubscribe => true,
                                RetainHandling::SendIfNew => old.is_none(),
                                RetainHandling::DoNotSend => false,
                            };
                        granted.push(Granted {
                            filter,
                            subscription,
                            send_retained,
                        });
                        ReasonCode::granted(options.qos)
                    }
                }
            };
            if let Some(r) = reasons.get_mut(i) {
                *r = reason;
            }
        }
        for (i, &e) in effective.iter().enumerate() {
            if e != i
                && let Some(&r) = reasons.get(e)
                && let Some(slot) = reasons.get_mut(i)
            {
                *slot = r;
            }
        }
        Subscribed {
            ack: SubAck {
                packet_id: s.packet_id,
                reasons,
                properties: Default::default(),
            },
            after,
            granted,
        }
    }

    /// Answers an UNSUBSCRIBE: each filter held is removed (and its row deleted in the
    /// store of a persistent session); one not held is answered "no subscription existed"
    /// and writes nothing.
    pub fn unsubscribe(&mut self, u: Unsubscribe) -> Unsubscribed {
        let mut reasons = Vec::with_capacity(u.filters.len());
        let mut removed = Vec::new();
        let mut after = None;
        for filter in u.filters {
            if self.subscriptions.remove(&filter).is_some() {
                after = after.max(self.save_subscription(&filter, None));
                reasons.push(ReasonCode::Success);
                removed.push(filter);
            } else {
                reasons.push(ReasonCode::NoSubscriptionExisted);
            }
        }
        Unsubscribed {
            ack: UnsubAck {
                packet_id: u.packet_id,
                reasons,
                properties: Default::default(),
            },
            after,
            removed,
        }
    }

    /// Removes one subscription a policy no longer allows (`Some(qos)`: lowers it to that
    /// QoS instead); returns the store ticket of the change.
    pub fn revoke(&mut self, filter: &TopicFilter, lower_to: Option<QoS>) -> Option<u64> {
        match lower_to {
            None => {
                self.subscriptions.remove(filter)?;
                self.save_subscription(filter, None)
            }
            Some(q) => {
                let s = self.subscriptions.get_mut(filter)?;
                if q >= s.options.qos {
                    return None;
                }
                s.options.qos = q;
                let s = *s;
                self.save_subscription(filter, Some(s))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use std::num::NonZeroU32;

    use super::*;
    use crate::codec::{PacketId, SubscribeProperties, SubscriptionOptions};
    use crate::mailbox::Mailbox;
    use crate::session::SessionState;
    use crate::session::tests::{LIMITS_Q, fresh, state};
    use crate::store::Scratch;

    const LIMITS: SubscribeLimits = SubscribeLimits {
        max_subscriptions: 3,
        max_topic_length: 16,
        max_topic_levels: 4,
    };

    fn opts(qos: QoS, rh: RetainHandling) -> SubscriptionOptions {
        SubscriptionOptions {
            retain_handling: rh,
            ..SubscriptionOptions::qos(qos)
        }
    }

    fn sub(filters: &[(&str, QoS)]) -> Subscribe {
        sub_with(filters, RetainHandling::SendAtSubscribe, None)
    }

    fn sub_with(filters: &[(&str, QoS)], rh: RetainHandling, id: Option<u32>) -> Subscribe {
        Subscribe {
            packet_id: PacketId::new(7).unwrap(),
            filters: (filters.iter())
                .map(|(f, q)| (TopicFilter::new(f).unwrap(), opts(*q, rh)))
                .collect(),
            properties: SubscribeProperties {
                subscription_identifier: id.and_then(NonZeroU32::new),
                ..Default::default()
            },
        }
    }

    fn unsub(filters: &[&str]) -> Unsubscribe {
        Unsubscribe {
            packet_id: PacketId::new(8).unwrap(),
            filters: (filters.iter())
                .map(|f| TopicFilter::new(f).unwrap())
                .collect(),
            user_properties: Default::default(),
        }
    }

    const Q0: QoS = QoS::AtMostOnce;
    const Q1: QoS = QoS::AtLeastOnce;
    const Q2: QoS = QoS::ExactlyOnce;

    #[test]
    fn each_filter_is_answered_in_order_with_its_granted_qos() {
        let mut s = fresh();
        let out = s.subscribe(sub(&[("a/#", Q2), ("b", Q0), ("c/+", Q1)]), &[], &LIMITS);
        assert_eq!(
            out.ack.reasons,
            [
                ReasonCode::GrantedQoS2,
                ReasonCode::Success,
                ReasonCode::GrantedQoS1
            ]
        );
        assert_eq!(out.ack.packet_id.get(), 7);
        assert_eq!(out.granted.len(), 3);
        assert_eq!(s.subscriptions.len(), 3);
        assert_eq!(out.after, None, "a session without store writes nothing");
    }

    #[test]
    fn a_permit_lowers_the_qos_and_a_refusal_keeps_its_code() {
        let mut s = fresh();
        let permits = [Ok(Some(Q1)), Err(ReasonCode::NotAuthorized), Ok(None)];
        let out = s.subscribe(sub(&[("a", Q2), ("b", Q2), ("c", Q2)]), &permits, &LIMITS);
        assert_eq!(
            out.ack.reasons,
            [
                ReasonCode::GrantedQoS1,
                ReasonCode::NotAuthorized,
                ReasonCode::GrantedQoS2
            ]
        );
        assert!(
            !s.subscriptions
                .contains_key(&TopicFilter::new("b").unwrap())
        );
        let a = s
            .subscriptions
            .get(&TopicFilter::new("a").unwrap())
            .unwrap();
        assert_eq!(a.options.qos, Q1);
    }

    #[test]
    fn limits_refuse_long_deep_and_one_too_many() {
        let mut s = fresh();
        let out = s.subscribe(
            sub(&[
                ("a/b/c/d/e", Q1),
                ("this/is/too/long/x", Q1),
                ("a", Q1),
                ("b", Q1),
                ("c", Q1),
                ("d", Q1),
            ]),
            &[],
            &LIMITS,
        );
        assert_eq!(
            out.ack.reasons,
            [
                ReasonCode::TopicFilterInvalid,
                ReasonCode::TopicFilterInvalid,
                ReasonCode::GrantedQoS1,
                ReasonCode::GrantedQoS1,
                ReasonCode::GrantedQoS1,
                ReasonCode::QuotaExceeded
            ]
        );
        // At the limit, a filter already held may still be changed.
        let out = s.subscribe(sub(&[("a", Q2)]), &[], &LIMITS);
        assert_eq!(out.ack.reasons, [ReasonCode::GrantedQoS2]);
        assert_eq!(s.subscriptions.len(), 3);
    }

    #[test]
    fn a_repeated_filter_takes_effect_once_as_its_last_occurrence() {
        let mut s = fresh();
        let out = s.subscribe(sub(&[("a", Q0), ("b", Q1), ("a", Q2)]), &[], &LIMITS);
        assert_eq!(
            out.ack.reasons,
            [
                ReasonCode::GrantedQoS2,
                ReasonCode::GrantedQoS1,
                ReasonCode::GrantedQoS2
            ]
        );
        assert_eq!(out.granted.len(), 2);
        // Repeats do not count against the limit.
        let many: Vec<(&str, QoS)> = std::iter::repeat_n(("x", Q1), 1000).collect();
        let out = s.subscribe(sub(&many), &[], &LIMITS);
        assert!(
            out.ack
                .reasons
                .iter()
                .all(|r| *r == ReasonCode::GrantedQoS1)
        );
        assert_eq!(out.granted.len(), 1);
    }

    #[test]
    fn retain_handling_decides_the_retained_messages() {
        let mut s = fresh();
        let roomy = SubscribeLimits {
            max_subscriptions: 10,
            ..LIMITS
        };
        let rh = |s: &mut SessionState, f: &str, rh| {
            s.subscribe(sub_with(&[(f, Q1)], rh, None), &[], &roomy)
                .granted
                .first()
                .unwrap()
                .send_retained
        };
        assert!(rh(&mut s, "a", RetainHandling::SendAtSubscribe));
        assert!(rh(&mut s, "a", RetainHandling::SendAtSubscribe));
        assert!(rh(&mut s, "b", RetainHandling::SendIfNew));
        assert!(!rh(&mut s, "b", RetainHandling::SendIfNew), "exists now");
        assert!(!rh(&mut s, "c", RetainHandling::DoNotSend));
        assert!(
            !rh(&mut s, "$share/g/d", RetainHandling::SendAtSubscribe),
            "never for a shared subscription"
        );
    }

    #[test]
    fn unsubscribe_answers_each_filter() {
        let mut s = fresh();
        s.subscribe(sub(&[("a", Q1), ("b", Q1)]), &[], &LIMITS);
        let out = s.unsubscribe(unsub(&["a", "nope", "a"]));
        assert_eq!(
            out.ack.reasons,
            [
                ReasonCode::Success,
                ReasonCode::NoSubscriptionExisted,
                ReasonCode::NoSubscriptionExisted
            ]
        );
        assert_eq!(out.removed, [TopicFilter::new("a").unwrap()]);
        assert_eq!(s.subscriptions.len(), 1);
    }

    #[test]
    fn revoke_removes_or_lowers() {
        let mut s = fresh();
        s.subscribe(sub(&[("a", Q2), ("b", Q2)]), &[], &LIMITS);
        let (a, b) = (
            TopicFilter::new("a").unwrap(),
            TopicFilter::new("b").unwrap(),
        );
        s.revoke(&a, None);
        s.revoke(&b, Some(Q1));
        assert!(!s.subscriptions.contains_key(&a));
        assert_eq!(s.subscriptions.get(&b).unwrap().options.qos, Q1);
        s.revoke(&b, Some(Q2));
        assert_eq!(
            s.subscriptions.get(&b).unwrap().options.qos,
            Q1,
            "never raised"
        );
    }

    #[test]
    fn a_persistent_session_writes_only_what_changed() {
        let scratch = Scratch::open("session-subscriptions");
        let mailbox = Mailbox::with_store(LIMITS_Q, scratch.store.clone(), 1);
        mailbox.set_persistent(true);
        let mut s = state(mailbox);
        let id = Some(3);
        let first = s.subscribe(
            sub_with(&[("a", Q1)], RetainHandling::SendAtSubscribe, id),
            &[],
            &LIMITS,
        );
        assert!(first.after.is_some(), "a new subscription is written");
        let same = s.subscribe(
            sub_with(&[("a", Q1)], RetainHandling::SendAtSubscribe, id),
            &[],
            &LIMITS,
        );
        assert_eq!(
            same.after, None,
            "the same subscription again writes nothing"
        );
        let other = s.subscribe(
            sub_with(&[("a", Q1)], RetainHandling::SendAtSubscribe, Some(4)),
            &[],
            &LIMITS,
        );
        assert!(other.after > first.after, "a new identifier is a change");
        assert_eq!(s.unsubscribe(unsub(&["zz"])).after, None);
        assert!(s.unsubscribe(unsub(&["a"])).after > other.after);
    }
}
