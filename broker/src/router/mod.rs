//! Subscription index, shared subscription groups, retained messages and fan-out.
//!
//! A pure data structure: no sockets, no plugins. Publishing takes a read lock on the
//! subscription trie (std `RwLock`, never held across an await), matches the topic level by
//! level, merges the matches of each session into one delivery and pushes it into that
//! session's [`Mailbox`].

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use smallvec::SmallVec;

use crate::codec::{QoS, SubscriptionOptions, TopicFilter};
use crate::mailbox::{Mailbox, Pushed};
use crate::message::{ClientKey, Delivery, Message};
use crate::store::Store;

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

/// The children of a tree node by topic level. Every PUBLISH looks up three of them per
/// level (the level, `+`, `#`): the hasher is foldhash's, seeded per process.
type Children<N> = std::collections::HashMap<Box<str>, N, TreeHasher>;

/// foldhash with the process's random seed and no seed of its own: zero-sized, so a map
/// there are many of (a child map in every tree node, a subscription map in every session)
/// does not carry 16 bytes of `RandomState`.
#[derive(Clone, Copy, Debug, Default)]
pub struct TreeHasher;

impl std::hash::BuildHasher for TreeHasher {
    type Hasher = foldhash::fast::FoldHasher<'static>;

    fn build_hasher(&self) -> Self::Hasher {
        foldhash::fast::FoldHasher::with_seed(0, foldhash::SharedSeed::global_random())
    }
}

#[derive(Debug, Default)]
struct Node {
    children: Children<Node>,
    entries: Vec<Entry>,
    shared: Groups,
}

/// A node's shared groups: a pointer, not a `Vec`, in the many nodes that have none (a
/// node is a slot of its parent's child map, and a map of a thousand children has 2,048
/// slots: each byte of a node counts twice per subscription under it).
#[derive(Debug, Default)]
#[expect(
    clippy::box_collection,
    reason = "a thin pointer in every node; the list's own allocation only where groups are"
)]
struct Groups(Option<Box<Vec<SharedGroup>>>);

impl Groups {
    fn push(&mut self, g: SharedGroup) {
        self.0.get_or_insert_default().push(g);
    }

    /// Keeps the groups `keep` says yes to (frees the list once none is left).
    fn retain(&mut self, keep: impl FnMut(&SharedGroup) -> bool) {
        if let Some(v) = &mut self.0 {
            v.retain(keep);
            if v.is_empty() {
                self.0 = None;
            }
        }
    }
}

impl std::ops::Deref for Groups {
    type Target = [SharedGroup];
    fn deref(&self) -> &[SharedGroup] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }
}

impl std::ops::DerefMut for Groups {
    fn deref_mut(&mut self) -> &mut [SharedGroup] {
        match &mut self.0 {
            Some(v) => v.as_mut_slice(),
            None => &mut [],
        }
    }
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.entries.is_empty() && self.shared.is_empty()
    }

    /// Whether the node holds anything but the one child on a path through it.
    fn holds_more_than_one_child(&self) -> bool {
        !self.entries.is_empty() || !self.shared.is_empty() || self.children.len() > 1
    }
}

/// Trees as deep as a topic has levels are dropped level by level: the derived drop would
/// recurse once per level, and a deep enough tree would overflow the stack.
macro_rules! drop_iteratively {
    ($node:ty) => {
        impl Drop for $node {
            fn drop(&mut self) {
                if self.children.is_empty() {
                    return;
                }
                let mut stack: Vec<$node> = self.children.drain().map(|(_, n)| n).collect();
                while let Some(mut n) = stack.pop() {
                    stack.extend(n.children.drain().map(|(_, c)| c));
                }
            }
        }
    };
}

drop_iteratively!(Node);
drop_iteratively!(RetainedNode);

#[derive(Debug, Default)]
struct RetainedNode {
    children: Children<RetainedNode>,
    msg: Option<Arc<Message>>,
}

/// The retained messages: a tree by topic level, and what it holds.
#[derive(Debug, Default)]
struct Retained {
    root: RetainedNode,
    /// Messages held.
    count: usize,
    /// Their size ([`Message::size`]).
    bytes: usize,
}

