//! The bundled `postgres-sink` plugin through the binary, against a real PostgreSQL
//! (Debian's `postgresql`, installed when missing, initialised per test in a temporary
//! folder on a free 127.0.0.1 port, SCRAM-SHA-256 password authentication): QoS 1
//! messages arrive as published; nothing is lost while PostgreSQL is down or after the
//! broker is killed with -9 (duplicates allowed, counted); a PostgreSQL that hangs slows
//! neither publishers nor subscribers; an address missing from the sidecar's `network`
//! list is refused.

use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::{Broker, v3, v5};
use crate::plugins::{bundled, wait_for_log};

const USER: &str = "sink";
const PASSWORD: &str = "sink-Pw-1";

/// A PostgreSQL cluster of one test (see `sandpiper_test_support::postgres`): database
/// `mqtt`, superuser `sink` with a SCRAM-SHA-256 password.
struct Postgres(sandpiper_test_support::postgres::Postgres);

impl std::ops::Deref for Postgres {
    type Target = sandpiper_test_support::postgres::Postgres;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Postgres {
    fn start() -> Postgres {
        Postgres(sandpiper_test_support::postgres::Postgres::start(
            USER, PASSWORD,
        ))
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
    // Each INSERT takes 500 ms more, so the sink lags behind the publisher and has a
    // statement in flight most of the time: the kill lands mid-run (with 100 ms, a slower
    // machine's publisher let the sink finish first).
    pg.psql(
        "CREATE TABLE msgs (topic text NOT NULL, payload bytea NOT NULL, qos smallint NOT NULL, \
         client_id text, received_at timestamptz NOT NULL, user_properties jsonb NOT NULL); \
         CREATE FUNCTION nap() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep(0.5); RETURN NULL; END $$; \
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
    let elsewhere = format!("127.0.0.1:{}", sandpiper_test_support::free_port());
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
