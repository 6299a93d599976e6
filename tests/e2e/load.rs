//! Load sanity: several publishers, one wildcard subscriber, nothing lost, duplicated
//! or reordered per publisher.

use std::time::{Duration, Instant};

use crate::harness::{Broker, WAIT, queue, raw, v3};

const PUBLISHERS: usize = 4;
const PER_PUBLISHER: usize = 2000;
const LOAD_DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_publishers_to_one_wildcard_subscriber_lose_nothing() {
    fan_in("max_queued_messages = 10000").await;
}

/// With the default queue limit (1000) the subscriber falls behind the four publishers;
/// back-pressure holds the publishers instead of dropping acknowledged messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_pressure_keeps_a_lagging_subscriber_lossless() {
    fan_in("").await;
}

/// A subscriber that stops reading is marked slow after the back-pressure timeout; from
/// then on the publisher is not held back by it and the healthy subscriber gets everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_subscriber_does_not_hold_back_others() {
    let broker = Broker::start_with("backpressure_timeout_ms = 300");
    // A raw client that subscribes and then never reads again.
    let mut stuck = raw::connect_tcp(&broker).await;
    raw::send(&mut stuck, &raw::connect_v311("stuck", true, 0)).await;
    raw::expect_packet(&mut stuck).await;
    let mut body = vec![0, 1];
    body.extend_from_slice(&(6u16).to_be_bytes());
    body.extend_from_slice(b"slow/#");
    body.push(1);
    raw::send(&mut stuck, &raw::packet(0x82, &body)).await;
    raw::expect_packet(&mut stuck).await;

    let mut healthy = v3::Client::connect(v3::options(&broker, "healthy")).await;
    healthy.subscribe_ok("slow/#", v3::QoS::AtLeastOnce).await;
    let publisher = v3::Client::connect(v3::options(&broker, "slow-pub")).await;
    const N: usize = 20_000;
    let started = Instant::now();
    let producer = tokio::spawn(async move {
        for seq in 0..N {
            queue(
                publisher
                    .client
                    .publish("slow/t", v3::QoS::AtLeastOnce, false, seq.to_string()),
                "PUBLISH",
            )
            .await;
        }
        publisher
    });
    for seq in 0..N {
        let p = healthy
            .recv_within(Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("healthy subscriber got only {seq} of {N}"));
        assert_eq!(p.payload, seq.to_string().as_bytes());
    }
    let elapsed = started.elapsed();
    let _publisher = producer.await.expect("publisher task");
    // One hold of 300 ms at most, not one per message.
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
    // Held back, then the subscriber marked slow: both counted.
    let m = crate::observability::scrape(&broker).await;
    let v = |name| crate::observability::value(&m, name);
    assert!(v("sandpiper_backpressure_waits_total") >= 1.0);
    assert_eq!(v("sandpiper_slow_subscribers_total"), 1.0);
    assert!(v("sandpiper_messages_dropped_total{reason=\"queue_full\"}") >= 1.0);
    drop(stuck);
}

async fn fan_in(mqtt: &str) {
    let broker = Broker::start_with(mqtt);
    let mut sub = v3::Client::connect(v3::options(&broker, "load-sub")).await;
    sub.subscribe_ok("load/#", v3::QoS::AtLeastOnce).await;

    let mut publishers = Vec::new();
    for i in 0..PUBLISHERS {
        let c = v3::Client::connect(v3::options(&broker, &format!("load-pub-{i}"))).await;
        publishers.push(tokio::spawn(async move {
            let topic = format!("load/{i}");
            for seq in 0..PER_PUBLISHER {
                let payload = format!("{i}:{seq}");
                queue(
                    c.client
                        .publish(&topic, v3::QoS::AtLeastOnce, false, payload),
                    "PUBLISH",
                )
                .await;
            }
            // Keep the connection until the subscriber is done.
            c
        }));
    }

    let deadline = Instant::now() + LOAD_DEADLINE;
    let mut next = [0usize; PUBLISHERS];
    let mut total = 0;
    while total < PUBLISHERS * PER_PUBLISHER {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(p) = sub.recv_within(left).await else {
            panic!("only {total} messages within {LOAD_DEADLINE:?}, per publisher {next:?}");
        };
        let text = String::from_utf8(p.payload.to_vec()).expect("utf-8 payload");
        let (who, seq) = text.split_once(':').expect("payload is `publisher:seq`");
        let who: usize = who.parse().expect("publisher index");
        let seq: usize = seq.parse().expect("sequence number");
        assert_eq!(p.topic, format!("load/{who}"));
        // 4.6: messages from one publisher on one topic keep their order; a gap or a
        // repeat shows up as a mismatch here.
        assert_eq!(
            seq, next[who],
            "publisher {who}: got {seq}, expected {}",
            next[who]
        );
        next[who] += 1;
        total += 1;
    }
    assert_eq!(next, [PER_PUBLISHER; PUBLISHERS]);
    // No duplicates trail behind.
    sub.expect_silence().await;
    for handle in publishers {
        let c = tokio::time::timeout(WAIT, handle)
            .await
            .expect("publisher task finished")
            .expect("publisher task did not panic");
        drop(c);
    }
}

