//! Test harness: runs the real `sandpiper` binary and drives it with rumqttc.
//!
//! Boundary: everything here is plumbing. Assertions about MQTT behaviour live in the
//! test modules; the harness only guarantees that every wait is bounded and that a
//! failing test prints the broker's log.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// Upper bound for anything that is expected to happen.
pub const WAIT: Duration = Duration::from_secs(5);
/// Window for "must not arrive" checks (kept at or under one second).
pub const QUIET: Duration = Duration::from_millis(800);
/// How long the broker gets to print its `listening` line.
const STARTUP: Duration = Duration::from_secs(20);
/// How long `Drop` waits after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A name no other test (or concurrent test binary) uses.
fn unique_name(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes ANSI escape sequences (`ESC [ ... letter`), in case colours slip through.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Equivalent of the contract's regex `listening.*addr=(\S+)`.
fn listen_addr(line: &str) -> Option<SocketAddr> {
    let after = &line[line.find("listening")?..];
    let value = &after[after.find("addr=")? + "addr=".len()..];
    let value: String = value.chars().take_while(|c| !c.is_whitespace()).collect();
    value.trim_matches('"').parse().ok()
}

/// Reads `source` line by line into `logs` until EOF, so the pipe never fills.
/// Lines are split on bytes so invalid UTF-8 cannot stop the draining.
fn drain(
    source: impl Read,
    prefix: &'static str,
    logs: Arc<Mutex<Vec<String>>>,
    addr_tx: Option<std_mpsc::Sender<SocketAddr>>,
) {
    let mut reader = BufReader::new(source);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = strip_ansi(String::from_utf8_lossy(&buf).trim_end());
        if let (Some(tx), Some(addr)) = (&addr_tx, listen_addr(&line)) {
            // The receiver only cares about the first listener; later sends may fail.
            let _ = tx.send(addr);
        }
        if let Ok(mut logs) = logs.lock() {
            logs.push(format!("{prefix}{line}"));
        }
    }
}

/// A running broker process with its own temporary config directory.
pub struct Broker {
    child: Child,
    addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    dir: PathBuf,
    status: Option<ExitStatus>,
    keep_dir: bool,
}

impl Broker {
    /// Broker with the contract's defaults.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Broker with `mqtt` (TOML lines) placed under the `[mqtt]` table.
    pub fn start_with(mqtt: &str) -> Self {
        let dir = std::env::temp_dir().join(unique_name("sandpiper-e2e"));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self::start_in(dir, mqtt)
    }

    /// Broker using the folder `dir` (its config and its data folder, kept from an earlier
    /// broker by [`Broker::kill9`] or [`Broker::stop`]).
    pub fn start_in(dir: PathBuf, mqtt: &str) -> Self {
        let text = format!(
            "[[listener]]\nname = \"default\"\nbind = \"127.0.0.1:0\"\n\n\
             [mqtt]\n{mqtt}\n\n[log]\nlevel = \"info\"\n\n[http]\nbind = \"127.0.0.1:0\"\n"
        );
        Self::start_config_in(dir, &text)
    }

