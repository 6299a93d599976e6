//! Durability: what the broker acknowledged survives `kill -9`.
//!
//! A persistent subscriber registers and leaves; a publisher sends a numbered QoS 1 or 2
//! storm; the broker is killed with SIGKILL at a random point; after the restart the
//! subscriber must receive every message whose PUBACK (QoS 1) or PUBREC (QoS 2) the
//! publisher got: QoS 1 at least once, QoS 2 exactly once, in order.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS};

use crate::harness::{Broker, WAIT, v5};

const LIMITS: &str = "max_queued_messages = 1000000\nmax_queued_bytes = 1000000000";
const STORM: u32 = 50_000;
const RUNS: u64 = 5;

fn options(broker: &Broker, id: &str, clean: bool) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", broker.port());
    o.set_clean_session(clean);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(64);
    o
}

/// Polls until `done` says an event is the awaited one; fails the test after [`WAIT`].
async fn poll_until(el: &mut EventLoop, what: &str, done: impl Fn(&Event) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, el.poll()).await {
            Ok(Ok(ev)) if done(&ev) => return,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("connection failed while waiting for {what}: {e}"),
            Err(_) => panic!("no {what} within {WAIT:?}"),
        }
    }
}

/// A persistent session subscribed to `storm/#`, then disconnected.
async fn register_subscriber(broker: &Broker, qos: QoS) {
    let (client, mut el) = AsyncClient::new(options(broker, "storm-sub", false), 10);
    client
        .subscribe("storm/#", qos)
        .await
        .expect("queue SUBSCRIBE");
    poll_until(&mut el, "SUBACK", |e| {
        matches!(e, Event::Incoming(Incoming::SubAck(_)))
    })
    .await;
    client.disconnect().await.expect("queue DISCONNECT");
    poll_until(&mut el, "DISCONNECT sent", |e| {
        matches!(e, Event::Outgoing(Outgoing::Disconnect))
    })
    .await;
}

/// Publishes the storm until the broker dies; returns the sequence numbers it acknowledged.
async fn publish_until_killed(broker: &Broker, qos: QoS, kill_after: Duration) -> HashSet<u32> {
    let (client, mut el) = AsyncClient::new(options(broker, "storm-pub", true), 1000);
    let producer = tokio::spawn(async move {
        for seq in 0..STORM {
            if client
                .publish("storm/x", qos, false, seq.to_be_bytes().to_vec())
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let pid = broker.pid();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(kill_after);
        let _ = std::process::Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status();
    });
    let mut seq_of: HashMap<u16, u32> = HashMap::new();
    let mut next = 0u32;
    let mut acked = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match tokio::time::timeout(WAIT, el.poll()).await {
            Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                seq_of.insert(pkid, next);
                next += 1;
            }
            Ok(Ok(Event::Incoming(Incoming::PubAck(a)))) if qos == QoS::AtLeastOnce => {
                acked.extend(seq_of.get(&a.pkid));
            }
            Ok(Ok(Event::Incoming(Incoming::PubRec(r)))) if qos == QoS::ExactlyOnce => {
                acked.extend(seq_of.get(&r.pkid));
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    producer.abort();
    let _ = killer.join();
    acked
}

/// Reconnects the persistent subscriber and collects payloads until 2 s of silence.
async fn drain_subscriber(broker: &Broker) -> Vec<u32> {
    let (_client, mut el) = AsyncClient::new(options(broker, "storm-sub", false), 10);
    let mut got = Vec::new();
    let mut present = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(2), el.poll()).await {
            Ok(Ok(Event::Incoming(Incoming::ConnAck(c)))) => present = Some(c.session_present),
            Ok(Ok(Event::Incoming(Incoming::Publish(p)))) => {
                let bytes: [u8; 4] = p.payload[..].try_into().expect("4-byte payload");
                got.push(u32::from_be_bytes(bytes));
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("subscriber connection failed: {e}"),
            Err(_) => break,
        }
    }
    assert_eq!(
        present,
        Some(true),
        "the persistent session survived the crash"
    );
    got
}

/// A small deterministic generator for kill points, seeded from the clock so runs differ.
fn kill_points(n: u64) -> Vec<Duration> {
    let mut x = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            Duration::from_millis(150 + x % 900)
        })
        .collect()
}

