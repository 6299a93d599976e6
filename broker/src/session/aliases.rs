//! Topic aliases (MQTT 5 §3.3.2.3.4), both ways, without I/O. They live as long as the
//! network connection (MQTT-3.3.2-7), not the session: a connection holds one of each.
//!
//! Inbound, a client may name a topic by a number up to our Topic Alias Maximum: a PUBLISH
//! with a topic and an alias (re)defines the alias, one with an alias and an empty topic uses
//! it. Outbound, we give each new topic the next alias while the client's maximum allows,
//! send the topic with its alias the first time and the alias alone after.

use std::collections::HashMap;
use std::num::NonZeroU16;

use crate::codec::{ReasonCode, TopicName};

/// The aliases a client defined toward us (index = alias − 1).
#[derive(Debug, Default)]
pub struct InboundAliases {
    /// Made at the first alias the client defines: most never do, and every byte here is
    /// kept by every idle connection.
    #[expect(
        clippy::box_collection,
        reason = "8 bytes inline instead of a vector header of 24 in every connection"
    )]
    slots: Option<Box<Vec<Option<TopicName>>>>,
}

impl InboundAliases {
    /// The topic of an inbound PUBLISH carrying `topic` (`None`: empty, MQTT 5 only) and
    /// `alias`, `max` being our Topic Alias Maximum. An alias above `max` is 0x94 Topic
    /// Alias Invalid (MQTT-3.3.2-9); an empty topic without an alias, or with one never
    /// defined on this connection, is 0x82 Protocol Error (MQTT-3.3.4-1 and §3.3.2.3.4).
    pub fn resolve(
        &mut self,
        topic: Option<TopicName>,
        alias: Option<NonZeroU16>,
        max: u16,
    ) -> Result<TopicName, ReasonCode> {
        let Some(alias) = alias else {
            return topic.ok_or(ReasonCode::ProtocolError);
        };
        if alias.get() > max {
            tracing::info!(alias = alias.get(), "topic alias above our maximum");
            return Err(ReasonCode::TopicAliasInvalid);
        }
        let slot = usize::from(alias.get() - 1);
        match topic {
            Some(t) => {
                let slots = self.slots.get_or_insert_with(Box::default);
                if slots.len() <= slot {
                    slots.resize(slot + 1, None);
                }
                if let Some(s) = slots.get_mut(slot) {
                    *s = Some(t.clone());
                }
                Ok(t)
            }
            None => (self.slots.as_ref())
                .and_then(|s| s.get(slot).cloned().flatten())
                .ok_or_else(|| {
                    tracing::info!(alias = alias.get(), "unknown topic alias");
                    ReasonCode::ProtocolError
                }),
        }
    }
}

/// How an outbound PUBLISH names its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// The topic alone: the client allows no (more) aliases.
    Topic,
    /// The topic and a new alias for it.
    Define(NonZeroU16),
    /// The alias alone (an empty topic).
    Alias(NonZeroU16),
}

/// The aliases we define toward a client.
#[derive(Debug)]
pub struct OutboundAliases {
    by_topic: HashMap<TopicName, NonZeroU16>,
    /// The client's Topic Alias Maximum.
    max: u16,
}

impl OutboundAliases {
    /// For a client whose CONNECT said Topic Alias Maximum `max`; `None` when it allows
    /// none (MQTT-3.3.2-8: we then send no alias).
    pub fn new(max: Option<u16>) -> Option<OutboundAliases> {
        max.filter(|&m| m > 0).map(|max| OutboundAliases {
            by_topic: HashMap::new(),
            max,
        })
    }

