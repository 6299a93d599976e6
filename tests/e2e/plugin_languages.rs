//! Plugins written in other languages than Rust, through the binary:
//! `examples/plugins/python-acl` (Python, componentize-py; `authorize`) and
//! `examples/plugins/js-transform` (JavaScript, componentize-js; `transform`). Each is
//! built from source by its own `build` script, loaded by the broker, exercised by MQTT
//! clients (allowed and denied subscribes and publishes, rewritten payloads) and
//! live-reloaded by a change of its sidecar.
//!
//! These components carry an interpreter (12–18 MB), and compiling one takes the debug
//! broker 15–25 s. So the first test that needs one builds it and has a broker load it
//! once into a compiled-code cache that every broker of this module shares (its
//! `data/plugin-cache` links there); the others load it from that cache, as a restarted
//! broker does.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::harness::{Broker, raw, v3, v5};
use crate::plugins::wait_for_log;

/// How long the first, uncached compilation of one of these components may take.
const COLD_LOAD: Duration = Duration::from_secs(300);

/// The compiled-code cache shared by the brokers of this module.
fn shared_cache() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2e-plugin-languages-cache")
}

/// A broker's folder whose `data/plugin-cache` is the shared cache.
fn broker_dir() -> PathBuf {
    let dir = Broker::temp_dir();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::create_dir_all(shared_cache()).unwrap();
    std::os::unix::fs::symlink(shared_cache(), dir.join("data/plugin-cache")).unwrap();
    dir
}

/// Writes `NAME.toml` then `NAME.wasm` (a copy of `wasm`) into `plugins`, each by rename.
fn install(plugins: &Path, name: &str, wasm: &Path, sidecar: &str) {
    std::fs::create_dir_all(plugins).unwrap();
    write_sidecar(plugins, name, sidecar);
    let tmp = plugins.join(format!("{name}.wasm.tmp"));
    std::fs::copy(wasm, &tmp).unwrap();
    std::fs::rename(&tmp, plugins.join(format!("{name}.wasm"))).unwrap();
}

/// Replaces `NAME.toml` in `plugins` by rename, as an operator editing it should.
fn write_sidecar(plugins: &Path, name: &str, sidecar: &str) {
    let tmp = plugins.join(format!("{name}.toml.tmp"));
    std::fs::write(&tmp, sidecar).unwrap();
    std::fs::rename(&tmp, plugins.join(format!("{name}.toml"))).unwrap();
}

/// Runs `examples/plugins/NAME/build`, then loads the component once in a broker whose
/// cache is the shared one, and returns the component's path.
fn build_and_warm(name: &str) -> PathBuf {
    let example = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/plugins")
        .join(name);
    let status = std::process::Command::new(example.join("build"))
        .status()
        .unwrap_or_else(|e| panic!("run examples/plugins/{name}/build: {e}"));
    assert!(status.success(), "examples/plugins/{name}/build failed");
    let wasm = example.join(format!("{name}.wasm"));

    // Loaded after start (a broker loads its plugins before it listens, and an uncached
    // component takes longer to compile than the harness waits for `listening`).
    let dir = broker_dir();
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let broker = Broker::start_in(dir, "");
    install(&plugins, name, &wasm, "");
    let deadline = Instant::now() + COLD_LOAD;
    loop {
        let logs = broker.logs();
        if logs.iter().any(|l| l.contains("plugin loaded")) {
            break;
        }
        assert!(
            !logs.iter().any(|l| l.contains("plugin refused")) && Instant::now() < deadline,
            "{name}.wasm was not loaded; log:\n{}",
            logs.join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wasm
}

fn python_acl() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| build_and_warm("python-acl")).clone()
}

fn js_transform() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| build_and_warm("js-transform")).clone()
}

/// A broker (and its plugins folder) with the plugin `name` and `sidecar`, loaded.
async fn broker_with(name: &str, wasm: &Path, sidecar: &str) -> (Broker, PathBuf) {
    let dir = broker_dir();
    let plugins = dir.join("plugins");
    install(&plugins, name, wasm, sidecar);
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;
    (broker, plugins)
}

