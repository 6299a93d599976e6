//! The topic filters another node's clients hold, as a tree of levels: which topics that
//! node wants (MQTT matching: `+` one level, `#` the rest and the parent, no wildcard at
//! the first level of a `$` topic). A node is told of each filter when its first local
//! subscription comes and when its last one goes, so a filter is here once or not at all.
//! A shared subscription (`$share/GROUP/FILTER`, one per group and filter) is kept apart:
//! at its filter's level, by its whole name.

use std::collections::HashMap;
use std::sync::Arc;

use smallvec::SmallVec;

use crate::codec::TopicFilter;
use crate::router::TreeHasher;

/// Most levels of a filter another node may hold here (removing walks the levels
/// recursively); a node's own `max_topic_levels` is 128 by default.
pub const MAX_LEVELS: usize = 1024;

fn too_deep(filter: &str) -> bool {
    filter.bytes().filter(|b| *b == b'/').count() >= MAX_LEVELS
}

/// A topic split into its levels once, to be matched against every node's filters.
#[derive(Debug)]
pub struct Topic<'a> {
    levels: SmallVec<[&'a str; 16]>,
    /// The topic starts with `$`: no wildcard matches its first level.
    sys: bool,
}

impl<'a> Topic<'a> {
    pub fn new(topic: &'a str) -> Self {
        Topic {
            levels: topic.split('/').collect(),
            sys: topic.starts_with('$'),
        }
    }
}

/// One level of the tree. The wildcards' children are kept beside the map: a topic is
/// matched with one lookup per level, not three.
#[derive(Debug, Default)]
struct Level {
    children: HashMap<Box<str>, Level, TreeHasher>,
    plus: Option<Box<Level>>,
    hash: Option<Box<Level>>,
    /// A filter ends here.
    here: bool,
    /// Shared subscriptions to the filter that ends here, by whole name.
    shares: Vec<Arc<str>>,
}

impl Level {
    fn is_empty(&self) -> bool {
        !self.here
            && self.shares.is_empty()
            && self.children.is_empty()
            && self.plus.is_none()
            && self.hash.is_none()
    }

    fn child(&self, l: &str) -> Option<&Level> {
        match l {
            "+" => self.plus.as_deref(),
            "#" => self.hash.as_deref(),
            _ => self.children.get(l),
        }
    }

    fn child_mut(&mut self, l: &str) -> Option<&mut Level> {
        match l {
            "+" => self.plus.as_deref_mut(),
            "#" => self.hash.as_deref_mut(),
            _ => self.children.get_mut(l),
        }
    }

    fn child_or_new(&mut self, l: &str) -> &mut Level {
        match l {
            "+" => self.plus.get_or_insert_default(),
            "#" => self.hash.get_or_insert_default(),
            _ => self.children.entry(l.into()).or_default(),
        }
    }

    fn cut(&mut self, l: &str) {
        match l {
            "+" => self.plus = None,
            "#" => self.hash = None,
            _ => {
                self.children.remove(l);
            }
        }
    }
}

/// The filters of one node.
#[derive(Debug, Default)]
pub struct Routes {
    root: Level,
    /// Filters held (shared subscriptions not counted).
    len: usize,
    /// Shared subscriptions held.
    shares: usize,
}

/// Where a subscription sits: the levels of its filter, and its whole name if shared.
fn place(subscription: &str) -> Option<(String, Option<Arc<str>>)> {
    if too_deep(subscription) {
        return None;
    }
    if !subscription.starts_with("$share/") {
        return Some((subscription.to_owned(), None));
    }
    let f = TopicFilter::new(subscription).ok()?;
    Some((f.filter().to_owned(), Some(subscription.into())))
}

impl Routes {
    /// Adds `subscription` (the topic part of a subscription, or a whole
    /// `$share/GROUP/FILTER`); false if it was already here, is not a valid shared
    /// subscription or is deeper than [`MAX_LEVELS`] (another node's word).
    pub fn insert(&mut self, subscription: &str) -> bool {
        let Some((filter, share)) = place(subscription) else {
            return false;
        };
        let mut level = &mut self.root;
        for l in filter.split('/') {
            level = level.child_or_new(l);
        }
        match share {
            None => {
                let new = !level.here;
                level.here = true;
                self.len += usize::from(new);
                new
            }
            Some(s) => {
                let new = !level.shares.contains(&s);
                if new {
                    level.shares.push(s);
                    self.shares += 1;
                }
                new
            }
        }
    }

