//! The bundled transform plugins through the binary: `topic-rewrite` (a subscriber of the
//! new topic gets the message; `%u` rules skip anonymous publishers; an invalid result
//! keeps the original topic), `json-enrich` (fields added to JSON objects, other JSON
//! untouched, non-JSON dropped or passed as configured, MQTT 5 properties unchanged) and
//! `rate-limit` (an MQTT 5 publisher over its limit gets DISCONNECT 0x96, an MQTT 3.1.1
//! one loses the excess silently and stays connected, a client within its limit is
//! unaffected).

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::harness::{Broker, raw, v3, v5};
use crate::plugins::{bundled, wait_for_log};

/// The user names the tests publish with, all with the password [`PASSWORD`]: a user name
/// is the client's only once authenticated, so `password-auth` knows them.
const USERS: [&str; 5] = ["acme", "a+b", "alice", "bob", "fast"];
const PASSWORD: &str = "pw";

/// A broker with the bundled plugin `name` and `sidecar`, and `password-auth` with
/// [`USERS`], loaded.
async fn broker_with_bundled(name: &str, sidecar: &str) -> Broker {
    let dir = Broker::temp_dir();
    install_with_users(&dir, name, sidecar);
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;
    broker
}

/// Puts the bundled plugin `name` with `sidecar`, and `password-auth` with [`USERS`], in
/// `dir`'s plugin folder.
fn install_with_users(dir: &std::path::Path, name: &str, sidecar: &str) {
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::write(plugins.join(format!("{name}.toml")), sidecar).unwrap();
    std::fs::copy(bundled(name), plugins.join(format!("{name}.wasm"))).unwrap();
    let users: String = (USERS.iter())
        .map(|u| crate::identity::user_line(u, PASSWORD))
        .collect();
    std::fs::write(
        plugins.join("password-auth.toml"),
        format!("[config.users]\n{users}"),
    )
    .unwrap();
    std::fs::copy(bundled("password-auth"), plugins.join("password-auth.wasm")).unwrap();
}

fn v3_as(broker: &Broker, id: &str, user: Option<&str>) -> v3::MqttOptions {
    let mut o = v3::options(broker, id);
    if let Some(u) = user {
        o.set_credentials(u, PASSWORD);
    }
    o
}

