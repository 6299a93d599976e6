//! Subscription index, shared subscription groups, retained messages and fan-out.
//!
//! A pure data structure: no sockets, no plugins. Publishing takes a read lock on the
//! subscription trie (std `RwLock`, never held across an await), matches the topic level by
//! level, merges the matches of each session into one delivery and pushes it into that
//! session's [`Mailbox`].

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use crate::codec::{QoS, SubscriptionOptions, TopicFilter};
use crate::mailbox::{Mailbox, Pushed};
use crate::message::{ClientKey, Delivery, Message};
use crate::store::{Op, Store, record};

/// A session as the router sees it: its key and its mailbox.
#[derive(Debug, Clone)]
pub struct Subscriber {
    /// The session's key.
    pub key: ClientKey,
    /// Where its deliveries go.
    pub mailbox: Arc<Mailbox>,
}

#[derive(Debug, Clone)]
struct Entry {
    sub: Subscriber,
    options: SubscriptionOptions,
    id: Option<NonZeroU32>,
}

#[derive(Debug)]
struct SharedGroup {
    filter: TopicFilter,
    members: Vec<Entry>,
    next: AtomicUsize,
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    entries: Vec<Entry>,
    shared: Vec<SharedGroup>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.entries.is_empty() && self.shared.is_empty()
    }
}

#[derive(Debug, Default)]
struct RetainedNode {
    children: HashMap<Box<str>, RetainedNode>,
    msg: Option<Arc<Message>>,
}

/// What routing one message did.
#[derive(Debug, Clone, Default)]
pub struct Routed {
    /// Sessions it was queued for.
    pub delivered: usize,
    /// The store ticket to wait for before acknowledging (persistent recipients or a
    /// retained message were written).
    pub ticket: Option<u64>,
    /// A recipient whose queue is half full: the publisher should wait for room.
    pub congested: Option<Arc<Mailbox>>,
}

impl Routed {
    fn add(&mut self, mailbox: &Arc<Mailbox>, pushed: Result<Pushed, crate::mailbox::Refused>) {
        if let Ok(p) = pushed {
            self.delivered += 1;
            self.ticket = self.ticket.max(p.ticket);
            if p.congested && self.congested.is_none() {
                self.congested = Some(mailbox.clone());
            }
        }
    }
}

/// The router of one broker.
#[derive(Debug, Default)]
pub struct Router {
    trie: RwLock<Node>,
    retained: RwLock<RetainedNode>,
    store: Option<Arc<Store>>,
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    // Every mutation below completes without panicking points in between, so a poisoned
    // lock still guards a consistent structure.
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

impl Router {
    /// An empty router.
    pub fn new() -> Router {
        Router::default()
    }

    /// An empty router that writes retained messages to `store`.
    pub fn with_store(store: Arc<Store>) -> Router {
        Router {
            store: Some(store),
            ..Router::default()
        }
    }

    /// Adds or replaces the subscription of `sub` to `filter`. Returns true if it is new
    /// (MQTT 5 Retain Handling 1 sends retained messages only then).
    pub fn subscribe(
        &self,
        sub: &Subscriber,
        filter: &TopicFilter,
        options: SubscriptionOptions,
        id: Option<NonZeroU32>,
    ) -> bool {
        let entry = Entry {
            sub: sub.clone(),
            options,
            id,
        };
        let mut root = write(&self.trie);
        let mut node = &mut *root;
        for level in filter.filter().split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        let list = match filter.share_group() {
            None => &mut node.entries,
            Some(_) => {
                let pos = node.shared.iter().position(|g| g.filter == *filter);
                let idx = match pos {
                    Some(i) => i,
                    None => {
                        node.shared.push(SharedGroup {
                            filter: filter.clone(),
                            members: Vec::new(),
                            next: AtomicUsize::new(0),
                        });
                        node.shared.len() - 1
                    }
                };
                match node.shared.get_mut(idx) {
                    Some(g) => &mut g.members,
                    None => return false,
                }
            }
        };
        match list.iter_mut().find(|e| e.sub.key == sub.key) {
            Some(existing) => {
                *existing = entry;
                false
            }
            None => {
                list.push(entry);
                true
            }
        }
    }