    /// A fresh temporary folder for [`Broker::start_config_in`] (and the files a test
    /// puts beside the config, such as certificates).
    pub fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(unique_name("sandpiper-e2e"));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        dir
    }

    /// Broker with a whole configuration file `text` (listeners and all) in `dir`.
    /// [`Broker::addr`] is the first listener's address; [`Broker::listener_addr`] finds
    /// the others by name.
    pub fn start_config_in(dir: PathBuf, text: &str) -> Self {
        let config = dir.join("sandpiper.toml");
        std::fs::write(&config, text).expect("write config");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sandpiper"));
        cmd.arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.join("data"));
        Self::spawn(cmd, dir, false)
    }

    /// Broker started with exactly `args`, in the working directory `cwd` (which the
    /// test owns: it is not removed).
    pub fn start_command(cwd: &std::path::Path, args: &[&str]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sandpiper"));
        cmd.args(args).current_dir(cwd);
        Self::spawn(cmd, cwd.to_path_buf(), true)
    }

    fn spawn(mut cmd: Command, dir: PathBuf, keep_dir: bool) -> Self {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1");
        // RUST_LOG overrides the config level; an inherited `warn` would hide the
        // `listening` line, so only an explicit test variable may set it.
        match std::env::var("SANDPIPER_E2E_LOG") {
            Ok(level) => cmd.env("RUST_LOG", level),
            Err(_) => cmd.env_remove("RUST_LOG"),
        };
        let mut child = cmd.spawn().expect("spawn sandpiper binary");

        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std_mpsc::channel();
        let stderr = child.stderr.take().expect("piped stderr");
        let stdout = child.stdout.take().expect("piped stdout");
        {
            let logs = Arc::clone(&logs);
            std::thread::spawn(move || drain(stderr, "", logs, Some(addr_tx)));
        }
        {
            let logs = Arc::clone(&logs);
            std::thread::spawn(move || drain(stdout, "[stdout] ", logs, None));
        }

        // The sender is dropped when stderr closes, so an early exit ends the wait too.
        let addr = match addr_rx.recv_timeout(STARTUP) {
            Ok(addr) => addr,
            Err(e) => {
                let _ = child.kill();
                let status = child.wait().ok();
                let log = logs.lock().map(|l| l.join("\n")).unwrap_or_default();
                if !keep_dir {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                panic!(
                    "broker did not log `listening ... addr=` ({e}); exit status {status:?}; log:\n{log}"
                );
            }
        };

        Broker {
            child,
            addr,
            logs,
            dir,
            status: None,
            keep_dir,
        }
    }

    /// The broker's folder (config, data, plugins).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// The address of the HTTP listener (metrics, health), from its log line.
    pub fn http_addr(&self) -> SocketAddr {
        let deadline = Instant::now() + STARTUP;
        loop {
            let found = self.logs().iter().find_map(|l| {
                let after = &l[l.find("endpoints up")?..];
                let v = &after[after.find("http=")? + "http=".len()..];
                let v: String = v.chars().take_while(|c| !c.is_whitespace()).collect();
                v.trim_matches('"').parse().ok()
            });
            if let Some(addr) = found {
                return addr;
            }
            assert!(
                Instant::now() < deadline,
                "no HTTP endpoints line; log:\n{}",
                self.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The address of the listener named `name` (from its `listening` log line).
    pub fn listener_addr(&self, name: &str) -> SocketAddr {
        let deadline = Instant::now() + STARTUP;
        let needle = format!("name={name} ");
        loop {
            if let Some(addr) = self
                .logs()
                .iter()
                .filter(|l| l.contains(&needle))
                .find_map(|l| listen_addr(l))
            {
                return addr;
            }
            assert!(
                Instant::now() < deadline,
                "no `listening` line for listener {name}; log:\n{}",
                self.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the broker with SIGKILL (a crash) and returns its folder for a restart.
    pub fn kill9(mut self) -> PathBuf {
        let _ = self.child.kill();
        self.status = self.child.wait().ok();
        self.keep_dir = true;
        self.dir.clone()
    }

    /// Stops the broker with SIGTERM, waits for it, and returns its folder for a restart.
    pub fn stop(mut self) -> PathBuf {
        self.terminate();
        let status = self.wait_exit_blocking(Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "broker did not stop cleanly: {status:?}"
        );
        self.keep_dir = true;
        self.dir.clone()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Everything the broker printed so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Sends SIGTERM (through the `kill` command: no libc in tests).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill -TERM");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    /// Polls for the process to exit, without blocking the runtime.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Panics if the process has exited (a crash, an abort).
    pub fn assert_running(&mut self) {
        if let Some(status) = self.try_status() {
            panic!(
                "the broker exited ({status}); log:\n{}",
                self.logs().join("\n")
            );
        }
    }

    /// Resident memory of the broker process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Blocking variant for `Drop`.
    fn wait_exit_blocking(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
            if self.wait_exit_blocking(STOP_GRACE).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!("---- sandpiper log (addr {}) ----", self.addr);
            for line in self.logs() {
                eprintln!("{line}");
            }
            eprintln!("---- end of sandpiper log ----");
        }
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Hands a request to rumqttc's bounded request channel; fails the test if the event
/// loop stops taking requests.
pub async fn queue<T, E: Debug>(request: impl Future<Output = Result<T, E>>, what: &str) -> T {
    match timeout(WAIT, request).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("cannot queue {what}: {e:?}"),
        Err(_) => panic!("request channel still full after {WAIT:?} for {what}"),
    }
}

/// What the event pump forwards: packets from the broker, then at most one error.
enum Item<P, E> {
    Packet(P),
    Closed(E),
}

/// Packets received by one connection, with a backlog so that waiting for one kind of
/// packet never loses another kind that arrived first.
pub struct Inbox<P, E> {
    rx: mpsc::UnboundedReceiver<Item<P, E>>,
    backlog: VecDeque<P>,
    closed: Option<E>,
    name: String,
}

impl<P: Debug, E: Debug> Inbox<P, E> {
    fn new(rx: mpsc::UnboundedReceiver<Item<P, E>>, name: String) -> Self {
        Inbox {
            rx,
            backlog: VecDeque::new(),
            closed: None,
            name,
        }
    }

    /// First packet (backlog first) matching `pred` within `within`; `None` on timeout
    /// or when the connection has closed.
    pub async fn take_within(&mut self, within: Duration, pred: impl Fn(&P) -> bool) -> Option<P> {
        if let Some(pos) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(pos);
        }
        let deadline = tokio::time::Instant::now() + within;
        while self.closed.is_none() {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => return None,
                Ok(None) => return None,
                Ok(Some(Item::Closed(e))) => self.closed = Some(e),
                Ok(Some(Item::Packet(p))) if pred(&p) => return Some(p),
                Ok(Some(Item::Packet(p))) => self.backlog.push_back(p),
            }
        }
        None
    }

    /// Like [`Inbox::take_within`] with [`WAIT`], but a miss fails the test.
    pub async fn take(&mut self, what: &str, pred: impl Fn(&P) -> bool) -> P {
        match self.take_within(WAIT, pred).await {
            Some(p) => p,
            None => panic!(
                "{}: no {what} within {WAIT:?}; closed: {:?}; other packets: {:?}",
                self.name, self.closed, self.backlog
            ),
        }
    }

    /// Waits for the connection to end and returns the client's error.
    pub async fn closed_within(&mut self, within: Duration) -> Option<&E> {
        let deadline = tokio::time::Instant::now() + within;
        while self.closed.is_none() {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) | Ok(None) => break,
                Ok(Some(Item::Closed(e))) => self.closed = Some(e),
                Ok(Some(Item::Packet(p))) => self.backlog.push_back(p),
            }
        }
        self.closed.as_ref()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }
}

/// Spawns the task that polls an event loop and forwards incoming packets. It stops at
/// the first error instead of letting rumqttc reconnect on the next poll.
/// `Event` resolves at the call site, so one macro serves both protocol versions.
macro_rules! spawn_pump {
    ($eventloop:ident, $tx:ident) => {
        tokio::spawn(async move {
            loop {
                match $eventloop.poll().await {
                    Ok(Event::Incoming(p)) => {
                        if $tx.send(Item::Packet(p)).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = $tx.send(Item::Closed(e));
                        break;
                    }
                }
            }
        })
    };
}

/// What the 3.1.1 and 5.0 clients share: the client type, its start after CONNECT, and
/// receiving, acknowledging and closing. rumqttc's types resolve at the call site (`v3`
/// or `v5`), as for [`spawn_pump!`].
macro_rules! shared_client {
    () => {
        pub struct Client {
            pub client: AsyncClient,
            pub connack: ConnAck,
            pub inbox: Inbox<Packet, ConnectionError>,
            task: JoinHandle<()>,
        }

        impl Client {
            /// Connects or fails the test.
            pub async fn connect(opts: MqttOptions) -> Client {
                let id = opts.client_id();
                match Self::try_connect(opts).await {
                    Ok(c) => c,
                    Err(e) => panic!("client {id:?}: connect failed: {e:?}"),
                }
            }

            /// Waits for the CONNACK, then forwards what arrives to the inbox.
            async fn start(
                name: String,
                client: AsyncClient,
                mut eventloop: EventLoop,
            ) -> Result<Client, ConnectionError> {
                let connack = match timeout(WAIT, eventloop.poll()).await {
                    Err(_) => panic!("{name}: no CONNACK within {WAIT:?}"),
                    Ok(Err(e)) => return Err(e),
                    Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => ack,
                    Ok(Ok(other)) => panic!("{name}: expected CONNACK first, got {other:?}"),
                };
                let (tx, rx) = mpsc::unbounded_channel();
                let task = spawn_pump!(eventloop, tx);
                Ok(Client {
                    client,
                    connack,
                    inbox: Inbox::new(rx, name),
                    task,
                })
            }

            /// For QoS 1/2, waits for the PUBACK / PUBCOMP of what was just published.
            async fn acknowledged(&mut self, qos: QoS) {
                match qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => {
                        self.inbox
                            .take("PUBACK", |p| matches!(p, Packet::PubAck(_)))
                            .await;
                    }
                    QoS::ExactlyOnce => {
                        self.inbox
                            .take("PUBCOMP", |p| matches!(p, Packet::PubComp(_)))
                            .await;
                    }
                }
            }

            /// Next PUBLISH from the broker, or fails the test.
            pub async fn recv(&mut self) -> Publish {
                match self
                    .inbox
                    .take("PUBLISH", |p| matches!(p, Packet::Publish(_)))
                    .await
                {
                    Packet::Publish(p) => p,
                    _ => unreachable!("filtered to PUBLISH"),
                }
            }

            pub async fn recv_within(&mut self, within: Duration) -> Option<Publish> {
                match self
                    .inbox
                    .take_within(within, |p| matches!(p, Packet::Publish(_)))
                    .await
                {
                    Some(Packet::Publish(p)) => Some(p),
                    _ => None,
                }
            }

            /// Fails if any PUBLISH arrives within [`QUIET`].
            pub async fn expect_silence(&mut self) {
                if let Some(p) = self.recv_within(QUIET).await {
                    panic!("{}: unexpected PUBLISH {p:?}", self.inbox.name);
                }
            }

            /// Sends DISCONNECT and waits for the connection to end.
            pub async fn disconnect(mut self) {
                queue(self.client.disconnect(), "DISCONNECT").await;
                // The broker closes the socket after DISCONNECT; the pump then ends.
                let _ = self.inbox.closed_within(WAIT).await;
                self.task.abort();
            }

            /// Acknowledges a PUBLISH received with manual acks enabled.
            pub async fn ack(&self, p: &Publish) {
                queue(self.client.ack(p), "PUBACK").await;
            }

            /// Drops the socket without DISCONNECT (an abnormal close for the broker).
            pub async fn kill(mut self) {
                self.task.abort();
                // Awaiting the aborted task guarantees the event loop and socket are
                // dropped.
                let _ = timeout(WAIT, &mut self.task).await;
            }
        }

        impl Drop for Client {
            fn drop(&mut self) {
                self.task.abort();
            }
        }
    };
}

/// MQTT 3.1.1 client (rumqttc's v4 module).
pub mod v3 {
    use super::*;
    pub use rumqttc::{
        AsyncClient, ConnAck, ConnectReturnCode, ConnectionError, Event, EventLoop, LastWill,
        MqttOptions, Packet, Publish, QoS, SubscribeReasonCode,
    };

    /// Options with the test defaults: 30 s keep alive and 1 MiB packet limits.
    pub fn options(broker: &Broker, id: &str) -> MqttOptions {
        let mut o = MqttOptions::new(id, "127.0.0.1", broker.port());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(1 << 20, 1 << 20);
        o
    }

    shared_client!();

    impl Client {
        /// Connects; a refused CONNACK or I/O failure comes back as the error.
        pub async fn try_connect(opts: MqttOptions) -> Result<Client, ConnectionError> {
            let name = format!("v3 client {:?}", opts.client_id());
            let (client, mut eventloop) = AsyncClient::new(opts, 256);
            // Without TCP_NODELAY, Nagle plus delayed ACKs add ~40 ms to request/response
            // exchanges.
            let mut network = rumqttc::NetworkOptions::new();
            network.set_tcp_nodelay(true);
            network.set_connection_timeout(WAIT.as_secs());
            eventloop.set_network_options(network);
            Self::start(name, client, eventloop).await
        }

        /// Subscribes one filter and returns the SUBACK return code.
        pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> SubscribeReasonCode {
            queue(self.client.subscribe(filter, qos), "SUBSCRIBE").await;
            match self
                .inbox
                .take("SUBACK", |p| matches!(p, Packet::SubAck(_)))
                .await
            {
                Packet::SubAck(ack) => {
                    assert_eq!(ack.return_codes.len(), 1, "one code per filter");
                    ack.return_codes[0]
                }
                _ => unreachable!("filtered to SUBACK"),
            }
        }

        /// Subscribes and asserts the granted QoS equals the requested one.
        pub async fn subscribe_ok(&mut self, filter: &str, qos: QoS) {
            let code = self.subscribe(filter, qos).await;
            assert_eq!(
                code,
                SubscribeReasonCode::Success(qos),
                "SUBACK for {filter}"
            );
        }

        /// Publishes and, for QoS 1/2, waits for PUBACK / PUBCOMP so the broker has
        /// taken the message before the test goes on.
        pub async fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
            queue(
                self.client.publish(topic, qos, retain, payload.to_vec()),
                "PUBLISH",
            )
            .await;
            self.acknowledged(qos).await;
        }
    }
}

/// MQTT 5 client (rumqttc's v5 module).
pub mod v5 {
    use super::*;
    pub use rumqttc::v5::mqttbytes::QoS;
    pub use rumqttc::v5::mqttbytes::v5::{
        ConnAck, ConnAckProperties, ConnectReturnCode, Filter, LastWill, LastWillProperties,
        Packet, Publish, PublishProperties, RetainForwardRule, SubscribeProperties,
        SubscribeReasonCode,
    };
    pub use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};

    /// Options with the test defaults: 30 s keep alive and a 1 MiB incoming limit.
    pub fn options(broker: &Broker, id: &str) -> MqttOptions {
        let mut o = MqttOptions::new(id, "127.0.0.1", broker.port());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(Some(1 << 20));
        // Without TCP_NODELAY, Nagle plus delayed ACKs add ~40 ms to request/response
        // exchanges.
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        o.set_network_options(network);
        o
    }

    shared_client!();

    impl Client {
        /// Connects; a refused CONNACK or I/O failure comes back as the error.
        pub async fn try_connect(opts: MqttOptions) -> Result<Client, ConnectionError> {
            let name = format!("v5 client {:?}", opts.client_id());
            let (client, eventloop) = AsyncClient::new(opts, 256);
            Self::start(name, client, eventloop).await
        }

        pub fn connack_properties(&self) -> ConnAckProperties {
            self.connack
                .properties
                .clone()
                .expect("CONNACK carries properties")
        }

        /// Subscribes `filters` in one SUBSCRIBE and returns the reason codes.
        pub async fn subscribe_filters(
            &mut self,
            filters: Vec<Filter>,
            id: Option<usize>,
        ) -> Vec<SubscribeReasonCode> {
            let count = filters.len();
            match id {
                Some(id) => {
                    queue(
                        self.client.subscribe_many_with_properties(
                            filters,
                            SubscribeProperties {
                                id: Some(id),
                                user_properties: Vec::new(),
                            },
                        ),
                        "SUBSCRIBE",
                    )
                    .await
                }
                None => queue(self.client.subscribe_many(filters), "SUBSCRIBE").await,
            }
            match self
                .inbox
                .take("SUBACK", |p| matches!(p, Packet::SubAck(_)))
                .await
            {
                Packet::SubAck(ack) => {
                    assert_eq!(ack.return_codes.len(), count, "one code per filter");
                    ack.return_codes
                }
                _ => unreachable!("filtered to SUBACK"),
            }
        }

        /// Subscribes one filter and asserts the requested QoS was granted.
        pub async fn subscribe_ok(&mut self, filter: &str, qos: QoS) {
            let codes = self
                .subscribe_filters(vec![Filter::new(filter, qos)], None)
                .await;
            assert_eq!(
                codes,
                vec![SubscribeReasonCode::Success(qos)],
                "SUBACK for {filter}"
            );
        }

        /// Publishes and waits for PUBACK / PUBCOMP for QoS 1/2.
        pub async fn publish_with(
            &mut self,
            topic: &str,
            qos: QoS,
            retain: bool,
            payload: &[u8],
            properties: Option<PublishProperties>,
        ) {
            let payload = bytes::Bytes::copy_from_slice(payload);
            match properties {
                Some(props) => {
                    queue(
                        self.client
                            .publish_with_properties(topic, qos, retain, payload, props),
                        "PUBLISH",
                    )
                    .await
                }
                None => queue(self.client.publish(topic, qos, retain, payload), "PUBLISH").await,
            }
            self.acknowledged(qos).await;
        }

        pub async fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
            self.publish_with(topic, qos, retain, payload, None).await;
        }
    }

    /// Topic of a v5 PUBLISH as text.
    pub fn topic(p: &Publish) -> String {
        String::from_utf8_lossy(&p.topic).into_owned()
    }
}

