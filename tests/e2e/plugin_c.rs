//! The C example plugin `examples/plugins/c-auth` through the binary: built from source by
//! its build script (Debian's clang for wasm32-wasi, `wit-bindgen c`, `wasm-tools component
//! new`) once per test run, then loaded by the broker. A good password connects, a wrong,
//! missing or unknown one gets CONNACK 0x86 (MQTT 3.1.1: return code 4), a client without
//! a user name (or with an MQTT 5 Authentication Method) is left to the listener's rule,
//! and a changed user table in the sidecar applies within a second while the broker runs.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::harness::{Broker, v3, v5};
use crate::plugins::{broker_with, wait_for_log};

/// Builds the example once per test run (`examples/plugins/c-auth/build`; a no-op when
/// nothing changed) and returns the path of `c-auth.wasm`.
fn c_auth() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/plugins/c-auth");
            let status = std::process::Command::new(dir.join("build"))
                .status()
                .expect("run examples/plugins/c-auth/build");
            assert!(status.success(), "examples/plugins/c-auth/build failed");
            dir.join("c-auth.wasm")
        })
        .clone()
}

/// A line of the plugin's user table: `NAME:sha256$SALT$HEX(SHA-256(SALT || password))`.
fn user_line(name: &str, salt: &str, password: &str) -> String {
    let mut input = salt.as_bytes().to_vec();
    input.extend_from_slice(password.as_bytes());
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("{name}:sha256${salt}${hex}")
}

/// The sidecar `c-auth.toml` with these table lines.
fn sidecar(lines: &[String]) -> String {
    format!("[config]\nusers = \"\"\"\n{}\n\"\"\"\n", lines.join("\n"))
}

/// A user name and password, or none.
type Login<'a> = Option<(&'a str, &'a str)>;

/// How a connect attempt ended: accepted, or refused with this CONNACK code.
#[derive(Debug, PartialEq, Eq)]
enum Connack {
    Accepted,
    /// MQTT 5 reason code / MQTT 3.1.1 return code, as rumqttc names them.
    Refused(String),
}

async fn connect_v5(broker: &Broker, id: &str, user: Login<'_>) -> Connack {
    let mut o = v5::options(broker, id);
    if let Some((u, p)) = user {
        o.set_credentials(u, p);
    }
    match v5::Client::try_connect(o).await {
        Ok(c) => {
            assert_eq!(c.connack.code, v5::ConnectReturnCode::Success);
            c.disconnect().await;
            Connack::Accepted
        }
        Err(v5::ConnectionError::ConnectionRefused(code)) => Connack::Refused(format!("{code:?}")),
        Err(e) => panic!("{id}: expected a CONNACK, got {e:?}"),
    }
}

async fn connect_v3(broker: &Broker, id: &str, user: Login<'_>) -> Connack {
    let mut o = v3::options(broker, id);
    if let Some((u, p)) = user {
        o.set_credentials(u, p);
    }
    match v3::Client::try_connect(o).await {
        Ok(c) => {
            assert_eq!(c.connack.code, v3::ConnectReturnCode::Success);
            c.disconnect().await;
            Connack::Accepted
        }
        Err(v3::ConnectionError::ConnectionRefused(code)) => Connack::Refused(format!("{code:?}")),
        Err(e) => panic!("{id}: expected a CONNACK, got {e:?}"),
    }
}