fn text(p: &v3::Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

const REWRITE: &str = r#"
topics = ["devices/#", "legacy/#"]
[config]
[[config.rules]]
from = "devices/+/data/#"
to = "tenants/%u/devices/{1}/{2}"
[[config.rules]]
from = "legacy/+"
to = "users/%u/{1}"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_rewrite_routes_to_the_rewritten_topic() {
    let broker = broker_with_bundled("topic-rewrite", REWRITE).await;
    let mut sub = v5::Client::connect(v5::options(&broker, "rw-sub")).await;
    for f in ["tenants/#", "devices/#", "users/#", "legacy/#"] {
        sub.subscribe_ok(f, v5::QoS::AtLeastOnce).await;
    }

    // MQTT 3.1.1 publisher with a user name: the first rule rewrites, and only the new
    // topic is delivered.
    let mut acme = v3::Client::connect(v3_as(&broker, "rw-acme", Some("acme"))).await;
    acme.publish("devices/d1/data/temp/c", v3::QoS::AtLeastOnce, false, b"21")
        .await;
    let p = sub.recv().await;
    assert_eq!(v5::topic(&p), "tenants/acme/devices/d1/temp/c");
    assert_eq!(&p.payload[..], b"21");
    sub.expect_silence().await;

    // MQTT 5 publisher: rewritten with its properties and payload as sent.
    let mut o = v5::options(&broker, "rw-v5");
    o.set_credentials("acme", PASSWORD);
    let mut v5p = v5::Client::connect(o).await;
    let props = v5::PublishProperties {
        content_type: Some("text/plain".into()),
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    };
    v5p.publish_with(
        "devices/d2/data/x",
        v5::QoS::AtLeastOnce,
        false,
        b"p",
        Some(props),
    )
    .await;
    let p = sub.recv().await;
    assert_eq!(v5::topic(&p), "tenants/acme/devices/d2/x");
    let got = p.properties.expect("properties");
    assert_eq!(got.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        got.user_properties,
        vec![("k".to_string(), "v".to_string())]
    );

    // No user name: the %u rule does not apply, the original topic is kept.
    let mut anon = v3::Client::connect(v3_as(&broker, "rw-anon", None)).await;
    anon.publish("devices/d3/data/y", v3::QoS::AtLeastOnce, false, b"a")
        .await;
    assert_eq!(v5::topic(&sub.recv().await), "devices/d3/data/y");

    // A user name with a wildcard makes an invalid topic name: original kept, warning.
    let mut odd = v3::Client::connect(v3_as(&broker, "rw-odd", Some("a+b"))).await;
    odd.publish("legacy/z", v3::QoS::AtLeastOnce, false, b"o")
        .await;
    assert_eq!(v5::topic(&sub.recv().await), "legacy/z");
    wait_for_log(&broker, "rewrite yields an invalid topic name").await;
    sub.expect_silence().await;
}

/// A will is a message like any other: it passes the transforms (rewritten here with the
/// user name of the client that set it) and the sinks (`sink-probe` republishes what it
/// gets on `sunk/...`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_passes_the_transforms_and_the_sinks() {
    let dir = Broker::temp_dir();
    install_with_users(&dir, "topic-rewrite", REWRITE);
    let plugins = dir.join("plugins");
    std::fs::write(
        plugins.join("sink.toml"),
        "topics = [\"tenants/#\"]\ntime_ms = 2000\n[sink]\nbatch = 50\nlinger_ms = 10\n[config]\n",
    )
    .unwrap();
    let probe = crate::plugins::hostile().with_file_name("sink_probe.wasm");
    std::fs::copy(probe, plugins.join("sink.wasm")).unwrap();
    let broker = Broker::start_in(dir, "");
    crate::plugins::wait_for_logs(&broker, "plugin loaded", 3).await;
    let mut sub = v5::Client::connect(v5::options(&broker, "will-sub")).await;
    for f in ["tenants/#", "devices/#", "sunk/#"] {
        sub.subscribe_ok(f, v5::QoS::AtLeastOnce).await;
    }
    let mut o = v3_as(&broker, "will-acme", Some("acme"));
    o.set_last_will(v3::LastWill::new(
        "devices/w1/data/gone",
        "bye",
        v3::QoS::AtLeastOnce,
        false,
    ));
    v3::Client::connect(o).await.kill().await;

    let mut topics = Vec::new();
    for _ in 0..2 {
        let p = sub.recv().await;
        assert_eq!(&p.payload[..], b"bye");
        topics.push(v5::topic(&p));
    }
    topics.sort();
    assert_eq!(
        topics,
        [
            "sunk/tenants/acme/devices/w1/gone",
            "tenants/acme/devices/w1/gone"
        ]
    );
    sub.expect_silence().await;
}

/// `max_topic_levels` bounds the topics plugins make too: a rewrite past it is ignored
/// (the message keeps its topic, the plugin's answer is logged as bad), and a topic a
/// plugin publishes past it is refused (`sink-probe` is told `invalid-topic` and retries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_plugins_make_keep_to_the_topic_limits() {
    let dir = Broker::temp_dir();
    install_with_users(&dir, "topic-rewrite", REWRITE);
    let plugins = dir.join("plugins");
    std::fs::write(
        plugins.join("sink.toml"),
        "topics = [\"tenants/#\"]\ntime_ms = 2000\n[sink]\nbatch = 1\nlinger_ms = 1\n[config]\n",
    )
    .unwrap();
    std::fs::copy(crate::plugin_sink::sink_probe(), plugins.join("sink.wasm")).unwrap();
    let broker = Broker::start_in(dir, "max_topic_levels = 5");
    crate::plugins::wait_for_logs(&broker, "plugin loaded", 3).await;
    let mut sub = v5::Client::connect(v5::options(&broker, "lim-sub")).await;
    sub.subscribe_ok("#", v5::QoS::AtLeastOnce).await;
    let mut acme = v3::Client::connect(v3_as(&broker, "lim-acme", Some("acme"))).await;

    // Five levels after the rewrite: within the limit, rewritten.
    acme.publish("devices/d1/data/x", v3::QoS::AtLeastOnce, false, b"1")
        .await;
    assert_eq!(v5::topic(&sub.recv().await), "tenants/acme/devices/d1/x");
    // The sink's republish would have six levels: refused, the sink retries.
    wait_for_log(&broker, "sink batch not delivered: publish:").await;
    let line = (broker.logs().into_iter())
        .find(|l| l.contains("sink batch not delivered"))
        .unwrap();
    assert!(line.to_lowercase().contains("invalid"), "{line}");

    // Six levels after the rewrite: the answer is ignored, the topic kept.
    acme.publish("devices/d1/data/x/y", v3::QoS::AtLeastOnce, false, b"2")
        .await;
    assert_eq!(v5::topic(&sub.recv().await), "devices/d1/data/x/y");
    wait_for_log(&broker, "over the topic limits").await;
    sub.expect_silence().await;
}

