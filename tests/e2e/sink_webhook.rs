//! The bundled `webhook` sink through the binary, against an HTTP/1.1 server written
//! here (a tokio listener on 127.0.0.1 that reads each request's head and
//! `Content-Length` body and answers as the test says): messages arrive as published;
//! a server answering 500 or gone and back later, and a broker killed with -9, lose
//! nothing; a server that never answers slows neither publishers nor other subscribers;
//! a URL whose `host:port` the sidecar's `network` does not list is refused.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::harness::{Broker, v3, v5};
use crate::plugins::{bundled, wait_for_log};

/// How the test server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// `200 OK` at once.
    Ok,
    /// `500 Internal Server Error`.
    Fail,
    /// `200 OK` after this long.
    Slow(Duration),
    /// Reads the request and never answers.
    Hang,
}

/// One request the server read.
#[derive(Debug, Clone)]
struct Request {
    target: String,
    headers: HashMap<String, String>,
}

#[derive(Default)]
struct Seen {
    /// Every message of every request answered 2xx, in arrival order.
    accepted: Mutex<Vec<Value>>,
    /// Every request read (whatever the answer).
    requests: Mutex<Vec<Request>>,
    connections: AtomicUsize,
}

/// The webhook endpoint: an HTTP/1.1 server on 127.0.0.1.
struct Hook {
    addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    seen: Arc<Seen>,
    task: Option<JoinHandle<()>>,
}

impl Hook {
    async fn start() -> Hook {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut hook = Hook {
            addr: listener.local_addr().unwrap(),
            answer: Arc::new(Mutex::new(Answer::Ok)),
            seen: Arc::default(),
            task: None,
        };
        hook.serve(listener);
        hook
    }