    /// Removes `subscription`; false if it was not here. Levels left empty are cut.
    pub fn remove(&mut self, subscription: &str) -> bool {
        let Some((filter, share)) = place(subscription) else {
            return false;
        };
        fn walk(level: &mut Level, rest: &[&str], share: &Option<Arc<str>>) -> bool {
            match rest.split_first() {
                None => match share {
                    None => std::mem::replace(&mut level.here, false),
                    Some(s) => {
                        let before = level.shares.len();
                        level.shares.retain(|x| x != s);
                        level.shares.len() != before
                    }
                },
                Some((l, rest)) => {
                    let Some(child) = level.child_mut(l) else {
                        return false;
                    };
                    let removed = walk(child, rest, share);
                    if child.is_empty() {
                        level.cut(l);
                    }
                    removed
                }
            }
        }
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = walk(&mut self.root, &levels, &share);
        match share {
            None => self.len -= usize::from(removed),
            Some(_) => self.shares -= usize::from(removed),
        }
        removed
    }

    /// Filters held (shared subscriptions not counted).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Filters and shared subscriptions held.
    pub fn held(&self) -> usize {
        self.len + self.shares
    }

    /// Whether a shared subscription is held.
    pub fn has_shares(&self) -> bool {
        self.shares > 0
    }

    /// Whether the shared subscription `share` (a whole `$share/GROUP/FILTER`) is held.
    pub fn has_share(&self, share: &TopicFilter) -> bool {
        let mut level = &self.root;
        for l in share.filter().split('/') {
            match level.child(l) {
                Some(c) => level = c,
                None => return false,
            }
        }
        level.shares.iter().any(|s| **s == *share.as_str())
    }

    /// Adds to `out` the shared subscriptions here whose filters match `topic`.
    pub fn shares_matching(&self, topic: &Topic<'_>, out: &mut Vec<Arc<str>>) {
        if self.shares == 0 {
            return;
        }
        let mut stack: SmallVec<[(&Level, usize); 16]> = smallvec::smallvec![(&self.root, 0)];
        while let Some((level, depth)) = stack.pop() {
            let first = depth == 0 && topic.sys;
            if !first && let Some(h) = &level.hash {
                out.extend(h.shares.iter().cloned());
            }
            let Some(l) = topic.levels.get(depth) else {
                out.extend(level.shares.iter().cloned());
                continue;
            };
            if let Some(c) = level.children.get(*l) {
                stack.push((c, depth + 1));
            }
            if !first && let Some(c) = &level.plus {
                stack.push((c, depth + 1));
            }
        }
    }

    /// Whether a filter here matches `topic`.
    pub fn matches(&self, topic: &Topic<'_>) -> bool {
        self.len > 0 && matches(&self.root, topic)
    }
}

