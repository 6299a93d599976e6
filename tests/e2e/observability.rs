//! The HTTP listener: health, readiness and Prometheus metrics, through the binary.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{Broker, raw, v3};

/// One HTTP/1.1 request: (status, content type, body).
pub(crate) async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let s = TcpStream::connect(addr)
        .await
        .expect("connect to the HTTP listener");
    let (status, head, body) = exchange(s, &addr.to_string(), None, method, path, b"").await;
    (status, content_type(&head), body)
}

/// One HTTP/1.1 request over `s`, with a bearer `token` and a JSON `body` if given:
/// (status, head, body).
pub(crate) async fn exchange<S>(
    mut s: S,
    host: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, String, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.expect("send request");
    s.write_all(body).await.expect("send body");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("answered within 10 s")
        .expect("read answer");
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    (status, head.to_owned(), body.to_owned())
}

/// The Content-Type of a response head.
fn content_type(head: &str) -> String {
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default()
}

/// The samples of an exposition: series (name and labels as written) → value. Every
/// family has HELP and TYPE lines before its samples.
fn samples(text: &str) -> HashMap<String, f64> {
    let mut typed = std::collections::HashSet::new();
    let mut out = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_whitespace().next().unwrap_or_default();
            typed.insert(name.to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("series and value");
        let name = series.split('{').next().unwrap_or_default();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "no TYPE line before {series}");
        out.insert(series.to_owned(), value.parse().expect("a number"));
    }
    out
}

