//! Load sanity: several publishers, one wildcard subscriber, nothing lost, duplicated
//! or reordered per publisher.

use std::time::{Duration, Instant};

use crate::harness::{Broker, WAIT, queue, v3};

const PUBLISHERS: usize = 4;
const PER_PUBLISHER: usize = 2000;
const LOAD_DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_publishers_to_one_wildcard_subscriber_lose_nothing() {
    // The contract drops messages beyond max_queued_messages (default 1000) when the
    // subscriber falls behind; the queue must hold a full burst for "lose nothing".
    let broker = Broker::start_with("max_queued_messages = 10000");
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