    /// Removes the subscription of `key` to `filter`; true if it existed.
    pub fn unsubscribe(&self, key: ClientKey, filter: &TopicFilter) -> bool {
        let mut root = write(&self.trie);
        let levels: Vec<&str> = filter.filter().split('/').collect();
        remove(&mut root, &levels, filter, key)
    }

    /// Stores the message if it is retained, then routes it.
    pub fn route(&self, msg: &Arc<Message>) -> Routed {
        let ticket = if msg.retain { self.retain(msg) } else { None };
        let mut r = self.publish(msg);
        r.ticket = r.ticket.max(ticket);
        r
    }

    /// Routes a message to every matching session.
    pub fn publish(&self, msg: &Arc<Message>) -> Routed {
        let root = read(&self.trie);
        let mut matches: Vec<&Entry> = Vec::new();
        let mut groups: Vec<&SharedGroup> = Vec::new();
        let topic = msg.topic.as_str();
        collect(&root, topic, true, &mut matches, &mut groups);

        let mut routed = Routed::default();
        if matches.len() > 1 {
            matches.sort_by_key(|e| e.sub.key);
        }
        let mut i = 0;
        while i < matches.len() {
            let key = matches.get(i).map(|e| e.sub.key);
            let mut j = i;
            let mut qos: Option<QoS> = None;
            let mut retain = false;
            let mut ids = Vec::new();
            while let Some(e) = matches.get(j).filter(|e| Some(e.sub.key) == key) {
                j += 1;
                if e.options.no_local && e.sub.key == msg.origin {
                    continue;
                }
                let q = msg.qos.min(e.options.qos);
                qos = Some(qos.map_or(q, |x| x.max(q)));
                retain |= e.options.retain_as_published && msg.retain;
                if let Some(id) = e.id {
                    ids.push(id);
                }
            }
            if let (Some(qos), Some(first)) = (qos, matches.get(i)) {
                let d = Delivery {
                    msg: msg.clone(),
                    qos,
                    retain,
                    sub_ids: ids,
                    shared: None,
                    store_id: None,
                    hooked: false,
                };
                routed.add(&first.sub.mailbox, first.sub.mailbox.push(d));
            }
            i = j;
        }

        for g in groups {
            if let Some(e) = pick_member(g, None) {
                let d = Delivery {
                    msg: msg.clone(),
                    qos: msg.qos.min(e.options.qos),
                    retain: e.options.retain_as_published && msg.retain,
                    sub_ids: e.id.into_iter().collect(),
                    shared: Some(g.filter.clone()),
                    store_id: None,
                    hooked: false,
                };
                routed.add(&e.sub.mailbox, e.sub.mailbox.push(d));
            }
        }
        routed
    }

    /// Hands a delivery of the shared subscription `filter` to a member other than
    /// `exclude`, preferring connected ones. Gives the delivery back if there is none.
    pub fn redeliver_shared(&self, mut d: Delivery, exclude: ClientKey) -> Result<(), Delivery> {
        let Some(filter) = d.shared.clone() else {
            return Err(d);
        };
        let root = read(&self.trie);
        let mut node = &*root;
        for level in filter.filter().split('/') {
            match node.children.get(level) {
                Some(n) => node = n,
                None => return Err(d),
            }
        }
        let Some(g) = node.shared.iter().find(|g| g.filter == filter) else {
            return Err(d);
        };
        let Some(e) = pick_member(g, Some(exclude)) else {
            return Err(d);
        };
        if !e.sub.mailbox.is_online() {
            return Err(d);
        }
        d.qos = d.msg.qos.min(e.options.qos);
        d.sub_ids = e.id.into_iter().collect();
        d.store_id = None;
        e.sub.mailbox.push(d.clone()).map(|_| ()).map_err(|_| d)
    }