    fn serve(&mut self, listener: TcpListener) {
        let (answer, seen) = (self.answer.clone(), self.seen.clone());
        self.task = Some(tokio::spawn(async move {
            // Dropped with the accept task: stopping the server ends its connections too.
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                seen.connections.fetch_add(1, Ordering::Relaxed);
                connections.spawn(connection(stream, answer.clone(), seen.clone()));
            }
        }));
    }

    fn set(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    /// Closes the listener and every connection.
    async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Listens again on the same address.
    async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    fn url(&self) -> String {
        format!("http://{}/in?x=1", self.addr)
    }

    fn accepted(&self) -> Vec<Value> {
        self.seen.accepted.lock().unwrap().clone()
    }

    fn requests(&self) -> Vec<Request> {
        self.seen.requests.lock().unwrap().clone()
    }

    /// Waits until at least `n` messages were accepted.
    async fn wait_accepted(&self, n: usize, within: Duration) -> Vec<Value> {
        self.wait_counted(n, within, |got| got.len()).await
    }

    /// Waits until `count` of what was accepted reaches `n`; returns what was accepted.
    async fn wait_counted(
        &self,
        n: usize,
        within: Duration,
        count: impl Fn(&[Value]) -> usize,
    ) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.accepted();
            let have = count(&got);
            if have >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{have} of {n} messages arrived within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every one of `m0`..`m{n - 1}` was accepted (duplicates kept).
    async fn wait_all(&self, n: usize, within: Duration) -> Vec<Value> {
        self.wait_counted(n, within, |got| {
            numbers(got).into_iter().collect::<HashSet<usize>>().len()
        })
        .await
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Serves the requests of one connection until it closes.
async fn connection(mut stream: TcpStream, answer: Arc<Mutex<Answer>>, seen: Arc<Seen>) {
    let mut buf = Vec::new();
    loop {
        let Some((request, body)) = read_request(&mut stream, &mut buf).await else {
            return;
        };
        seen.requests.lock().unwrap().push(request);
        let answer = *answer.lock().unwrap();
        let status = match answer {
            Answer::Ok => "200 OK",
            Answer::Fail => "500 Internal Server Error",
            Answer::Slow(d) => {
                tokio::time::sleep(d).await;
                "200 OK"
            }
            Answer::Hang => {
                // Until the client gives up (or the server is stopped).
                let mut rest = [0u8; 1];
                let _ = stream.read(&mut rest).await;
                return;
            }
        };
        if status.starts_with('2') {
            let doc: Value = serde_json::from_slice(&body).expect("the body is JSON");
            let messages = doc["messages"]
                .as_array()
                .expect("a messages array")
                .clone();
            seen.accepted.lock().unwrap().extend(messages);
        }
        let response = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Reads one request (head, then a `Content-Length` body); None when the peer closes.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(Request, Vec<u8>)> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        read_more(stream, buf).await?;
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).expect("an ASCII head");
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_owned();
    let mut headers = HashMap::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').expect("a header line");
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    let mut parts = request_line.split(' ');
    assert_eq!(parts.next(), Some("POST"), "request line {request_line:?}");
    let target = parts.next().unwrap_or_default().to_owned();
    let length: usize = headers
        .get("content-length")
        .expect("a Content-Length")
        .parse()
        .unwrap();
    while buf.len() < head_end + length {
        read_more(stream, buf).await?;
    }
    let body = buf[head_end..head_end + length].to_vec();
    buf.drain(..head_end + length);
    Some((Request { target, headers }, body))
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 16 * 1024];
    match tokio::time::timeout(Duration::from_secs(30), stream.read(&mut chunk)).await {
        Ok(Ok(n)) if n > 0 => {
            buf.extend_from_slice(&chunk[..n]);
            Some(())
        }
        _ => None,
    }
}

/// A sidecar for the webhook on `s/#`: small batches, quick retries, 1 s request waits.
fn sidecar(network: &str, url: &str) -> String {
    sidecar_waiting(network, url, 1000)
}

/// [`sidecar`] with request waits of `timeout_ms`.
fn sidecar_waiting(network: &str, url: &str, timeout_ms: u32) -> String {
    format!(
        "topics = [\"s/#\"]\ntime_ms = 8000\nnetwork = [\"{network}\"]\n\
         [sink]\nbatch = 20\nlinger_ms = 10\nretry_min_ms = 50\nretry_max_ms = 300\n\
         [config]\nurl = \"{url}\"\ntimeout_ms = {timeout_ms}\n\
         [config.headers]\nAuthorization = \"Bearer t0ken\"\n"
    )
}

fn write_sidecar(plugins: &Path, text: &str) {
    std::fs::create_dir_all(plugins).unwrap();
    std::fs::write(plugins.join("webhook.toml.tmp"), text).unwrap();
    std::fs::rename(
        plugins.join("webhook.toml.tmp"),
        plugins.join("webhook.toml"),
    )
    .unwrap();
}

/// A broker (in a fresh folder) with the webhook plugin and `sidecar`, and its plugins
/// folder.
async fn broker_with_webhook(sidecar: &str) -> (Broker, PathBuf) {
    let dir = Broker::temp_dir();
    let plugins = dir.join("plugins");
    write_sidecar(&plugins, sidecar);
    std::fs::copy(bundled("webhook"), plugins.join("webhook.wasm")).unwrap();
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;
    (broker, plugins)
}

/// Publishes `s/x` messages `m{from}`..`m{to - 1}` at QoS 1, each acknowledged.
async fn publish_range(broker: &Broker, id: &str, from: usize, to: usize) {
    let mut publ = v3::Client::connect(v3::options(broker, id)).await;
    for i in from..to {
        publ.publish(
            "s/x",
            v3::QoS::AtLeastOnce,
            false,
            format!("m{i}").as_bytes(),
        )
        .await;
    }
    publ.disconnect().await;
}

/// The `m{i}` numbers of what arrived, in arrival order.
fn numbers(accepted: &[Value]) -> Vec<usize> {
    accepted
        .iter()
        .map(|m| {
            let p = m["payload"].as_str().unwrap();
            p.strip_prefix('m').unwrap().parse().unwrap()
        })
        .collect()
}

/// Asserts that every one of `0..n` arrived, first arrivals in order; returns how many
/// arrived more than once.
fn all_in_order(got: &[usize], n: usize) -> usize {
    let mut seen = HashSet::new();
    let firsts: Vec<usize> = got.iter().copied().filter(|i| seen.insert(*i)).collect();
    assert_eq!(
        firsts,
        (0..n).collect::<Vec<_>>(),
        "every message, first arrivals in order"
    );
    got.len() - n
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_messages_arrive_exactly_as_published() {
    let hook = Hook::start().await;
    let (broker, _) = broker_with_webhook(&sidecar(&hook.addr.to_string(), &hook.url())).await;
    let started = now_ms();

    // MQTT 5, so user properties and content types travel too.
    let mut publ = v5::Client::connect(v5::options(&broker, "wh-pub")).await;
    let n: usize = 120;
    let mut sent = Vec::new();
    for i in 0..n {
        let topic = format!("s/{}", i % 3);
        let payload: Vec<u8> = if i % 10 == 9 {
            vec![0xff, i as u8, 0x00, 0x80]
        } else {
            format!("m{i} grüße {{\"n\":{i}}}").into_bytes()
        };
        let retain = i.is_multiple_of(40);
        let props = v5::PublishProperties {
            content_type: i.is_multiple_of(2).then(|| "text/plain".to_owned()),
            user_properties: vec![("i".into(), i.to_string()), ("k".into(), "v".into())],
            ..Default::default()
        };
        publ.publish_with(&topic, v5::QoS::AtLeastOnce, retain, &payload, Some(props))
            .await;
        sent.push((topic, payload, retain));
    }
    publ.disconnect().await;

    let got = hook.wait_accepted(n, Duration::from_secs(15)).await;
    // Nothing failed, so nothing is posted twice.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got_all = hook.accepted();
    assert_eq!(got_all.len(), n, "each message exactly once");
    for (i, (m, (topic, payload, retain))) in got.iter().zip(&sent).enumerate() {
        assert_eq!(m["topic"], topic.as_str(), "message {i}");
        let body = match m["payload_encoding"].as_str() {
            Some("utf8") => m["payload"].as_str().unwrap().as_bytes().to_vec(),
            Some("base64") => base64::engine::general_purpose::STANDARD
                .decode(m["payload"].as_str().unwrap())
                .unwrap(),
            other => panic!("message {i}: payload_encoding {other:?}"),
        };
        assert_eq!(&body, payload, "message {i}");
        let utf8 = std::str::from_utf8(payload).is_ok();
        assert_eq!(m["payload_encoding"], if utf8 { "utf8" } else { "base64" });
        assert_eq!(m["qos"], 1);
        assert_eq!(m["retain"], *retain, "message {i}");
        assert_eq!(m["publisher"], "wh-pub");
        let at = m["received_at"].as_u64().unwrap();
        assert!(at >= started && at <= now_ms(), "received_at {at}");
        assert_eq!(
            m["user_properties"],
            serde_json::json!({"i": i.to_string(), "k": "v"})
        );
        if i.is_multiple_of(2) {
            assert_eq!(m["content_type"], "text/plain");
        } else {
            assert!(m.get("content_type").is_none());
        }
    }
    for r in hook.requests() {
        assert_eq!(r.target, "/in?x=1");
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers["authorization"], "Bearer t0ken");
        assert_eq!(r.headers["host"], hook.addr.to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_stopped_server_loses_nothing() {
    let mut hook = Hook::start().await;
    let (broker, _) = broker_with_webhook(&sidecar(&hook.addr.to_string(), &hook.url())).await;
    let url = format!("http://{}/in", hook.addr);

    publish_range(&broker, "wh-pub-1", 0, 100).await;
    hook.wait_accepted(100, Duration::from_secs(10)).await;

    // 500: every batch is offered again.
    hook.set(Answer::Fail);
    publish_range(&broker, "wh-pub-2", 100, 200).await;
    wait_for_log(
        &broker,
        &format!("sink batch not delivered: POST {url}: HTTP status 500"),
    )
    .await;

    // Gone: connections are refused.
    hook.stop().await;
    publish_range(&broker, "wh-pub-3", 200, 300).await;
    wait_for_log(
        &broker,
        &format!("sink batch not delivered: POST {url}: connection refused"),
    )
    .await;
    assert_eq!(hook.accepted().len(), 100, "nothing accepted meanwhile");

    // Back: everything queued arrives.
    hook.set(Answer::Ok);
    hook.restart().await;
    let got = hook.wait_all(300, Duration::from_secs(15)).await;
    let duplicates = all_in_order(&numbers(&got), 300);
    eprintln!("webhook after 500s and an outage: 300 messages, {duplicates} duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_loses_nothing() {
    let hook = Hook::start().await;
    // A slow endpoint (20 messages per 300 ms), so the queue is still draining when the
    // broker dies.
    hook.set(Answer::Slow(Duration::from_millis(300)));
    let (broker, _) = broker_with_webhook(&sidecar(&hook.addr.to_string(), &hook.url())).await;
    let n = 400;
    // Every PUBACK promises the message is in the sink's queue on disk.
    publish_range(&broker, "wh-pub", 0, n).await;
    // Killed while the server holds a request it has read and will accept: that batch
    // never got its answer to the broker, so it comes again after the restart.
    let deadline = Instant::now() + Duration::from_secs(10);
    while hook.requests().len() < 2 {
        assert!(Instant::now() < deadline, "no second request");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let dir = broker.kill9();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before = hook.accepted().len();
    assert!(before < n, "killed mid-run ({before} of {n} delivered)");

    hook.set(Answer::Ok);
    let _broker = Broker::start_in(dir, "");
    let got = hook.wait_all(n, Duration::from_secs(20)).await;
    let duplicates = all_in_order(&numbers(&got), n);
    assert!(
        duplicates > 0,
        "the batch in flight at the kill was posted again"
    );
    eprintln!(
        "webhook across kill -9: {n} messages, {before} delivered before the kill, \
         {duplicates} duplicates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_slows_no_one() {
    let hook = Hook::start().await;
    hook.set(Answer::Hang);
    // Each attempt waits 3 s for an answer: a publisher or subscriber held up by the sink
    // would wait as long.
    let sidecar = sidecar_waiting(&hook.addr.to_string(), &hook.url(), 3000);
    let (broker, _) = broker_with_webhook(&sidecar).await;
    let url = format!("http://{}/in", hook.addr);

    publish_range(&broker, "wh-first", 0, 1).await;
    // The sink thread is now waiting for an answer that does not come.
    let deadline = Instant::now() + Duration::from_secs(10);
    while hook.requests().is_empty() {
        assert!(Instant::now() < deadline, "no request reached the server");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Publishers to the sink's topics get their PUBACKs at disk speed...
    let mut publ = v3::Client::connect(v3::options(&broker, "wh-pub")).await;
    let mut slowest = Duration::ZERO;
    for i in 1..60 {
        let t = Instant::now();
        publ.publish(
            "s/x",
            v3::QoS::AtLeastOnce,
            false,
            format!("m{i}").as_bytes(),
        )
        .await;
        slowest = slowest.max(t.elapsed());
    }
    publ.disconnect().await;
    // ...and other subscribers get their messages at once.
    let mut other = v3::Client::connect(v3::options(&broker, "wh-other")).await;
    other.subscribe_ok("other/x", v3::QoS::AtLeastOnce).await;
    let mut round_trips = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        other
            .publish("other/x", v3::QoS::AtLeastOnce, false, b"ping")
            .await;
        assert_eq!(&other.recv().await.payload[..], b"ping");
        round_trips.push(t.elapsed());
    }
    other.disconnect().await;
    let worst = round_trips.iter().max().copied().unwrap_or_default();
    eprintln!("webhook hanging: slowest PUBACK {slowest:?}, round trips {round_trips:?}");
    assert!(slowest < Duration::from_secs(1), "PUBACK took {slowest:?}");
    assert!(worst < Duration::from_secs(1), "round trip took {worst:?}");

    // The request's wait is bounded (timeout_ms = 3000): the batch is retried...
    wait_for_log(
        &broker,
        &format!("sink batch not delivered: POST {url}: no answer in time"),
    )
    .await;
    // ...and arrives once the server answers.
    hook.set(Answer::Ok);
    let got = hook.wait_all(60, Duration::from_secs(15)).await;
    all_in_order(&numbers(&got), 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_outside_the_network_list_is_refused() {
    let hook = Hook::start().await;
    let elsewhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listed = elsewhere.local_addr().unwrap().to_string();
    let (broker, plugins) = broker_with_webhook(&sidecar(&listed, &hook.url())).await;

    publish_range(&broker, "wh-pub", 0, 5).await;
    wait_for_log(&broker, "plugin network use refused").await;
    wait_for_log(&broker, "request denied by the broker").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        hook.seen.connections.load(Ordering::Relaxed),
        0,
        "nothing was sent"
    );
    let refusal = broker
        .logs()
        .into_iter()
        .find(|l| l.contains("plugin network use refused"))
        .unwrap();
    assert!(refusal.contains(&hook.addr.to_string()), "{refusal}");

    // Listing the URL's host by name (and using that name) lets the queue drain.
    let port = hook.addr.port();
    write_sidecar(
        &plugins,
        &sidecar(
            &format!("localhost:{port}"),
            &format!("http://localhost:{port}/in?x=1"),
        ),
    );
    let got = hook.wait_accepted(5, Duration::from_secs(10)).await;
    all_in_order(&numbers(&got), 5);
}