async fn storm(qos: QoS) {
    for (run, kill_after) in kill_points(RUNS).into_iter().enumerate() {
        let broker = Broker::start_with(LIMITS);
        register_subscriber(&broker, qos).await;
        let acked = publish_until_killed(&broker, qos, kill_after).await;
        let dir = broker.kill9();
        let broker = Broker::start_in(dir, LIMITS);
        let got = drain_subscriber(&broker).await;

        let received: HashSet<u32> = got.iter().copied().collect();
        let lost: Vec<u32> = {
            let mut l: Vec<u32> = acked.difference(&received).copied().collect();
            l.sort_unstable();
            l
        };
        let duplicates = got.len() - received.len();
        eprintln!(
            "run {run}: killed after {kill_after:?}; acknowledged {}, delivered {} ({duplicates} duplicates)",
            acked.len(),
            got.len()
        );
        assert!(
            !acked.is_empty(),
            "run {run}: nothing was acknowledged before the kill"
        );
        assert_eq!(
            lost,
            Vec::<u32>::new(),
            "run {run}: acknowledged messages lost"
        );
        if qos == QoS::ExactlyOnce {
            assert_eq!(duplicates, 0, "run {run}: QoS 2 messages duplicated");
        }
        // In order per publisher: first occurrences strictly increase (QoS 1 may repeat a
        // message, never reorder it).
        let mut seen = HashSet::new();
        let firsts: Vec<u32> = got.iter().copied().filter(|s| seen.insert(*s)).collect();
        assert!(
            firsts.windows(2).all(|w| w[0] < w[1]),
            "run {run}: messages out of order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_storm_survives_kill_9() {
    storm(QoS::AtLeastOnce).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_storm_survives_kill_9_exactly_once() {
    storm(QoS::ExactlyOnce).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_subscriptions_and_expiry_survive_restarts() {
    let broker = Broker::start();
    // A retained message, a persistent session that expires in 2 s and one that never
    // expires, each with a subscription.
    {
        let (c, mut el) = AsyncClient::new(options(&broker, "keeper", true), 10);
        c.publish("keep/r", QoS::AtLeastOnce, true, b"kept".to_vec())
            .await
            .expect("queue PUBLISH");
        poll_until(&mut el, "PUBACK", |e| {
            matches!(e, Event::Incoming(Incoming::PubAck(_)))
        })
        .await;
    }
    register_subscriber(&broker, QoS::AtLeastOnce).await;
    let dir = broker.kill9();

    let broker = Broker::start_in(dir, "");
    let (c, mut el) = AsyncClient::new(options(&broker, "reader", true), 10);
    c.subscribe("keep/#", QoS::AtLeastOnce)
        .await
        .expect("queue SUBSCRIBE");
    poll_until(&mut el, "retained message after kill -9", |e| {
        matches!(e, Event::Incoming(Incoming::Publish(p)) if p.retain && &p.payload[..] == b"kept")
    })
    .await;
    drop((c, el));
    // The subscription survived: a message published now reaches the offline session.
    {
        let (c, mut el) = AsyncClient::new(options(&broker, "pub2", true), 10);
        c.publish(
            "storm/after",
            QoS::AtLeastOnce,
            false,
            7u32.to_be_bytes().to_vec(),
        )
        .await
        .expect("queue PUBLISH");
        poll_until(&mut el, "PUBACK", |e| {
            matches!(e, Event::Incoming(Incoming::PubAck(_)))
        })
        .await;
    }
    // A clean restart keeps it too.
    let dir = broker.stop();
    let broker = Broker::start_in(dir, "");
    assert_eq!(drain_subscriber(&broker).await, vec![7]);
}

fn persistent5(broker: &Broker, id: &str, expiry: u32) -> v5::MqttOptions {
    let mut o = v5::options(broker, id);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(expiry));
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_is_honoured_across_restarts() {
    let broker = Broker::start();
    // One session that expires while the broker is down, one that outlives the restart.
    for (id, expiry) in [("brief", 2), ("lasting", 600)] {
        let mut c = v5::Client::connect(persistent5(&broker, id, expiry)).await;
        c.subscribe_ok("exp/t", v5::QoS::AtLeastOnce).await;
        c.disconnect().await;
    }
    let mut p = v5::Client::connect(v5::options(&broker, "exp-pub")).await;
    p.publish("exp/t", v5::QoS::AtLeastOnce, false, b"queued")
        .await;
    p.disconnect().await;
    let dir = broker.kill9();
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let broker = Broker::start_in(dir, "");
    let brief = v5::Client::connect(persistent5(&broker, "brief", 2)).await;
    assert!(
        !brief.connack.session_present,
        "a session that expired while the broker was down is gone"
    );
    let mut lasting = v5::Client::connect(persistent5(&broker, "lasting", 600)).await;
    assert!(lasting.connack.session_present);
    assert_eq!(&lasting.recv().await.payload[..], b"queued");
}

/// A session resumed with expiry 0 ends with its connection, and so with a crash of the
/// broker during that connection: after the restart it is gone (MQTT 5 §3.1.2.11.2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_resumed_with_expiry_zero_does_not_survive_a_crash() {
    let broker = Broker::start();
    let mut c = v5::Client::connect(persistent5(&broker, "ends", 600)).await;
    c.subscribe_ok("ends/t", v5::QoS::AtLeastOnce).await;
    c.disconnect().await;
    let mut o = v5::options(&broker, "ends");
    o.set_clean_start(false);
    let resumed = v5::Client::connect(o).await;
    assert!(resumed.connack.session_present);
    let dir = broker.kill9();
    drop(resumed);

    let broker = Broker::start_in(dir, "");
    let again = v5::Client::connect(persistent5(&broker, "ends", 600)).await;
    assert!(
        !again.connack.session_present,
        "a session resumed with expiry 0 outlived its connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_message_expiry_is_honoured_across_restarts() {
    let broker = Broker::start();
    let mut p = v5::Client::connect(v5::options(&broker, "rexp-pub")).await;
    let short = v5::PublishProperties {
        message_expiry_interval: Some(1),
        ..Default::default()
    };
    p.publish_with(
        "rexp/short",
        v5::QoS::AtLeastOnce,
        true,
        b"short",
        Some(short),
    )
    .await;
    p.publish("rexp/long", v5::QoS::AtLeastOnce, true, b"long")
        .await;
    p.disconnect().await;
    let dir = broker.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let broker = Broker::start_in(dir, "");
    let mut s = v5::Client::connect(v5::options(&broker, "rexp-sub")).await;
    s.subscribe_ok("rexp/#", v5::QoS::AtLeastOnce).await;
    let got = s.recv().await;
    assert_eq!(&got.payload[..], b"long");
    s.expect_silence().await;
}

/// A truncated or overwritten store stops the broker at start with an error naming the
/// file, never a panic and never a silent start with the data gone.
#[test]
fn damaged_store_is_refused_with_a_clear_error() {
    let broker = Broker::start();
    let dir = broker.stop();
    let file = dir.join("data").join("sandpiper.redb");
    let len = std::fs::metadata(&file).expect("store file").len();
    for damage in ["truncated", "garbage"] {
        match damage {
            "truncated" => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&file)
                    .expect("open store");
                f.set_len(len / 3).expect("truncate");
            }
            _ => std::fs::write(&file, vec![0xA5; 8192]).expect("overwrite"),
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sandpiper"))
            .arg("--config")
            .arg(dir.join("sandpiper.toml"))
            .arg("--data-dir")
            .arg(dir.join("data"))
            .output()
            .expect("run sandpiper");
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{damage}: started on a damaged store:\n{log}"
        );
        assert!(
            log.contains("sandpiper.redb") && !log.contains("panicked"),
            "{damage}: unclear error:\n{log}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
