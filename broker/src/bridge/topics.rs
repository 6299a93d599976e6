//! A bridge's topic map, without I/O: which local topics go out and under which remote
//! name, which remote topics come in and under which local name (Mosquitto's rule: the
//! pattern is `filter`, a local topic is `local_prefix` + the part after it, a remote
//! topic `remote_prefix` + the same part).

use crate::codec::{QoS, filter_matches};
use crate::config::BridgeTopic;

/// One `[[bridge.topic]]`, with its two full patterns built once.
#[derive(Debug, Clone)]
struct Entry {
    local: String,
    remote: String,
    local_prefix: String,
    remote_prefix: String,
    out: bool,
    inbound: bool,
    qos: QoS,
}

/// The topic map of one bridge.
#[derive(Debug, Clone)]
pub struct TopicMap {
    entries: Vec<Entry>,
}

/// Where a message goes and at most at which QoS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// The topic on the other side.
    pub topic: String,
    /// The topic entry's QoS ceiling.
    pub qos: QoS,
}

impl TopicMap {
    /// The map of `topics`.
    pub fn new(topics: &[BridgeTopic]) -> TopicMap {
        TopicMap {
            entries: (topics.iter())
                .map(|t| Entry {
                    local: t.local(),
                    remote: t.remote(),
                    local_prefix: t.local_prefix.clone(),
                    remote_prefix: t.remote_prefix.clone(),
                    out: t.direction.out(),
                    inbound: t.direction.inbound(),
                    qos: t.max_qos(),
                })
                .collect(),
        }
    }

