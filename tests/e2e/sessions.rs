//! Persistent sessions (3.1.1 clean session 0, v5 session expiry), redelivery on
//! resume, session expiry and session takeover.

use std::time::Duration;

use crate::harness::{Broker, WAIT, raw, v3, v5};

fn persistent3(broker: &Broker, id: &str) -> v3::MqttOptions {
    let mut o = v3::options(broker, id);
    o.set_clean_session(false);
    o
}

fn persistent5(broker: &Broker, id: &str, expiry: u32) -> v5::MqttOptions {
    let mut o = v5::options(broker, id);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(expiry));
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_persistent_session_queues_qos1_and_qos2_but_not_qos0() {
    let broker = Broker::start();
    let mut sub = v3::Client::connect(persistent3(&broker, "sess-sub")).await;
    assert!(!sub.connack.session_present, "no session existed yet");
    sub.subscribe_ok("sess/t", v3::QoS::ExactlyOnce).await;
    sub.disconnect().await;
    // Let the broker finish taking the session offline; the instant right after the
    // close is covered by `v311_qos0_right_after_disconnect_is_not_queued`.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut pubr = v3::Client::connect(v3::options(&broker, "sess-pub")).await;

    pubr.publish("sess/t", v3::QoS::AtLeastOnce, false, b"m1")
        .await;
    pubr.publish("sess/t", v3::QoS::AtMostOnce, false, b"q0")
        .await;
    pubr.publish("sess/t", v3::QoS::ExactlyOnce, false, b"m2")
        .await;
    pubr.publish("sess/t", v3::QoS::AtLeastOnce, false, b"m3")
        .await;

    let mut sub = v3::Client::connect(persistent3(&broker, "sess-sub")).await;
    // [MQTT-3.2.2-2] session present = 1 when resuming.
    assert!(sub.connack.session_present);
    // 3.1.2.4: QoS 1/2 messages are part of the session state; QoS 0 is optional in the
    // spec and the contract keeps it out. Delivered in publish order (4.6).
    let mut got = Vec::new();
    for _ in 0..3 {
        let p = sub.recv().await;
        got.push((p.payload.to_vec(), p.qos));
    }
    assert_eq!(
        got,
        vec![
            (b"m1".to_vec(), v3::QoS::AtLeastOnce),
            (b"m2".to_vec(), v3::QoS::ExactlyOnce),
            (b"m3".to_vec(), v3::QoS::AtLeastOnce),
        ]
    );
    sub.expect_silence().await;

    // The subscription itself survived: live messages flow without resubscribing.
    pubr.publish("sess/t", v3::QoS::AtLeastOnce, false, b"live")
        .await;
    assert_eq!(&sub.recv().await.payload[..], b"live");
}