const ACL: &str = r##"
[config]
default = "deny"
[[config.rules]]
allow = "readwrite"
topic = "devices/%c/#"
[[config.rules]]
allow = "read"
topic = "public/#"
[[config.rules]]
deny = "write"
topic = "devices/%c/secret"
[[config.rules]]
allow = "readwrite"
topic = "#"
username = "admin"
"##;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_acl_allows_and_denies_subscribes_and_publishes() {
    // The admin rule applies to a user who proved the name: password-auth beside the acl.
    let dir = broker_dir();
    let plugins = dir.join("plugins");
    install(&plugins, "python-acl", &python_acl(), ACL);
    let users = format!(
        "[config.users]\n{}",
        crate::identity::user_line("admin", "admin-pw")
    );
    install(
        &plugins,
        "password-auth",
        &crate::plugins::bundled("password-auth"),
        &users,
    );
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;

    let mut dev = v3::Client::connect(v3::options(&broker, "dev1")).await;
    dev.subscribe_ok("devices/dev1/#", v3::QoS::AtLeastOnce)
        .await;
    dev.subscribe_ok("public/#", v3::QoS::AtLeastOnce).await;
    // Another client's topics, and a filter wider than any allow rule: SUBACK 0x80.
    for filter in ["devices/dev2/#", "#", "devices/+/temp"] {
        assert_eq!(
            dev.subscribe(filter, v3::QoS::AtLeastOnce).await,
            v3::SubscribeReasonCode::Failure,
            "{filter}"
        );
    }
    // A user name's rule: the admin may subscribe to everything.
    let mut admin_opts = v3::options(&broker, "console");
    admin_opts.set_credentials("admin", "admin-pw");
    let mut admin = v3::Client::connect(admin_opts).await;
    admin.subscribe_ok("#", v3::QoS::AtLeastOnce).await;

    // MQTT 3.1.1 cannot refuse a PUBLISH: a denied one (read-only topic, deny rule,
    // another client's topic) is acknowledged and dropped; the allowed one is routed.
    for topic in ["public/news", "devices/dev1/secret", "devices/dev2/temp"] {
        dev.publish(topic, v3::QoS::AtLeastOnce, false, b"no").await;
    }
    dev.publish("devices/dev1/temp", v3::QoS::AtLeastOnce, false, b"21")
        .await;
    for c in [&mut dev, &mut admin] {
        let p = c.recv().await;
        assert_eq!(
            (p.topic.as_str(), &p.payload[..]),
            ("devices/dev1/temp", &b"21"[..])
        );
        c.expect_silence().await;
    }

    // MQTT 5: a denied QoS 1 PUBLISH gets PUBACK 0x87 (not authorized).
    let mut s = raw::connect_v5(&broker, "dev5").await;
    raw::send(
        &mut s,
        &raw::publish("devices/dev1/x", 1, false, 7, b"no", true),
    )
    .await;
    let (first, body) = raw::expect_packet(&mut s).await;
    assert_eq!(first, 0x40, "PUBACK");
    assert_eq!(&body[..3], &[0, 7, 0x87], "PUBACK 0x87");
    raw::send(
        &mut s,
        &raw::publish("devices/dev5/x", 1, false, 8, b"ok", true),
    )
    .await;
    let (first, body) = raw::expect_packet(&mut s).await;
    assert_eq!(first, 0x40, "PUBACK");
    assert!(body.len() == 2 || body[2] == 0, "allowed: {body:?}");
    assert_eq!(&admin.recv().await.payload[..], b"ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_acl_with_broken_rules_denies_and_says_why() {
    let broken = "[config]\n[[config.rules]]\nallow = \"everything\"\ntopic = \"#\"\n";
    let (broker, _) = broker_with("python-acl", &python_acl(), broken).await;
    let mut c = v3::Client::connect(v3::options(&broker, "anyone")).await;
    assert_eq!(
        c.subscribe("a/b", v3::QoS::AtMostOnce).await,
        v3::SubscribeReasonCode::Failure
    );
    wait_for_log(&broker, "rules[0].allow: expected read, write or readwrite").await;
}

const ACL_A: &str = "[config]\n[[config.rules]]\nallow = \"readwrite\"\ntopic = \"a/#\"\n";
const ACL_B: &str = "[config]\n[[config.rules]]\nallow = \"readwrite\"\ntopic = \"b/#\"\n";

