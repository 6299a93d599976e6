//! Durability: what the broker acknowledged survives `kill -9`.
//!
//! A persistent subscriber registers and leaves; a publisher sends a numbered QoS 1 or 2
//! storm; the broker is killed with SIGKILL at a random point; after the restart the
//! subscriber must receive every message whose PUBACK (QoS 1) or PUBREC (QoS 2) the
//! publisher got: QoS 1 at least once, QoS 2 exactly once, in order.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS};

use crate::harness::{Broker, WAIT, raw, v5};

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

/// An MQTT 3.1.1 QoS 2 sender done by hand, its state kept across connections as a client
/// with persistent state must (MQTT 4.3.3, 4.4): what awaits PUBREC is resent with DUP,
/// what awaits PUBCOMP has its PUBREL resent, and packet ids come from a small pool so
/// that ids are reused soon after their PUBCOMP.
struct Qos2Sender {
    free: std::collections::VecDeque<u16>,
    /// id → (sequence number, released: PUBREC received and PUBREL sent).
    inflight: std::collections::BTreeMap<u16, (u32, bool)>,
    next: u32,
    total: u32,
    /// Sequence numbers the broker acknowledged with PUBREC.
    acked: HashSet<u32>,
}

/// The receiving end: delivers a message when its PUBLISH first arrives and remembers the
/// packet id until PUBREL (method B of MQTT 4.3.3), across connections.
#[derive(Default)]
struct Qos2Receiver {
    awaiting_rel: HashSet<u16>,
    got: Vec<u32>,
}

mod wire {
    use crate::harness::raw;

    pub fn publish(id: u16, seq: u32, dup: bool) -> Vec<u8> {
        raw::publish("storm2/x", 2, dup, id, &seq.to_be_bytes(), false)
    }

    pub fn ack(first: u8, id: u16) -> Vec<u8> {
        raw::packet(first, &id.to_be_bytes())
    }

    pub fn id(body: &[u8]) -> Option<u16> {
        Some(u16::from_be_bytes(body.get(..2)?.try_into().ok()?))
    }
}

/// Connects with Clean Session 0 and reads the CONNACK; `None` if the broker is gone.
async fn connect_persistent(addr: std::net::SocketAddr, id: &str) -> Option<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.set_nodelay(true).ok()?;
    s.write_all(&crate::harness::raw::connect(
        "MQTT", 4, id, false, 60, None,
    ))
    .await
    .ok()?;
    match crate::harness::raw::read_packet(&mut s, Duration::from_secs(30)).await {
        Some((0x20, body)) if body.get(1) == Some(&0) => Some(s),
        _ => None,
    }
}

impl Qos2Sender {
    fn new(total: u32) -> Qos2Sender {
        Qos2Sender {
            free: (1..=32).collect(),
            inflight: Default::default(),
            next: 0,
            total,
            acked: HashSet::new(),
        }
    }

    fn done(&self) -> bool {
        self.next >= self.total && self.inflight.is_empty()
    }

    /// Resumes its flows and sends until `total` or until the connection fails.
    async fn run(&mut self, addr: std::net::SocketAddr) {
        use tokio::io::AsyncWriteExt;
        let Some(mut s) = connect_persistent(addr, "storm2-pub").await else {
            return;
        };
        let mut out = Vec::new();
        for (&id, &(seq, released)) in &self.inflight {
            out.extend(if released {
                wire::ack(0x62, id)
            } else {
                wire::publish(id, seq, true)
            });
        }
        loop {
            while self.next < self.total {
                let Some(id) = self.free.pop_front() else {
                    break;
                };
                out.extend(wire::publish(id, self.next, false));
                self.inflight.insert(id, (self.next, false));
                self.next += 1;
            }
            if !out.is_empty() && s.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
            if self.done() {
                return;
            }
            let Some((first, body)) =
                crate::harness::raw::read_packet(&mut s, Duration::from_secs(30)).await
            else {
                return;
            };
            let Some(id) = wire::id(&body) else { return };
            match first {
                0x50 => {
                    if let Some(e) = self.inflight.get_mut(&id) {
                        self.acked.insert(e.0);
                        e.1 = true;
                        out.extend(wire::ack(0x62, id));
                    }
                }
                0x70 if self.inflight.remove(&id).is_some() => self.free.push_back(id),
                _ => {}
            }
        }
    }
}

