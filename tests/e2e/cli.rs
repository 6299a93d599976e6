//! The command line a new user meets first: `--version`, `--check-config` (everything the
//! broker loads at start, checked without binding a port), paths in a configuration file
//! taken relative to that file, and the start-up log naming the resolved paths and the
//! first compilation of a plugin.

use std::path::Path;
use std::process::{Command, Output};

use crate::harness::{Broker, v3};
use crate::plugins::{bundled, wait_for_log};
use crate::transports::generate_certs;

fn sandpiper(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sandpiper"))
        .args(args)
        .current_dir(cwd)
        .env("NO_COLOR", "1")
        .output()
        .expect("run sandpiper")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn version_names_the_plugin_contract() {
    let o = sandpiper(&["--version"], &std::env::temp_dir());
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.starts_with(&format!("sandpiper {}", env!("CARGO_PKG_VERSION")))
            && out.contains("plugin contract sandpiper:plugin@0.1.1"),
        "{out}"
    );
}

/// `--check-config` loads the certificates and the plugins as a start would, reports each
/// failure by name with exit code 1, and binds nothing: it passes while another process
/// holds the listener's port.
#[test]
fn check_config_loads_certificates_and_plugins_without_binding() {
    let dir = Broker::temp_dir();
    let certs = generate_certs(&dir);
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(bundled("acl"), plugins.join("acl.wasm")).unwrap();
    std::fs::write(
        plugins.join("acl.toml"),
        "[[config.rules]]\nallow = \"readwrite\"\ntopic = \"#\"\n",
    )
    .unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let config = |cert: &str| {
        format!(
            "[[listener]]\nbind = \"127.0.0.1:{port}\"\n\n[[listener]]\nname = \"secure\"\n\
             kind = \"tls\"\nbind = \"127.0.0.1:0\"\ncert = \"{cert}\"\nkey = \"{}\"\n",
            certs.join("server.key").display()
        )
    };
    let path = dir.join("sandpiper.toml");
    let check = || {
        sandpiper(
            &["--config", path.to_str().unwrap(), "--check-config"],
            &dir,
        )
    };

    std::fs::write(
        &path,
        config(&certs.join("server.pem").display().to_string()),
    )
    .unwrap();
    let o = check();
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("listener secure: TLS certificate, key and client CA ok"),
        "{out}"
    );
    assert!(
        out.contains("plugin acl: ok; hooks: lifecycle (init), authorize, share"),
        "{out}"
    );
    assert!(out.contains("configuration ok"), "{out}");

    // A certificate file that is not a certificate.
    std::fs::write(dir.join("bad.pem"), "not a certificate\n").unwrap();
    std::fs::write(&path, config("bad.pem")).unwrap();
    let o = check();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("listener secure: TLS configuration") && text(&o).contains("bad.pem"),
        "{}",
        text(&o)
    );

    // A client CA file that holds no certificate.
    std::fs::write(dir.join("bad-ca.pem"), "not a CA\n").unwrap();
    std::fs::write(
        &path,
        format!(
            "{}client_ca = \"bad-ca.pem\"\n",
            config(&certs.join("server.pem").display().to_string())
        ),
    )
    .unwrap();
    let o = check();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("listener secure") && text(&o).contains("bad-ca.pem"),
        "{}",
        text(&o)
    );

    // A sidecar that does not parse, and a component that is not one.
    std::fs::write(
        &path,
        config(&certs.join("server.pem").display().to_string()),
    )
    .unwrap();
    std::fs::write(plugins.join("acl.toml"), "priority = \"first\"\n").unwrap();
    std::fs::write(plugins.join("junk.wasm"), b"\0asm junk").unwrap();
    let o = check();
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("plugin acl:") && out.contains("acl.toml"),
        "{out}"
    );
    assert!(out.contains("plugin junk:"), "{out}");
    assert!(!out.contains("configuration ok"), "{out}");
    drop(held);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every relative path in a configuration file is relative to the file's folder, not to
/// the working directory; the start-up log names each resolved path, and the first load
/// of a plugin version says that it is compiling and how long it took (later starts load
/// it from the cache and say nothing of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relative_paths_follow_the_configuration_file() {
    let dir = Broker::temp_dir();
    let conf = dir.join("conf");
    std::fs::create_dir_all(conf.join("my-plugins")).unwrap();
    std::fs::copy(bundled("acl"), conf.join("my-plugins/acl.wasm")).unwrap();
    std::fs::write(
        conf.join("my-plugins/acl.toml"),
        "[[config.rules]]\nallow = \"readwrite\"\ntopic = \"open/#\"\n",
    )
    .unwrap();
    generate_certs(&conf); // conf/certs
    let config = "[[listener]]\nbind = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"secure\"\n\
                  kind = \"tls\"\nbind = \"127.0.0.1:0\"\ncert = \"certs/server.pem\"\n\
                  key = \"certs/server.key\"\n\n[store]\ndata_dir = \"state\"\n\n\
                  [plugins]\ndir = \"my-plugins\"\n";
    std::fs::write(conf.join("sandpiper.toml"), config).unwrap();
    // Started from another folder, with a relative path to the file.
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let start = || Broker::start_command(&elsewhere, &["--config", "../conf/sandpiper.toml"]);

    let broker = start();
    for (what, path) in [
        ("configuration", conf.join("sandpiper.toml")),
        ("data_dir", conf.join("state")),
        ("plugins.dir", conf.join("my-plugins")),
        ("listener secure cert", conf.join("certs/server.pem")),
        ("listener secure key", conf.join("certs/server.key")),
    ] {
        wait_for_log(&broker, &format!("{what} path={}", path.display())).await;
    }
    wait_for_log(
        &broker,
        "compiling plugin (first load of this version, cached afterwards)",
    )
    .await;
    wait_for_log(&broker, "plugin compiled").await;
    wait_for_log(&broker, "plugin loaded").await;
    // The plugin from the configuration's folder is in force.
    let mut c = v3::Client::connect(v3::options(&broker, "rel")).await;
    assert_eq!(
        c.subscribe("closed/t", v3::QoS::AtMostOnce).await,
        v3::SubscribeReasonCode::Failure
    );
    c.subscribe_ok("open/t", v3::QoS::AtMostOnce).await;
    drop(c);
    broker.stop();
    assert!(
        conf.join("state/sandpiper.redb").exists(),
        "store beside the file"
    );
    assert!(
        !elsewhere.join("state").exists(),
        "no store in the working directory"
    );

    let broker = start();
    wait_for_log(&broker, "plugin loaded").await;
    assert!(
        !broker.logs().iter().any(|l| l.contains("compiling plugin")),
        "a cached plugin is not compiled again"
    );
    broker.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