/// New rules apply to a connected client. Usually about 0.4 s (the 250 ms folder poll and
/// a cache-hit load); the bound is 2 s, as for the JavaScript example, because this test
/// runs beside the others of its stage loading their interpreters on the same two cores (it
/// once took 1.15 s there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_acl_rules_reload_live_within_two_seconds() {
    let (broker, plugins) = broker_with("python-acl", &python_acl(), ACL_A).await;
    let mut c = v3::Client::connect(v3::options(&broker, "reloaded")).await;
    c.subscribe_ok("a/x", v3::QoS::AtMostOnce).await;
    assert_eq!(
        c.subscribe("b/x", v3::QoS::AtMostOnce).await,
        v3::SubscribeReasonCode::Failure
    );

    // New rules while the client stays connected: its cached decisions go with the old
    // version.
    let changed = Instant::now();
    write_sidecar(&plugins, "python-acl", ACL_B);
    while c.subscribe("b/x", v3::QoS::AtMostOnce).await
        != v3::SubscribeReasonCode::Success(v3::QoS::AtMostOnce)
    {
        assert!(
            changed.elapsed() < Duration::from_secs(5),
            "new rules not applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = changed.elapsed();
    assert!(took < Duration::from_secs(2), "reload took {took:?}");
    assert_eq!(
        c.subscribe("a/x", v3::QoS::AtMostOnce).await,
        v3::SubscribeReasonCode::Failure
    );
    wait_for_log(&broker, "plugin replaced").await;
    c.disconnect().await;
}

const TRANSFORM: &str = r#"
topics = ["sensors/#"]
[config]
rename = { temp = "temperature", hum = "humidity" }
add = { site = "plant-7", schema = 2 }
publisher_key = "device"
"#;

fn text(payload: &[u8]) -> &str {
    std::str::from_utf8(payload).expect("UTF-8 payload")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_transform_rewrites_json_payloads() {
    let (broker, _) = broker_with("js-transform", &js_transform(), TRANSFORM).await;
    let mut sub = v5::Client::connect(v5::options(&broker, "js-sub")).await;
    sub.subscribe_ok("sensors/#", v5::QoS::AtLeastOnce).await;
    sub.subscribe_ok("other/#", v5::QoS::AtLeastOnce).await;

    // Renamed members in place, added ones after them (in name order); a forged `site`
    // is replaced where it was.
    let mut th = v3::Client::connect(v3::options(&broker, "th-1")).await;
    th.publish(
        "sensors/hall",
        v3::QoS::AtLeastOnce,
        false,
        br#"{"temp":21.5,"hum":40,"site":"forged"}"#,
    )
    .await;
    let p = sub.recv().await;
    assert_eq!(v5::topic(&p), "sensors/hall");
    assert_eq!(
        text(&p.payload),
        r#"{"temperature":21.5,"humidity":40,"site":"plant-7","schema":2,"device":"th-1"}"#
    );

    // What is not a JSON object passes unchanged, and so does a topic the sidecar's
    // `topics` does not select.
    for payload in [&b"not json"[..], b"[1,2]", b"\xff\xfe"] {
        th.publish("sensors/raw", v3::QoS::AtLeastOnce, false, payload)
            .await;
        assert_eq!(&sub.recv().await.payload[..], payload);
    }
    th.publish("other/x", v3::QoS::AtLeastOnce, false, br#"{"temp":1}"#)
        .await;
    assert_eq!(&sub.recv().await.payload[..], br#"{"temp":1}"#);

    // MQTT 5: the rewritten message keeps its properties.
    let mut v5p = v5::Client::connect(v5::options(&broker, "th-5")).await;
    let props = v5::PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    };
    v5p.publish_with(
        "sensors/roof",
        v5::QoS::AtLeastOnce,
        false,
        br#"{"temp":-3}"#,
        Some(props),
    )
    .await;
    let p = sub.recv().await;
    assert_eq!(
        text(&p.payload),
        r#"{"temperature":-3,"schema":2,"site":"plant-7","device":"th-5"}"#
    );
    let got = p.properties.expect("properties");
    assert_eq!(got.content_type.as_deref(), Some("application/json"));
    assert_eq!(got.payload_format_indicator, Some(1));
    assert_eq!(
        got.user_properties,
        vec![("k".to_string(), "v".to_string())]
    );
    sub.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_transform_config_reloads_live_within_two_seconds() {
    let (broker, plugins) = broker_with("js-transform", &js_transform(), TRANSFORM).await;
    let mut sub = v3::Client::connect(v3::options(&broker, "js-watch")).await;
    sub.subscribe_ok("sensors/#", v3::QoS::AtMostOnce).await;
    let mut publ = v3::Client::connect(v3::options(&broker, "js-pub")).await;
    publ.publish("sensors/a", v3::QoS::AtLeastOnce, false, br#"{"temp":1}"#)
        .await;
    assert_eq!(
        text(&sub.recv().await.payload),
        r#"{"temperature":1,"schema":2,"site":"plant-7","device":"js-pub"}"#
    );

    let changed = Instant::now();
    write_sidecar(
        &plugins,
        "js-transform",
        "topics = [\"sensors/#\"]\n[config]\nadd = { site = \"plant-8\" }\n",
    );
    loop {
        publ.publish("sensors/a", v3::QoS::AtLeastOnce, false, br#"{"temp":1}"#)
            .await;
        let got = sub.recv().await;
        if text(&got.payload) == r#"{"temp":1,"site":"plant-8"}"# {
            break;
        }
        assert_eq!(
            text(&got.payload),
            r#"{"temperature":1,"schema":2,"site":"plant-7","device":"js-pub"}"#
        );
        assert!(
            changed.elapsed() < Duration::from_secs(5),
            "new config not applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The folder is looked at every 250 ms; the new instance of a JavaScript component
    // (12 MB, its engine included) takes most of the rest to load from the cache and
    // start: 1.07 s once on a slower 2-core machine, hence 2 s here.
    let took = changed.elapsed();
    assert!(took < Duration::from_secs(2), "reload took {took:?}");
    wait_for_log(&broker, "plugin replaced").await;
}