impl Qos2Receiver {
    /// Receives until the connection fails or `quiet` passes without a packet.
    async fn run(&mut self, addr: std::net::SocketAddr, subscribe: bool, quiet: Duration) {
        use tokio::io::AsyncWriteExt;
        let Some(mut s) = connect_persistent(addr, "storm2-sub").await else {
            return;
        };
        if subscribe {
            let mut body = 1u16.to_be_bytes().to_vec();
            body.extend_from_slice(&[0, 8]);
            body.extend_from_slice(b"storm2/#");
            body.push(2);
            if s.write_all(&crate::harness::raw::packet(0x82, &body))
                .await
                .is_err()
            {
                return;
            }
        }
        loop {
            let next = tokio::time::timeout(
                quiet,
                crate::harness::raw::read_packet(&mut s, Duration::from_secs(3600)),
            )
            .await;
            let Ok(Some((first, body))) = next else {
                return;
            };
            let answer = match first >> 4 {
                3 => {
                    assert_eq!((first >> 1) & 3, 2, "QoS 2 delivery");
                    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                    let Some(id) = wire::id(&body[2 + topic_len..]) else {
                        return;
                    };
                    let seq: [u8; 4] = body[4 + topic_len..].try_into().expect("4-byte payload");
                    if self.awaiting_rel.insert(id) {
                        self.got.push(u32::from_be_bytes(seq));
                    }
                    wire::ack(0x50, id)
                }
                6 => {
                    let Some(id) = wire::id(&body) else { return };
                    self.awaiting_rel.remove(&id);
                    wire::ack(0x70, id)
                }
                _ => continue,
            };
            if s.write_all(&answer).await.is_err() {
                return;
            }
        }
    }
}

/// QoS 2 in both directions at once, the broker killed with SIGKILL at a random moment:
/// after the restart both ends resume their flows (the sender also reuses packet ids
/// whose PUBCOMP it had), and every message the broker acknowledged with PUBREC reaches
/// the receiver exactly once. This holds only if PUBCOMP goes out after the inbound id is
/// forgotten on disk and PUBREL after the outbound stage is on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_both_directions_survive_kill_9_exactly_once() {
    for (run, kill_after) in kill_points(3).into_iter().enumerate() {
        let kill_after = kill_after + Duration::from_millis(300);
        let broker = Broker::start_with(LIMITS);
        let addr = broker.addr();
        let receiving = tokio::spawn(async move {
            let mut rx = Qos2Receiver::default();
            rx.run(addr, true, Duration::from_secs(3600)).await;
            rx
        });
        let sending = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut tx = Qos2Sender::new(STORM);
            tx.run(addr).await;
            tx
        });
        tokio::time::sleep(kill_after).await;
        let dir = broker.kill9();
        let mut rx = receiving.await.unwrap();
        let mut tx = sending.await.unwrap();
        let before = (tx.acked.len(), rx.got.len());

        let broker = Broker::start_in(dir, LIMITS);
        tx.total = tx.next + 2_000;
        tx.run(broker.addr()).await;
        assert!(
            tx.done(),
            "run {run}: the sender finished after the restart"
        );
        rx.run(broker.addr(), false, Duration::from_secs(2)).await;

        let got: HashSet<u32> = rx.got.iter().copied().collect();
        let duplicates = rx.got.len() - got.len();
        let mut lost: Vec<u32> = tx.acked.difference(&got).copied().collect();
        lost.sort_unstable();
        eprintln!(
            "run {run}: killed after {kill_after:?} with {} acknowledged and {} received; \
             in all {} acknowledged, {} received, {duplicates} duplicates",
            before.0,
            before.1,
            tx.acked.len(),
            rx.got.len()
        );
        assert!(
            before.0 > 0,
            "run {run}: nothing was acknowledged before the kill"
        );
        assert_eq!(duplicates, 0, "run {run}: QoS 2 delivered twice");
        assert!(
            lost.is_empty(),
            "run {run}: acknowledged and lost: {lost:?}"
        );
    }
}