/// Bounds of the retained store (`[mqtt] max_retained_messages`, `max_retained_bytes`).
#[derive(Debug, Clone, Copy)]
pub struct RetainLimits {
    /// Most retained messages.
    pub max_messages: usize,
    /// Most bytes of retained messages.
    pub max_bytes: usize,
}

impl Default for RetainLimits {
    fn default() -> Self {
        RetainLimits {
            max_messages: usize::MAX,
            max_bytes: usize::MAX,
        }
    }
}

/// The retained store is full: the message was not retained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainedFull;

/// The retained store's limits in force (a configuration reload changes them).
#[derive(Debug)]
struct LiveRetainLimits {
    max_messages: AtomicUsize,
    max_bytes: AtomicUsize,
}

impl LiveRetainLimits {
    fn new(l: RetainLimits) -> LiveRetainLimits {
        LiveRetainLimits {
            max_messages: AtomicUsize::new(l.max_messages),
            max_bytes: AtomicUsize::new(l.max_bytes),
        }
    }
}

impl Default for LiveRetainLimits {
    fn default() -> Self {
        LiveRetainLimits::new(RetainLimits::default())
    }
}

/// The topic's levels, on the stack for the usual depths.
type Levels<'a> = SmallVec<[&'a str; 16]>;

/// What routing one message did.
#[derive(Debug, Clone, Default)]
pub struct Routed {
    /// Sessions it was queued for.
    pub delivered: usize,
    /// A retained message the full retained store did not keep (it was still routed).
    pub not_retained: bool,
    /// The store ticket to wait for before acknowledging (persistent recipients or a
    /// retained message were written).
    pub ticket: Option<u64>,
    /// The cluster's ticket to wait for as well (added by the pipeline: a QoS 1/2 message
    /// for other nodes is acknowledged once JetStream holds it).
    pub replicated: Option<u64>,
    /// A recipient whose queue is half full (or, added by the pipeline, a bridge behind):
    /// the publisher should wait for room.
    pub congested: Option<Arc<dyn crate::mailbox::Room>>,
}

/// Which of a matching shared subscription's members a routing serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serve {
    /// None: another node of the cluster serves the group.
    No,
    /// One member, a connected one if there is one.
    Any,
    /// One connected member; none connected: the group is given back.
    Online,
}

impl Routed {
    /// Adds what another routing of the same message did.
    pub fn merge(&mut self, other: Routed) {
        self.delivered += other.delivered;
        self.ticket = self.ticket.max(other.ticket);
        self.replicated = self.replicated.max(other.replicated);
        if self.congested.is_none() {
            self.congested = other.congested;
        }
    }

    fn add(&mut self, mailbox: &Arc<Mailbox>, pushed: Result<Pushed, crate::mailbox::Refused>) {
        if let Ok(p) = pushed {
            self.delivered += 1;
            self.ticket = self.ticket.max(p.ticket);
            if p.congested && self.congested.is_none() {
                let room: Arc<dyn crate::mailbox::Room> = mailbox.clone();
                self.congested = Some(room);
            }
        }
    }
}

/// The router of one broker.
#[derive(Debug, Default)]
pub struct Router {
    trie: RwLock<Node>,
    retained: RwLock<Retained>,
    retain_limits: LiveRetainLimits,
    store: Option<Arc<Store>>,
    /// Subscriptions held (shared ones count once per member).
    subscriptions: AtomicUsize,
    /// Shared subscription groups.
    shared_groups: AtomicUsize,
    /// Told of every subscription made and removed (the cluster).
    interest: std::sync::OnceLock<Arc<dyn Interest>>,
}

/// What wants to know which filters the sessions subscribe to: the cluster, which tells
/// the other nodes. Called after the change, outside the router's lock, once per
/// subscription made or removed (a replaced one is neither).
pub trait Interest: Send + Sync + std::fmt::Debug {
    /// A subscription to `filter` was made: the topic filter, or the whole
    /// `$share/GROUP/FILTER` of a shared subscription (one per group and filter).
    fn subscribed(&self, filter: &str);
    /// A subscription to `filter` was removed.
    fn unsubscribed(&self, filter: &str);
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

