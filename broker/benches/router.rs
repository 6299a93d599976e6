//! Criterion benchmarks of topic matching in `sandpiper::router::Router` holding 100,000
//! subscriptions, one session each.
//!
//! The filters: 80 % exact (`sensors/{g}/{i}/temperature`), 10 % ending in `+`
//! (`sensors/{g}/{i}/+`) and 10 % with `+` in the middle (`sensors/{g}/+/temperature`,
//! for groups `g` ending in 9), where `g = i % 1000`. A publish to an ordinary device matches
//! one subscription; one to a device of a group ending in 9 matches the 100 mid-level
//! wildcards of that group.
//!
//! Sessions are offline and messages QoS 0, so `publish` walks the trie, merges matches per
//! session and builds each delivery, and the mailbox refuses it before taking its lock:
//! nothing accumulates between iterations. `publish_online_1` also queues into a live
//! mailbox and drains it again.
//!
//! `cargo bench -p sandpiper --bench router`

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sandpiper::codec::{MessageProperties, QoS, SubscriptionOptions, TopicFilter, TopicName};
use sandpiper::mailbox::{Mailbox, QueueLimits};
use sandpiper::message::Message;
use sandpiper::router::{Router, Subscriber};

const SUBSCRIPTIONS: u64 = 100_000;
const LIMITS: QueueLimits = QueueLimits {
    max_messages: 1000,
    max_bytes: 16 << 20,
    // Nothing accumulates here (offline sessions, or drained after each publish), so
    // back-pressure would never engage; off keeps the measured path to matching and queueing.
    backpressure: false,
};

fn filter_of(i: u64) -> String {
    let g = i % 1000;
    match i % 10 {
        8 => format!("sensors/{g}/{i}/+"),
        9 => format!("sensors/{g}/+/temperature"),
        _ => format!("sensors/{g}/{i}/temperature"),
    }
}

fn build() -> (Router, Vec<Subscriber>) {
    let router = Router::new();
    let mut subs = Vec::new();
    for i in 0..SUBSCRIPTIONS {
        let sub = Subscriber {
            key: i + 1,
            mailbox: Arc::new(Mailbox::new(LIMITS)),
        };
        let filter = match TopicFilter::new(&filter_of(i)) {
            Ok(f) => f,
            Err(e) => panic!("bench filter: {e}"),
        };
        router.subscribe(
            &sub,
            &filter,
            SubscriptionOptions::qos(QoS::AtMostOnce),
            None,
        );
        subs.push(sub);
    }
    (router, subs)
}

fn message(topic: &str) -> Arc<Message> {
    let topic = match TopicName::new(topic) {
        Ok(t) => t,
        Err(e) => panic!("bench topic: {e}"),
    };
    Arc::new(Message {
        topic,
        payload: Bytes::from_static(&[0u8; 64]),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: MessageProperties::default(),
        expires_at: None,
        publisher: None,
    })
}

fn matching(c: &mut Criterion) {
    let (router, subs) = build();
    let mut g = c.benchmark_group("router_100k");
    g.throughput(Throughput::Elements(1));

    // Device 4242 of group 242: its exact subscription only.
    let one = message("sensors/242/4242/temperature");
    // Device 4249 of group 249: the 100 `sensors/249/+/temperature` subscriptions.
    let hundred = message("sensors/249/4249/temperature");
    let none = message("sensors/242/999999/temperature");
    g.bench_function("publish_1_match", |b| {
        b.iter(|| black_box(router.publish(black_box(&one))))
    });
    g.bench_function("publish_100_matches", |b| {
        b.iter(|| black_box(router.publish(black_box(&hundred))))
    });
    g.bench_function("publish_no_match", |b| {
        b.iter(|| black_box(router.publish(black_box(&none))))
    });

    // The same single match into a connected session, drained after each publish.
    let target = subs
        .iter()
        .find(|s| s.key == 4243)
        .map(|s| s.mailbox.clone());
    let Some(mailbox) = target else {
        panic!("subscriber of device 4242 missing");
    };
    mailbox.set_online(true);
    let mut drained = VecDeque::new();
    g.bench_function("publish_online_1", |b| {
        b.iter(|| {
            let n = router.publish(black_box(&one));
            mailbox.drain(&mut drained, usize::MAX, usize::MAX);
            drained.clear();
            black_box(n)
        })
    });
    g.finish();
}

criterion_group!(benches, matching);
criterion_main!(benches);