/// With `durability = "periodic"` acknowledgements do not wait for the disk: a kill -9 can
/// lose what was acknowledged in the last `fsync_interval_ms`, never anything older, and
/// what it loses is the most recent messages (the store commits in order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_durability_loses_at_most_the_last_interval() {
    let config = "[[listener]]\nname = \"default\"\nbind = \"127.0.0.1:0\"\n\n\
                  [mqtt]\nmax_queued_messages = 100000\n\n\
                  [store]\ndurability = \"periodic\"\nfsync_interval_ms = 100\n";
    let broker = Broker::start_config_in(Broker::temp_dir(), config);
    register_subscriber(&broker, QoS::AtLeastOnce).await;
    let publish = |broker: &Broker, from: u32, n: u32| {
        let (client, mut el) = AsyncClient::new(options(broker, "periodic-pub", true), 1000);
        async move {
            for seq in from..from + n {
                client
                    .publish(
                        "storm/x",
                        QoS::AtLeastOnce,
                        false,
                        seq.to_be_bytes().to_vec(),
                    )
                    .await
                    .expect("queue PUBLISH");
            }
            let mut acks = 0;
            while acks < n {
                match tokio::time::timeout(WAIT, el.poll()).await {
                    Ok(Ok(Event::Incoming(Incoming::PubAck(_)))) => acks += 1,
                    Ok(Ok(_)) => {}
                    other => panic!("publisher: {other:?} after {acks} PUBACKs"),
                }
            }
        }
    };
    // Acknowledged, then 5 intervals pass: all of it survives.
    publish(&broker, 0, 500).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dir = broker.kill9();
    let broker = Broker::start_config_in(dir, config);
    let got = drain_subscriber(&broker).await;
    let set: HashSet<u32> = got.iter().copied().collect();
    assert!(
        (0..500).all(|i| set.contains(&i)),
        "acknowledged more than an interval before the kill and lost"
    );
    // Acknowledged and killed at once: whatever is lost is the newest.
    publish(&broker, 1000, 500).await;
    let dir = broker.kill9();
    let broker = Broker::start_config_in(dir, config);
    let got: Vec<u32> = drain_subscriber(&broker)
        .await
        .into_iter()
        .filter(|&i| i >= 1000)
        .collect();
    eprintln!(
        "periodic: killed right after 500 acknowledgements, {} survived",
        got.len()
    );
    let expected: Vec<u32> = (1000..1000 + u32::try_from(got.len()).unwrap()).collect();
    assert_eq!(got, expected, "the survivors are the oldest, in order");
}

/// A small filesystem (tmpfs) mounted over a folder for the life of the value.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (CI runs as root): {status}"
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the filesystem of `dir` with a file, up to its last byte.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let mut byte = [0u8; 1];
    while f.write_all(&byte).is_ok() {
        byte[0] = 1;
    }
    let _ = f.sync_all();
    path
}

/// An MQTT 5 publisher on a raw socket whose PUBACK reason codes are collected by packet id.
struct AckedPublisher {
    wr: tokio::net::tcp::OwnedWriteHalf,
    acks: std::sync::Arc<std::sync::Mutex<HashMap<u16, Vec<u8>>>>,
    reader: tokio::task::JoinHandle<()>,
    /// Put in front of each payload, to tell publishers apart.
    tag: u16,
    next: u16,
}