/// Hand-built packets for what rumqttc refuses to send (empty id with a persistent
/// session, MQTT 3.1, unknown protocol levels, silence after CONNECT, duplicates).
pub mod raw {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub async fn connect_tcp(broker: &Broker) -> TcpStream {
        timeout(WAIT, TcpStream::connect(broker.addr()))
            .await
            .expect("TCP connect timed out")
            .expect("TCP connect")
    }

    fn put_str(buf: &mut Vec<u8>, s: &[u8]) {
        let len = u16::try_from(s.len()).expect("string fits u16");
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(s);
    }

    /// SUBSCRIBE `id` of `filters`, QoS 0 each; MQTT 5 adds an empty property block.
    pub fn subscribe<'a>(id: u16, filters: impl IntoIterator<Item = &'a str>, v5: bool) -> Vec<u8> {
        let mut body = id.to_be_bytes().to_vec();
        if v5 {
            body.push(0);
        }
        for f in filters {
            put_str(&mut body, f.as_bytes());
            body.push(0);
        }
        packet(0x82, &body)
    }

    /// Fixed header + remaining length (variable byte integer).
    pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        let mut len = body.len();
        loop {
            let mut byte = u8::try_from(len % 128).expect("< 128");
            len /= 128;
            if len > 0 {
                byte |= 0x80;
            }
            out.push(byte);
            if len == 0 {
                break;
            }
        }
        out.extend_from_slice(body);
        out
    }

    pub struct Will<'a> {
        pub topic: &'a str,
        pub payload: &'a [u8],
        pub qos: u8,
    }

    /// CONNECT for protocol `name`/`level` (3.x layout, no properties).
    pub fn connect(
        name: &str,
        level: u8,
        client_id: &str,
        clean: bool,
        keep_alive: u16,
        will: Option<Will<'_>>,
    ) -> Vec<u8> {
        let mut body = Vec::new();
        put_str(&mut body, name.as_bytes());
        body.push(level);
        let mut flags = if clean { 0x02 } else { 0x00 };
        if let Some(w) = &will {
            flags |= 0x04 | (w.qos << 3);
        }
        body.push(flags);
        body.extend_from_slice(&keep_alive.to_be_bytes());
        if level == 5 {
            body.push(0); // empty CONNECT properties
        }
        put_str(&mut body, client_id.as_bytes());
        if let Some(w) = will {
            if level == 5 {
                body.push(0); // empty will properties
            }
            put_str(&mut body, w.topic.as_bytes());
            put_str(&mut body, w.payload);
        }
        packet(0x10, &body)
    }

    pub fn connect_v311(client_id: &str, clean: bool, keep_alive: u16) -> Vec<u8> {
        connect("MQTT", 4, client_id, clean, keep_alive, None)
    }

    /// PUBLISH (3.1.1 layout unless `v5`, which adds an empty property block).
    pub fn publish(
        topic: &str,
        qos: u8,
        dup: bool,
        pkid: u16,
        payload: &[u8],
        v5: bool,
    ) -> Vec<u8> {
        let mut body = Vec::new();
        put_str(&mut body, topic.as_bytes());
        if qos > 0 {
            body.extend_from_slice(&pkid.to_be_bytes());
        }
        if v5 {
            body.push(0);
        }
        body.extend_from_slice(payload);
        let first = 0x30 | (qos << 1) | if dup { 0x08 } else { 0 };
        packet(first, &body)
    }

    pub async fn send(stream: &mut TcpStream, bytes: &[u8]) {
        timeout(WAIT, stream.write_all(bytes))
            .await
            .expect("write timed out")
            .expect("write");
    }

    /// Reads one packet: `Some((first byte, body))`, or `None` at EOF / reset.
    pub async fn read_packet(stream: &mut TcpStream, within: Duration) -> Option<(u8, Vec<u8>)> {
        let fut = async {
            let first = stream.read_u8().await.ok()?;
            let mut len: usize = 0;
            let mut shift = 0;
            loop {
                let b = stream.read_u8().await.ok()?;
                len |= usize::from(b & 0x7f) << shift;
                if b & 0x80 == 0 {
                    break;
                }
                shift += 7;
                if shift > 21 {
                    return None;
                }
            }
            let mut body = vec![0; len];
            stream.read_exact(&mut body).await.ok()?;
            Some((first, body))
        };
        match timeout(within, fut).await {
            Ok(r) => r,
            Err(_) => panic!("no packet and no close within {within:?}"),
        }
    }

    /// Reads one packet and fails the test at EOF.
    pub async fn expect_packet(stream: &mut TcpStream) -> (u8, Vec<u8>) {
        read_packet(stream, WAIT)
            .await
            .expect("connection closed, expected a packet")
    }

    /// Asserts the broker closes the connection within `within` without sending
    /// anything more than packets accepted by `allowed`.
    pub async fn expect_close(
        stream: &mut TcpStream,
        within: Duration,
        allowed: impl Fn(u8) -> bool,
    ) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match read_packet(stream, left).await {
                None => return,
                Some((first, body)) => assert!(
                    allowed(first),
                    "unexpected packet {first:#04x} {body:?} before close"
                ),
            }
        }
    }

    /// Raw MQTT 5 connection (clean start, no properties) that completed CONNECT and
    /// got a successful CONNACK.
    ///
    /// Used where the broker's DISCONNECT matters: rumqttc 0.25 cannot decode the short
    /// DISCONNECT form `E0 01 <reason>` (Remaining Length 1, Property Length omitted),
    /// which MQTT 5 §3.14.2.2.1 allows, and reports it as a plain connection abort.
    pub async fn connect_v5(broker: &Broker, client_id: &str) -> TcpStream {
        let mut s = connect_tcp(broker).await;
        send(&mut s, &connect("MQTT", 5, client_id, true, 30, None)).await;
        let (first, body) = expect_packet(&mut s).await;
        assert_eq!(first, 0x20, "CONNACK");
        assert_eq!(body.get(1), Some(&0x00), "CONNACK success, got {body:?}");
        s
    }

    /// Reads until the broker closes the connection and returns the reason codes of
    /// the DISCONNECT packets seen on the way.
    pub async fn disconnect_codes(stream: &mut TcpStream) -> Vec<u8> {
        let mut codes = Vec::new();
        while let Some((first, body)) = read_packet(stream, WAIT).await {
            if first == 0xE0 {
                // No variable header means 0x00, normal disconnection (3.14.2.1).
                codes.push(body.first().copied().unwrap_or(0));
            }
        }
        codes
    }
}
