//! The plugin host through the binary: the bundled `acl` plugin (authorize at SUBSCRIBE
//! and PUBLISH), live reload of the plugins folder with decision-cache invalidation, a
//! broken replacement leaving the old version serving, and hostile plugins (built from
//! `tests/plugins/hostile`): an infinite loop, unbounded allocation, a trap, an `init` that
//! never returns, against which the failure policy holds and other clients keep being
//! served.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::harness::{Broker, v3};

/// Builds the bundled plugins once per test run (`plugins/build`) and returns the path
/// of the component `name`.
pub(crate) fn bundled(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dist = BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
        let status = std::process::Command::new(root.join("build"))
            .status()
            .expect("run plugins/build");
        assert!(status.success(), "plugins/build failed");
        root.join("dist")
    });
    dist.join(format!("{name}.wasm"))
}

/// Builds `tests/plugins` once per test run and returns the path of `hostile.wasm`.
pub(crate) fn hostile() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            // Shares the bundled plugins' target folder (and its compiled wit-bindgen).
            let target = root.join("plugins/target");
            let status = std::process::Command::new("cargo")
                .args(["build", "--release", "--quiet", "--target", "wasm32-wasip2"])
                .arg("--manifest-path")
                .arg(root.join("tests/plugins/Cargo.toml"))
                .arg("--target-dir")
                .arg(&target)
                .status()
                .expect("run cargo for tests/plugins");
            assert!(status.success(), "building tests/plugins failed");
            target.join("wasm32-wasip2/release/hostile.wasm")
        })
        .clone()
}

/// A broker whose plugins folder holds `NAME.wasm` (a copy of `wasm`) and `NAME.toml`.
pub(crate) async fn broker_with(name: &str, wasm: &Path, sidecar: &str) -> Broker {
    let dir = Broker::temp_dir();
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::write(plugins.join(format!("{name}.toml")), sidecar).unwrap();
    std::fs::copy(wasm, plugins.join(format!("{name}.wasm"))).unwrap();
    Broker::start_in(dir, "")
}

/// Round trip of one QoS 1 message on a well-behaved topic, with its latency.
async fn round_trip(broker: &Broker, id: &str) -> Duration {
    let mut c = v3::Client::connect(v3::options(broker, id)).await;
    c.subscribe_ok(&format!("good/{id}"), v3::QoS::AtLeastOnce)
        .await;
    let t = Instant::now();
    c.publish(&format!("good/{id}"), v3::QoS::AtLeastOnce, false, b"ok")
        .await;
    assert_eq!(&c.recv().await.payload[..], b"ok");
    let took = t.elapsed();
    c.disconnect().await;
    took
}