impl AckedPublisher {
    async fn connect(broker: &Broker, id: &str, tag: u16) -> AckedPublisher {
        use tokio::io::AsyncReadExt;
        let s = crate::harness::raw::connect_v5(broker, id).await;
        let (mut rd, wr) = s.into_split();
        let acks = std::sync::Arc::new(std::sync::Mutex::new(HashMap::<u16, Vec<u8>>::new()));
        let reader = {
            let acks = acks.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 64 * 1024];
                loop {
                    match rd.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    // Short packets only here: PUBACK 0x40 with remaining length 2
                    // (success) or more (a reason code first).
                    while buf.len() >= 2 && buf.len() >= 2 + usize::from(buf[1]) {
                        let len = usize::from(buf[1]);
                        if buf[0] == 0x40 {
                            let id = u16::from_be_bytes([buf[2], buf[3]]);
                            let code = if len >= 3 { buf[4] } else { 0 };
                            acks.lock().unwrap().entry(id).or_default().push(code);
                        }
                        buf.drain(..2 + len);
                    }
                }
            })
        };
        AckedPublisher {
            wr,
            acks,
            reader,
            tag,
            next: 1,
        }
    }

    async fn publish(&mut self) -> u16 {
        let id = self.next;
        self.next += 1;
        send_numbered(&mut self.wr, self.tag, id).await;
        id
    }

    fn acks(&self) -> HashMap<u16, Vec<u8>> {
        self.acks.lock().unwrap().clone()
    }

    /// Waits until publish `id` has its PUBACK; returns its reason code.
    async fn ack_of(&self, id: u16, within: Duration) -> u8 {
        let deadline = Instant::now() + within;
        loop {
            if let Some(c) = self.acks().get(&id).and_then(|c| c.first()) {
                return *c;
            }
            assert!(Instant::now() < deadline, "no PUBACK for publish {id}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for AckedPublisher {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The disk fills up under a persistent subscriber's QoS 1 traffic: the store's commit
/// fails and is logged; the acknowledgement that waited for it is held (not sent as a
/// lie), and from then on MQTT 5 publishes that need the store get PUBACK 0x97 at once
/// while an MQTT 3.1.1 one is left unacknowledged on a connection that stays open.
/// Once space is freed the broker writes again by itself: the held acknowledgement goes
/// out (0x00), new publishes are accepted, each publish got exactly one PUBACK, and every
/// message acknowledged with 0x00 reaches the subscriber, also after a kill -9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_what_needs_it_and_recovers() {
    let dir = Broker::temp_dir();
    let data = dir.join("data");
    let _tmpfs = Tmpfs::mount(&data, "16m");
    let broker = Broker::start_in(dir.clone(), "");
    let mut sub = v5::Client::connect(persistent5(&broker, "disk-sub", 600)).await;
    sub.subscribe_ok("disk/#", v5::QoS::AtLeastOnce).await;
    let mut first = AckedPublisher::connect(&broker, "disk-pub-1", 1).await;
    let id = first.publish().await;
    assert_eq!(first.ack_of(id, WAIT).await, 0);

    let filler = fill(&data);
    // The next writes need room that is not there. redb may still find free pages in its
    // file for a few commits, so publish until one fails (bounded).
    let mut held = Vec::new();
    while !broker
        .logs()
        .iter()
        .any(|l| l.contains("store commit failed"))
    {
        assert!(
            held.len() < 256,
            "no failed commit after {} publishes of 16 KiB on a full disk",
            held.len()
        );
        held.push(first.publish().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A publisher with nothing waiting is refused at once.
    let mut second = AckedPublisher::connect(&broker, "disk-pub-2", 2).await;
    for _ in 0..5 {
        let id = second.publish().await;
        assert_eq!(
            second.ack_of(id, WAIT).await,
            0x97,
            "PUBACK Quota exceeded while the store cannot write"
        );
    }
    // MQTT 3.1.1 cannot refuse a QoS 1 message: it is left unacknowledged (and not
    // routed), and the connection stays open.
    let mut v311 = raw::connect_tcp(&broker).await;
    raw::send(&mut v311, &raw::connect_v311("disk-pub-3", true, 30)).await;
    assert_eq!(
        raw::read_packet(&mut v311, WAIT).await.map(|p| p.0),
        Some(0x20)
    );
    raw::send(
        &mut v311,
        &raw::publish("disk/v311", 1, false, 7, b"v311", false),
    )
    .await;
    raw::send(&mut v311, &[0xC0, 0]).await; // PINGREQ
    assert_eq!(
        raw::read_packet(&mut v311, WAIT).await.map(|p| p.0),
        Some(0xD0),
        "no PUBACK while the store cannot write, only the PINGRESP"
    );

    // Not ready while the store cannot write, and the failed commits are counted.
    let (status, _, body) = crate::observability::http(broker.http_addr(), "GET", "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("store: commits are failing"), "{body}");
    let m = crate::observability::scrape(&broker).await;
    assert_eq!(crate::observability::value(&m, "sandpiper_ready"), 0.0);
    assert!(crate::observability::value(&m, "sandpiper_store_write_errors_total") >= 1.0);

    // Space comes back: the broker writes again by itself.
    std::fs::remove_file(&filler).unwrap();
    crate::plugins::wait_for_log(&broker, "store writes again").await;
    crate::observability::until(&broker, "ready again", |m| {
        m.get("sandpiper_ready") == Some(&1.0)
    })
    .await;
    for id in &held {
        let code = first.ack_of(*id, Duration::from_secs(10)).await;
        assert!(code == 0 || code == 0x97, "publish {id}: PUBACK {code:#x}");
    }
    for _ in 0..5 {
        let id = second.publish().await;
        assert_eq!(second.ack_of(id, WAIT).await, 0, "accepted again");
    }
    // Sent again (as the client does on its next connection), it is accepted.
    raw::send(
        &mut v311,
        &raw::publish("disk/v311", 1, true, 7, b"v311", false),
    )
    .await;
    assert_eq!(
        raw::read_packet(&mut v311, WAIT).await,
        Some((0x40, vec![0, 7])),
        "PUBACK once the store writes again"
    );
    let mut accepted = HashSet::new();
    for p in [&first, &second] {
        let acks = p.acks();
        assert!(
            acks.values().all(|c| c.len() == 1),
            "one PUBACK per publish"
        );
        assert_eq!(
            acks.len(),
            usize::from(p.next - 1),
            "every publish answered"
        );
        accepted.extend(
            acks.iter()
                .filter(|(_, c)| c[0] == 0)
                .map(|(id, _)| (p.tag, *id)),
        );
    }
    eprintln!(
        "full disk: {} publishes accepted, {} refused",
        accepted.len(),
        usize::from(first.next + second.next - 2) - accepted.len()
    );
    // Every accepted message reaches the subscriber (live, or after a kill -9).
    let mut received = HashSet::new();
    while let Some(p) = sub.recv_within(Duration::from_millis(800)).await {
        received.insert(p.payload[..4].to_vec());
    }
    drop(sub);
    let dir = broker.kill9();
    let broker = Broker::start_in(dir, "");
    let mut sub = v5::Client::connect(persistent5(&broker, "disk-sub", 600)).await;
    assert!(sub.connack.session_present);
    while let Some(p) = sub.recv_within(Duration::from_millis(800)).await {
        received.insert(p.payload[..4].to_vec());
    }
    let lost: Vec<_> = accepted
        .iter()
        .filter(|(tag, id)| {
            let mut key = tag.to_be_bytes().to_vec();
            key.extend_from_slice(&id.to_be_bytes());
            !received.contains(&key)
        })
        .collect();
    assert!(lost.is_empty(), "acknowledged with 0x00 and lost: {lost:?}");
    assert!(
        received.contains(b"v311".as_slice()),
        "the 3.1.1 message, acknowledged once sent again"
    );
}

/// A QoS 1 MQTT 5 PUBLISH of 16 KiB whose payload starts with a tag of its publisher and
/// its packet id.
async fn send_numbered(wr: &mut tokio::net::tcp::OwnedWriteHalf, tag: u16, id: u16) {
    use tokio::io::AsyncWriteExt;
    let mut payload = vec![b'd'; 16 * 1024];
    payload[..2].copy_from_slice(&tag.to_be_bytes());
    payload[2..4].copy_from_slice(&id.to_be_bytes());
    let p = crate::harness::raw::publish("disk/t", 1, false, id, &payload, true);
    wr.write_all(&p).await.unwrap();
}