/// Walks with a stack of its own (a topic may have thousands of levels): (level, how
/// many of the topic's levels it stands for).
fn matches(root: &Level, topic: &Topic<'_>) -> bool {
    let mut stack: SmallVec<[(&Level, usize); 16]> = smallvec::smallvec![(root, 0)];
    while let Some((level, depth)) = stack.pop() {
        let first = depth == 0 && topic.sys;
        if !first && level.hash.as_ref().is_some_and(|h| h.here) {
            return true;
        }
        let Some(l) = topic.levels.get(depth) else {
            if level.here {
                return true;
            }
            continue;
        };
        if let Some(c) = level.children.get(*l) {
            stack.push((c, depth + 1));
        }
        if !first && let Some(c) = &level.plus {
            stack.push((c, depth + 1));
        }
    }
    false
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn m(r: &Routes, topic: &str) -> bool {
        r.matches(&Topic::new(topic))
    }

    fn sm(r: &Routes, topic: &str, out: &mut Vec<Arc<str>>) {
        r.shares_matching(&Topic::new(topic), out)
    }

    /// MQTT matching written the plain way, to check the tree against.
    fn plain(filter: &str, topic: &str) -> bool {
        if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
            return false;
        }
        let f: Vec<&str> = filter.split('/').collect();
        let t: Vec<&str> = topic.split('/').collect();
        let mut i = 0;
        loop {
            match (f.get(i), t.get(i)) {
                (Some(&"#"), _) => return true,
                (Some(&"+"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
            i += 1;
        }
    }

    #[test]
    fn wildcards_match_as_mqtt_says() {
        let mut r = Routes::default();
        r.insert("a/#");
        assert!(m(&r, "a") && m(&r, "a/b/c") && !m(&r, "b"));
        let mut r = Routes::default();
        r.insert("+/x");
        assert!(m(&r, "a/x") && m(&r, "/x") && !m(&r, "$SYS/x") && !m(&r, "a"));
        let mut r = Routes::default();
        r.insert("#");
        assert!(m(&r, "anything/at/all") && !m(&r, "$SYS/broker"));
        r.insert("$SYS/#");
        assert!(m(&r, "$SYS/broker"));
    }

    #[test]
    fn deep_topics_and_filters_cost_no_stack() {
        let mut r = Routes::default();
        let deep = vec!["+"; MAX_LEVELS - 1].join("/");
        assert!(r.insert(&deep));
        assert!(!r.insert(&vec!["+"; MAX_LEVELS + 1].join("/")));
        let topic = vec!["x"; MAX_LEVELS - 1].join("/");
        assert!(m(&r, &topic));
        assert!(!m(&r, &vec!["x"; 60_000].join("/")));
        assert!(r.remove(&deep) && (r.len() == 0));
    }

    #[test]
    fn removing_cuts_empty_levels_and_counts() {
        let mut r = Routes::default();
        assert!(r.insert("a/b/c") && r.insert("a/+") && !r.insert("a/b/c"));
        assert_eq!(r.len(), 2);
        assert!(r.remove("a/b/c") && !r.remove("a/b/c") && !r.remove("a/b"));
        assert!(m(&r, "a/q") && !m(&r, "a/b/c"));
        assert!(r.remove("a/+"));
        assert!((r.len() == 0) && r.root.children.is_empty());
    }

    #[test]
    fn shared_subscriptions_sit_apart_from_plain_filters() {
        let mut r = Routes::default();
        assert!(r.insert("$share/g/a/+") && r.insert("$share/h/a/+") && r.insert("a/b"));
        assert!(!r.insert("$share/g/a/+") && !r.insert("$share//a") && !r.insert("$share/g"));
        assert_eq!((r.len(), r.has_shares()), (1, true));
        let mut out = Vec::new();
        sm(&r, "a/x", &mut out);
        out.sort();
        assert_eq!(out, [Arc::from("$share/g/a/+"), Arc::from("$share/h/a/+")]);
        // A shared subscription alone does not make the node want the topic for itself.
        assert!(!m(&r, "a/x") && m(&r, "a/b"));
        let g = TopicFilter::new("$share/g/a/+").unwrap();
        assert!(r.has_share(&g) && !r.has_share(&TopicFilter::new("$share/x/a/+").unwrap()));
        assert!(r.remove("$share/g/a/+") && !r.remove("$share/g/a/+") && !r.has_share(&g));
        assert!(r.remove("$share/h/a/+") && !r.has_shares());
        assert!(r.remove("a/b") && r.root.children.is_empty());
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("".to_owned()),
            Just("$s".to_owned())
        ]
    }

    fn filter_level() -> impl Strategy<Value = String> {
        prop_oneof![level(), Just("+".to_owned())]
    }

    fn filter() -> impl Strategy<Value = String> {
        (prop::collection::vec(filter_level(), 1..4), any::<bool>()).prop_map(|(mut l, hash)| {
            if hash {
                l.push("#".to_owned());
            }
            l.join("/")
        })
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..5).prop_map(|l| l.join("/"))
    }

    proptest! {
        #[test]
        fn the_tree_matches_what_plain_matching_says(
            filters in prop::collection::vec(filter(), 0..6),
            removed in prop::collection::vec(any::<prop::sample::Index>(), 0..3),
            topics in prop::collection::vec(topic(), 1..8),
        ) {
            let mut r = Routes::default();
            let mut held: Vec<String> = Vec::new();
            for f in &filters {
                prop_assert_eq!(r.insert(f), !held.contains(f));
                if !held.contains(f) {
                    held.push(f.clone());
                }
            }
            for i in removed {
                if held.is_empty() {
                    break;
                }
                let f = held.remove(i.index(held.len()));
                prop_assert!(r.remove(&f));
            }
            prop_assert_eq!(r.len(), held.len());
            for t in &topics {
                let want = held.iter().any(|f| plain(f, t));
                prop_assert_eq!(m(&r, t), want, "topic {} filters {:?}", t, held);
            }
        }

        #[test]
        fn shared_subscriptions_match_as_plain_matching_says(
            shares in prop::collection::vec((0..3u8, filter()), 0..6),
            plain_filters in prop::collection::vec(filter(), 0..3),
            topics in prop::collection::vec(topic(), 1..8),
        ) {
            let mut r = Routes::default();
            let mut held: Vec<(String, String)> = Vec::new();
            for (g, f) in &shares {
                let name = format!("$share/g{g}/{f}");
                if TopicFilter::new(&name).is_err() {
                    // An empty filter: not a shared subscription.
                    prop_assert!(!r.insert(&name));
                    continue;
                }
                prop_assert_eq!(r.insert(&name), !held.iter().any(|(n, _)| *n == name));
                if !held.iter().any(|(n, _)| *n == name) {
                    held.push((name, f.clone()));
                }
            }
            for f in &plain_filters {
                r.insert(f);
            }
            for t in &topics {
                let mut got = Vec::new();
                sm(&r, t, &mut got);
                let mut got: Vec<String> = got.iter().map(|s| s.to_string()).collect();
                got.sort();
                let mut want: Vec<String> = (held.iter())
                    .filter(|(_, f)| plain(f, t))
                    .map(|(n, _)| n.clone())
                    .collect();
                want.sort();
                prop_assert_eq!(got, want, "topic {}", t);
            }
            for (n, _) in &held {
                prop_assert!(r.remove(n));
            }
            prop_assert!(!r.has_shares());
        }
    }
}