/// A publisher held back for a congested subscriber is not read meanwhile: its silence is
/// the broker's doing, so its keep alive does not run out. With a keep alive of 1 s and a
/// back-pressure pause of up to 4 s, every QoS 1 message it sent in one go is read and
/// acknowledged once the pause ends; only then does its own silence count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_held_back_keeps_its_keep_alive() {
    let mut broker =
        Broker::start_with("backpressure_timeout_ms = 4000\nmax_queued_messages = 100");
    // A subscriber that never reads again.
    let mut stuck = raw::connect_tcp(&broker).await;
    raw::send(&mut stuck, &raw::connect_v311("ka-stuck", true, 0)).await;
    raw::expect_packet(&mut stuck).await;
    let mut body = vec![0, 1];
    body.extend_from_slice(&(4u16).to_be_bytes());
    body.extend_from_slice(b"ka/#");
    body.push(1);
    raw::send(&mut stuck, &raw::packet(0x82, &body)).await;
    raw::expect_packet(&mut stuck).await;

    let mut publisher = raw::connect_tcp(&broker).await;
    raw::send(&mut publisher, &raw::connect_v311("ka-pub", true, 1)).await;
    raw::expect_packet(&mut publisher).await;
    const N: u16 = 400;
    let mut burst = Vec::new();
    for id in 1..=N {
        burst.extend(raw::publish("ka/t", 1, false, id, &[7u8; 512], false));
    }
    raw::send(&mut publisher, &burst).await;
    // Then silence: PUBACKs are counted until the broker closes the connection.
    let mut acks = 0usize;
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Some((first, _)) = raw::read_packet(&mut publisher, Duration::from_secs(5)).await {
        if first == 0x40 {
            acks += 1;
        }
        assert!(Instant::now() < deadline, "still open after 20 s");
    }
    assert_eq!(
        acks,
        usize::from(N),
        "every PUBLISH read and acknowledged before the close"
    );
    drop(stuck);
    broker.assert_running();
}

/// Packets read while the connection's acknowledgements wait for the store are handled
/// when the store catches up, even when the client has nothing more to send: a persistent
/// session pipelines more SUBSCRIBE/UNSUBSCRIBE pairs than the broker holds answers for
/// (each one is a durable write) in one go, then waits for every answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_behind_held_acknowledgements_are_answered() {
    let mut broker = Broker::start();
    let mut s = raw::connect_tcp(&broker).await;
    raw::send(&mut s, &raw::connect_v311("held-pairs", false, 0)).await;
    raw::expect_packet(&mut s).await;
    // PINGREQs first: reading them grows the broker's reads to their largest, so one read
    // then holds more pairs than the broker holds answers for (1,024).
    let mut burst = [0xC0u8, 0].repeat(100_000);
    const PAIRS: u16 = 3_000;
    for i in 0..PAIRS {
        let filter = format!("h/{i}");
        let mut body = (2 * i + 1).to_be_bytes().to_vec();
        body.extend_from_slice(&u16::try_from(filter.len()).unwrap_or(0).to_be_bytes());
        body.extend_from_slice(filter.as_bytes());
        body.push(1);
        burst.extend(raw::packet(0x82, &body));
        let mut body = (2 * i + 2).to_be_bytes().to_vec();
        body.extend_from_slice(&u16::try_from(filter.len()).unwrap_or(0).to_be_bytes());
        body.extend_from_slice(filter.as_bytes());
        burst.extend(raw::packet(0xA2, &body));
    }
    raw::send(&mut s, &burst).await;
    let (mut pings, mut subacks, mut unsubacks) = (0u32, 0u16, 0u16);
    while subacks + unsubacks < 2 * PAIRS {
        let Some((first, _)) = raw::read_packet(&mut s, Duration::from_secs(10)).await else {
            break;
        };
        match first {
            0xD0 => pings += 1,
            0x90 => subacks += 1,
            0xB0 => unsubacks += 1,
            other => panic!("unexpected packet {other:#04x}"),
        }
    }
    assert_eq!(
        (pings, subacks, unsubacks),
        (100_000, PAIRS, PAIRS),
        "every packet answered"
    );
    broker.assert_running();
}