    /// An empty router that writes retained messages to `store` and keeps at most what
    /// `limits` allow.
    pub fn with_store(store: Arc<Store>, limits: RetainLimits) -> Router {
        Router {
            store: Some(store),
            retain_limits: LiveRetainLimits::new(limits),
            ..Router::default()
        }
    }

    /// Tells `interest` of every subscription made or removed from now on (set once,
    /// before any session subscribes).
    pub fn set_interest(&self, interest: Arc<dyn Interest>) {
        let _ = self.interest.set(interest);
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
        let new = self.subscribe_in_trie(sub, filter, options, id);
        if new && let Some(i) = self.interest.get() {
            i.subscribed(filter.as_str());
        }
        new
    }

    fn subscribe_in_trie(
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
                        self.shared_groups.fetch_add(1, Ordering::Relaxed);
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
                if list.is_empty() {
                    // Most filters have one subscriber: room for exactly one (a first push
                    // would make room for four, three of them never used, on every node).
                    list.reserve_exact(1);
                }
                list.push(entry);
                self.subscriptions.fetch_add(1, Ordering::Relaxed);
                true
            }
        }
    }

    /// Wakes the mailbox of every subscriber (each once per subscription it holds). Walks
    /// the whole trie with a stack of its own, under the read lock; for rare events (a
    /// change of the policy that granted the subscriptions), not for the way of a message.
    pub fn wake_subscribers(&self) {
        let trie = read(&self.trie);
        let mut stack: Vec<&Node> = vec![&trie];
        while let Some(node) = stack.pop() {
            for e in &node.entries {
                e.sub.mailbox.wake();
            }
            for g in node.shared.iter() {
                for e in &g.members {
                    e.sub.mailbox.wake();
                }
            }
            stack.extend(node.children.values());
        }
    }

    /// Subscriptions held and shared groups, for metrics.
    pub fn subscription_counts(&self) -> (usize, usize) {
        (
            self.subscriptions.load(Ordering::Relaxed),
            self.shared_groups.load(Ordering::Relaxed),
        )
    }

    /// Removes the subscription of `key` to `filter`; true if it existed. Nodes left empty
    /// are cut off where the path stops holding anything else.
    pub fn unsubscribe(&self, key: ClientKey, filter: &TopicFilter) -> bool {
        let removed = self.unsubscribe_in_trie(key, filter);
        if removed && let Some(i) = self.interest.get() {
            i.unsubscribed(filter.as_str());
        }
        removed
    }

    fn unsubscribe_in_trie(&self, key: ClientKey, filter: &TopicFilter) -> bool {
        let levels: Levels<'_> = filter.filter().split('/').collect();
        let mut root = write(&self.trie);
        // The deepest node on the path that stays whatever happens below it.
        let mut keep = 0;
        let mut node = &*root;
        for (depth, level) in levels.iter().enumerate() {
            if depth > 0 && node.holds_more_than_one_child() {
                keep = depth;
            }
            match node.children.get(*level) {
                Some(c) => node = c,
                None => return false,
            }
        }
        let mut leaf = &mut *root;
        for level in &levels {
            match leaf.children.get_mut(*level) {
                Some(c) => leaf = c,
                None => return false,
            }
        }
        let removed = match filter.share_group() {
            None => {
                let before = leaf.entries.len();
                leaf.entries.retain(|e| e.sub.key != key);
                before != leaf.entries.len()
            }
            Some(_) => {
                let mut removed = false;
                for g in leaf.shared.iter_mut().filter(|g| g.filter == *filter) {
                    let before = g.members.len();
                    g.members.retain(|e| e.sub.key != key);
                    removed |= before != g.members.len();
                }
                let groups = leaf.shared.len();
                leaf.shared.retain(|g| !g.members.is_empty());
                let gone = groups - leaf.shared.len();
                self.shared_groups.fetch_sub(gone, Ordering::Relaxed);
                removed
            }
        };
        if leaf.is_empty() {
            cut(&mut root, &levels, keep);
        }
        if removed {
            self.subscriptions.fetch_sub(1, Ordering::Relaxed);
        }
        removed
    }

    /// Stores the message if it is retained (and the retained store has room), then
    /// routes it.
    pub fn route(&self, msg: &Arc<Message>) -> Routed {
        self.route_sharing(msg, |_| true)
    }

    /// [`Router::route`], serving only the shared subscriptions `serve` says yes to (the
    /// others are served by other nodes of the cluster).
    pub fn route_sharing(
        &self,
        msg: &Arc<Message>,
        serve: impl Fn(&TopicFilter) -> bool,
    ) -> Routed {
        let (ticket, not_retained) = match msg.retain {
            true => match self.retain(msg) {
                Ok(t) => (t, false),
                Err(RetainedFull) => (None, true),
            },
            false => (None, false),
        };
        let mut r = self.publish_sharing(msg, serve);
        r.ticket = r.ticket.max(ticket);
        r.not_retained = not_retained;
        r
    }

    /// Routes a message to every matching session.
    pub fn publish(&self, msg: &Arc<Message>) -> Routed {
        self.publish_sharing(msg, |_| true)
    }

    /// Routes a message to every matching session, and to one member of each matching
    /// shared subscription `serve` says yes to.
    pub fn publish_sharing(
        &self,
        msg: &Arc<Message>,
        serve: impl Fn(&TopicFilter) -> bool,
    ) -> Routed {
        let serve = |g: &TopicFilter| match serve(g) {
            true => Serve::Any,
            false => Serve::No,
        };
        self.publish_serving(msg, true, serve, &mut Vec::new())
    }

    /// Routes a message from another node: to every matching session if `plain`, and to
    /// one member of each matching shared subscription as `serve` says; the groups
    /// `Serve::Online` found no connected member of go to `asleep`.
    pub fn publish_serving(
        &self,
        msg: &Arc<Message>,
        plain: bool,
        serve: impl Fn(&TopicFilter) -> Serve,
        asleep: &mut Vec<TopicFilter>,
    ) -> Routed {
        let root = read(&self.trie);
        let mut matches: Vec<&Entry> = Vec::new();
        let mut groups: Vec<&SharedGroup> = Vec::new();
        let topic = msg.topic.as_str();
        collect(&root, topic, &mut matches, &mut groups);

        let mut routed = Routed::default();
        if !plain {
            matches.clear();
        }
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
                if e.options.no_local && msg.publisher == Some(e.sub.key) {
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
            let how = serve(&g.filter);
            if how == Serve::No {
                continue;
            }
            let picked = pick_member(g, None);
            if how == Serve::Online && !picked.is_some_and(|e| e.sub.mailbox.is_online()) {
                asleep.push(g.filter.clone());
                continue;
            }
            if let Some(e) = picked {
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

    /// Whether routing `msg` would write to the store: a persistent session subscribes to
    /// its topic (shared groups included). Used only while the store cannot write.
    pub fn reaches_persistent(&self, msg: &Message) -> bool {
        let root = read(&self.trie);
        let mut matches: Vec<&Entry> = Vec::new();
        let mut groups: Vec<&SharedGroup> = Vec::new();
        collect(&root, msg.topic.as_str(), &mut matches, &mut groups);
        matches.iter().any(|e| e.sub.mailbox.is_persistent())
            || (groups.iter()).any(|g| g.members.iter().any(|e| e.sub.mailbox.is_persistent()))
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
    /// is empty (MQTT-3.3.1-10/11), in memory and in the store. Returns the store ticket,
    /// or [`RetainedFull`] when keeping it would pass the retained store's limits.
    pub fn retain(&self, msg: &Arc<Message>) -> Result<Option<u64>, RetainedFull> {
        self.retain_in_memory(msg)?;
        let Some(store) = self.store.as_ref() else {
            return Ok(None);
        };
        if msg.payload.is_empty() {
            return Ok(store.delete_retained(msg.topic.as_str()));
        }
        Ok(store.save_retained(msg))
    }

    /// Puts new retained-store limits in force: messages kept beyond lower ones stay, and
    /// no new topic is kept until the store is under them.
    pub fn set_retain_limits(&self, limits: RetainLimits) {
        self.retain_limits
            .max_messages
            .store(limits.max_messages, Ordering::Relaxed);
        self.retain_limits
            .max_bytes
            .store(limits.max_bytes, Ordering::Relaxed);
    }

    /// Whether the retained store has room for `msg` (a replacement counts only what it
    /// adds; clearing a topic always fits). A publisher is refused on this answer; the
    /// store itself checks again when the message is kept.
    pub fn retain_room(&self, msg: &Message) -> bool {
        if msg.payload.is_empty() {
            return true;
        }
        let r = read(&self.retained);
        let old = find_retained(&r.root, msg.topic.as_str()).map_or(0, |m| m.size());
        self.fits(&r, msg, old)
    }

    fn fits(&self, r: &Retained, msg: &Message, old: usize) -> bool {
        let count = r.count + usize::from(old == 0);
        let bytes = (r.bytes - old.min(r.bytes)).saturating_add(msg.size());
        count <= self.retain_limits.max_messages.load(Ordering::Relaxed)
            && bytes <= self.retain_limits.max_bytes.load(Ordering::Relaxed)
    }

    /// Keeps the broker's own `$SYS` message in memory, outside the retained store's
    /// counts and limits (only the broker publishes under `$SYS/`).
    pub fn retain_system(&self, msg: &Arc<Message>) {
        let mut r = write(&self.retained);
        let mut node = &mut r.root;
        for level in msg.topic.as_str().split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        node.msg = Some(msg.clone());
    }

    /// Stores or clears a retained message in memory only (also used at start, for
    /// messages read from the store).
    pub fn retain_in_memory(&self, msg: &Arc<Message>) -> Result<(), RetainedFull> {
        let topic = msg.topic.as_str();
        let levels: Levels<'_> = topic.split('/').collect();
        let mut r = write(&self.retained);
        let old = find_retained(&r.root, topic).map_or(0, |m| m.size());
        if msg.payload.is_empty() {
            if old > 0 && remove_retained(&mut r.root, &levels) {
                r.count -= 1;
                r.bytes = r.bytes.saturating_sub(old);
            }
            return Ok(());
        }
        if !self.fits(&r, msg, old) {
            return Err(RetainedFull);
        }
        let mut node = &mut r.root;
        for level in &levels {
            node = node.children.entry((*level).into()).or_default();
        }
        node.msg = Some(msg.clone());
        if old == 0 {
            r.count += 1;
        }
        r.bytes = r.bytes.saturating_sub(old).saturating_add(msg.size());
        Ok(())
    }

    /// Calls `visit` with each retained message whose topic matches `filter` (without
    /// share prefix) and that has not expired at `now`, until `visit` answers false. The
    /// walk keeps its own stack, so no depth of topics can exhaust the thread's; the read
    /// lock is held throughout, so `visit` must be quick.
    pub fn for_each_retained(
        &self,
        filter: &str,
        now: Instant,
        mut visit: impl FnMut(&Arc<Message>) -> bool,
    ) {
        let levels: Levels<'_> = filter.split('/').collect();
        let r = read(&self.retained);
        let mut emit = |n: &RetainedNode| match &n.msg {
            Some(m) if !m.is_expired(now) => visit(m),
            _ => true,
        };
        let mut stack: SmallVec<[(&RetainedNode, usize); 16]> = SmallVec::new();
        stack.push((&r.root, 0));
        while let Some((node, i)) = stack.pop() {
            // At the root, wildcards never match `$` topics (MQTT-4.7.2-1).
            let visible = |name: &str| !(i == 0 && name.starts_with('$'));
            match levels.get(i).copied() {
                None => {
                    if !emit(node) {
                        return;
                    }
                }
                Some("#") => {
                    // "a/#" matches "a" itself too.
                    if i > 0 && !emit(node) {
                        return;
                    }
                    let mut below: Vec<&RetainedNode> = (node.children.iter())
                        .filter(|(name, _)| visible(name))
                        .map(|(_, c)| c)
                        .collect();
                    while let Some(n) = below.pop() {
                        if !emit(n) {
                            return;
                        }
                        below.extend(n.children.values());
                    }
                }
                Some("+") => {
                    for (name, c) in &node.children {
                        if visible(name) {
                            stack.push((c, i + 1));
                        }
                    }
                }
                Some(level) => {
                    if let Some(c) = node.children.get(level) {
                        stack.push((c, i + 1));
                    }
                }
            }
        }
    }

    /// The retained messages whose topics match `filter`, skipping expired ones (tests
    /// and small lookups; subscriptions use [`Router::for_each_retained`]).
    pub fn retained_matching(&self, filter: &str, now: Instant) -> Vec<Arc<Message>> {
        let mut out = Vec::new();
        self.for_each_retained(filter, now, |m| {
            out.push(m.clone());
            true
        });
        out
    }

    /// Number of retained messages and their size.
    pub fn retained_size(&self) -> (usize, usize) {
        let r = read(&self.retained);
        (r.count, r.bytes)
    }

    /// Number of retained messages (for tests and metrics).
    pub fn retained_count(&self) -> usize {
        self.retained_size().0
    }
}

/// The retained message of `topic`, if any.
fn find_retained<'a>(root: &'a RetainedNode, topic: &str) -> Option<&'a Arc<Message>> {
    let mut node = root;
    for level in topic.split('/') {
        node = node.children.get(level)?;
    }
    node.msg.as_ref()
}

/// Removes the child on `levels` below the node at depth `keep` (the subtree under it
/// holds nothing but the path).
fn cut(root: &mut Node, levels: &[&str], keep: usize) {
    let mut node = root;
    for level in levels.iter().take(keep) {
        match node.children.get_mut(*level) {
            Some(c) => node = c,
            None => return,
        }
    }
    if let Some(level) = levels.get(keep) {
        node.children.remove(*level);
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

/// Collects the entries and shared groups of the trie whose filters match `topic`. The
/// walk keeps its own stack (on the thread's stack for the usual depths), so no depth of
/// topic can exhaust the thread's.
fn collect<'a>(
    root: &'a Node,
    topic: &str,
    matches: &mut Vec<&'a Entry>,
    groups: &mut Vec<&'a SharedGroup>,
) {
    // (node, where the topic's remaining levels start)
    let mut stack: SmallVec<[(&'a Node, usize); 16]> = SmallVec::new();
    stack.push((root, 0));
    while let Some((node, start)) = stack.pop() {
        let rest = topic.get(start..).unwrap_or("");
        let (level, next) = match rest.find('/') {
            Some(i) => (rest.get(..i).unwrap_or(""), Some(start + i + 1)),
            None => (rest, None),
        };
        // At the first level, wildcards never match `$` topics (MQTT-4.7.2-1).
        let wildcards = !(start == 0 && level.starts_with('$'));
        if wildcards && let Some(hash) = node.children.get("#") {
            matches.extend(hash.entries.iter());
            groups.extend(hash.shared.iter());
        }
        let exact = node.children.get(level);
        let plus = node.children.get("+").filter(|_| wildcards);
        for child in [exact, plus].into_iter().flatten() {
            match next {
                Some(n) => stack.push((child, n)),
                None => {
                    matches.extend(child.entries.iter());
                    groups.extend(child.shared.iter());
                    // "a/#" also matches "a" (MQTT-4.7.1-2).
                    if let Some(hash) = child.children.get("#") {
                        matches.extend(hash.entries.iter());
                        groups.extend(hash.shared.iter());
                    }
                }
            }
        }
    }
}

/// Removes the message at the end of `levels`, and the nodes the removal leaves empty.
/// False when there was none.
fn remove_retained(root: &mut RetainedNode, levels: &[&str]) -> bool {
    // The deepest node on the path that stays whatever happens below it.
    let mut keep = 0;
    let mut node = &*root;
    for (depth, level) in levels.iter().enumerate() {
        if depth > 0 && (node.msg.is_some() || node.children.len() > 1) {
            keep = depth;
        }
        match node.children.get(*level) {
            Some(c) => node = c,
            None => return false,
        }
    }
    let mut leaf = &mut *root;
    for level in levels {
        match leaf.children.get_mut(*level) {
            Some(c) => leaf = c,
            None => return false,
        }
    }
    let removed = leaf.msg.take().is_some();
    if leaf.children.is_empty() {
        let mut node = root;
        for level in levels.iter().take(keep) {
            match node.children.get_mut(*level) {
                Some(c) => node = c,
                None => return removed,
            }
        }
        if let Some(level) = levels.get(keep) {
            node.children.remove(*level);
        }
    }
    removed
}

#[cfg(test)]
mod tests;
