//! The bundled `postgres-sink` plugin through the binary, against a real PostgreSQL
//! (Debian's `postgresql`, installed when missing, initialised per test in a temporary
//! folder on a free 127.0.0.1 port, SCRAM-SHA-256 password authentication): QoS 1
//! messages arrive as published; nothing is lost while PostgreSQL is down or after the
//! broker is killed with -9 (duplicates allowed, counted); a PostgreSQL that hangs slows
//! neither publishers nor subscribers; an address missing from the sidecar's `network`
//! list is refused.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::harness::{Broker, v3, v5};
use crate::plugins::{bundled, wait_for_log};

const USER: &str = "sink";
const PASSWORD: &str = "sink-Pw-1";

/// The folder with `initdb` and `pg_ctl`, installing Debian's `postgresql` first if it
/// is missing (with sudo when not root, as tests/run does).
fn pg_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = find_pg_bin() {
            return bin;
        }
        let root = is_root();
        let apt = |args: &[&str]| {
            let mut c = if root {
                Command::new("apt-get")
            } else {
                let mut c = Command::new("sudo");
                c.arg("apt-get");
                c
            };
            c.args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .is_ok_and(|s| s.success())
        };
        assert!(apt(&["update", "-qq"]), "apt-get update failed");
        assert!(
            apt(&["install", "-y", "-qq", "postgresql"]),
            "apt-get install postgresql failed"
        );
        find_pg_bin().expect("initdb after installing postgresql")
    })
}

/// The newest `/usr/lib/postgresql/N/bin` with `initdb`, else one on `PATH`.
fn find_pg_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|d| d.join("initdb").exists())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A PostgreSQL cluster of one test: database `mqtt`, role `sink` (SCRAM-SHA-256
/// password). Run as root, the server runs as the `postgres` user, which the package
/// creates (PostgreSQL refuses to run as root). Stopped and deleted on drop.
struct Postgres {
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl Postgres {
    fn start() -> Postgres {
        let bin = pg_bin();
        // A folder of its own (removed on drop): data, password file, log, socket.
        let dir = Broker::temp_dir();
        let pg = Postgres {
            dir,
            port: free_port(),
            as_postgres: is_root(),
        };
        std::fs::write(pg.dir.join("pwfile"), PASSWORD).unwrap();
        pg.chown();
        let data = pg.data();
        let pwfile = pg.dir.join("pwfile");
        pg.run(
            &bin.join("initdb"),
            &[
                "-D",
                &data,
                "-U",
                USER,
                "--pwfile",
                &pwfile.to_string_lossy(),
                "--auth-local",
                "trust",
                "--auth-host",
                "scram-sha-256",
                "-E",
                "UTF8",
                "--no-locale",
                "-N",
            ],
        );
        pg.resume();
        pg.psql_in("postgres", "CREATE DATABASE mqtt");
        pg
    }

    fn data(&self) -> String {
        self.dir.join("data").to_string_lossy().into_owned()
    }

    fn chown(&self) {
        if self.as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&self.dir)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown to postgres failed");
        }
    }

    fn run(&self, exe: &Path, args: &[&str]) {
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", exe.display()));
        assert!(
            out.status.success(),
            "{} {args:?} failed: {}{}",
            exe.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the server (again) on its port; returns once it accepts connections.
    fn resume(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c password_encryption=scram-sha-256 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log").to_string_lossy().into_owned();
        let data = self.data();
        self.run(
            &pg_bin().join("pg_ctl"),
            &[
                "-D", &data, "-l", &log, "-o", &opts, "-w", "-t", "30", "start",
            ],
        );
    }

    /// Stops the server: clients are disconnected, transactions in flight rolled back.
    fn stop(&self) {
        let data = self.data();
        self.run(
            &pg_bin().join("pg_ctl"),
            &["-D", &data, "-m", "fast", "-w", "-t", "30", "stop"],
        );
    }

    fn psql(&self, sql: &str) -> String {
        self.psql_in("mqtt", sql)
    }

    /// psql as the superuser over the Unix socket (trust), unaligned, tuples only.
    fn psql_in(&self, db: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                USER,
                "-d",
                db,
                "-c",
                sql,
            ])
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim_end().to_owned()
    }

    /// `SELECT count(*), count(DISTINCT payload)` of the table, 0 while it does not exist.
    fn counts(&self) -> (usize, usize) {
        let exists = self.psql("SELECT to_regclass('public.msgs') IS NOT NULL");
        if exists != "t" {
            return (0, 0);
        }
        let out = self.psql("SELECT count(*) || ' ' || count(DISTINCT payload) FROM msgs");
        let mut it = out.split(' ').map(|n| n.parse::<usize>().unwrap());
        (it.next().unwrap(), it.next().unwrap())
    }

    /// Waits until the table holds `n` distinct payloads; returns (rows, distinct).
    async fn wait_for_distinct(
        &self,
        n: usize,
        within: Duration,
        broker: &Broker,
    ) -> (usize, usize) {
        let deadline = Instant::now() + within;
        loop {
            let c = self.counts();
            if c.1 >= n {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} distinct rows after {within:?} ({} rows); broker log:\n{}",
                c.1,
                c.0,
                broker.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let pg_ctl = pg_bin().join("pg_ctl");
        let data = self.data();
        let args = [
            "-D",
            data.as_str(),
            "-m",
            "immediate",
            "-w",
            "-t",
            "30",
            "stop",
        ];
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&pg_ctl);
            c
        } else {
            Command::new(&pg_ctl)
        };
        let _ = cmd
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A sidecar for the plugin: `pg/#` selected, quick batching and retries, `network`
/// as given, the plugin's `[config]` pointing at `127.0.0.1:port`.
fn sidecar(network: &[String], port: u16, extra_config: &str) -> String {
    let network: Vec<String> = network.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "topics = [\"pg/#\"]\ntime_ms = 10000\nnetwork = [{}]\n\
         [sink]\nbatch = 100\nlinger_ms = 10\nretry_min_ms = 50\nretry_max_ms = 500\n\
         [config]\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"{USER}\"\n\
         password = \"{PASSWORD}\"\ndatabase = \"mqtt\"\ntable = \"msgs\"\n\
         create_table = true\nconnect_timeout_ms = 2000\nio_timeout_ms = 5000\n{extra_config}\n",
        network.join(", ")
    )
}