    /// How to name `topic` in the next PUBLISH, which the caller then sends. Aliases are
    /// given in order from 1 and never redefined: once `max` topics have one, other topics
    /// go out by name.
    pub fn name(&mut self, topic: &TopicName) -> Naming {
        if let Some(&a) = self.by_topic.get(topic) {
            return Naming::Alias(a);
        }
        // Beyond 65,535 topics there is no next alias (the conversion fails).
        let next = u16::try_from(self.by_topic.len() + 1).ok();
        match next.and_then(NonZeroU16::new) {
            Some(a) if a.get() <= self.max => {
                self.by_topic.insert(topic.clone(), a);
                Naming::Define(a)
            }
            _ => Naming::Topic,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]

    use super::*;
    use proptest::prelude::*;

    fn t(s: &str) -> TopicName {
        TopicName::new(s).unwrap()
    }

    fn a(n: u16) -> Option<NonZeroU16> {
        NonZeroU16::new(n)
    }

    #[test]
    fn inbound_table() {
        let mut al = InboundAliases::default();
        // (topic, alias, max) → result, in order on one connection.
        type Row<'a> = (Option<&'a str>, u16, u16, Result<&'a str, ReasonCode>);
        let rows: [Row; 9] = [
            (Some("a/b"), 0, 10, Ok("a/b")),
            (None, 0, 10, Err(ReasonCode::ProtocolError)),
            (None, 1, 10, Err(ReasonCode::ProtocolError)),
            (Some("x"), 11, 10, Err(ReasonCode::TopicAliasInvalid)),
            (Some("x"), 1, 0, Err(ReasonCode::TopicAliasInvalid)),
            (Some("x"), 3, 10, Ok("x")),
            (None, 3, 10, Ok("x")),
            (Some("y"), 3, 10, Ok("y")),
            (None, 3, 10, Ok("y")),
        ];
        for (i, (topic, alias, max, want)) in rows.into_iter().enumerate() {
            let got = al.resolve(topic.map(t), a(alias), max);
            assert_eq!(got, want.map(t), "row {i}");
        }
        assert_eq!(
            al.resolve(None, a(2), 10),
            Err(ReasonCode::ProtocolError),
            "defining 3 did not define 2"
        );
    }

    #[test]
    fn outbound_defines_once_then_uses_the_alias_and_stops_at_the_maximum() {
        assert!(OutboundAliases::new(None).is_none());
        assert!(OutboundAliases::new(Some(0)).is_none());
        let mut al = OutboundAliases::new(Some(2)).unwrap();
        assert_eq!(al.name(&t("a")), Naming::Define(a(1).unwrap()));
        assert_eq!(al.name(&t("a")), Naming::Alias(a(1).unwrap()));
        assert_eq!(al.name(&t("b")), Naming::Define(a(2).unwrap()));
        assert_eq!(al.name(&t("c")), Naming::Topic);
        assert_eq!(al.name(&t("c")), Naming::Topic);
        assert_eq!(al.name(&t("b")), Naming::Alias(a(2).unwrap()));
    }

    fn topic() -> impl Strategy<Value = TopicName> {
        prop::sample::select(vec!["a", "a/b", "c/d/e", "x", "y/z z", "é"]).prop_map(t)
    }

    proptest! {
        /// Inbound aliases against a model: a map from alias to the topic last defined.
        #[test]
        fn inbound_follows_the_model(
            max in 0u16..6,
            steps in prop::collection::vec((prop::option::of(topic()), 0u16..8), 0..60),
        ) {
            let mut al = InboundAliases::default();
            let mut model: HashMap<u16, TopicName> = HashMap::new();
            for (topic, alias) in steps {
                let want = match (&topic, alias) {
                    (_, n) if n > max => Err(ReasonCode::TopicAliasInvalid),
                    (Some(t), 0) => Ok(t.clone()),
                    (None, 0) => Err(ReasonCode::ProtocolError),
                    (Some(t), n) => {
                        model.insert(n, t.clone());
                        Ok(t.clone())
                    }
                    (None, n) => model.get(&n).cloned().ok_or(ReasonCode::ProtocolError),
                };
                prop_assert_eq!(al.resolve(topic, a(alias), max), want);
            }
        }

        /// What we send, read by a client keeping its own inbound aliases, always names
        /// the topic we meant, and no alias exceeds the client's maximum.
        #[test]
        fn a_client_reads_back_every_topic(
            max in 1u16..5,
            topics in prop::collection::vec(topic(), 0..60),
        ) {
            let mut ours = OutboundAliases::new(Some(max)).unwrap();
            let mut theirs = InboundAliases::default();
            for topic in topics {
                let (sent, alias) = match ours.name(&topic) {
                    Naming::Topic => (Some(topic.clone()), None),
                    Naming::Define(n) => (Some(topic.clone()), Some(n)),
                    Naming::Alias(n) => (None, Some(n)),
                };
                prop_assert!(alias.is_none_or(|n| n.get() <= max));
                prop_assert_eq!(theirs.resolve(sent, alias, max), Ok(topic));
            }
        }
    }
}
