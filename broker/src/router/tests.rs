//! The router beside its code: matching, shared groups, retained messages, limits.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]

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
        publisher: None,
    })
}

fn drain(s: &Subscriber) -> Vec<Delivery> {
    let mut out = std::collections::VecDeque::new();
    s.mailbox.drain(&mut out, usize::MAX, usize::MAX);
    out.into_iter().collect()
}

#[test]
fn a_tree_node_stays_small() {
    // A node is a slot of its parent's child map: every byte counts once per subscription
    // under a wide parent (README, "A million subscriptions").
    assert!(
        std::mem::size_of::<Node>() <= 64,
        "{}",
        std::mem::size_of::<Node>()
    );
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

/// Whether `m`'s connection would wake now (a permit is waiting).
fn woken(m: &Mailbox) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(std::time::Duration::from_millis(10), m.notified())
            .await
            .is_ok()
    })
}

#[test]
fn every_subscriber_is_woken_deep_and_shared_alike() {
    let r = Router::new();
    let (plain, member, idle) = (sub(1), sub(2), sub(3));
    let deep = TopicFilter::new(&"d/".repeat(500)).unwrap();
    r.subscribe(
        &plain,
        &deep,
        SubscriptionOptions::qos(QoS::AtMostOnce),
        None,
    );
    let group = TopicFilter::new("$share/g/x/#").unwrap();
    r.subscribe(
        &member,
        &group,
        SubscriptionOptions::qos(QoS::AtMostOnce),
        None,
    );
    for s in [&plain, &member, &idle] {
        woken(&s.mailbox); // what going online left
    }
    r.wake_subscribers();
    assert!(woken(&plain.mailbox), "a subscriber deep in the trie");
    assert!(woken(&member.mailbox), "a shared group's member");
    assert!(!woken(&idle.mailbox), "a session with no subscription");
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
fn serving_online_gives_back_a_group_whose_members_are_offline() {
    let r = Router::new();
    let (asleep, plain) = (sub(1), sub(2));
    asleep.mailbox.set_online(false);
    let f = TopicFilter::new("$share/g/t/#").unwrap();
    r.subscribe(
        &asleep,
        &f,
        SubscriptionOptions::qos(QoS::AtLeastOnce),
        None,
    );
    let p = TopicFilter::new("t/#").unwrap();
    r.subscribe(&plain, &p, SubscriptionOptions::qos(QoS::AtLeastOnce), None);
    let m = msg("t/1", QoS::AtLeastOnce);
    let mut given_back = Vec::new();
    let routed = r.publish_serving(&m, true, |_| Serve::Online, &mut given_back);
    assert_eq!((routed.delivered, given_back), (1, vec![f.clone()]));
    assert_eq!(drain(&plain).len(), 1);
    assert!(drain(&asleep).is_empty());
    // Any member, and no plain subscriber a second time.
    let mut none = Vec::new();
    let routed = r.publish_serving(&m, false, |_| Serve::Any, &mut none);
    assert_eq!((routed.delivered, none.len()), (1, 0));
    assert_eq!((drain(&asleep).len(), drain(&plain).len()), (1, 0));
    // Online again: served at once.
    asleep.mailbox.set_online(true);
    let routed = r.publish_serving(&m, false, |_| Serve::Online, &mut none);
    assert_eq!((routed.delivered, none.len()), (1, 0));
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

/// Topics far deeper than any limit (65,536 levels, as a will could once carry) are
/// stored, matched, removed and dropped without recursion.
#[test]
fn deep_topics_do_not_recurse() {
    let deep = "/".repeat(65_535);
    let r = Router::new();
    let s = sub(1);
    let f = TopicFilter::new(&deep).unwrap();
    r.subscribe(&s, &f, SubscriptionOptions::qos(QoS::AtMostOnce), None);
    r.subscribe(
        &s,
        &TopicFilter::new("#").unwrap(),
        SubscriptionOptions::qos(QoS::AtMostOnce),
        None,
    );
    let mut m = clone_msg(&msg(&deep, QoS::AtMostOnce));
    m.retain = true;
    let m = Arc::new(m);
    assert_eq!(r.publish(&m).delivered, 1);
    r.retain(&m).unwrap();
    assert_eq!(r.retained_matching("#", Instant::now()).len(), 1);
    assert_eq!(r.retained_matching(&deep, Instant::now()).len(), 1);
    assert!(r.unsubscribe(1, &f));
    let mut clear = clone_msg(&m);
    clear.payload = Bytes::new();
    r.retain(&Arc::new(clear)).unwrap();
    assert_eq!(r.retained_size(), (0, 0));
    // And a whole deep tree dropped at once.
    r.subscribe(&s, &f, SubscriptionOptions::qos(QoS::AtMostOnce), None);
    r.retain(&m).unwrap();
    drop(r);
}

#[test]
fn retained_store_keeps_to_its_limits() {
    let r = Router::default();
    r.set_retain_limits(RetainLimits {
        max_messages: 2,
        max_bytes: 100,
    });
    let retained = |topic: &str, payload: &'static [u8]| {
        let mut m = clone_msg(&msg(topic, QoS::AtMostOnce));
        m.retain = true;
        m.payload = Bytes::from_static(payload);
        Arc::new(m)
    };
    r.retain(&retained("a", b"1")).unwrap();
    r.retain(&retained("b", b"2")).unwrap();
    assert!(!r.retain_room(&retained("c", b"3")));
    assert_eq!(r.retain(&retained("c", b"3")), Err(RetainedFull));
    // A replacement adds no message, and clearing always fits.
    assert!(r.retain_room(&retained("a", b"11")));
    r.retain(&retained("a", b"11")).unwrap();
    assert_eq!(r.retained_size(), (2, 5));
    assert_eq!(r.retain(&retained("b", &[0; 100])), Err(RetainedFull));
    r.retain(&retained("b", b"")).unwrap();
    r.retain(&retained("c", b"3")).unwrap();
    assert_eq!(r.retained_size(), (2, 5));
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
        publisher: None,
    };
    r.retain(&Arc::new(Message {
        payload: Bytes::from_static(b"1"),
        ..clone_msg(&m)
    }))
    .unwrap();
    r.retain(&Arc::new(Message {
        payload: Bytes::from_static(b"2"),
        ..clone_msg(&m)
    }))
    .unwrap();
    let got = r.retained_matching("a/#", Instant::now());
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].payload[..], b"2");
    m.payload = Bytes::new();
    r.retain(&Arc::new(m)).unwrap();
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
        publisher: m.publisher,
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
        rr.retain(&Arc::new(stored)).unwrap();
        prop_assert_eq!(
            rr.retained_matching(&filter, Instant::now()).len() == 1,
            filter_matches(&filter, &topic)
        );
    }
}