    /// Stores a retained message, or clears the topic's retained message when the payload
    /// is empty (MQTT-3.3.1-10/11), in memory and in the store. Returns the store ticket.
    pub fn retain(&self, msg: &Arc<Message>) -> Option<u64> {
        self.retain_in_memory(msg);
        let store = self.store.as_ref()?;
        let topic: Arc<str> = Arc::from(msg.topic.as_str());
        if msg.payload.is_empty() {
            store.submit_one(Op::DeleteRetained(topic))
        } else {
            match record::encode_retained(msg) {
                Ok(bytes) => store.submit_one(Op::PutRetained(topic, bytes)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot store a retained message");
                    None
                }
            }
        }
    }

    /// Stores or clears a retained message in memory only (used at start, for messages read
    /// from the store).
    pub fn retain_in_memory(&self, msg: &Arc<Message>) {
        let mut root = write(&self.retained);
        if msg.payload.is_empty() {
            let levels: Vec<&str> = msg.topic.as_str().split('/').collect();
            remove_retained(&mut root, &levels);
        } else {
            let mut node = &mut *root;
            for level in msg.topic.as_str().split('/') {
                node = node.children.entry(level.into()).or_default();
            }
            node.msg = Some(msg.clone());
        }
    }

    /// The retained messages whose topics match `filter` (without share prefix), skipping
    /// expired ones.
    pub fn retained_matching(&self, filter: &str, now: Instant) -> Vec<Arc<Message>> {
        let root = read(&self.retained);
        let levels: Vec<&str> = filter.split('/').collect();
        let mut out = Vec::new();
        collect_retained(&root, &levels, true, &mut out);
        out.retain(|m| !m.is_expired(now));
        out
    }

    /// Number of retained messages (for tests and metrics).
    pub fn retained_count(&self) -> usize {
        fn count(n: &RetainedNode) -> usize {
            usize::from(n.msg.is_some()) + n.children.values().map(count).sum::<usize>()
        }
        count(&read(&self.retained))
    }
}

fn pick_member(g: &SharedGroup, exclude: Option<ClientKey>) -> Option<&Entry> {
    let n = g.members.len();
    if n == 0 {
        return None;
    }
    let start = g.next.fetch_add(1, Ordering::Relaxed) % n;
    let candidates = || {
        (0..n)
            .filter_map(move |k| g.members.get((start + k) % n))
            .filter(move |e| Some(e.sub.key) != exclude)
    };
    candidates()
        .find(|e| e.sub.mailbox.is_online())
        .or_else(|| candidates().next())
}

/// Walks the trie for `topic`; `root` is true at the first level, where `$` topics are not
/// matched by wildcards (MQTT-4.7.2-1).
fn collect<'a>(
    node: &'a Node,
    topic: &str,
    root: bool,
    matches: &mut Vec<&'a Entry>,
    groups: &mut Vec<&'a SharedGroup>,
) {
    let (level, rest) = match topic.split_once('/') {
        Some((l, r)) => (l, Some(r)),
        None => (topic, None),
    };
    let wildcards = !(root && level.starts_with('$'));
    if wildcards && let Some(hash) = node.children.get("#") {
        matches.extend(hash.entries.iter());
        groups.extend(hash.shared.iter());
    }
    let mut visit = |child: &'a Node| match rest {
        Some(r) => collect(child, r, false, matches, groups),
        None => {
            matches.extend(child.entries.iter());
            groups.extend(child.shared.iter());
            // "a/#" also matches "a" (MQTT-4.7.1-2).
            if let Some(hash) = child.children.get("#") {
                matches.extend(hash.entries.iter());
                groups.extend(hash.shared.iter());
            }
        }
    };
    if let Some(child) = node.children.get(level) {
        visit(child);
    }
    if wildcards && let Some(plus) = node.children.get("+") {
        visit(plus);
    }
}