/// Writes the sidecar then the component into `plugins` (each beside, then renamed).
fn install(plugins: &Path, sidecar: &str) {
    std::fs::create_dir_all(plugins).unwrap();
    std::fs::write(plugins.join("postgres-sink.toml.tmp"), sidecar).unwrap();
    std::fs::rename(
        plugins.join("postgres-sink.toml.tmp"),
        plugins.join("postgres-sink.toml"),
    )
    .unwrap();
    if !plugins.join("postgres-sink.wasm").exists() {
        std::fs::copy(
            bundled("postgres-sink"),
            plugins.join("postgres-sink.wasm.tmp"),
        )
        .unwrap();
        std::fs::rename(
            plugins.join("postgres-sink.wasm.tmp"),
            plugins.join("postgres-sink.wasm"),
        )
        .unwrap();
    }
}

/// A broker with the plugin loaded.
async fn broker_with_sink(sidecar: &str) -> Broker {
    let dir = Broker::temp_dir();
    install(&dir.join("plugins"), sidecar);
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;
    broker
}

/// Publishes `pg/{topic}` QoS 1 messages `from..to` (payload `m{i}`), each acknowledged.
async fn publish_range(broker: &Broker, id: &str, from: usize, to: usize) {
    let mut c = v3::Client::connect(v3::options(broker, id)).await;
    for i in from..to {
        c.publish(
            &format!("pg/{}", i % 10),
            v3::QoS::AtLeastOnce,
            false,
            format!("m{i}").as_bytes(),
        )
        .await;
    }
    c.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_messages_arrive_in_postgres_exactly_as_published() {
    let pg = Postgres::start();
    let broker = broker_with_sink(&sidecar(&[format!("127.0.0.1:{}", pg.port)], pg.port, "")).await;

    // 500 from an MQTT 3.1.1 client, binary payloads...
    const N: usize = 500;
    let mut c = v3::Client::connect(v3::options(&broker, "pg-v3")).await;
    let mut sent: Vec<String> = Vec::new();
    for i in 0..N {
        let payload: Vec<u8> = vec![0, (i % 256) as u8, 0xff, b'\'', b'\\'];
        let payload = [payload, format!("#{i}").into_bytes()].concat();
        let topic = format!("pg/dev{}/temp", i % 7);
        c.publish(&topic, v3::QoS::AtLeastOnce, false, &payload)
            .await;
        let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
        sent.push(format!("{topic}|{hex}|1|pg-v3|{{}}"));
    }
    c.disconnect().await;
    // ...and one from MQTT 5 with user properties (a repeated name becomes an array).
    let mut c5 = v5::Client::connect(v5::options(&broker, "pg-v5")).await;
    let props = v5::PublishProperties {
        user_properties: vec![
            ("unit".into(), "°C".into()),
            ("tag".into(), "a".into()),
            ("tag".into(), "b".into()),
        ],
        ..Default::default()
    };
    c5.publish_with(
        "pg/v5",
        v5::QoS::AtLeastOnce,
        false,
        b"{\"t\":21.5}",
        Some(props),
    )
    .await;
    c5.disconnect().await;
    sent.push(format!(
        "pg/v5|{}|1|pg-v5|{{\"tag\": [\"a\", \"b\"], \"unit\": \"°C\"}}",
        b"{\"t\":21.5}"
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ));
    // Not selected by `topics`: not inserted.
    let mut other = v3::Client::connect(v3::options(&broker, "pg-other")).await;
    other
        .publish("elsewhere/x", v3::QoS::AtLeastOnce, false, b"no")
        .await;
    other.disconnect().await;

    let (rows, distinct) = pg
        .wait_for_distinct(N + 1, Duration::from_secs(30), &broker)
        .await;
    assert_eq!((rows, distinct), (N + 1, N + 1), "each message once");
    let got = pg.psql(
        "SELECT topic || '|' || encode(payload, 'hex') || '|' || qos || '|' || client_id \
         || '|' || user_properties::text FROM msgs",
    );
    let mut got: Vec<&str> = got.lines().collect();
    got.sort_unstable();
    sent.sort_unstable();
    assert_eq!(got, sent);
    // received_at is the broker's receive time: within this test's run.
    let age = pg.psql("SELECT max(now() - received_at) < interval '5 minutes' FROM msgs");
    assert_eq!(age, "t");
    // In publish order within a topic (one client, QoS 1): received_at never goes back.
    let back = pg.psql(
        "SELECT count(*) FROM (SELECT received_at < lag(received_at) OVER (ORDER BY ctid) AS back \
         FROM msgs) s WHERE back",
    );
    assert_eq!(back, "0", "rows were inserted in publish order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_mid_run_loses_nothing_once_it_returns() {
    let pg = Postgres::start();
    let broker = broker_with_sink(&sidecar(&[format!("127.0.0.1:{}", pg.port)], pg.port, "")).await;
    const N: usize = 600;
    publish_range(&broker, "pg-before", 0, N / 3).await;
    pg.wait_for_distinct(1, Duration::from_secs(20), &broker)
        .await;

    // Down mid-run: publishers are still acknowledged (the broker queues on disk).
    pg.stop();
    let t = Instant::now();
    publish_range(&broker, "pg-during", N / 3, 2 * N / 3).await;
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "publishing while PostgreSQL is down took {:?}",
        t.elapsed()
    );
    wait_for_log(&broker, "sink batch not delivered").await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Back, on the same port: everything arrives.
    pg.resume();
    publish_range(&broker, "pg-after", 2 * N / 3, N).await;
    let (rows, distinct) = pg
        .wait_for_distinct(N, Duration::from_secs(60), &broker)
        .await;
    assert_eq!(distinct, N);
    eprintln!(
        "postgres stopped mid-run: {N} published, {rows} rows, {} duplicates",
        rows - distinct
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_mid_run_loses_nothing_after_restart() {
    let pg = Postgres::start();
    // Each INSERT takes 100 ms more, so the sink lags behind the publisher and has a
    // statement in flight most of the time: the kill lands mid-run.
    pg.psql(
        "CREATE TABLE msgs (topic text NOT NULL, payload bytea NOT NULL, qos smallint NOT NULL, \
         client_id text, received_at timestamptz NOT NULL, user_properties jsonb NOT NULL); \
         CREATE FUNCTION nap() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep(0.1); RETURN NULL; END $$; \
         CREATE TRIGGER nap AFTER INSERT ON msgs FOR EACH STATEMENT EXECUTE FUNCTION nap();",
    );
    let dir = Broker::temp_dir();
    install(
        &dir.join("plugins"),
        &sidecar(&[format!("127.0.0.1:{}", pg.port)], pg.port, ""),
    );
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;

    // Every PUBACK means the record is in the sink's queue on disk.
    const N: usize = 1500;
    publish_range(&broker, "pg-kill", 0, N).await;
    let at_kill = pg.counts();
    let dir = broker.kill9();
    assert!(
        at_kill.0 < N,
        "the sink had finished before the kill: not mid-run"
    );

    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;
    let (rows, distinct) = pg
        .wait_for_distinct(N, Duration::from_secs(60), &broker)
        .await;
    assert_eq!(distinct, N);
    eprintln!(
        "broker killed with -9 with {} of {N} rows inserted: {rows} rows after restart, {} duplicates",
        at_kill.0,
        rows - distinct
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_postgres_slows_neither_publishers_nor_subscribers() {
    // Accepts connections and never answers: the plugin waits inside a socket read, out
    // of the broker's reach, for up to 25 s (its connect timeout).
    let hung = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = hung.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in hung.incoming().flatten() {
            held.push(s);
            if held.len() > 64 {
                break;
            }
        }
        std::thread::sleep(Duration::from_secs(60));
    });
    let sidecar = sidecar(&[addr.to_string()], addr.port(), "")
        .replace("connect_timeout_ms = 2000", "connect_timeout_ms = 25000")
        .replace("io_timeout_ms = 5000", "io_timeout_ms = 25000")
        .replace("time_ms = 10000", "time_ms = 60000");
    let broker = broker_with_sink(&sidecar).await;

    let mut sub = v3::Client::connect(v3::options(&broker, "pg-hang-sub")).await;
    sub.subscribe_ok("pg/#", v3::QoS::AtLeastOnce).await;
    let mut publ = v3::Client::connect(v3::options(&broker, "pg-hang-pub")).await;
    // The first message sends the sink into its hang; then 200 round trips.
    publ.publish("pg/first", v3::QoS::AtLeastOnce, false, b"first")
        .await;
    sub.recv().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..200 {
        let one = Instant::now();
        publ.publish(
            "pg/x",
            v3::QoS::AtLeastOnce,
            false,
            format!("{i}").as_bytes(),
        )
        .await;
        let p = sub.recv().await;
        assert_eq!(p.payload, format!("{i}").as_bytes());
        slowest = slowest.max(one.elapsed());
    }
    let took = t.elapsed();
    eprintln!("hanging sink: 200 QoS 1 round trips in {took:?}, slowest {slowest:?}");
    // The sink is stuck for 25 s: a broker waiting on it would show that here. The
    // bounds leave room for a loaded test machine (unloaded: ~0.2 s, slowest ~10 ms).
    assert!(
        slowest < Duration::from_secs(2),
        "slowest round trip {slowest:?}"
    );
    assert!(
        took < Duration::from_secs(15),
        "200 round trips took {took:?}"
    );
    // The sink has delivered nothing and is still waiting (no retry logged yet).
    assert!(
        !broker
            .logs()
            .iter()
            .any(|l| l.contains("sink batch not delivered")),
        "the sink should still be waiting on the hung server"
    );
    publ.disconnect().await;
    sub.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_not_in_the_network_list_is_refused() {
    let pg = Postgres::start();
    // `network` lists another port: the plugin's connection to PostgreSQL is refused.
    let elsewhere = format!("127.0.0.1:{}", free_port());
    let dir = Broker::temp_dir();
    let plugins = dir.join("plugins");
    install(
        &plugins,
        &sidecar(std::slice::from_ref(&elsewhere), pg.port, ""),
    );
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;
    publish_range(&broker, "pg-refused", 0, 20).await;
    wait_for_log(&broker, "plugin network use refused").await;
    wait_for_log(&broker, "is it in the sidecar's `network` list?").await;
    assert_eq!(pg.counts(), (0, 0));

    // Listing it (a live sidecar change) lets the queued messages through.
    install(
        &plugins,
        &sidecar(&[elsewhere, format!("127.0.0.1:{}", pg.port)], pg.port, ""),
    );
    let (rows, distinct) = pg
        .wait_for_distinct(20, Duration::from_secs(30), &broker)
        .await;
    assert_eq!((rows, distinct), (20, 20));
}