pub(crate) fn value(s: &HashMap<String, f64>, series: &str) -> f64 {
    *s.get(series)
        .unwrap_or_else(|| panic!("no series {series} in {:?}", s.keys().collect::<Vec<_>>()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_answer() {
    let mut broker = Broker::start();
    let http_at = broker.http_addr();
    let (status, _, body) = http(http_at, "GET", "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    // Ready once every listener is bound (an instant after the first `listening` line).
    let mut answer = http(http_at, "GET", "/readyz").await;
    for _ in 0..50 {
        if answer.0 == 200 {
            break;
        }
        assert_eq!(answer.0, 503);
        tokio::time::sleep(Duration::from_millis(20)).await;
        answer = http(http_at, "GET", "/readyz").await;
    }
    let (status, ctype, body) = answer;
    assert_eq!(status, 200, "{body}");
    assert_eq!(ctype, "application/json");
    assert_eq!(body.trim(), r#"{"ready":true,"missing":[]}"#);
    assert_eq!(http(http_at, "GET", "/nope").await.0, 404);
    assert_eq!(http(http_at, "POST", "/metrics").await.0, 405);
    // A request that never ends its headers costs one task, and is dropped.
    let mut slow = TcpStream::connect(http_at).await.expect("connect");
    slow.write_all(b"GET /metrics HTTP/1.1\r\n")
        .await
        .expect("send");
    assert_eq!(http(http_at, "GET", "/healthz").await.0, 200);
    broker.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_clients_do() {
    let mut broker = Broker::start();
    let http_at = broker.http_addr();
    // Ready once every listener is bound, a moment after the first one logs.
    let before = until(&broker, "ready", |m| m.get("sandpiper_ready") == Some(&1.0)).await;
    assert_eq!(value(&before, "sandpiper_sessions{state=\"online\"}"), 0.0);
    // Every listener's protocols have a series before anyone connects.
    assert_eq!(
        value(
            &before,
            "sandpiper_connections_open{listener=\"default\",protocol=\"5.0\"}"
        ),
        0.0
    );

    // A persistent subscriber, a publisher, QoS 0 and 1 messages and one retained.
    let mut sub = {
        let mut o = v3::options(&broker, "metrics-sub");
        o.set_clean_session(false);
        v3::Client::connect(o).await
    };
    sub.subscribe_ok("m/#", v3::QoS::AtLeastOnce).await;
    let mut publisher = v3::Client::connect(v3::options(&broker, "metrics-pub")).await;
    for i in 0..10u8 {
        publisher
            .publish("m/a", v3::QoS::AtLeastOnce, false, &[i; 100])
            .await;
    }
    for _ in 0..5 {
        publisher
            .publish("m/b", v3::QoS::AtMostOnce, false, &[1; 10])
            .await;
    }
    publisher
        .publish("m/retained", v3::QoS::AtLeastOnce, true, b"r")
        .await;
    publisher
        .publish("nobody/here", v3::QoS::AtLeastOnce, false, b"x")
        .await;
    for _ in 0..16 {
        sub.recv().await;
    }
    // A CONNECT of an unknown protocol level is refused.
    let mut bad = raw::connect_tcp(&broker).await;
    raw::send(&mut bad, &raw::connect("MQTT", 9, "bad", true, 0, None)).await;
    let _ = raw::read_packet(&mut bad, Duration::from_secs(5)).await;

    let text = http(http_at, "GET", "/metrics").await;
    assert!(
        text.1.starts_with("text/plain; version=0.0.4"),
        "{}",
        text.1
    );
    let m = samples(&text.2);
    assert_eq!(
        value(
            &m,
            "sandpiper_connections_open{listener=\"default\",protocol=\"3.1.1\"}"
        ),
        2.0
    );
    assert_eq!(value(&m, "sandpiper_sessions{state=\"online\"}"), 2.0);
    assert!(value(&m, "sandpiper_connections_accepted_total") >= 3.0);
    assert_eq!(value(&m, "sandpiper_connections_connected_total"), 2.0);
    assert_eq!(
        value(
            &m,
            "sandpiper_connections_refused_total{reason=\"protocol\"}"
        ),
        1.0
    );
    assert_eq!(
        value(&m, "sandpiper_messages_received_total{qos=\"1\"}"),
        12.0
    );
    assert_eq!(
        value(&m, "sandpiper_messages_received_total{qos=\"0\"}"),
        5.0
    );
    assert_eq!(value(&m, "sandpiper_messages_sent_total{qos=\"1\"}"), 11.0);
    assert_eq!(value(&m, "sandpiper_messages_sent_total{qos=\"0\"}"), 5.0);
    assert_eq!(
        value(&m, "sandpiper_received_payload_bytes_total{qos=\"1\"}"),
        (10 * 100 + 1 + 1) as f64
    );
    assert_eq!(
        value(&m, "sandpiper_received_payload_bytes_total{qos=\"0\"}"),
        (5 * 10) as f64
    );
    assert_eq!(
        value(&m, "sandpiper_received_payload_bytes_total{qos=\"2\"}"),
        0.0
    );
    assert_eq!(
        value(&m, "sandpiper_sent_payload_bytes_total{qos=\"1\"}"),
        (10 * 100 + 1) as f64
    );
    assert_eq!(
        value(&m, "sandpiper_sent_payload_bytes_total{qos=\"0\"}"),
        (5 * 10) as f64
    );
    assert_eq!(
        value(
            &m,
            "sandpiper_messages_dropped_total{reason=\"no_subscriber\"}"
        ),
        1.0
    );
    assert_eq!(value(&m, "sandpiper_retained_messages"), 1.0);
    assert_eq!(value(&m, "sandpiper_subscriptions"), 1.0);
    // The persistent session's queue entries and subscription were committed.
    assert!(value(&m, "sandpiper_store_commits_total") >= 1.0);
    assert!(value(&m, "sandpiper_store_commit_duration_seconds_count") >= 1.0);
    assert!(value(&m, "sandpiper_store_size_bytes") > 0.0);
    assert!(value(&m, "process_resident_memory_bytes") > 1e6);
    assert!(value(&m, "process_open_fds") > 3.0);
    assert!(value(&m, "process_start_time_seconds") > 1.7e9);
    assert!(value(&m, "process_cpu_seconds_total") >= 0.0);
    assert!(
        value(&m, "sandpiper_store_records_total") >= value(&m, "sandpiper_store_commits_total")
    );

    // Gone: the clean session ends, the persistent one stays offline.
    sub.disconnect().await;
    publisher.disconnect().await;
    let mut m = HashMap::new();
    for _ in 0..50 {
        m = samples(&http(http_at, "GET", "/metrics").await.2);
        if value(&m, "sandpiper_sessions{state=\"online\"}") == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(value(&m, "sandpiper_sessions{state=\"offline\"}"), 1.0);
    assert_eq!(
        value(
            &m,
            "sandpiper_connections_open{listener=\"default\",protocol=\"3.1.1\"}"
        ),
        0.0
    );
    broker.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_address_that_cannot_be_bound_stops_the_broker() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let dir = Broker::temp_dir();
    let config = dir.join("sandpiper.toml");
    std::fs::write(
        &config,
        format!("[[listener]]\nbind = \"127.0.0.1:0\"\n\n[http]\nbind = \"127.0.0.1:{port}\"\n"),
    )
    .expect("write config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sandpiper"))
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .output()
        .expect("run sandpiper");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[http] bind"), "{err}");
}

/// A scrape of `broker`'s /metrics.
pub(crate) async fn scrape(broker: &Broker) -> HashMap<String, f64> {
    samples(&http(broker.http_addr(), "GET", "/metrics").await.2)
}

/// Polls the metrics until `ok` holds for them, at most 10 s.
pub(crate) async fn until(
    broker: &Broker,
    what: &str,
    ok: impl Fn(&HashMap<String, f64>) -> bool,
) -> HashMap<String, f64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(broker).await;
        if ok(&m) {
            return m;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {m:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_plugin_shows_what_it_costs() {
    use crate::plugin_sink::{sidecar, sink_probe, write_sidecar};
    use sha2::Digest;
    let sink = sink_probe();
    let version: String = sha2::Sha256::digest(std::fs::read(&sink).expect("read plugin"))
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    let broker = crate::plugins::broker_with("sink", &sink, &sidecar("fail = \"true\"")).await;
    crate::plugins::wait_for_log(&broker, "plugin loaded").await;
    let mut publisher = v3::Client::connect(v3::options(&broker, "cost-pub")).await;
    for i in 0..20u8 {
        publisher
            .publish("s/x", v3::QoS::AtLeastOnce, false, &[i])
            .await;
    }
    crate::plugins::wait_for_log(&broker, "sink batch not delivered").await;
    let m = until(&broker, "the oldest record waits a second", |m| {
        m.get("sandpiper_sink_oldest_record_age_seconds{plugin=\"sink\"}")
            .is_some_and(|v| *v >= 1.0)
    })
    .await;
    assert_eq!(
        value(
            &m,
            &format!(
                "sandpiper_plugin_info{{plugin=\"sink\",hooks=\"sink\",version=\"{version}\"}}"
            )
        ),
        1.0
    );
    assert_eq!(
        value(&m, "sandpiper_sink_queue_records{plugin=\"sink\"}"),
        20.0
    );
    assert!(value(&m, "sandpiper_sink_retries_total{plugin=\"sink\"}") >= 1.0);
    assert_eq!(
        value(&m, "sandpiper_sink_delivered_total{plugin=\"sink\"}"),
        0.0
    );
    let calls = value(
        &m,
        "sandpiper_plugin_calls_total{plugin=\"sink\",hook=\"sink\"}",
    );
    assert!(calls >= 1.0);
    assert_eq!(
        value(
            &m,
            "sandpiper_plugin_call_duration_seconds_count{plugin=\"sink\",hook=\"sink\"}"
        ),
        calls
    );
    assert_eq!(
        value(
            &m,
            "sandpiper_plugin_reloads_total{plugin=\"sink\",result=\"loaded\"}"
        ),
        1.0
    );
    assert_eq!(
        value(&m, "sandpiper_plugin_instances{plugin=\"sink\"}"),
        1.0
    );
    assert!(value(&m, "sandpiper_plugin_memory_bytes{plugin=\"sink\"}") >= 65536.0);

    // Told to deliver: the queue drains, and the new version is counted as a replacement.
    let plugins = broker.dir().join("plugins");
    write_sidecar(&plugins, &sidecar(""));
    let m = until(&broker, "the sink delivers", |m| {
        m.get("sandpiper_sink_delivered_total{plugin=\"sink\"}") == Some(&20.0)
    })
    .await;
    assert_eq!(
        value(&m, "sandpiper_sink_queue_records{plugin=\"sink\"}"),
        0.0
    );
    assert_eq!(
        value(
            &m,
            "sandpiper_sink_oldest_record_age_seconds{plugin=\"sink\"}"
        ),
        0.0
    );
    assert_eq!(
        value(
            &m,
            "sandpiper_plugin_reloads_total{plugin=\"sink\",result=\"replaced\"}"
        ),
        1.0
    );
    publisher.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_failures_are_counted_by_reason() {
    let sidecar = "time_ms = 50\n[config]\nmode = \"loop\"\n";
    let broker = crate::plugins::broker_with("hostile", &crate::plugins::hostile(), sidecar).await;
    crate::plugins::wait_for_log(&broker, "plugin loaded").await;
    let mut c = v3::Client::connect(v3::options(&broker, "looped")).await;
    assert_eq!(
        c.subscribe("bad/x", v3::QoS::AtLeastOnce).await,
        v3::SubscribeReasonCode::Failure
    );
    let m = scrape(&broker).await;
    assert!(
        value(
            &m,
            "sandpiper_plugin_failures_total{plugin=\"hostile\",reason=\"timeout\"}"
        ) >= 1.0
    );
    assert_eq!(
        value(
            &m,
            "sandpiper_plugin_failures_total{plugin=\"hostile\",reason=\"panic\"}"
        ),
        0.0
    );
    // The client's CONNECT went through the plugin's `authenticate`, which let it in.
    assert!(value(&m, "sandpiper_authentications_total{result=\"success\"}") >= 1.0);
    c.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_client_and_never_its_password() {
    use std::io::BufRead;
    let dir = Broker::temp_dir();
    let config = dir.join("sandpiper.toml");
    std::fs::write(
        &config,
        "[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\n\n[http]\nbind = \"\"\n\n\
         [log]\nformat = \"json\"\n",
    )
    .expect("write config");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sandpiper"))
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run sandpiper");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let v: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"));
            if tx.send(v).is_err() {
                return;
            }
        }
    });
    let next = |what: &str| loop {
        let v = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no `{what}` line"));
        if v["message"] == what {
            return v;
        }
    };
    let listening = next("listening");
    let addr: SocketAddr = listening["addr"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("the listener's address");
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut body = vec![0, 4];
    body.extend_from_slice(b"MQTT");
    // Level 4, flags: user name, password, clean session; keep alive 30.
    body.extend_from_slice(&[4, 0b1100_0010, 0, 30]);
    for part in [&b"json-client"[..], b"bob", b"hunter2-secret"] {
        body.extend_from_slice(&u16::try_from(part.len()).unwrap_or(0).to_be_bytes());
        body.extend_from_slice(part);
    }
    raw::send(&mut s, &raw::packet(0x10, &body)).await;
    let (first, _) = raw::expect_packet(&mut s).await;
    assert_eq!(first, 0x20, "CONNACK");
    let connected = next("client connected");
    assert_eq!(connected["listener"], "plain");
    assert_eq!(connected["protocol"], "3.1.1");
    assert_eq!(connected["spans"][0]["client_id"], "json-client");
    assert!(connected["spans"][0]["peer"].as_str().is_some());
    raw::send(&mut s, &[0xE0, 0]).await;
    let gone = next("client disconnected");
    assert_eq!(gone["spans"][0]["client_id"], "json-client");
    // The user as authenticated: none here (an anonymous listener, no auth plugin), so the
    // claimed "bob" is not logged as if it were.
    assert_eq!(connected["user"], "", "{connected}");
    assert_eq!(gone["listener"], "plain", "{gone}");
    assert!(
        gone["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{gone}"
    );
    assert_eq!(gone["code"], "", "no DISCONNECT from the broker: {gone}");
    let _ = child.kill();
    let _ = child.wait();
    // Everything it wrote, the connect lines included, never holds the password.
    let all: Vec<String> = rx.try_iter().map(|v| v.to_string()).collect();
    assert!(!connected.to_string().contains("hunter2"));
    assert!(all.iter().all(|l| !l.contains("hunter2")));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sys_tree_is_published_and_only_the_broker_writes_it() {
    let dir = Broker::temp_dir();
    let mut broker = Broker::start_config_in(
        dir,
        "[[listener]]\nname = \"default\"\nbind = \"127.0.0.1:0\"\n\n[http]\nbind = \"127.0.0.1:0\"\n\n\
         [sys]\ninterval = 1\n",
    );
    let mut all = v3::Client::connect(v3::options(&broker, "sys-hash")).await;
    all.subscribe_ok("#", v3::QoS::AtMostOnce).await;
    let mut sys = v3::Client::connect(v3::options(&broker, "sys-reader")).await;
    sys.subscribe_ok("$SYS/broker/#", v3::QoS::AtMostOnce).await;
    let mut seen: HashMap<String, String> = HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // The retained ones at subscribe, then fresh publications (every second) until one
    // counts both clients.
    let wanted = [
        "version",
        "uptime",
        "clients/connected",
        "clients/maximum",
        "subscriptions/count",
        "messages/received",
        "messages/sent",
        "publish/messages/dropped",
        "retained messages/count",
        "load/messages/sent/5min",
        "load/bytes/received/15min",
    ];
    loop {
        let complete = wanted
            .iter()
            .all(|t| seen.contains_key(&format!("$SYS/broker/{t}")));
        let both = [
            "clients/connected",
            "clients/maximum",
            "subscriptions/count",
        ]
        .iter()
        .all(|t| {
            seen.get(&format!("$SYS/broker/{t}"))
                .is_some_and(|n| n == "2")
        });
        if complete && both {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "only {seen:?}");
        if let Some(p) = sys.recv_within(Duration::from_secs(3)).await {
            seen.insert(
                p.topic.clone(),
                String::from_utf8_lossy(&p.payload).into_owned(),
            );
        }
    }
    let v = |t: &str| {
        seen.get(&format!("$SYS/broker/{t}"))
            .cloned()
            .unwrap_or_else(|| panic!("no $SYS/broker/{t} in {seen:?}"))
    };
    assert!(v("version").starts_with("sandpiper "));
    assert!(v("uptime").ends_with(" seconds"));
    assert!(v("clients/connected").parse::<u32>().expect("a number") >= 2);
    assert!(v("clients/maximum").parse::<u32>().expect("a number") >= 2);
    assert!(v("subscriptions/count").parse::<u32>().expect("a number") >= 2);
    for t in [
        "messages/received",
        "messages/sent",
        "publish/messages/dropped",
        "retained messages/count",
        "load/messages/sent/5min",
        "load/bytes/received/15min",
    ] {
        v(t).parse::<f64>().unwrap_or_else(|e| panic!("{t}: {e}"));
    }
    // `#` never matches $SYS, and $SYS does not fill the retained store.
    assert!(all.recv_within(Duration::from_millis(300)).await.is_none());
    let m = scrape(&broker).await;
    assert_eq!(value(&m, "sandpiper_retained_messages"), 0.0);

    // A client cannot write there: MQTT 5 gets 0x87, and no reader sees it.
    let mut forger = raw::connect_v5(&broker, "sys-forger").await;
    raw::send(
        &mut forger,
        &raw::publish("$SYS/broker/version", 1, false, 7, b"evil 1.0", true),
    )
    .await;
    let (first, body) = raw::expect_packet(&mut forger).await;
    assert_eq!(first, 0x40, "PUBACK");
    assert_eq!(body.get(2), Some(&0x87), "Not authorized: {body:?}");
    let mut late = v3::Client::connect(v3::options(&broker, "sys-late")).await;
    late.subscribe_ok("$SYS/broker/version", v3::QoS::AtMostOnce)
        .await;
    let p = late.recv().await;
    assert!(String::from_utf8_lossy(&p.payload).starts_with("sandpiper "));
    broker.assert_running();
}

/// `[sys] interval = 0` turns the tree off; with it on, who may read it is the
/// authorize hook's decision like any other topic (here the bundled `acl`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sys_tree_can_be_turned_off_and_its_readers_are_authorized() {
    let dir = Broker::temp_dir();
    let broker = Broker::start_config_in(
        dir,
        "[[listener]]\nname = \"default\"\nbind = \"127.0.0.1:0\"\n\n[http]\nbind = \"\"\n\n\
         [sys]\ninterval = 0\n",
    );
    let mut sys = v3::Client::connect(v3::options(&broker, "sys-off")).await;
    sys.subscribe_ok("$SYS/#", v3::QoS::AtMostOnce).await;
    assert!(
        sys.recv_within(Duration::from_millis(2500)).await.is_none(),
        "interval 0 publishes nothing"
    );
    sys.disconnect().await;

    let dir = Broker::temp_dir();
    crate::plugins::install_acl(
        &dir.join("plugins"),
        "[config]\ndefault = \"allow\"\n[[config.rules]]\ndeny = \"read\"\ntopic = \"$SYS/#\"\n",
    );
    let mut broker = Broker::start_config_in(
        dir,
        "[[listener]]\nname = \"default\"\nbind = \"127.0.0.1:0\"\n\n[http]\nbind = \"\"\n\n\
         [sys]\ninterval = 1\n",
    );
    crate::plugins::wait_for_log(&broker, "plugin loaded").await;
    let mut c = v3::Client::connect(v3::options(&broker, "sys-denied")).await;
    assert_eq!(
        c.subscribe("$SYS/broker/version", v3::QoS::AtMostOnce)
            .await,
        v3::SubscribeReasonCode::Failure,
        "the acl denies reading $SYS"
    );
    c.subscribe_ok("other/topic", v3::QoS::AtMostOnce).await;
    assert!(c.recv_within(Duration::from_millis(1500)).await.is_none());
    broker.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_listener_can_serve_https_with_client_certificates() {
    use crate::transports::{client_config, generate_certs, tls_connect};
    let dir = Broker::temp_dir();
    let certs = generate_certs(&dir);
    let mut broker = Broker::start_config_in(
        dir,
        &format!(
            "[[listener]]\nname = \"default\"\nbind = \"127.0.0.1:0\"\n\n\
             [http]\nbind = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
            certs.join("server.pem").display(),
            certs.join("server.key").display(),
            certs.join("ca.pem").display(),
        ),
    );
    let at = broker.http_addr();
    let ca = certs.join("ca.pem");
    // A client certificate the CA signed: served.
    let ok = tls_connect(at, client_config(&ca, Some(&certs.join("client"))))
        .await
        .expect("handshake with a client certificate");
    let (status, _, body) = exchange(ok, "localhost", None, "GET", "/metrics", b"").await;
    assert_eq!(status, 200);
    // (Ready or not yet: the listeners may still be binding.)
    assert!(body.contains("\nsandpiper_ready "), "{body}");
    // Without one, or with another CA's: no answer.
    for client in [None, Some(certs.join("other-client"))] {
        let refused = match tls_connect(at, client_config(&ca, client.as_deref())).await {
            Err(_) => true,
            Ok(mut s) => {
                let _ = s
                    .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    .await;
                let mut buf = [0u8; 64];
                !matches!(
                    tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await,
                    Ok(Ok(n)) if n > 0
                )
            }
        };
        assert!(
            refused,
            "a client without a valid certificate got an answer"
        );
    }
    // Plain HTTP on the HTTPS port gets no answer either.
    let mut plain = TcpStream::connect(at).await.expect("connect");
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    broker.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_are_a_gauge() {
    let mut broker = Broker::start();
    let persistent = |b: &Broker| {
        let mut o = v3::options(b, "queue-gauge");
        o.set_clean_session(false);
        o
    };
    let mut sub = v3::Client::connect(persistent(&broker)).await;
    sub.subscribe_ok("q/#", v3::QoS::AtLeastOnce).await;
    sub.disconnect().await;
    let mut publisher = v3::Client::connect(v3::options(&broker, "queue-pub")).await;
    for i in 0..3u8 {
        publisher
            .publish("q/a", v3::QoS::AtLeastOnce, false, &[i; 10])
            .await;
    }
    let m = until(&broker, "three queued", |m| {
        m.get("sandpiper_queued_messages") == Some(&3.0)
    })
    .await;
    // Topic (3 bytes) and payload (10) each.
    assert_eq!(value(&m, "sandpiper_queued_bytes"), 39.0);
    // Back online with a client that does not acknowledge: the three are in flight.
    let mut raw_sub = raw::connect_tcp(&broker).await;
    raw::send(&mut raw_sub, &raw::connect_v311("queue-gauge", false, 0)).await;
    raw::expect_packet(&mut raw_sub).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (first, body) = raw::expect_packet(&mut raw_sub).await;
        assert_eq!(first & 0xF0, 0x30, "PUBLISH");
        let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        ids.push([body[2 + topic_len], body[3 + topic_len]]);
    }
    let m = until(&broker, "three in flight", |m| {
        m.get("sandpiper_inflight_messages") == Some(&3.0)
    })
    .await;
    assert_eq!(value(&m, "sandpiper_queued_messages"), 0.0);
    for id in ids {
        raw::send(&mut raw_sub, &[0x40, 2, id[0], id[1]]).await;
    }
    until(&broker, "none in flight", |m| {
        m.get("sandpiper_inflight_messages") == Some(&0.0)
    })
    .await;
    drop(raw_sub);
    let sub = v3::Client::connect(persistent(&broker)).await;
    until(&broker, "the queue drained", |m| {
        m.get("sandpiper_queued_messages") == Some(&0.0)
            && m.get("sandpiper_queued_bytes") == Some(&0.0)
    })
    .await;
    sub.disconnect().await;
    publisher.disconnect().await;
    broker.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_timeouts_and_groups_are_counted() {
    // An authenticate plugin that denies everyone.
    let broker = crate::plugins::broker_with(
        "hostile",
        &crate::plugins::hostile(),
        "[config]\nmode = \"deny\"\n",
    )
    .await;
    crate::plugins::wait_for_log(&broker, "plugin loaded").await;
    assert!(
        v3::Client::try_connect(v3::options(&broker, "denied"))
            .await
            .is_err()
    );
    let m = scrape(&broker).await;
    assert_eq!(
        value(&m, "sandpiper_authentications_total{result=\"failure\"}"),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "sandpiper_connections_refused_total{reason=\"not_authorized\"}"
        ) + value(
            &m,
            "sandpiper_connections_refused_total{reason=\"bad_credentials\"}"
        ),
        1.0
    );
    drop(broker);

    // A client that goes silent past its keep alive (1 s: closed after 1.5 s), and a shared
    // group of two members.
    let broker = Broker::start();
    let mut silent = raw::connect_tcp(&broker).await;
    raw::send(&mut silent, &raw::connect_v311("silent", true, 1)).await;
    raw::expect_packet(&mut silent).await;
    let mut a = v3::Client::connect(v3::options(&broker, "member-a")).await;
    a.subscribe_ok("$share/g/t", v3::QoS::AtMostOnce).await;
    let mut b = v3::Client::connect(v3::options(&broker, "member-b")).await;
    b.subscribe_ok("$share/g/t", v3::QoS::AtMostOnce).await;
    let m = until(&broker, "the silent client closed", |m| {
        m.get("sandpiper_keepalive_timeouts_total") == Some(&1.0)
    })
    .await;
    assert_eq!(value(&m, "sandpiper_shared_groups"), 1.0);
    assert_eq!(value(&m, "sandpiper_subscriptions"), 2.0);
    a.disconnect().await;
    b.disconnect().await;
    until(&broker, "the group gone", |m| {
        m.get("sandpiper_shared_groups") == Some(&0.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_tls_handshakes_are_counted() {
    let dir = Broker::temp_dir();
    let certs = crate::transports::generate_certs(&dir);
    let broker = Broker::start_config_in(
        dir,
        &format!(
            "[[listener]]\nname = \"secure\"\nkind = \"tls\"\nbind = \"127.0.0.1:0\"\n\
             cert = \"{}\"\nkey = \"{}\"\n\n[http]\nbind = \"127.0.0.1:0\"\n",
            certs.join("server.pem").display(),
            certs.join("server.key").display(),
        ),
    );
    let mut s = TcpStream::connect(broker.addr()).await.expect("connect");
    s.write_all(b"this is not a TLS client hello\r\n\r\n")
        .await
        .expect("send");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    until(&broker, "the handshake failure counted", |m| {
        m.get("sandpiper_tls_handshake_failures_total") == Some(&1.0)
    })
    .await;
}

/// Standard error is a pipe the parent stops reading (a harness that only waited for the
/// `listening` line): the log lines of thousands of clients fill it, and the broker keeps
/// serving, dropping lines (counted) rather than waiting for the reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_nobody_reads_never_stops_the_broker() {
    use std::io::BufRead;
    let dir = Broker::temp_dir();
    let config = dir.join("sandpiper.toml");
    std::fs::write(
        &config,
        "[[listener]]\nbind = \"127.0.0.1:0\"\n\n[http]\nbind = \"127.0.0.1:0\"\n",
    )
    .expect("write config");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sandpiper"))
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run sandpiper");
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut addr: Option<SocketAddr> = None;
    let mut http_at: Option<SocketAddr> = None;
    while addr.is_none() {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).expect("read") > 0,
            "no listening line"
        );
        if line.contains("endpoints up") {
            http_at = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("http="))
                .and_then(|a| a.parse().ok());
        }
        if let Some(at) = line.find("listening") {
            addr = line[at..]
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .and_then(|a| a.parse().ok());
        }
    }
    let addr = addr.expect("address");
    // From here on nobody reads standard error (the reader stays open).
    // Two lines per client: more than the queue of 16,384 lines and the pipe together.
    for i in 0..9000u32 {
        let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| panic!("connect {i} timed out"))
            .expect("connect");
        raw::send(&mut s, &raw::connect_v311(&format!("quiet-{i}"), true, 0)).await;
        let answer = raw::read_packet(&mut s, Duration::from_secs(5)).await;
        assert_eq!(answer.map(|(f, _)| f), Some(0x20), "CONNACK for client {i}");
        raw::send(&mut s, &[0xE0, 0]).await;
    }
    let metrics = samples(
        &http(http_at.expect("http address"), "GET", "/metrics")
            .await
            .2,
    );
    assert!(value(&metrics, "sandpiper_log_lines_dropped_total") > 0.0);
    let _ = child.kill();
    let _ = child.wait();
    drop(stderr);
    let _ = std::fs::remove_dir_all(&dir);
}