fn remove(node: &mut Node, levels: &[&str], filter: &TopicFilter, key: ClientKey) -> bool {
    match levels.split_first() {
        None => match filter.share_group() {
            None => {
                let before = node.entries.len();
                node.entries.retain(|e| e.sub.key != key);
                before != node.entries.len()
            }
            Some(_) => {
                let mut removed = false;
                for g in node.shared.iter_mut().filter(|g| g.filter == *filter) {
                    let before = g.members.len();
                    g.members.retain(|e| e.sub.key != key);
                    removed |= before != g.members.len();
                }
                node.shared.retain(|g| !g.members.is_empty());
                removed
            }
        },
        Some((first, rest)) => {
            let Some(child) = node.children.get_mut(*first) else {
                return false;
            };
            let removed = remove(child, rest, filter, key);
            if child.is_empty() {
                node.children.remove(*first);
            }
            removed
        }
    }
}

fn remove_retained(node: &mut RetainedNode, levels: &[&str]) {
    match levels.split_first() {
        None => node.msg = None,
        Some((first, rest)) => {
            if let Some(child) = node.children.get_mut(*first) {
                remove_retained(child, rest);
                if child.msg.is_none() && child.children.is_empty() {
                    node.children.remove(*first);
                }
            }
        }
    }
}