/// The JSON members after `prefix` in `payload`, checking that `received_at` is now.
fn enriched_tail(payload: &str, prefix: &str) -> String {
    let rest = payload
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{payload:?} does not start with {prefix:?}"));
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let ts: u64 = digits.parse().expect("a received_at number");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let ts = u128::from(ts);
    assert!(
        ts <= now && now - ts < 60_000,
        "received_at {ts} is not now ({now})"
    );
    rest[digits.len()..].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_enrich_adds_fields_and_drops_non_json_when_configured() {
    let sidecar = r#"
topics = ["sensors/#"]
[config]
drop_non_json = true
[config.fields]
received_at = "ts"
client_id = "client_id"
username = "username"
"#;
    let broker = broker_with_bundled("json-enrich", sidecar).await;
    let mut sub = v3::Client::connect(v3::options(&broker, "je-sub")).await;
    sub.subscribe_ok("sensors/#", v3::QoS::AtLeastOnce).await;
    sub.subscribe_ok("other/#", v3::QoS::AtLeastOnce).await;
    let mut publ = v3::Client::connect(v3_as(&broker, "je-pub", Some("alice"))).await;

    // A JSON object gets the configured fields after its own, replacing a forged one.
    publ.publish(
        "sensors/t",
        v3::QoS::AtLeastOnce,
        false,
        br#"{"t": 21.50, "username": "mallory"}"#,
    )
    .await;
    let got = text(&sub.recv().await);
    assert_eq!(
        enriched_tail(&got, r#"{"t":21.50,"ts":"#),
        r#","client_id":"je-pub","username":"alice"}"#
    );

    // Other JSON passes unchanged; non-JSON is dropped (the next message arrives first).
    publ.publish("sensors/a", v3::QoS::AtLeastOnce, false, b"[1,2]")
        .await;
    assert_eq!(text(&sub.recv().await), "[1,2]");
    publ.publish("sensors/b", v3::QoS::AtLeastOnce, false, b"not json")
        .await;
    publ.publish("sensors/c", v3::QoS::AtLeastOnce, false, b"7")
        .await;
    let p = sub.recv().await;
    assert_eq!((p.topic.as_str(), text(&p).as_str()), ("sensors/c", "7"));
    // Topics outside the sidecar's `topics` are not handed to the plugin.
    publ.publish("other/x", v3::QoS::AtLeastOnce, false, b"not json")
        .await;
    assert_eq!(text(&sub.recv().await), "not json");
    sub.expect_silence().await;

    // MQTT 5: only the payload changes; no user name gives null.
    let mut sub5 = v5::Client::connect(v5::options(&broker, "je-sub5")).await;
    sub5.subscribe_ok("sensors/#", v5::QoS::AtLeastOnce).await;
    let mut pub5 = v5::Client::connect(v5::options(&broker, "je-pub5")).await;
    let props = v5::PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some("replies/1".into()),
        correlation_data: Some(Bytes::from_static(b"c1")),
        user_properties: vec![("u".into(), "1".into())],
        ..Default::default()
    };
    pub5.publish_with(
        "sensors/v5",
        v5::QoS::AtLeastOnce,
        false,
        br#"{"n":{"deep":[1]}}"#,
        Some(props),
    )
    .await;
    let p = sub5.recv().await;
    let got = String::from_utf8_lossy(&p.payload).into_owned();
    assert_eq!(
        enriched_tail(&got, r#"{"n":{"deep":[1]},"ts":"#),
        r#","client_id":"je-pub5","username":null}"#
    );
    let got = p.properties.expect("properties");
    assert_eq!(got.payload_format_indicator, Some(1));
    assert_eq!(got.content_type.as_deref(), Some("application/json"));
    assert_eq!(got.response_topic.as_deref(), Some("replies/1"));
    assert_eq!(got.correlation_data.as_deref(), Some(&b"c1"[..]));
    assert_eq!(
        got.user_properties,
        vec![("u".to_string(), "1".to_string())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_enrich_passes_non_json_by_default_and_adds_only_configured_fields() {
    let sidecar = "[config.fields]\nclient_id = \"from\"\n";
    let broker = broker_with_bundled("json-enrich", sidecar).await;
    let mut sub = v3::Client::connect(v3::options(&broker, "jd-sub")).await;
    sub.subscribe_ok("#", v3::QoS::AtLeastOnce).await;
    let mut publ = v3::Client::connect(v3_as(&broker, "jd-pub", Some("bob"))).await;
    publ.publish("s/1", v3::QoS::AtLeastOnce, false, b"plain text")
        .await;
    assert_eq!(text(&sub.recv().await), "plain text");
    publ.publish("s/2", v3::QoS::AtLeastOnce, false, br#"{"a":1}"#)
        .await;
    assert_eq!(text(&sub.recv().await), r#"{"a":1,"from":"jd-pub"}"#);
}

const LIMITS: &str = r#"
instances = 1
[config]
rate = 0.2
burst = 3
[config.users.fast]
rate = 1000.0
burst = 1000
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_disconnects_v5_drops_v3_excess_and_spares_clients_within_limits() {
    let broker = broker_with_bundled("rate-limit", LIMITS).await;
    let mut sub = v3::Client::connect(v3::options(&broker, "rl-sub")).await;
    sub.subscribe_ok("rl/#", v3::QoS::AtLeastOnce).await;

    // MQTT 3.1.1 over the limit: every PUBLISH is acknowledged, the burst (3) is
    // delivered, the excess is dropped silently, and the client stays connected.
    let mut v3p = v3::Client::connect(v3::options(&broker, "rl-v3")).await;
    for i in 0..8 {
        v3p.publish(
            "rl/v3",
            v3::QoS::AtLeastOnce,
            false,
            format!("{i}").as_bytes(),
        )
        .await;
    }
    for i in 0..3 {
        assert_eq!(text(&sub.recv().await), format!("{i}"));
    }
    sub.expect_silence().await;
    assert!(!v3p.inbox.is_closed(), "a 3.1.1 publisher stays connected");
    v3p.subscribe_ok("rl/echo", v3::QoS::AtMostOnce).await;

    // A client within its limit is unaffected: its own bucket, and a per-user override.
    let mut calm = v5::Client::connect(v5::options(&broker, "rl-calm")).await;
    for i in 0..2 {
        calm.publish(
            "rl/calm",
            v5::QoS::AtLeastOnce,
            false,
            format!("c{i}").as_bytes(),
        )
        .await;
        assert_eq!(text(&sub.recv().await), format!("c{i}"));
    }
    let mut o = v5::options(&broker, "rl-fast");
    o.set_credentials("fast", PASSWORD);
    let mut fast = v5::Client::connect(o).await;
    for i in 0..50 {
        fast.publish(
            "rl/fast",
            v5::QoS::AtLeastOnce,
            false,
            format!("f{i}").as_bytes(),
        )
        .await;
    }
    for i in 0..50 {
        assert_eq!(text(&sub.recv().await), format!("f{i}"));
    }
    assert!(!calm.inbox.is_closed() && !fast.inbox.is_closed());

    // MQTT 5 over the limit: DISCONNECT 0x96 (message rate too high). Five QoS 0
    // publishes in one write: three pass, the fourth is refused.
    let mut s = raw::connect_v5(&broker, "rl-v5").await;
    let burst: Vec<u8> = (0..5)
        .flat_map(|i| raw::publish("rl/v5", 0, false, 0, format!("v{i}").as_bytes(), true))
        .collect();
    raw::send(&mut s, &burst).await;
    assert_eq!(raw::disconnect_codes(&mut s).await, vec![0x96]);
    for i in 0..3 {
        assert_eq!(text(&sub.recv().await), format!("v{i}"));
    }
    sub.expect_silence().await;

    // The limited 3.1.1 client is still served: a subscription round trip works.
    v3p.subscribe_ok("rl/echo2", v3::QoS::AtMostOnce).await;
    assert!(!v3p.inbox.is_closed());
}
