//! MQTT 5 features: property forwarding, subscription identifiers, message expiry,
//! Receive Maximum (outbound window), topic aliases, no-local, Maximum Packet Size.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;

use crate::harness::{Broker, raw, v3, v5};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_publish_properties_are_forwarded_unchanged() {
    let broker = Broker::start();
    let mut sub = v5::Client::connect(v5::options(&broker, "props-sub")).await;
    sub.subscribe_filters(
        vec![v5::Filter::new("props/#", v5::QoS::AtLeastOnce)],
        Some(42),
    )
    .await;
    let mut pubr = v5::Client::connect(v5::options(&broker, "props-pub")).await;
    let user = vec![
        ("a".to_string(), "1".to_string()),
        ("b".to_string(), "2".to_string()),
        ("a".to_string(), "3".to_string()),
    ];
    let sent = v5::PublishProperties {
        payload_format_indicator: Some(1),
        response_topic: Some("props/reply".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
        user_properties: user.clone(),
        content_type: Some("application/json".into()),
        ..Default::default()
    };
    pubr.publish_with(
        "props/x",
        v5::QoS::AtLeastOnce,
        false,
        b"{\"k\":1}",
        Some(sent),
    )
    .await;

    let p = sub.recv().await;
    assert_eq!(v5::topic(&p), "props/x");
    let got = p.properties.expect("properties forwarded");
    // [MQTT-3.3.2-17]/[MQTT-3.3.2-18] user properties unaltered and in order.
    assert_eq!(got.user_properties, user);
    // [MQTT-3.3.2-20] content type, [MQTT-3.3.2-15]/[MQTT-3.3.2-16] response topic and
    // correlation data, [MQTT-3.3.2-4] payload format indicator: all unaltered.
    assert_eq!(got.content_type.as_deref(), Some("application/json"));
    assert_eq!(got.response_topic.as_deref(), Some("props/reply"));
    assert_eq!(got.correlation_data.as_deref(), Some(&b"\x00\x01corr"[..]));
    assert_eq!(got.payload_format_indicator, Some(1));
    // [MQTT-3.3.4-3] the subscription identifier of the matching subscription.
    assert_eq!(got.subscription_identifiers, vec![42]);
    // The subscriber's Topic Alias Maximum is 0, so no alias may be used.
    assert_eq!(got.topic_alias, None);
    assert_eq!(got.message_expiry_interval, None, "no expiry was set");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_overlapping_subscriptions_carry_all_identifiers() {
    let broker = Broker::start();
    let mut sub = v5::Client::connect(v5::options(&broker, "ids")).await;
    sub.subscribe_filters(vec![v5::Filter::new("ids/+", v5::QoS::AtMostOnce)], Some(1))
        .await;
    sub.subscribe_filters(
        vec![v5::Filter::new("ids/#", v5::QoS::AtLeastOnce)],
        Some(2),
    )
    .await;
    let mut pubr = v5::Client::connect(v5::options(&broker, "ids-pub")).await;
    pubr.publish("ids/x", v5::QoS::AtLeastOnce, false, b"x")
        .await;
    // The contract: one copy at the maximum granted QoS with every matching identifier
    // ([MQTT-3.3.4-4], order not significant).
    let p = sub.recv().await;
    assert_eq!(p.qos, v5::QoS::AtLeastOnce);
    let ids: BTreeSet<usize> = p
        .properties
        .expect("properties with subscription identifiers")
        .subscription_identifiers
        .into_iter()
        .collect();
    assert_eq!(ids, BTreeSet::from([1, 2]));
    sub.expect_silence().await;
}

fn expiring(seconds: u32) -> v5::PublishProperties {
    v5::PublishProperties {
        message_expiry_interval: Some(seconds),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_message_expiry_is_forwarded_on_live_delivery() {
    let broker = Broker::start();
    let mut sub = v5::Client::connect(v5::options(&broker, "exp-sub")).await;
    sub.subscribe_ok("exp/#", v5::QoS::AtLeastOnce).await;
    let mut pubr = v5::Client::connect(v5::options(&broker, "exp-pub")).await;
    pubr.publish_with(
        "exp/t",
        v5::QoS::AtLeastOnce,
        false,
        b"x",
        Some(expiring(100)),
    )
    .await;
    let p = sub.recv().await;
    // [MQTT-3.3.2-6] forwarded with the remaining interval (received value minus time
    // waited in the server: effectively none here).
    let left = p
        .properties
        .and_then(|pr| pr.message_expiry_interval)
        .expect("Message Expiry Interval forwarded");
    assert!((95..=100).contains(&left), "remaining expiry {left}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_queued_message_expiry_is_decremented_and_expired_ones_dropped() {
    let broker = Broker::start();
    let mut opts = v5::options(&broker, "exp-off");
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(120));
    let mut sub = v5::Client::connect(opts.clone()).await;
    sub.subscribe_ok("expq/#", v5::QoS::AtLeastOnce).await;
    sub.disconnect().await;

    let mut pubr = v5::Client::connect(v5::options(&broker, "exp-pub")).await;
    // Published first, so if it were (wrongly) kept it would be delivered first.
    pubr.publish_with(
        "expq/short",
        v5::QoS::AtLeastOnce,
        false,
        b"short",
        Some(expiring(1)),
    )
    .await;
    pubr.publish_with(
        "expq/long",
        v5::QoS::AtLeastOnce,
        false,
        b"long",
        Some(expiring(60)),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2200)).await;

    let mut sub = v5::Client::connect(opts).await;
    assert!(sub.connack.session_present);
    let p = sub.recv().await;
    // [MQTT-3.3.2-5] an expired message is not delivered.
    assert_eq!(v5::topic(&p), "expq/long", "the 1 s message had expired");
    // [MQTT-3.3.2-6] the remaining lifetime is reduced by the 2.2 s spent queued.
    let left = p
        .properties
        .and_then(|pr| pr.message_expiry_interval)
        .expect("Message Expiry Interval forwarded");
    assert!(
        (50..=58).contains(&left),
        "remaining expiry {left}, expected ≤ 58"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_receive_maximum_limits_unacknowledged_deliveries() {
    let broker = Broker::start();
    let mut opts = v5::options(&broker, "rm-sub");
    opts.set_receive_maximum(Some(2));
    opts.set_manual_acks(true);
    let mut sub = v5::Client::connect(opts).await;
    sub.subscribe_ok("rm/t", v5::QoS::AtLeastOnce).await;
    let mut pubr = v5::Client::connect(v5::options(&broker, "rm-pub")).await;
    for i in 0..10u8 {
        pubr.publish("rm/t", v5::QoS::AtLeastOnce, false, &[i])
            .await;
    }

    let mut delivered = Vec::new();
    let mut max_window = 0;
    while delivered.len() < 10 {
        let mut unacked = Vec::new();
        while let Some(p) = sub.recv_within(Duration::from_millis(300)).await {
            unacked.push(p);
            // [MQTT-3.3.4-9] no more than Receive Maximum unacknowledged QoS>0 PUBLISHes.
            assert!(
                unacked.len() <= 2,
                "{} unacknowledged PUBLISHes, client Receive Maximum is 2",
                unacked.len()
            );
        }
        assert!(
            !unacked.is_empty(),
            "delivery stalled after {} of 10 messages",
            delivered.len()
        );
        max_window = max_window.max(unacked.len());
        for p in unacked {
            sub.ack(&p).await;
            delivered.push(p.payload[0]);
        }
    }
    assert_eq!(delivered, (0..10).collect::<Vec<u8>>(), "in publish order");
    assert_eq!(
        max_window, 2,
        "the window is min(Receive Maximum, max_inflight)"
    );
    sub.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_inbound_topic_alias_is_resolved() {
    let broker = Broker::start_with("topic_alias_maximum = 4");
    let mut sub = v5::Client::connect(v5::options(&broker, "ta-sub")).await;
    sub.subscribe_ok("ta/#", v5::QoS::AtLeastOnce).await;
    let mut pubr = v5::Client::connect(v5::options(&broker, "ta-pub")).await;
    let alias = v5::PublishProperties {
        topic_alias: Some(3),
        ..Default::default()
    };
    // 3.3.2.3.4: first PUBLISH sets alias 3, the second uses it with an empty topic.
    pubr.publish_with(
        "ta/long/topic",
        v5::QoS::AtLeastOnce,
        false,
        b"1",
        Some(alias.clone()),
    )
    .await;
    pubr.publish_with("", v5::QoS::AtLeastOnce, false, b"2", Some(alias))
        .await;
    for payload in [b"1", b"2"] {
        let p = sub.recv().await;
        assert_eq!(&p.payload[..], payload);
        assert_eq!(v5::topic(&p), "ta/long/topic");
        // The subscriber allowed no aliases (Topic Alias Maximum 0).
        assert_eq!(p.properties.and_then(|pr| pr.topic_alias), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_no_local_suppresses_own_messages() {
    let broker = Broker::start();
    let mut me = v5::Client::connect(v5::options(&broker, "nl-me")).await;
    let mut f = v5::Filter::new("nl/t", v5::QoS::AtLeastOnce);
    f.nolocal = true;
    me.subscribe_filters(vec![f], None).await;
    me.publish("nl/t", v5::QoS::AtLeastOnce, false, b"mine")
        .await;
    let mut other = v5::Client::connect(v5::options(&broker, "nl-other")).await;
    other
        .publish("nl/t", v5::QoS::AtLeastOnce, false, b"theirs")
        .await;
    // [MQTT-3.8.3-3] no-local: own publications are not forwarded back.
    let p = me.recv().await;
    assert_eq!(&p.payload[..], b"theirs");
    me.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_client_maximum_packet_size_is_honoured() {
    let broker = Broker::start();
    let mut opts = v5::options(&broker, "mps-small");
    opts.set_max_packet_size(Some(256));
    let mut small = v5::Client::connect(opts).await;
    small.subscribe_ok("mps/t", v5::QoS::AtLeastOnce).await;
    let mut big = v5::Client::connect(v5::options(&broker, "mps-big")).await;
    big.subscribe_ok("mps/t", v5::QoS::AtLeastOnce).await;
    let mut pubr = v5::Client::connect(v5::options(&broker, "mps-pub")).await;
    pubr.publish("mps/t", v5::QoS::AtLeastOnce, false, &[b'x'; 1000])
        .await;
    pubr.publish("mps/t", v5::QoS::AtLeastOnce, false, b"tiny")
        .await;

    // [MQTT-3.1.2-24]/[MQTT-3.1.2-25] never send a packet above the client's Maximum Packet Size; the
    // message is dropped for that subscriber only and the connection stays up.
    let p = small.recv().await;
    assert_eq!(&p.payload[..], b"tiny");
    assert!(!small.inbox.is_closed());
    assert_eq!(big.recv().await.payload.len(), 1000);
    assert_eq!(&big.recv().await.payload[..], b"tiny");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_oversized_packet_gets_disconnect_0x95() {
    let broker = Broker::start_with("max_packet_size = 1024");
    let mut s = raw::connect_v5(&broker, "too-big").await;
    raw::send(
        &mut s,
        &raw::publish("big/t", 0, false, 0, &[b'x'; 4000], true),
    )
    .await;
    // 3.2.2.3.6: above the server's Maximum Packet Size → DISCONNECT 0x95, then close.
    assert_eq!(raw::disconnect_codes(&mut s).await, vec![0x95]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_topic_alias_above_maximum_gets_disconnect_0x94() {
    let broker = Broker::start_with("topic_alias_maximum = 4");
    let mut s = raw::connect_v5(&broker, "bad-alias").await;
    // PUBLISH QoS 0 "ta/x" with properties { Topic Alias (0x23) = 5 }.
    let mut body = vec![0x00, 0x04];
    body.extend_from_slice(b"ta/x");
    body.extend_from_slice(&[0x03, 0x23, 0x00, 0x05]);
    body.extend_from_slice(b"p");
    raw::send(&mut s, &raw::packet(0x30, &body)).await;
    // 3.3.2.3.4: an alias above the server's Topic Alias Maximum → DISCONNECT 0x94.
    assert_eq!(raw::disconnect_codes(&mut s).await, vec![0x94]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_exceeding_server_receive_maximum_gets_disconnect_0x93() {
    let broker = Broker::start_with("receive_maximum = 2");
    let mut s = raw::connect_v5(&broker, "flood").await;
    // Three QoS 2 PUBLISHes never released: the third exceeds Receive Maximum 2.
    for id in 1..=3u16 {
        raw::send(&mut s, &raw::publish("rx/t", 2, false, id, b"p", true)).await;
    }
    // 3.3.4 / 4.9: the server answers DISCONNECT 0x93 (Receive Maximum exceeded).
    assert_eq!(raw::disconnect_codes(&mut s).await.last(), Some(&0x93));
}

/// A client that writes more QoS 2 PUBLISHes than our Receive Maximum (256) in one go,
/// and only then reads, answering each PUBREC with its PUBREL as a client library does,
/// must read every PUBREC the broker sent and then DISCONNECT 0x93. The broker has closed
/// by the time the PUBRELs arrive: unless it closes gracefully (shuts its side down and
/// reads what is still coming), they meet a closed socket, the kernel answers with a
/// reset, and the client's next write fails before it has read why it was disconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_disconnect_0x93_reaches_a_client_that_is_still_answering() {
    let broker = Broker::start();
    let mut s = raw::connect_v5(&broker, "burst").await;
    let mut burst = Vec::new();
    for id in 1..=257u16 {
        burst.extend(raw::publish("burst/t", 2, false, id, b"p", true));
    }
    raw::send(&mut s, &burst).await;
    // The broker handles the burst and closes meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut pubrecs = 0;
    let mut disconnect = None;
    while let Some((first, body)) = raw::read_packet(&mut s, crate::harness::WAIT).await {
        match first {
            0x50 => {
                assert!(disconnect.is_none(), "PUBREC after DISCONNECT");
                pubrecs += 1;
                let id = body.get(..2).expect("packet id").to_vec();
                raw::send(&mut s, &raw::packet(0x62, &id)).await;
            }
            0xE0 => disconnect = body.first().copied(),
            other => panic!("unexpected packet {other:#x}"),
        }
    }
    assert_eq!(pubrecs, 256, "one PUBREC per accepted PUBLISH");
    assert_eq!(
        disconnect,
        Some(0x93),
        "DISCONNECT Receive Maximum exceeded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_and_v311_subscribers_both_get_v5_publish() {
    let broker = Broker::start();
    let mut old = v3::Client::connect(v3::options(&broker, "old")).await;
    old.subscribe_ok("mixed/t", v3::QoS::AtLeastOnce).await;
    let mut pubr = v5::Client::connect(v5::options(&broker, "new-pub")).await;
    let props = v5::PublishProperties {
        user_properties: vec![("x".into(), "y".into())],
        ..Default::default()
    };
    pubr.publish_with("mixed/t", v5::QoS::AtLeastOnce, false, b"both", Some(props))
        .await;
    // A 3.1.1 subscriber gets the same application message, minus v5 properties.
    let p = old.recv().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("mixed/t", &b"both"[..])
    );
}

/// `max_session_expiry` defaults to 7 days: a client asking for a session that never
/// expires (0xFFFFFFFF) is told 604,800 s in CONNACK; one asking for less keeps its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_session_expiry_is_capped_at_seven_days_by_default() {
    let broker = Broker::start();
    let mut o = v5::options(&broker, "forever");
    o.set_session_expiry_interval(Some(u32::MAX));
    let c = v5::Client::connect(o).await;
    let props = c.connack.properties.clone().expect("CONNACK properties");
    assert_eq!(props.session_expiry_interval, Some(7 * 24 * 3600));
    c.disconnect().await;

    let mut o = v5::options(&broker, "a-day");
    o.set_session_expiry_interval(Some(86_400));
    let c = v5::Client::connect(o).await;
    let props = c.connack.properties.clone().expect("CONNACK properties");
    assert_eq!(
        props.session_expiry_interval, None,
        "the client's own value stands"
    );
}
