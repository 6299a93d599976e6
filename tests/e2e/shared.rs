//! Shared subscriptions (`$share/group/filter`): one member per message, and
//! redelivery of a departed member's unacknowledged messages.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::harness::{Broker, v3, v5};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_delivers_each_message_to_one_member() {
    let broker = Broker::start();
    // Members of one group may mix protocol versions.
    let mut a = v3::Client::connect(v3::options(&broker, "share-a")).await;
    a.subscribe_ok("$share/g/jobs/#", v3::QoS::AtLeastOnce)
        .await;
    let mut b = v5::Client::connect(v5::options(&broker, "share-b")).await;
    b.subscribe_ok("$share/g/jobs/#", v5::QoS::AtLeastOnce)
        .await;
    let mut pubr = v3::Client::connect(v3::options(&broker, "share-pub")).await;
    for i in 0..20u8 {
        pubr.publish("jobs/x", v3::QoS::AtLeastOnce, false, &[i])
            .await;
    }

    // MQTT 5 §4.8.2: each message goes to exactly one member of the group.
    let mut seen = Vec::new();
    let (mut from_a, mut from_b) = (0, 0);
    while seen.len() < 20 {
        tokio::select! {
            p = a.recv() => { seen.push(p.payload[0]); from_a += 1; }
            p = b.recv() => { seen.push(p.payload[0]); from_b += 1; }
        }
    }
    let distinct: BTreeSet<u8> = seen.iter().copied().collect();
    assert_eq!(
        distinct,
        (0..20).collect(),
        "every message delivered once: {seen:?}"
    );
    tokio::join!(a.expect_silence(), b.expect_silence());
    assert_eq!(from_a + from_b, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_shared_messages_move_to_another_member() {
    let broker = Broker::start();
    let mut opts = v3::options(&broker, "share-slow");
    opts.set_manual_acks(true);
    let mut slow = v3::Client::connect(opts).await;
    slow.subscribe_ok("$share/g/work", v3::QoS::AtLeastOnce)
        .await;
    let mut pubr = v3::Client::connect(v3::options(&broker, "share-pub")).await;
    pubr.publish("work", v3::QoS::AtLeastOnce, false, b"task")
        .await;
    // Only member so far: it gets the message and never acknowledges it.
    let p = slow.recv().await;
    assert_eq!(&p.payload[..], b"task");

    let mut other = v3::Client::connect(v3::options(&broker, "share-other")).await;
    other
        .subscribe_ok("$share/g/work", v3::QoS::AtLeastOnce)
        .await;
    slow.kill().await;
    // The contract: unacknowledged QoS 1/2 messages of a member that disconnects are
    // redelivered to another member.
    let p = other.recv().await;
    assert_eq!(&p.payload[..], b"task");
    assert!(
        other
            .recv_within(Duration::from_millis(300))
            .await
            .is_none()
    );
}

/// A persistent MQTT 5 session holds, unsent, ordinary messages and a shared one behind a
/// full receive window when its client drops. No other member takes the shared message,
/// so it stays with the session; after the reconnect every message arrives, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_session_gets_its_queue_when_a_shared_message_stayed_with_it() {
    let broker = Broker::start();
    let persistent = |clean: bool, manual: bool| {
        let mut o = v5::options(&broker, "mixed-sub");
        o.set_clean_start(clean);
        o.set_session_expiry_interval(Some(600));
        o.set_receive_maximum(Some(1));
        o.set_manual_acks(manual);
        o
    };
    let mut sub = v5::Client::connect(persistent(true, true)).await;
    sub.subscribe_ok("plain/#", v5::QoS::AtLeastOnce).await;
    sub.subscribe_ok("$share/g/job", v5::QoS::AtLeastOnce).await;
    let mut pubr = v5::Client::connect(v5::options(&broker, "mixed-pub")).await;
    for t in ["plain/1", "plain/2", "plain/3", "job"] {
        pubr.publish(t, v5::QoS::AtLeastOnce, false, t.as_bytes())
            .await;
    }
    // The window of one holds plain/1 in flight, unacknowledged; the rest wait.
    assert_eq!(&sub.recv().await.payload[..], b"plain/1");
    sub.kill().await;

    let mut sub = v5::Client::connect(persistent(false, false)).await;
    assert!(sub.connack.session_present);
    let mut got = Vec::new();
    while let Some(p) = sub.recv_within(Duration::from_secs(2)).await {
        got.push(String::from_utf8_lossy(&p.payload).into_owned());
        if got.len() == 4 {
            break;
        }
    }
    assert_eq!(got, ["plain/1", "plain/2", "plain/3", "job"]);
    sub.expect_silence().await;
}