/// A hostile authorize hook on `bad/...` is stopped, fails closed (SUBACK 0x80), is
/// logged with `why`, and the plugin keeps serving others on a fresh instance.
async fn hostile_authorize(mode: &str, limits: &str, why: &str) {
    let sidecar = format!("time_ms = 50\n{limits}\n[config]\nmode = \"{mode}\"\n");
    let broker = broker_with("hostile", &hostile(), &sidecar).await;
    wait_for_log(&broker, "plugin loaded").await;
    let mut c = v3::Client::connect(v3::options(&broker, &format!("victim-{mode}"))).await;
    let t = Instant::now();
    assert_eq!(
        c.subscribe("bad/x", v3::QoS::AtLeastOnce).await,
        v3::SubscribeReasonCode::Failure,
        "fail closed"
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    wait_for_log(&broker, why).await;
    // Other clients (and this one, on a fresh instance) are served at normal latency.
    c.subscribe_ok("good/after", v3::QoS::AtMostOnce).await;
    for i in 0..3 {
        let took = round_trip(&broker, &format!("other-{mode}-{i}")).await;
        assert!(
            took < Duration::from_millis(500),
            "round trip took {took:?}"
        );
    }
    c.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_infinite_loop_hits_the_time_budget() {
    hostile_authorize("loop", "", "time budget of 50 ms exceeded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_unbounded_allocation_hits_the_memory_cap() {
    hostile_authorize("alloc", "memory_mb = 16", "plugin call failed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_trap_replaces_the_instance() {
    hostile_authorize("trap", "", "trap").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_policy_ignore_lets_the_request_through() {
    let sidecar = "time_ms = 50\n[on_failure]\nauthorize = \"ignore\"\n[config]\nmode = \"trap\"\n";
    let broker = broker_with("hostile", &hostile(), sidecar).await;
    wait_for_log(&broker, "plugin loaded").await;
    let mut c = v3::Client::connect(v3::options(&broker, "lenient")).await;
    c.subscribe_ok("bad/x", v3::QoS::AtLeastOnce).await;
    c.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_or_failing_init_is_refused_and_the_broker_serves() {
    for mode in ["slow-init", "fail-init"] {
        let sidecar = format!("init_ms = 200\n[config]\nmode = \"{mode}\"\n");
        let broker = broker_with("hostile", &hostile(), &sidecar).await;
        wait_for_log(&broker, "plugin refused").await;
        // Not loaded: nothing is denied.
        let mut c = v3::Client::connect(v3::options(&broker, "after-init")).await;
        c.subscribe_ok("bad/x", v3::QoS::AtMostOnce).await;
        c.disconnect().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticate_plugin_denies_and_fails_closed() {
    let sidecar = "time_ms = 50\n[config]\nmode = \"loop\"\n";
    let broker = broker_with("hostile", &hostile(), sidecar).await;
    wait_for_log(&broker, "plugin loaded").await;
    // A looping authenticate is stopped and refuses (3.1.1 return code 5).
    let r = v3::Client::try_connect(v3::options(&broker, "bad-client")).await;
    assert!(r.is_err(), "a failed authenticate must refuse the client");
    // A well-behaved answer lets the next client in.
    let c = v3::Client::connect(v3::options(&broker, "good-client")).await;
    c.disconnect().await;

    let sidecar = "[config]\nmode = \"deny\"\n";
    let broker = broker_with("hostile", &hostile(), sidecar).await;
    wait_for_log(&broker, "plugin loaded").await;
    let r = v3::Client::try_connect(v3::options(&broker, "anyone")).await;
    assert!(r.is_err(), "denied by the plugin");
}

const ACL_RULES: &str = r#"
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
"#;

/// Copies `acl.wasm` and the sidecar into `plugins` the way an operator should: write
/// beside, then rename, so the watcher never sees a half-written file.
pub(crate) fn install_acl(plugins: &Path, rules: &str) {
    std::fs::create_dir_all(plugins).unwrap();
    std::fs::write(plugins.join("acl.toml.tmp"), rules).unwrap();
    std::fs::rename(plugins.join("acl.toml.tmp"), plugins.join("acl.toml")).unwrap();
    std::fs::copy(bundled("acl"), plugins.join("acl.wasm.tmp")).unwrap();
    std::fs::rename(plugins.join("acl.wasm.tmp"), plugins.join("acl.wasm")).unwrap();
}

pub(crate) async fn wait_for_log(broker: &Broker, needle: &str) {
    wait_for_logs(broker, needle, 1).await;
}

/// How many log lines contain `needle`.
pub(crate) fn count_logs(broker: &Broker, needle: &str) -> usize {
    broker.logs().iter().filter(|l| l.contains(needle)).count()
}

/// Waits (10 s at most) until at least `n` log lines contain `needle`.
pub(crate) async fn wait_for_logs(broker: &Broker, needle: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while count_logs(broker, needle) < n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} log lines with {needle:?}; log:\n{}",
            broker.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_plugin_authorizes_subscribe_and_publish() {
    let dir = Broker::temp_dir();
    install_acl(&dir.join("plugins"), ACL_RULES);
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;

    let mut dev = v3::Client::connect(v3::options(&broker, "dev1")).await;
    dev.subscribe_ok("devices/dev1/#", v3::QoS::AtLeastOnce)
        .await;
    dev.subscribe_ok("public/#", v3::QoS::AtLeastOnce).await;
    // Another client's topics, and a filter overlapping a deny rule: refused (3.1.1 0x80).
    assert_eq!(
        dev.subscribe("devices/dev2/#", v3::QoS::AtLeastOnce).await,
        v3::SubscribeReasonCode::Failure
    );
    assert_eq!(
        dev.subscribe("#", v3::QoS::AtLeastOnce).await,
        v3::SubscribeReasonCode::Failure
    );
    // Allowed publish comes back; a denied one (read-only topic, deny rule) is
    // acknowledged and dropped silently, as MQTT 3.1.1 has no way to refuse it.
    dev.publish("public/news", v3::QoS::AtLeastOnce, false, b"no")
        .await;
    dev.publish("devices/dev1/secret", v3::QoS::AtLeastOnce, false, b"no")
        .await;
    dev.publish("devices/dev1/temp", v3::QoS::AtLeastOnce, false, b"yes")
        .await;
    let p = dev.recv().await;
    assert_eq!(p.topic, "devices/dev1/temp");
    dev.expect_silence().await;
}

/// Answers every connection with `HTTP/1.1 204` once it has read a request head: the
/// peer of the hostile plugin's `socket` and `http` modes. Returns its address and the
/// count of connections it accepted.
fn tiny_http_server() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // "localhost" may resolve to ::1 first: the same port there too, where IPv6 is.
    let servers =
        std::iter::once(server).chain(std::net::TcpListener::bind(("::1", addr.port())).ok());
    for server in servers {
        let count = accepted.clone();
        std::thread::spawn(move || serve_204(server, count));
    }
    (addr, accepted)
}

fn serve_204(server: std::net::TcpListener, count: std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    {
        for mut s in server.incoming().flatten() {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n");
            });
        }
    }
}

/// From every hook (authenticate, authorize, transform, deliver) a plugin may make the
/// WASI calls that block in the host: a stderr write, a 1 ms sleep, a panic (its message
/// goes to stderr first), a TCP connect, an HTTP request, a socket read that waits for an
/// answer that never comes. None may take the connection down: the hook's answer applies
/// (for a panic, or a wait that outlasts the call's time budget, the hook's failure
/// policy: authenticate and authorize fail closed, transform and deliver pass the message
/// on), the client's connection keeps working, and other clients are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_wasi_calls_from_any_hook_cannot_kill_a_connection() {
    let (peer, _) = tiny_http_server();
    for mode in ["print", "sleep", "socket", "http", "panic", "stall"] {
        let sidecar = format!(
            "time_ms = 300\nnetwork = [\"{peer}\"]\n[config]\nmode = \"{mode}\"\naddress = \"{peer}\"\n"
        );
        let broker = broker_with("hostile", &hostile(), &sidecar).await;
        wait_for_log(&broker, "plugin loaded").await;
        let fails = mode == "panic" || mode == "stall";
        // authenticate
        let r = v3::Client::try_connect(v3::options(&broker, "bad-auth")).await;
        assert_eq!(r.is_ok(), !fails, "{mode}: authenticate");
        drop(r);
        // authorize, transform and deliver, on one connection that must survive them.
        let mut c = v3::Client::connect(v3::options(&broker, "hooks")).await;
        let code = c.subscribe("bad/x", v3::QoS::AtLeastOnce).await;
        let granted = code == v3::SubscribeReasonCode::Success(v3::QoS::AtLeastOnce);
        assert_eq!(granted, !fails, "{mode}: authorize answered {code:?}");
        c.subscribe_ok("badt/#", v3::QoS::AtLeastOnce).await;
        c.subscribe_ok("badd/#", v3::QoS::AtLeastOnce).await;
        for topic in ["badt/1", "badd/1"] {
            c.publish(topic, v3::QoS::AtLeastOnce, false, topic.as_bytes())
                .await;
            let p = c.recv().await;
            assert_eq!(p.topic, topic, "{mode}: {topic} passed on");
        }
        c.subscribe_ok("good/x", v3::QoS::AtLeastOnce).await;
        c.publish("good/x", v3::QoS::AtLeastOnce, false, b"alive")
            .await;
        assert_eq!(
            &c.recv().await.payload[..],
            b"alive",
            "{mode}: connection alive"
        );
        round_trip(&broker, &format!("other-{mode}")).await;
        let logs = broker.logs();
        assert!(
            !logs.iter().any(|l| l.contains("Cannot start a runtime")),
            "{mode}: a plugin's WASI call panicked in the host:\n{}",
            logs.join("\n")
        );
        if fails {
            assert!(logs.iter().any(|l| l.contains("plugin call failed")));
        }
        if mode == "stall" {
            assert!(
                logs.iter()
                    .any(|l| l.contains("longer than its time budget")),
                "a stalled read ends with the time budget:\n{}",
                logs.join("\n")
            );
        }
    }
}

/// A plugin's network allow-list names a host: it may look that name up and connect to
/// what it resolves to (checked at connect time), and nothing else: a lookup of another
/// name is refused and logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_resolves_only_the_names_it_lists() {
    let (peer, accepted) = tiny_http_server();
    let listed = format!("localhost:{}", peer.port());
    for (mode, extra) in [
        ("socket", format!("address = \"{listed}\"")),
        ("lookup", "lookup = \"elsewhere.invalid\"".to_owned()),
    ] {
        let sidecar = format!(
            "time_ms = 1000\nnetwork = [\"{listed}\"]\n[config]\nmode = \"{mode}\"\n{extra}\n"
        );
        let broker = broker_with("hostile", &hostile(), &sidecar).await;
        wait_for_log(&broker, "plugin loaded").await;
        let mut c = v3::Client::connect(v3::options(&broker, "net")).await;
        c.subscribe_ok("bad/x", v3::QoS::AtMostOnce).await;
        if mode == "lookup" {
            wait_for_log(&broker, "plugin name lookup refused").await;
        } else {
            // The plugin's connect completes in the kernel before the server thread's
            // accept returns: wait for the accept rather than racing it.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while accepted.load(std::sync::atomic::Ordering::SeqCst) == 0
                && std::time::Instant::now() < deadline
            {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            assert!(
                accepted.load(std::sync::atomic::Ordering::SeqCst) > 0,
                "the listed name resolved and connected:\n{}",
                broker.logs().join("\n")
            );
        }
    }
}

/// `%c` / `%u` take only values that cannot change a rule's filter (the class of
/// Mosquitto's CVE-2017-7650). With the shipped example sidecar (`allow readwrite
/// devices/%c/#`), clients named `+`, `#` or `a/b` get nothing of another device's topics,
/// while a device keeps its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_placeholders_cannot_widen_a_rule() {
    let dir = Broker::temp_dir();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/acl/acl.example.toml");
    install_acl(
        &dir.join("plugins"),
        &std::fs::read_to_string(example).unwrap(),
    );
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;
    let mut victim = v3::Client::connect(v3::options(&broker, "victim")).await;
    // (Not devices/victim/#: it overlaps the example's deny rule devices/%c/secret.)
    victim
        .subscribe_ok("devices/victim/cmd", v3::QoS::AtLeastOnce)
        .await;
    for id in ["+", "#", "a/b"] {
        let mut c = v3::Client::connect(v3::options(&broker, id)).await;
        for filter in ["devices/victim/cmd", "devices/+/cmd", "devices/#"] {
            assert_eq!(
                c.subscribe(filter, v3::QoS::AtLeastOnce).await,
                v3::SubscribeReasonCode::Failure,
                "client {id:?} subscribing {filter}"
            );
        }
        c.publish("devices/victim/cmd", v3::QoS::AtLeastOnce, false, b"no")
            .await;
    }
    victim.expect_silence().await;
    victim
        .publish("devices/victim/cmd", v3::QoS::AtLeastOnce, false, b"own")
        .await;
    assert_eq!(&victim.recv().await.payload[..], b"own");
}

/// A rule file that does not parse, or a rule without exactly one of allow/deny, refuses
/// the acl version at `init`: at start it is not loaded, on a reload the previous rules
/// keep serving; `plugin check` with the sidecar reports why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_refuses_a_broken_rule_file_at_init() {
    let dir = Broker::temp_dir();
    let plugins = dir.join("plugins");
    install_acl(&plugins, ACL_RULES);
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;
    for broken in [
        "[[config.rules]]\nallow = \"readwrite\"\n",
        "[[config.rules]]\ntopic = \"a/#\"\n",
        "[[config.rules]]\nallow = \"read\"\ndeny = \"write\"\ntopic = \"a\"\n",
        "[[config.rules]]\nallow = \"read\"\ntopic = \"a/#/b\"\n",
    ] {
        std::fs::write(plugins.join("acl.toml.tmp"), broken).unwrap();
        std::fs::rename(plugins.join("acl.toml.tmp"), plugins.join("acl.toml")).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sandpiper"))
            .args(["plugin", "check"])
            .arg(plugins.join("acl.wasm"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "plugin check passed {broken:?}");
    }
    wait_for_log(&broker, "the previous version keeps serving").await;
    // The good rules still apply.
    let mut dev = v3::Client::connect(v3::options(&broker, "dev1")).await;
    dev.subscribe_ok("devices/dev1/#", v3::QoS::AtLeastOnce)
        .await;
    assert_eq!(
        dev.subscribe("devices/dev2/#", v3::QoS::AtLeastOnce).await,
        v3::SubscribeReasonCode::Failure
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_reload_applies_within_a_second_and_a_broken_version_is_refused() {
    let dir = Broker::temp_dir();
    let plugins = dir.join("plugins");
    let broker = Broker::start_in(dir, "");
    // The README's "within a second" is once the component is compiled: load it once (the
    // broker keeps the compiled code in its cache) and remove it, so that the time measured
    // below is the reload's, not the compiler's on a machine busy with the other tests.
    install_acl(&plugins, ACL_RULES);
    wait_for_log(&broker, "plugin loaded").await;
    std::fs::remove_file(plugins.join("acl.wasm")).unwrap();
    wait_for_log(&broker, "plugin removed").await;
    let mut c = v3::Client::connect(v3::options(&broker, "dev7")).await;
    c.subscribe_ok("devices/dev7/#", v3::QoS::AtLeastOnce).await;
    // No plugin: anything goes, and the decision for other/x is now cached... by nobody.
    c.publish("devices/dev7/a", v3::QoS::AtLeastOnce, false, b"1")
        .await;
    assert_eq!(&c.recv().await.payload[..], b"1");
    c.subscribe_ok("other/x", v3::QoS::AtMostOnce).await;

    // Add the ACL while the client stays connected: within a second it applies.
    let added = Instant::now();
    install_acl(&plugins, ACL_RULES);
    loop {
        let code = c.subscribe("other/y", v3::QoS::AtMostOnce).await;
        if code == v3::SubscribeReasonCode::Failure {
            break;
        }
        assert!(added.elapsed() < Duration::from_secs(3), "ACL not applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        added.elapsed() < Duration::from_millis(1500),
        "reload took {:?}",
        added.elapsed()
    );

    // A broken replacement is refused and the loaded version keeps serving.
    std::fs::write(plugins.join("acl.wasm.tmp"), b"not a component").unwrap();
    std::fs::rename(plugins.join("acl.wasm.tmp"), plugins.join("acl.wasm")).unwrap();
    wait_for_log(&broker, "the previous version keeps serving").await;
    assert_eq!(
        c.subscribe("other/z", v3::QoS::AtMostOnce).await,
        v3::SubscribeReasonCode::Failure
    );
    c.subscribe_ok("devices/dev7/b", v3::QoS::AtMostOnce).await;

    // Removing it lifts the rules (and drops the cached denials).
    std::fs::remove_file(plugins.join("acl.wasm")).unwrap();
    wait_for_logs(&broker, "plugin removed", 2).await;
    c.subscribe_ok("other/z", v3::QoS::AtMostOnce).await;
    c.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_auth_plugin_authenticates_where_anonymous_is_refused() {
    let dir = Broker::temp_dir();
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    // Password "s3cret" (10000 iterations: fast enough for a test).
    std::fs::write(
        plugins.join("password-auth.toml"),
        "[config.users]\nalice = \"pbkdf2-sha256$10000$c2FuZHBpcGVyLXRlc3Qtcw==$K6GWkoqN0dMmyiWMBl3ERfaH2ptcRpood7eHV/X1+AI=\"\n",
    )
    .unwrap();
    std::fs::copy(bundled("password-auth"), plugins.join("password-auth.wasm")).unwrap();
    let broker = Broker::start_config_in(
        dir,
        "[[listener]]\nname = \"default\"\nbind = \"127.0.0.1:0\"\nallow_anonymous = false\n",
    );
    wait_for_log(&broker, "plugin loaded").await;

    let with = |user: Option<(&str, &str)>, id: &str| {
        let mut o = v3::options(&broker, id);
        if let Some((u, p)) = user {
            o.set_credentials(u, p);
        }
        o
    };
    let c = v3::Client::connect(with(Some(("alice", "s3cret")), "pw-ok")).await;
    assert_eq!(c.connack.code, v3::ConnectReturnCode::Success);
    c.disconnect().await;
    for (user, id) in [
        (Some(("alice", "wrong")), "pw-bad"),
        (Some(("mallory", "s3cret")), "pw-unknown"),
        (None, "pw-anonymous"),
    ] {
        let r = v3::Client::try_connect(with(user, id)).await;
        assert!(r.is_err(), "{id} must be refused");
    }
}

/// `[plugins] required`: a broker that cannot load a required plugin at start (its file
/// missing, or a file that is not a component) exits with an error naming it before any
/// listener opens; once it is loaded, removing its file keeps it serving (logged) rather
/// than opening the broker to everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_required_plugin_is_never_missing() {
    let dir = Broker::temp_dir();
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let config = "[[listener]]\nname = \"default\"\nbind = \"127.0.0.1:0\"\n\
                  [plugins]\nrequired = [\"acl\"]\n";
    std::fs::write(dir.join("sandpiper.toml"), config).unwrap();
    let refused_start = |why: &str| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sandpiper"))
            .arg("--config")
            .arg(dir.join("sandpiper.toml"))
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{why}: the broker kept running without its required plugin");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{why}: {text}");
        assert!(
            text.contains("required plugin not loaded: acl") && !text.contains("listening"),
            "{why}: {text}"
        );
    };
    refused_start("no acl.wasm");
    std::fs::write(plugins.join("acl.wasm"), b"not a component").unwrap();
    refused_start("a broken acl.wasm");

    install_acl(&plugins, ACL_RULES);
    let broker = Broker::start_config_in(dir.clone(), config);
    wait_for_log(&broker, "plugin loaded").await;
    std::fs::remove_file(plugins.join("acl.wasm")).unwrap();
    wait_for_log(&broker, "required plugin's file removed").await;
    // Still the acl's rules: another device's topics stay closed.
    let mut c = v3::Client::connect(v3::options(&broker, "d1")).await;
    assert_eq!(
        c.subscribe("devices/d2/cmd", v3::QoS::AtLeastOnce).await,
        v3::SubscribeReasonCode::Failure
    );
    c.subscribe_ok("devices/d1/cmd", v3::QoS::AtLeastOnce).await;
    assert!(
        !broker.logs().iter().any(|l| l.contains("plugin removed")),
        "{}",
        broker.logs().join("\n")
    );

    // The file comes back: logged, and the plugin serves as before.
    install_acl(&plugins, ACL_RULES);
    wait_for_log(&broker, "required plugin's file is back").await;
    // A broken replacement is refused; the running version keeps serving.
    std::fs::write(plugins.join("acl.wasm.tmp"), b"\0asm broken").unwrap();
    std::fs::rename(plugins.join("acl.wasm.tmp"), plugins.join("acl.wasm")).unwrap();
    wait_for_log(&broker, "the previous version keeps serving").await;
    let mut c = v3::Client::connect(v3::options(&broker, "d3")).await;
    assert_eq!(
        c.subscribe("devices/d2/cmd", v3::QoS::AtLeastOnce).await,
        v3::SubscribeReasonCode::Failure
    );
    c.subscribe_ok("devices/d3/cmd", v3::QoS::AtLeastOnce).await;
}

/// A plugin built against contract 0.1.0 (`tests/plugins/old-contract`, from that
/// release's WIT) loads in today's broker, and its hook is called as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_built_for_contract_0_1_0_still_serves() {
    let wasm = hostile().with_file_name("old_contract.wasm");
    let broker = broker_with("old-contract", &wasm, "").await;
    wait_for_log(&broker, "plugin loaded").await;
    let mut c = v3::Client::connect(v3::options(&broker, "old")).await;
    assert_eq!(
        c.subscribe("old-contract/denied/x", v3::QoS::AtLeastOnce)
            .await,
        v3::SubscribeReasonCode::Failure,
        "the 0.1.0 authorize hook denies"
    );
    c.subscribe_ok("old-contract/fine", v3::QoS::AtLeastOnce)
        .await;
    c.disconnect().await;

    // The admin API names the contract it was built against.
    let dir = Broker::temp_dir();
    std::fs::create_dir_all(dir.join("plugins")).unwrap();
    std::fs::copy(&wasm, dir.join("plugins/old-contract.wasm")).unwrap();
    let (broker, admin, _) = crate::admin::start_with_tokens_in(dir, "", "");
    wait_for_log(&broker, "plugin loaded").await;
    let (status, v) = crate::admin::api(
        broker.http_addr(),
        Some(&admin),
        "GET",
        "/api/v1/plugins",
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["plugins"][0]["name"], "old-contract", "{v}");
    assert_eq!(v["plugins"][0]["contract"], "0.1.0", "{v}");
}