fn collect_retained(node: &RetainedNode, levels: &[&str], root: bool, out: &mut Vec<Arc<Message>>) {
    fn all(node: &RetainedNode, out: &mut Vec<Arc<Message>>) {
        out.extend(node.msg.iter().cloned());
        for c in node.children.values() {
            all(c, out);
        }
    }
    let Some((first, rest)) = levels.split_first() else {
        out.extend(node.msg.iter().cloned());
        return;
    };
    match *first {
        "#" => {
            // "a/#" matches "a" itself too; at the root, never `$` topics.
            if !root {
                out.extend(node.msg.iter().cloned());
            }
            for (name, c) in &node.children {
                if !(root && name.starts_with('$')) {
                    all(c, out);
                }
            }
        }
        "+" => {
            for (name, c) in &node.children {
                if !(root && name.starts_with('$')) {
                    collect_retained(c, rest, false, out);
                }
            }
        }
        level => {
            if let Some(c) = node.children.get(level) {
                collect_retained(c, rest, false, out);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::codec::{MessageProperties, TopicName, filter_matches};
    use crate::mailbox::QueueLimits;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn sub(key: ClientKey) -> Subscriber {
        let mailbox = Arc::new(Mailbox::new(QueueLimits {
            max_messages: 1000,
            max_bytes: 1 << 20,
            backpressure: true,
        }));
        mailbox.set_online(true);
        Subscriber { key, mailbox }
    }

    fn msg(topic: &str, qos: QoS) -> Arc<Message> {
        Arc::new(Message {
            topic: TopicName::new(topic).unwrap(),
            payload: Bytes::from_static(b"x"),
            qos,
            retain: false,
            properties: MessageProperties::default(),
            expires_at: None,
            origin: 0,
        })
    }

    fn drain(s: &Subscriber) -> Vec<Delivery> {
        let mut out = std::collections::VecDeque::new();
        s.mailbox.drain(&mut out, usize::MAX, usize::MAX);
        out.into_iter().collect()
    }

    #[test]
    fn overlapping_subscriptions_deliver_once_at_max_qos() {
        let r = Router::new();
        let s = sub(1);
        let f1 = TopicFilter::new("a/+").unwrap();
        let f2 = TopicFilter::new("a/#").unwrap();
        r.subscribe(
            &s,
            &f1,
            SubscriptionOptions::qos(QoS::AtMostOnce),
            NonZeroU32::new(1),
        );
        r.subscribe(
            &s,
            &f2,
            SubscriptionOptions::qos(QoS::AtLeastOnce),
            NonZeroU32::new(2),
        );
        assert_eq!(r.publish(&msg("a/b", QoS::ExactlyOnce)).delivered, 1);
        let got = drain(&s);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].qos, QoS::AtLeastOnce);
        let mut ids: Vec<u32> = got[0].sub_ids.iter().map(|i| i.get()).collect();
        ids.sort();
        assert_eq!(ids, vec![1, 2]);
    }

    #[test]
    fn dollar_topics_skip_leading_wildcards() {
        let r = Router::new();
        let s = sub(1);
        r.subscribe(
            &s,
            &TopicFilter::new("#").unwrap(),
            SubscriptionOptions::qos(QoS::AtMostOnce),
            None,
        );
        r.subscribe(
            &s,
            &TopicFilter::new("+/x").unwrap(),
            SubscriptionOptions::qos(QoS::AtMostOnce),
            None,
        );
        assert_eq!(r.publish(&msg("$SYS/x", QoS::AtMostOnce)).delivered, 0);
        r.subscribe(
            &s,
            &TopicFilter::new("$SYS/#").unwrap(),
            SubscriptionOptions::qos(QoS::AtMostOnce),
            None,
        );
        assert_eq!(r.publish(&msg("$SYS/x", QoS::AtMostOnce)).delivered, 1);
    }

    #[test]
    fn shared_group_delivers_to_one_member() {
        let r = Router::new();
        let a = sub(1);
        let b = sub(2);
        let f = TopicFilter::new("$share/g/t/#").unwrap();
        r.subscribe(&a, &f, SubscriptionOptions::qos(QoS::AtLeastOnce), None);
        r.subscribe(&b, &f, SubscriptionOptions::qos(QoS::AtLeastOnce), None);
        for _ in 0..10 {
            assert_eq!(r.publish(&msg("t/1", QoS::AtLeastOnce)).delivered, 1);
        }
        assert_eq!(drain(&a).len() + drain(&b).len(), 10);
    }

    #[test]
    fn unsubscribe_prunes() {
        let r = Router::new();
        let a = sub(1);
        let f = TopicFilter::new("a/b/c").unwrap();
        r.subscribe(&a, &f, SubscriptionOptions::qos(QoS::AtMostOnce), None);
        assert!(r.unsubscribe(1, &f));
        assert!(!r.unsubscribe(1, &f));
        assert!(read(&r.trie).is_empty());
    }

    #[test]
    fn retained_store_replace_clear() {
        let r = Router::new();
        let mut m = Message {
            topic: TopicName::new("a/b").unwrap(),
            payload: Bytes::from_static(b"1"),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: MessageProperties::default(),
            expires_at: None,
            origin: 0,
        };
        r.retain(&Arc::new(Message {
            payload: Bytes::from_static(b"1"),
            ..clone_msg(&m)
        }));
        r.retain(&Arc::new(Message {
            payload: Bytes::from_static(b"2"),
            ..clone_msg(&m)
        }));
        let got = r.retained_matching("a/#", Instant::now());
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0].payload[..], b"2");
        m.payload = Bytes::new();
        r.retain(&Arc::new(m));
        assert_eq!(r.retained_count(), 0);
    }

    fn clone_msg(m: &Message) -> Message {
        Message {
            topic: m.topic.clone(),
            payload: m.payload.clone(),
            qos: m.qos,
            retain: m.retain,
            properties: m.properties.clone(),
            expires_at: m.expires_at,
            origin: m.origin,
        }
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![Just("a"), Just("b"), Just("$c"), Just("")].prop_map(String::from)
    }

    proptest! {
        /// The trie agrees with the reference matcher for every filter/topic pair.
        #[test]
        fn trie_matches_like_reference(
            topic in prop::collection::vec(level(), 1..4),
            filter in prop::collection::vec(prop_oneof![level(), Just("+".to_string())], 1..4),
            hash in any::<bool>(),
        ) {
            let topic = topic.join("/");
            let mut filter = filter.join("/");
            if hash { filter.push_str("/#"); }
            let (Ok(t), Ok(f)) = (TopicName::new(&topic), TopicFilter::new(&filter)) else {
                return Ok(());
            };
            let r = Router::new();
            let s = sub(1);
            r.subscribe(&s, &f, SubscriptionOptions::qos(QoS::AtMostOnce), None);
            let m = msg(t.as_str(), QoS::AtMostOnce);
            prop_assert_eq!(r.publish(&m).delivered == 1, filter_matches(&filter, &topic));
            let rr = Router::new();
            let mut stored = clone_msg(&m);
            stored.retain = true;
            rr.retain(&Arc::new(stored));
            prop_assert_eq!(
                rr.retained_matching(&filter, Instant::now()).len() == 1,
                filter_matches(&filter, &topic)
            );
        }
    }
}