/// 0x86 in MQTT 5, return code 4 in MQTT 3.1.1.
fn bad_credentials() -> Connack {
    Connack::Refused("BadUserNamePassword".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_plugin_checks_passwords_for_v5_and_v311_clients() {
    let table = sidecar(&[
        "# the test's users".into(),
        user_line("alice", "4c1f0e5a", "s3cret"),
        user_line("dev:7", "9b2d", "p@ss word"),
        // Malformed: bob is listed but refused whatever his password, and the log says why.
        "bob:sha256$9b2d$not-hex".into(),
    ]);
    let broker = broker_with("c-auth", &c_auth(), &table).await;
    wait_for_log(&broker, "plugin loaded").await;

    let cases: [(&str, Login<'_>, Connack); 8] = [
        ("good", Some(("alice", "s3cret")), Connack::Accepted),
        // A user name with ':' (the table splits at the last one) and a space in the password.
        ("colon", Some(("dev:7", "p@ss word")), Connack::Accepted),
        ("bad", Some(("alice", "s3cret!")), bad_credentials()),
        ("case", Some(("alice", "S3CRET")), bad_credentials()),
        // rumqttc sends no password field for an empty one.
        ("nopw", Some(("alice", "")), bad_credentials()),
        ("unknown", Some(("mallory", "s3cret")), bad_credentials()),
        ("malformed", Some(("bob", "not-hex")), bad_credentials()),
        // No user name: the plugin ignores it and the loopback listener lets it in.
        ("anonymous", None, Connack::Accepted),
    ];
    // MQTT 5 enhanced authentication is not this plugin's: it ignores the CONNECT, and as
    // no plugin takes the method, the broker refuses it with 0x8C.
    let mut o = v5::options(&broker, "c5-method");
    o.set_credentials("alice", "s3cret");
    o.set_authentication_method(Some("SCRAM-SHA-256".into()));
    match v5::Client::try_connect(o).await {
        Err(v5::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, v5::ConnectReturnCode::BadAuthenticationMethod);
        }
        Ok(_) => panic!("a CONNECT with an Authentication Method must not be let in"),
        Err(e) => panic!("expected CONNACK 0x8C, got {e:?}"),
    }

    for (id, user, want) in &cases {
        let got = connect_v5(&broker, &format!("c5-{id}"), *user).await;
        assert_eq!(&got, want, "MQTT 5 client {id}");
        let got = connect_v3(&broker, &format!("c3-{id}"), *user).await;
        assert_eq!(&got, want, "MQTT 3.1.1 client {id}");
    }
    wait_for_log(&broker, "malformed sha256$SALT$HASH; this user is refused").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_plugin_applies_a_changed_user_table_within_a_second() {
    let dir = Broker::temp_dir();
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(c_auth(), plugins.join("c-auth.wasm")).unwrap();
    let table = sidecar(&[user_line("alice", "a1", "old-pass")]);
    std::fs::write(plugins.join("c-auth.toml"), table).unwrap();
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;
    let old = Some(("alice", "old-pass"));
    let new = Some(("alice", "new-pass"));
    assert_eq!(connect_v5(&broker, "r-old", old).await, Connack::Accepted);
    assert_eq!(connect_v5(&broker, "r-new", new).await, bad_credentials());
    assert_eq!(
        connect_v3(&broker, "r-bob", Some(("bob", "b0b"))).await,
        bad_credentials()
    );

    // The operator's edit: a new password for alice and a new user, written beside the
    // sidecar and renamed into place.
    let table = sidecar(&[
        user_line("alice", "a2", "new-pass"),
        user_line("bob", "b2", "b0b"),
    ]);
    std::fs::write(plugins.join("c-auth.toml.tmp"), table).unwrap();
    let changed = Instant::now();
    std::fs::rename(plugins.join("c-auth.toml.tmp"), plugins.join("c-auth.toml")).unwrap();
    let mut attempt = 0;
    while connect_v5(&broker, &format!("r-try-{attempt}"), new).await != Connack::Accepted {
        assert!(
            changed.elapsed() < Duration::from_secs(5),
            "new table not applied; log:\n{}",
            broker.logs().join("\n")
        );
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = changed.elapsed();
    assert!(took < Duration::from_secs(1), "reload took {took:?}");

    // The old password is gone; the new user works with both protocol versions.
    assert_eq!(connect_v5(&broker, "r-old2", old).await, bad_credentials());
    assert_eq!(connect_v3(&broker, "r-old3", old).await, bad_credentials());
    assert_eq!(
        connect_v3(&broker, "r-bob2", Some(("bob", "b0b"))).await,
        Connack::Accepted
    );
}