/// Once the broker has closed the connection after DISCONNECT the session is offline, so
/// a QoS 0 message published right then must not be kept for it. The window between
/// the close and the session going offline is narrow, so the sequence runs many times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_qos0_right_after_disconnect_is_not_queued() {
    let broker = Broker::start();
    let mut pubr = v3::Client::connect(v3::options(&broker, "race-pub")).await;
    for i in 0..200 {
        let id = format!("race-{i}");
        let topic = format!("race/{i}");
        let mut sub = v3::Client::connect(persistent3(&broker, &id)).await;
        sub.subscribe_ok(&topic, v3::QoS::AtLeastOnce).await;
        sub.disconnect().await;
        pubr.publish(&topic, v3::QoS::AtMostOnce, false, b"q0")
            .await;
        pubr.publish(&topic, v3::QoS::AtLeastOnce, false, b"marker")
            .await;
        let mut sub = v3::Client::connect(persistent3(&broker, &id)).await;
        assert!(sub.connack.session_present);
        let p = sub.recv().await;
        assert_eq!(
            String::from_utf8_lossy(&p.payload),
            "marker",
            "iteration {i}: QoS 0 message kept for a session whose connection had closed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_clean_session_discards_previous_session() {
    let broker = Broker::start();
    let sub = {
        let mut c = v3::Client::connect(persistent3(&broker, "wipe")).await;
        c.subscribe_ok("wipe/t", v3::QoS::AtLeastOnce).await;
        c
    };
    sub.disconnect().await;

    // [MQTT-3.1.2-6] clean session 1 discards the stored session.
    let clean = v3::Client::connect(v3::options(&broker, "wipe")).await;
    assert!(!clean.connack.session_present);
    clean.disconnect().await;

    let mut again = v3::Client::connect(persistent3(&broker, "wipe")).await;
    assert!(!again.connack.session_present, "old session must be gone");
    let mut pubr = v3::Client::connect(v3::options(&broker, "wipe-pub")).await;
    pubr.publish("wipe/t", v3::QoS::AtLeastOnce, false, b"x")
        .await;
    again.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_unacked_qos1_is_resent_with_dup_on_resume() {
    let broker = Broker::start();
    let mut opts = persistent3(&broker, "dup-sub");
    opts.set_manual_acks(true);
    let mut sub = v3::Client::connect(opts).await;
    sub.subscribe_ok("dup/t", v3::QoS::AtLeastOnce).await;
    let mut pubr = v3::Client::connect(v3::options(&broker, "dup-pub")).await;
    pubr.publish("dup/t", v3::QoS::AtLeastOnce, false, b"again")
        .await;
    let first = sub.recv().await;
    assert!(!first.dup, "first delivery attempt has DUP=0 (3.3.1.1)");
    // Never acknowledged; the socket just drops.
    sub.kill().await;

    let mut sub = v3::Client::connect(persistent3(&broker, "dup-sub")).await;
    assert!(sub.connack.session_present);
    // [MQTT-4.4.0-1] unacknowledged PUBLISHes are re-sent, [MQTT-3.3.1-1] with DUP=1.
    let again = sub.recv().await;
    assert_eq!(&again.payload[..], b"again");
    assert_eq!(again.qos, v3::QoS::AtLeastOnce);
    assert!(again.dup, "redelivery must set DUP=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_session_with_expiry_queues_messages_while_offline() {
    let broker = Broker::start();
    let mut sub = v5::Client::connect(persistent5(&broker, "sess5", 300)).await;
    assert!(!sub.connack.session_present);
    sub.subscribe_ok("sess5/t", v5::QoS::AtLeastOnce).await;
    sub.disconnect().await;
    // rumqttc may close its side as soon as DISCONNECT is written: on a loaded machine the
    // broker can read it after the QoS 0 message below arrives, and a session still online
    // then rightly gets that message. Give the broker time to see the client go.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    let mut pubr = v5::Client::connect(v5::options(&broker, "sess5-pub")).await;
    for m in [&b"a"[..], b"b", b"c"] {
        pubr.publish("sess5/t", v5::QoS::AtLeastOnce, false, m)
            .await;
    }
    pubr.publish("sess5/t", v5::QoS::AtMostOnce, false, b"q0")
        .await;
    // A QoS 0 publish returns once queued in the client: the PUBACK of a QoS 1 message
    // sent after it shows that the broker has handled it before the subscriber returns.
    pubr.publish("sess5/t", v5::QoS::AtLeastOnce, false, b"d")
        .await;

    let mut sub = v5::Client::connect(persistent5(&broker, "sess5", 300)).await;
    assert!(sub.connack.session_present, "[MQTT-3.2.2-2]");
    for m in [&b"a"[..], b"b", b"c", b"d"] {
        let p = sub.recv().await;
        assert_eq!(&p.payload[..], m);
        assert_eq!(p.qos, v5::QoS::AtLeastOnce);
    }
    sub.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_session_is_gone_after_expiry_interval() {
    let broker = Broker::start();
    let mut sub = v5::Client::connect(persistent5(&broker, "short", 1)).await;
    sub.subscribe_ok("short/t", v5::QoS::AtLeastOnce).await;
    sub.disconnect().await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    // 3.1.2.11.2: the session is discarded once the interval has passed.
    let sub = v5::Client::connect(persistent5(&broker, "short", 1)).await;
    assert!(
        !sub.connack.session_present,
        "session outlived its 1 s expiry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_session_expiry_zero_ends_session_on_disconnect() {
    let broker = Broker::start();
    let mut o = v5::options(&broker, "zero");
    o.set_clean_start(false);
    let mut sub = v5::Client::connect(o.clone()).await;
    sub.subscribe_ok("zero/t", v5::QoS::AtLeastOnce).await;
    sub.disconnect().await;
    // 3.1.2.11.2: absent Session Expiry Interval means 0 → session ends with the connection.
    let sub = v5::Client::connect(o).await;
    assert!(!sub.connack.session_present);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_takeover_closes_first_connection() {
    let broker = Broker::start();
    let mut first = v3::Client::connect(v3::options(&broker, "same-id")).await;
    let mut second = v3::Client::connect(v3::options(&broker, "same-id")).await;
    assert_eq!(second.connack.code, v3::ConnectReturnCode::Success);
    // [MQTT-3.1.4-2] the existing client is disconnected.
    assert!(
        first.inbox.closed_within(WAIT).await.is_some(),
        "first connection still open after takeover"
    );
    // The new connection is fully functional.
    second.subscribe_ok("take/t", v3::QoS::AtLeastOnce).await;
    second
        .publish("take/t", v3::QoS::AtLeastOnce, false, b"mine")
        .await;
    assert_eq!(&second.recv().await.payload[..], b"mine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_takeover_resumes_persistent_session() {
    let broker = Broker::start();
    let mut first = v3::Client::connect(persistent3(&broker, "roam")).await;
    first.subscribe_ok("roam/t", v3::QoS::AtLeastOnce).await;
    let mut second = v3::Client::connect(persistent3(&broker, "roam")).await;
    assert!(second.connack.session_present, "session carried over");
    assert!(first.inbox.closed_within(WAIT).await.is_some());
    let mut pubr = v3::Client::connect(v3::options(&broker, "roam-pub")).await;
    pubr.publish("roam/t", v3::QoS::AtLeastOnce, false, b"follow")
        .await;
    assert_eq!(&second.recv().await.payload[..], b"follow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_takeover_sends_disconnect_0x8e() {
    let broker = Broker::start();
    // Raw first connection: see `raw::connect_v5` for why rumqttc cannot observe this.
    let mut first = raw::connect_v5(&broker, "same-id").await;
    let second = v5::Client::connect(v5::options(&broker, "same-id")).await;
    assert_eq!(second.connack.code, v5::ConnectReturnCode::Success);
    // [MQTT-3.1.4-3] DISCONNECT with 0x8E (Session taken over), then close.
    assert_eq!(raw::disconnect_codes(&mut first).await, vec![0x8E]);
}

/// A session that ends with its connection (Clean Session 1) is not handed to a connection
/// that takes the client id over with Clean Session 0: there is no session to resume
/// (MQTT-3.1.2-6, MQTT-3.2.2-2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_of_a_clean_session_resumes_nothing() {
    let broker = Broker::start();
    let mut a = raw::connect_tcp(&broker).await;
    raw::send(&mut a, &raw::connect_v311("clean-taken", true, 0)).await;
    let (kind, body) = raw::expect_packet(&mut a).await;
    assert_eq!((kind, body), (0x20, vec![0, 0]));
    let mut b = raw::connect_tcp(&broker).await;
    raw::send(&mut b, &raw::connect_v311("clean-taken", false, 0)).await;
    let (kind, body) = raw::expect_packet(&mut b).await;
    assert_eq!(kind, 0x20);
    assert_eq!(body, vec![0, 0], "CONNACK must say no session present");
}

/// Connects with Clean Start `clean` and, when `expiry` is not 0, a Session Expiry
/// Interval property (none at all for 0, which the spec reads as 0).
fn v5_with_expiry(broker: &Broker, id: &str, clean: bool, expiry: u32) -> v5::MqttOptions {
    let mut o = v5::options(broker, id);
    o.set_clean_start(clean);
    o.set_session_expiry_interval((expiry > 0).then_some(expiry));
    o
}

/// Every combination of the expiry a session was made with and the expiry of the
/// reconnect that resumes it (Clean Start 0). The session state, subscriptions and queued
/// messages, is resumed whenever it still exists; the new interval only decides what
/// happens when the new connection ends (MQTT 5 §3.1.2.4, §3.1.2.11.2, §4.1). Queued
/// messages are delivered with their Message Expiry Interval reduced by the time they
/// waited; ones whose interval passed are not delivered (§3.3.2.3.3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_resume_delivers_the_queue_for_every_old_and_new_expiry() {
    let broker = Broker::start();
    let cases = [(0, 0), (0, 300), (300, 0), (300, 300)];
    for (old, new) in cases {
        let id = format!("mx-{old}-{new}");
        let mut sub = v5::Client::connect(v5_with_expiry(&broker, &id, true, old)).await;
        sub.subscribe_ok(&format!("{id}/#"), v5::QoS::ExactlyOnce)
            .await;
        sub.disconnect().await;
    }
    let mut pubr = v5::Client::connect(v5::options(&broker, "mx-pub")).await;
    let expiring = |secs| v5::PublishProperties {
        message_expiry_interval: Some(secs),
        ..Default::default()
    };
    for (old, new) in cases {
        let topic = format!("mx-{old}-{new}/B");
        pubr.publish_with(
            &topic,
            v5::QoS::AtLeastOnce,
            false,
            b"short",
            Some(expiring(1)),
        )
        .await;
        pubr.publish_with(
            &topic,
            v5::QoS::AtLeastOnce,
            false,
            b"q1",
            Some(expiring(100)),
        )
        .await;
    }
    // The 1 s message expires while its session waits.
    tokio::time::sleep(Duration::from_millis(2100)).await;

    for (old, new) in cases {
        let id = format!("mx-{old}-{new}");
        let mut sub = v5::Client::connect(v5_with_expiry(&broker, &id, false, new)).await;
        assert_eq!(
            sub.connack.session_present,
            old > 0,
            "{id}: Session Present (MQTT-3.2.2-2, MQTT-3.2.2-3)"
        );
        if old > 0 {
            let p = sub.recv().await;
            assert_eq!(&p.payload[..], b"q1", "{id}: the queued message");
            assert_eq!(
                p.qos,
                v5::QoS::AtLeastOnce,
                "{id}: min(publish, subscription)"
            );
            let left = p
                .properties
                .as_ref()
                .and_then(|p| p.message_expiry_interval);
            assert!(
                left.is_some_and(|s| (90..=98).contains(&s)),
                "{id}: expiry interval reduced by the 2 s it waited: {left:?}"
            );
        }
        sub.expect_silence().await;
        sub.disconnect().await;
        // What is left once this connection has ended: the session (resumed or new)
        // remains exactly when this connection asked for an expiry above 0.
        let again = v5::Client::connect(v5_with_expiry(&broker, &id, false, 300)).await;
        assert_eq!(
            again.connack.session_present,
            new > 0,
            "{id}: session after the second connection ended"
        );
        again.disconnect().await;
    }
}

/// The byte sequence: a session made with Session Expiry Interval 99999 and
/// resumed by a CONNECT with no properties at all gets its queued QoS 1 message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_resume_without_properties_gets_the_queued_message() {
    let broker = Broker::start();
    let mut a = raw::connect_tcp(&broker).await;
    // CONNECT v5, Clean Start 1, properties: Session Expiry Interval (0x11) 99999.
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 5, 0x11];
    body.extend_from_slice(&99_999u32.to_be_bytes());
    body.extend_from_slice(&[0, 7]);
    body.extend_from_slice(b"aclient");
    raw::send(&mut a, &raw::packet(0x10, &body)).await;
    assert_eq!(raw::expect_packet(&mut a).await.0 >> 4, 2, "CONNACK");
    // SUBSCRIBE id 1, no properties, "TopicA/#" QoS 2.
    let mut sub = vec![0, 1, 0, 0, 8];
    sub.extend_from_slice(b"TopicA/#");
    sub.push(2);
    raw::send(&mut a, &raw::packet(0x82, &sub)).await;
    assert_eq!(raw::expect_packet(&mut a).await.0 >> 4, 9, "SUBACK");
    raw::send(&mut a, &[0xE0, 0]).await;
    drop(a);

    let mut b = v5::Client::connect(v5::options(&broker, "bclient")).await;
    b.publish("TopicA/B", v5::QoS::AtLeastOnce, false, b"q1")
        .await;

    let mut a = raw::connect_tcp(&broker).await;
    raw::send(&mut a, &raw::connect("MQTT", 5, "aclient", false, 60, None)).await;
    let (first, connack) = raw::expect_packet(&mut a).await;
    assert_eq!(first, 0x20, "CONNACK");
    assert_eq!(connack.first(), Some(&1), "Session Present 1");
    let (first, publish) = raw::expect_packet(&mut a).await;
    assert_eq!(first >> 4, 3, "PUBLISH of the queued message");
    assert_eq!((first >> 1) & 3, 1, "QoS 1");
    assert!(
        publish.ends_with(b"q1"),
        "payload of the queued message: {publish:?}"
    );
}

/// MQTT 3.1.1 §3.1.2.4: Clean Session 0 on both connections resumes the session and its
/// queue; Clean Session 1 on either end leaves nothing to resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_resume_for_every_clean_session_pair() {
    let broker = Broker::start();
    let cases = [(false, false), (false, true), (true, false), (true, true)];
    let mut pubr = v3::Client::connect(v3::options(&broker, "cs-pub")).await;
    for (first, second) in cases {
        let id = format!("cs-{first}-{second}");
        let mut o = v3::options(&broker, &id);
        o.set_clean_session(first);
        let mut sub = v3::Client::connect(o).await;
        sub.subscribe_ok(&format!("{id}/t"), v3::QoS::ExactlyOnce)
            .await;
        sub.disconnect().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        pubr.publish(&format!("{id}/t"), v3::QoS::AtLeastOnce, false, b"q1")
            .await;
        let mut o = v3::options(&broker, &id);
        o.set_clean_session(second);
        let mut sub = v3::Client::connect(o).await;
        let resumed = !first && !second;
        assert_eq!(
            sub.connack.session_present, resumed,
            "{id}: Session Present"
        );
        if resumed {
            let p = sub.recv().await;
            assert_eq!(&p.payload[..], b"q1", "{id}");
        }
        sub.expect_silence().await;
    }
}

/// More expired messages wait in a connected subscriber's queue than its connection takes
/// from it at once (256): every one it takes is dropped and nothing is written, and the
/// message behind them must still come without anything else waking the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_that_starts_with_many_expired_messages_still_delivers_the_rest() {
    let broker = Broker::start();
    let mut o = v5::options(&broker, "mx-many");
    o.set_receive_maximum(Some(1));
    o.set_manual_acks(true);
    let mut sub = v5::Client::connect(o).await;
    sub.subscribe_ok("mx-many/#", v5::QoS::AtLeastOnce).await;
    let mut pubr = v5::Client::connect(v5::options(&broker, "mx-many-pub")).await;
    pubr.publish("mx-many/t", v5::QoS::AtLeastOnce, false, b"first")
        .await;
    // Held in flight, unacknowledged: the window of one is full, the rest waits.
    let first = sub.recv().await;
    assert_eq!(&first.payload[..], b"first");
    let expiring = v5::PublishProperties {
        message_expiry_interval: Some(1),
        ..Default::default()
    };
    for _ in 0..300 {
        pubr.publish_with(
            "mx-many/t",
            v5::QoS::AtLeastOnce,
            false,
            b"short",
            Some(expiring.clone()),
        )
        .await;
    }
    pubr.publish("mx-many/t", v5::QoS::AtLeastOnce, false, b"kept")
        .await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // The acknowledgement frees the window: the connection takes 256 expired messages,
    // drops them all, and must come back for the rest.
    sub.ack(&first).await;
    let p = sub.recv().await;
    assert_eq!(
        &p.payload[..],
        b"kept",
        "the message behind 300 expired ones"
    );
}