    /// The first entry of direction `out` (or inbound) whose pattern on that side selects
    /// `topic`, with the part of `topic` after that side's prefix; `None` too where that
    /// part is empty and the other side has no prefix (no topic there).
    fn select<'t>(&self, topic: &'t str, out: bool) -> Option<(&Entry, &'t str)> {
        self.entries.iter().find_map(|e| {
            let (on, pattern, prefix, other) = match out {
                true => (e.out, &e.local, &e.local_prefix, &e.remote_prefix),
                false => (e.inbound, &e.remote, &e.remote_prefix, &e.local_prefix),
            };
            if !on || !filter_matches(pattern, topic) {
                return None;
            }
            let rest = topic.strip_prefix(prefix.as_str())?;
            (!rest.is_empty() || !other.is_empty()).then_some((e, rest))
        })
    }

    /// Where local topic `topic` goes at the remote, by the first outbound entry that
    /// selects it.
    pub fn outbound(&self, topic: &str) -> Option<Mapped> {
        self.select(topic, true).map(|(e, rest)| Mapped {
            topic: format!("{}{rest}", e.remote_prefix),
            qos: e.qos,
        })
    }

    /// The QoS ceiling of the outbound entry that selects local topic `topic` (what
    /// [`TopicMap::outbound`] picks, without building the remote name).
    pub fn out_qos(&self, topic: &str) -> Option<QoS> {
        self.select(topic, true).map(|(e, _)| e.qos)
    }

    /// Where remote topic `topic` goes locally, by the first inbound entry that selects it.
    pub fn inbound(&self, topic: &str) -> Option<Mapped> {
        self.select(topic, false).map(|(e, rest)| Mapped {
            topic: format!("{}{rest}", e.local_prefix),
            qos: e.qos,
        })
    }

    /// What the bridge subscribes to at the remote: (remote pattern, QoS), one per inbound
    /// entry.
    pub fn subscriptions(&self) -> Vec<(String, QoS)> {
        (self.entries.iter())
            .filter(|e| e.inbound)
            .map(|e| (e.remote.clone(), e.qos))
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::codec::{TopicFilter, TopicName};
    use crate::config::Direction;

    fn entry(
        direction: Direction,
        filter: &str,
        local: &str,
        remote: &str,
        qos: u8,
    ) -> BridgeTopic {
        BridgeTopic {
            direction,
            filter: filter.into(),
            local_prefix: local.into(),
            remote_prefix: remote.into(),
            qos,
        }
    }

    #[test]
    fn prefixes_both_ways() {
        let map = TopicMap::new(&[
            entry(Direction::Out, "sensors/#", "", "site17/", 1),
            entry(Direction::In, "cmd/+", "local/", "site17/", 2),
            entry(Direction::Both, "shared/x", "l/", "r/", 0),
        ]);
        let m = |topic: &str, qos| {
            Some(Mapped {
                topic: topic.into(),
                qos,
            })
        };
        assert_eq!(
            map.outbound("sensors/t/1"),
            m("site17/sensors/t/1", QoS::AtLeastOnce)
        );
        assert_eq!(
            map.outbound("sensors"),
            m("site17/sensors", QoS::AtLeastOnce)
        );
        assert_eq!(map.outbound("cmd/a"), None);
        assert_eq!(
            map.inbound("site17/cmd/a"),
            m("local/cmd/a", QoS::ExactlyOnce)
        );
        assert_eq!(map.inbound("site17/sensors/a"), None);
        assert_eq!(map.outbound("l/shared/x"), m("r/shared/x", QoS::AtMostOnce));
        assert_eq!(map.inbound("r/shared/x"), m("l/shared/x", QoS::AtMostOnce));
        assert_eq!(map.outbound("$SYS/x"), None);
        assert_eq!(map.out_qos("sensors/t"), Some(QoS::AtLeastOnce));
        assert_eq!(map.out_qos("cmd/a"), None);
        assert_eq!(
            map.subscriptions(),
            [
                ("site17/cmd/+".to_owned(), QoS::ExactlyOnce),
                ("r/shared/x".to_owned(), QoS::AtMostOnce)
            ]
        );
    }

    #[test]
    fn the_first_entry_that_selects_wins() {
        let map = TopicMap::new(&[
            entry(Direction::Out, "a/b", "", "first/", 0),
            entry(Direction::Out, "a/#", "", "second/", 2),
        ]);
        assert_eq!(map.outbound("a/b").unwrap().topic, "first/a/b");
        assert_eq!(map.outbound("a/c").unwrap().topic, "second/a/c");
    }

    fn level() -> impl Strategy<Value = String> {
        "[a-c]{0,2}"
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..5).prop_map(|l| l.join("/"))
    }

    fn prefix() -> impl Strategy<Value = String> {
        prop::collection::vec("[a-c]{1,2}", 0..3)
            .prop_map(|l| l.iter().map(|s| format!("{s}/")).collect())
    }

    proptest! {
        /// A topic sent out and received back by the same map (a two-way entry) reads as it
        /// was, and every mapped name is a valid topic name.
        #[test]
        fn both_ways_round_trip(t in topic(), local in prefix(), remote in prefix()) {
            let map = TopicMap::new(&[entry(Direction::Both, "#", &local, &remote, 2)]);
            let full = format!("{local}{t}");
            prop_assume!(TopicName::new(&full).is_ok());
            let Some(out) = map.outbound(&full) else {
                // Only the local prefix alone, with no remote prefix, has no remote name.
                prop_assert!(t.is_empty() && remote.is_empty());
                return Ok(());
            };
            prop_assert!(TopicName::new(&out.topic).is_ok());
            prop_assert_eq!(out.topic.clone(), format!("{remote}{t}"));
            let back = map.inbound(&out.topic).unwrap();
            prop_assert_eq!(back.topic, full);
        }

        /// What goes out is what the local pattern selects, under a name the remote
        /// pattern selects.
        #[test]
        fn selection_follows_the_patterns(t in topic(), local in prefix(), remote in prefix()) {
            let filter = "+/#";
            let map = TopicMap::new(&[entry(Direction::Out, filter, &local, &remote, 1)]);
            prop_assume!(TopicName::new(&t).is_ok());
            let local_pattern = format!("{local}{filter}");
            prop_assert!(TopicFilter::new(&local_pattern).is_ok());
            prop_assert_eq!(map.out_qos(&t).is_some(), map.outbound(&t).is_some());
            match map.outbound(&t) {
                Some(m) => {
                    prop_assert!(filter_matches(&local_pattern, &t));
                    let remote_pattern = format!("{remote}{filter}");
                    prop_assert!(filter_matches(&remote_pattern, &m.topic));
                }
                None => prop_assert!(
                    !filter_matches(&local_pattern, &t)
                        || !t.starts_with(&local)
                        || (t == local && remote.is_empty())
                ),
            }
        }
    }
}
