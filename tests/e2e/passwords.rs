//! The bundled `password-auth` plugin with password files: `sandpiper passwd` writes them,
//! the sidecar's `config_files` hands one to the plugin (and reloads it when it changes),
//! Mosquitto's `$7$` lines are accepted, a broken file is refused at `init` while the
//! previous users keep working, and an unknown user name costs what a wrong password does.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Broker, v3};
use crate::plugins::{bundled, wait_for_log};

/// `sandpiper passwd FILE USER [ARGS]` with `password` on standard input.
fn passwd(file: &Path, user: &str, password: &str, args: &[&str]) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sandpiper"))
        .arg("passwd")
        .arg(file)
        .arg(user)
        .args(args)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sandpiper passwd");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sandpiper passwd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Mosquitto's `$7$` line for `user`: PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt.
fn mosquitto_line(user: &str, password: &str) -> String {
    use base64::Engine as _;
    let salt = [9u8; 12];
    let mut hash = [0u8; 64];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA512,
        std::num::NonZeroU32::new(101).unwrap(),
        &salt,
        password.as_bytes(),
        &mut hash,
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    format!("{user}:$7$101${}${}\n", b64.encode(salt), b64.encode(hash))
}

fn login(broker: &Broker, user: &str, password: &str) -> v3::MqttOptions {
    let mut o = v3::options(broker, &format!("{user}-{password}"));
    o.set_credentials(user, password);
    o
}

async fn accepted(broker: &Broker, user: &str, password: &str) -> bool {
    match v3::Client::try_connect(login(broker, user, password)).await {
        Ok(c) => {
            c.disconnect().await;
            true
        }
        Err(_) => false,
    }
}

/// A password file written by `sandpiper passwd` (and extended with a Mosquitto line) is
/// the plugin's user table; changing it reloads the plugin within a second; a file that
/// does not read is refused and the previous users keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_files_from_sandpiper_passwd_and_mosquitto() {
    let dir = Broker::temp_dir();
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let file = plugins.join("password-auth.passwd");
    passwd(&file, "alice", "first", &["--iterations", "1000"]);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap()
        .write_all(mosquitto_line("mosq", "from-mosquitto").as_bytes())
        .unwrap();
    std::fs::write(
        plugins.join("password-auth.toml"),
        "[config_files]\npasswd = \"password-auth.passwd\"\n",
    )
    .unwrap();
    std::fs::copy(bundled("password-auth"), plugins.join("password-auth.wasm")).unwrap();
    let broker = Broker::start_config_in(
        dir,
        "[[listener]]\nname = \"default\"\nbind = \"127.0.0.1:0\"\nallow_anonymous = false\n",
    );
    wait_for_log(&broker, "plugin loaded").await;
    assert!(accepted(&broker, "alice", "first").await);
    assert!(
        accepted(&broker, "mosq", "from-mosquitto").await,
        "a $7$ line"
    );
    assert!(!accepted(&broker, "alice", "wrong").await);
    assert!(!accepted(&broker, "nobody", "first").await);

    // A new password: the plugin reloads with the file.
    passwd(&file, "alice", "second", &["--iterations", "1000"]);
    wait_for_log(&broker, "plugin replaced").await;
    assert!(accepted(&broker, "alice", "second").await);
    assert!(!accepted(&broker, "alice", "first").await);

    // A broken line: refused at init, the previous users keep working.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap()
        .write_all(b"carol:not-a-hash\n")
        .unwrap();
    wait_for_log(&broker, "the previous version keeps serving").await;
    assert!(
        broker
            .logs()
            .iter()
            .any(|l| l.contains("passwd line 3 (carol)")),
        "the refusal names the line"
    );
    assert!(accepted(&broker, "alice", "second").await);
}

/// A user name nobody knows costs as long as a known one with a wrong password: the time
/// of a refusal does not tell which user names exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_user_costs_what_a_wrong_password_does() {
    let dir = Broker::temp_dir();
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let file = plugins.join("password-auth.passwd");
    // Slow on purpose (about 100 ms a check) so that the difference would show.
    passwd(&file, "alice", "pw", &["--iterations", "200000"]);
    std::fs::write(
        plugins.join("password-auth.toml"),
        "time_ms = 5000\n[config_files]\npasswd = \"password-auth.passwd\"\n",
    )
    .unwrap();
    std::fs::copy(bundled("password-auth"), plugins.join("password-auth.wasm")).unwrap();
    let broker = Broker::start_config_in(
        dir,
        "[[listener]]\nname = \"default\"\nbind = \"127.0.0.1:0\"\nallow_anonymous = false\n",
    );
    wait_for_log(&broker, "plugin loaded").await;
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        for (user, times) in [("alice", &mut known), ("mallory", &mut unknown)] {
            let t = Instant::now();
            assert!(!accepted(&broker, user, "wrong").await);
            times.push(t.elapsed());
        }
    }
    let (known, unknown) = (median(known), median(unknown));
    eprintln!("refusal of a known user {known:?}, of an unknown one {unknown:?}");
    assert!(
        unknown * 10 >= known * 7,
        "an unknown user is refused faster ({unknown:?}) than a wrong password ({known:?})"
    );
}
