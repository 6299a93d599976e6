//! QoS 0/1/2 in both directions, downgrade to the granted QoS, exactly-once inbound,
//! overlapping subscriptions and the outbound in-flight window for 3.1.1 clients.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::harness::{Broker, raw, v3, v5};

const LEVELS: [u8; 3] = [0, 1, 2];

fn qos3(level: u8) -> v3::QoS {
    match level {
        0 => v3::QoS::AtMostOnce,
        1 => v3::QoS::AtLeastOnce,
        _ => v3::QoS::ExactlyOnce,
    }
}

fn qos5(level: u8) -> v5::QoS {
    match level {
        0 => v5::QoS::AtMostOnce,
        1 => v5::QoS::AtLeastOnce,
        _ => v5::QoS::ExactlyOnce,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_delivery_qos_is_min_of_publish_and_granted() {
    let broker = Broker::start();
    let mut sub = v3::Client::connect(v3::options(&broker, "matrix-sub")).await;
    for s in LEVELS {
        sub.subscribe_ok(&format!("matrix/s{s}"), qos3(s)).await;
    }
    let mut pubr = v3::Client::connect(v3::options(&broker, "matrix-pub")).await;
    for s in LEVELS {
        for p in LEVELS {
            pubr.publish(
                &format!("matrix/s{s}"),
                qos3(p),
                false,
                format!("s{s}p{p}").as_bytes(),
            )
            .await;
        }
    }
    let mut got = BTreeMap::new();
    for _ in 0..9 {
        let p = sub.recv().await;
        let key = String::from_utf8(p.payload.to_vec()).expect("utf-8 payload");
        assert!(
            got.insert(key.clone(), p.qos).is_none(),
            "{key} delivered twice"
        );
        if p.qos != v3::QoS::AtMostOnce {
            assert_ne!(p.pkid, 0, "QoS>0 PUBLISH needs a packet id");
        }
    }
    // [MQTT-3.8.4-6] / 4.3: delivered at min(publish QoS, granted QoS), each exactly once.
    for s in LEVELS {
        for p in LEVELS {
            assert_eq!(
                got.get(&format!("s{s}p{p}")),
                Some(&qos3(s.min(p))),
                "sub QoS {s}, pub QoS {p}"
            );
        }
    }
    sub.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_delivery_qos_is_min_of_publish_and_granted() {
    let broker = Broker::start();
    let mut sub = v5::Client::connect(v5::options(&broker, "matrix-sub")).await;
    for s in LEVELS {
        sub.subscribe_ok(&format!("matrix/s{s}"), qos5(s)).await;
    }
    let mut pubr = v5::Client::connect(v5::options(&broker, "matrix-pub")).await;
    for s in LEVELS {
        for p in LEVELS {
            pubr.publish(
                &format!("matrix/s{s}"),
                qos5(p),
                false,
                format!("s{s}p{p}").as_bytes(),
            )
            .await;
        }
    }
    let mut got = BTreeMap::new();
    for _ in 0..9 {
        let p = sub.recv().await;
        let key = String::from_utf8(p.payload.to_vec()).expect("utf-8 payload");
        assert!(
            got.insert(key.clone(), p.qos).is_none(),
            "{key} delivered twice"
        );
    }
    for s in LEVELS {
        for p in LEVELS {
            assert_eq!(
                got.get(&format!("s{s}p{p}")),
                Some(&qos5(s.min(p))),
                "sub QoS {s}, pub QoS {p}"
            );
        }
    }
    sub.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_and_v5_clients_interoperate() {
    let broker = Broker::start();
    let mut sub3 = v3::Client::connect(v3::options(&broker, "mix-3")).await;
    sub3.subscribe_ok("mix/#", v3::QoS::ExactlyOnce).await;
    let mut sub5 = v5::Client::connect(v5::options(&broker, "mix-5")).await;
    sub5.subscribe_ok("mix/#", v5::QoS::ExactlyOnce).await;

    sub3.publish("mix/from3", v3::QoS::ExactlyOnce, false, b"three")
        .await;
    sub5.publish("mix/from5", v5::QoS::ExactlyOnce, false, b"five")
        .await;
    for _ in 0..2 {
        let p = sub3.recv().await;
        assert_eq!(p.qos, v3::QoS::ExactlyOnce);
        assert!(p.topic == "mix/from3" || p.topic == "mix/from5");
        let p = sub5.recv().await;
        assert_eq!(p.qos, v5::QoS::ExactlyOnce);
        let t = v5::topic(&p);
        assert!(t == "mix/from3" || t == "mix/from5");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_resent_before_pubrel_is_delivered_once() {
    let broker = Broker::start();
    let mut sub = v3::Client::connect(v3::options(&broker, "once-sub")).await;
    sub.subscribe_ok("once/t", v3::QoS::ExactlyOnce).await;

    let mut s = raw::connect_tcp(&broker).await;
    raw::send(&mut s, &raw::connect_v311("once-pub", true, 30)).await;
    assert_eq!(raw::expect_packet(&mut s).await, (0x20, vec![0x00, 0x00]));
    raw::send(
        &mut s,
        &raw::publish("once/t", 2, false, 7, b"only-once", false),
    )
    .await;
    assert_eq!(
        raw::expect_packet(&mut s).await,
        (0x50, vec![0x00, 0x07]),
        "PUBREC"
    );
    // 4.3.3: a retransmission (DUP=1, same id) before PUBREL gets another PUBREC and
    // must not cause a second onward delivery.
    raw::send(
        &mut s,
        &raw::publish("once/t", 2, true, 7, b"only-once", false),
    )
    .await;
    assert_eq!(
        raw::expect_packet(&mut s).await,
        (0x50, vec![0x00, 0x07]),
        "PUBREC"
    );
    raw::send(&mut s, &[0x62, 0x02, 0x00, 0x07]).await;
    assert_eq!(
        raw::expect_packet(&mut s).await,
        (0x70, vec![0x00, 0x07]),
        "PUBCOMP"
    );

    let p = sub.recv().await;
    assert_eq!(&p.payload[..], b"only-once");
    sub.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_subscriptions_get_one_copy_at_max_qos() {
    let broker = Broker::start();
    let mut sub = v3::Client::connect(v3::options(&broker, "overlap")).await;
    sub.subscribe_ok("ov/+", v3::QoS::AtMostOnce).await;
    sub.subscribe_ok("ov/#", v3::QoS::ExactlyOnce).await;
    let mut pubr = v3::Client::connect(v3::options(&broker, "ov-pub")).await;
    pubr.publish("ov/x", v3::QoS::ExactlyOnce, false, b"both")
        .await;
    // [MQTT-3.3.5-1] the maximum QoS of the matching subscriptions; the contract
    // promises a single copy.
    let p = sub.recv().await;
    assert_eq!(p.qos, v3::QoS::ExactlyOnce);
    sub.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_outbound_inflight_is_capped_by_max_inflight() {
    let broker = Broker::start_with("max_inflight = 3");
    let mut opts = v3::options(&broker, "window-sub");
    opts.set_manual_acks(true);
    let mut sub = v3::Client::connect(opts).await;
    sub.subscribe_ok("win/t", v3::QoS::AtLeastOnce).await;
    let mut pubr = v3::Client::connect(v3::options(&broker, "window-pub")).await;
    for i in 0..10u8 {
        pubr.publish("win/t", v3::QoS::AtLeastOnce, false, &[i])
            .await;
    }

    let mut delivered = Vec::new();
    let mut max_window = 0;
    while delivered.len() < 10 {
        // Take everything the broker sends while nothing is acknowledged.
        let mut unacked = Vec::new();
        while let Some(p) = sub.recv_within(Duration::from_millis(300)).await {
            unacked.push(p);
            assert!(
                unacked.len() <= 3,
                "{} unacknowledged QoS 1 PUBLISHes outstanding, max_inflight is 3",
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
        max_window, 3,
        "the window is min(client limit, max_inflight)"
    );
    sub.expect_silence().await;
}
