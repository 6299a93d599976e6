//! The sink hook's host side through the binary, with the test plugin `sink-probe` (built
//! from `tests/plugins/sink-probe`), which republishes what it receives on `sunk/...`:
//! batches arrive in order and a failing sink gets them again; the queue survives kill -9,
//! also a backlog larger than what the queue keeps in memory, and what was delivered is not
//! delivered again after one; and the sidecar's `network` list decides which addresses a
//! plugin may connect to.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::harness::{Broker, v3};
use crate::plugins::{count_logs, hostile, wait_for_log};

pub(crate) fn sink_probe() -> PathBuf {
    hostile().with_file_name("sink_probe.wasm")
}

pub(crate) fn write_sidecar(plugins: &Path, text: &str) {
    std::fs::create_dir_all(plugins).unwrap();
    std::fs::write(plugins.join("sink.toml.tmp"), text).unwrap();
    std::fs::rename(plugins.join("sink.toml.tmp"), plugins.join("sink.toml")).unwrap();
}

fn install(plugins: &Path, sidecar: &str) {
    write_sidecar(plugins, sidecar);
    std::fs::copy(sink_probe(), plugins.join("sink.wasm.tmp")).unwrap();
    std::fs::rename(plugins.join("sink.wasm.tmp"), plugins.join("sink.wasm")).unwrap();
}

pub(crate) fn sidecar(config: &str) -> String {
    format!(
        "topics = [\"s/#\"]\ntime_ms = 2000\n[sink]\nbatch = 50\nlinger_ms = 10\n\
         retry_min_ms = 50\nretry_max_ms = 200\n[config]\n{config}\n"
    )
}

/// Collects `n` payloads from `sunk/#` (duplicates kept), failing after `within`.
async fn collect(sub: &mut v3::Client, n: usize, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match sub.recv_within(left).await {
            Some(p) => got.push(String::from_utf8_lossy(&p.payload).into_owned()),
            None => panic!("{} of {n} records arrived", got.len()),
        }
    }
    got
}

async fn publish_all(broker: &Broker, n: usize) -> Vec<String> {
    publish_padded(broker, n, 0).await
}

/// Publishes `n` messages `m0`, `m1`, ... padded with dots to `pad` bytes.
async fn publish_padded(broker: &Broker, n: usize, pad: usize) -> Vec<String> {
    let mut publ = v3::Client::connect(v3::options(broker, "sink-pub")).await;
    let mut sent = Vec::new();
    for i in 0..n {
        let mut body = format!("m{i}");
        let len = body.len();
        body.extend(std::iter::repeat_n('.', pad.saturating_sub(len)));
        publ.publish("s/x", v3::QoS::AtLeastOnce, false, body.as_bytes())
            .await;
        sent.push(body);
    }
    publ.disconnect().await;
    sent
}

/// A broker with the probe as a sink that fails every batch, and a subscriber to what the
/// probe republishes once it works: (plugins folder, broker, subscriber).
async fn failing_sink_and_subscriber() -> (PathBuf, Broker, v3::Client) {
    let dir = Broker::temp_dir();
    let plugins = dir.join("plugins");
    install(&plugins, &sidecar("fail = \"true\""));
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;
    let mut sub = v3::Client::connect(v3::options(&broker, "sunk-sub")).await;
    sub.subscribe_ok("sunk/#", v3::QoS::AtLeastOnce).await;
    (plugins, broker, sub)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_sink_gets_every_record_again_in_order() {
    let (plugins, broker, mut sub) = failing_sink_and_subscriber().await;

    let sent = publish_all(&broker, 300).await;
    wait_for_log(&broker, "sink batch not delivered: told to fail").await;
    assert!(sub.recv_within(Duration::from_millis(300)).await.is_none());

    write_sidecar(&plugins, &sidecar(""));
    let got = collect(&mut sub, sent.len(), Duration::from_secs(10)).await;
    assert_eq!(got, sent, "every record, once, in order");
    sub.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_queue_survives_kill_9() {
    let dir = Broker::temp_dir();
    let plugins = dir.join("plugins");
    install(&plugins, &sidecar("fail = \"true\""));
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;
    // Every PUBACK promises the record is on disk.
    let sent = publish_all(&broker, 500).await;
    let dir = broker.kill9();

    // Restarted still failing, so nothing drains before the subscriber is there.
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "sink queue recovered plugin=sink waiting=500").await;
    let mut sub = v3::Client::connect(v3::options(&broker, "sunk-sub")).await;
    sub.subscribe_ok("sunk/#", v3::QoS::AtLeastOnce).await;
    write_sidecar(&plugins, &sidecar(""));
    let got = collect(&mut sub, sent.len(), Duration::from_secs(15)).await;
    assert_eq!(
        got, sent,
        "every acknowledged record, in order, after kill -9"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_beyond_memory_is_read_back_in_order_and_not_again_after_kill_9() {
    let (plugins, broker, mut sub) = failing_sink_and_subscriber().await;
    // 12 MiB of records: more than a sink queue keeps in memory (8 MiB), so the oldest
    // are read back from the store.
    let sent = publish_padded(&broker, 3_000, 4_096).await;
    wait_for_log(&broker, "sink batch not delivered: told to fail").await;
    write_sidecar(&plugins, &sidecar(""));
    let got = collect(&mut sub, sent.len(), Duration::from_secs(30)).await;
    assert!(got == sent, "every record, once, in order");
    sub.expect_silence().await;

    // What was delivered is consumed in the store too: a kill -9 does not bring it back.
    let dir = broker.kill9();
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;
    assert_eq!(
        count_logs(&broker, "sink queue recovered"),
        0,
        "{:?}",
        broker.logs()
    );
    let mut sub = v3::Client::connect(v3::options(&broker, "sunk-sub")).await;
    sub.subscribe_ok("sunk/#", v3::QoS::AtLeastOnce).await;
    let more = publish_padded(&broker, 3, 0).await;
    let got = collect(&mut sub, 3, Duration::from_secs(10)).await;
    assert_eq!(got, more, "the new records alone");
    sub.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_connects_only_to_its_network_list() {
    let allowed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, o) = (allowed.local_addr().unwrap(), other.local_addr().unwrap());
    let net = format!("network = [\"{a}\"]\n");

    let dir = Broker::temp_dir();
    let plugins = dir.join("plugins");
    install(
        &plugins,
        &format!("{net}{}", sidecar(&format!("connect = \"{o}\""))),
    );
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;
    let mut sub = v3::Client::connect(v3::options(&broker, "sunk-sub")).await;
    sub.subscribe_ok("sunk/#", v3::QoS::AtLeastOnce).await;
    let sent = publish_all(&broker, 5).await;
    wait_for_log(&broker, "plugin network use refused").await;
    assert!(sub.recv_within(Duration::from_millis(300)).await.is_none());

    // The listed address is reachable.
    write_sidecar(
        &plugins,
        &format!("{net}{}", sidecar(&format!("connect = \"{a}\""))),
    );
    let got = collect(&mut sub, sent.len(), Duration::from_secs(10)).await;
    assert_eq!(got, sent);
}
