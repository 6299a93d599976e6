//! The admin API (`/api/v1`, docs/admin-api.md) and `sandpiper token new`, through the
//! binary, with real MQTT clients.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::net::TcpStream;

use crate::harness::{Broker, WAIT, raw, v3, v5};

/// `sandpiper token new NAME --role ROLE`: (the token, the TOML lines).
pub(crate) fn token_new(name: &str, role: &str) -> (String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sandpiper"))
        .args(["token", "new", name, "--role", role])
        .output()
        .expect("run sandpiper token new");
    assert!(out.status.success(), "token new: {out:?}");
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let (token, rest) = text.split_once('\n').expect("the token on its own line");
    (token.to_owned(), rest.to_owned())
}

/// A broker whose admin API has an `admin` and a `read` token: (broker, admin token, read
/// token). `extra` goes at the end of the configuration.
pub(crate) fn start_with_tokens(http: &str, extra: &str) -> (Broker, String, String) {
    start_with_tokens_in(Broker::temp_dir(), http, extra)
}

/// [`start_with_tokens`] in the folder `dir` (which may hold a `plugins` folder).
pub(crate) fn start_with_tokens_in(
    dir: std::path::PathBuf,
    http: &str,
    extra: &str,
) -> (Broker, String, String) {
    let (admin, admin_toml) = token_new("ops", "admin");
    let (read, read_toml) = token_new("viewer", "read");
    let text = format!(
        "[[listener]]\nname = \"default\"\nbind = \"127.0.0.1:0\"\n\n[log]\nlevel = \"info\"\n\n\
         [http]\nbind = \"127.0.0.1:0\"\n{http}\n{admin_toml}\n{read_toml}\n{extra}\n"
    );
    let broker = Broker::start_config_in(dir, &text);
    (broker, admin, read)
}

/// One HTTP/1.1 request with an optional bearer token and JSON body: (status, body as
/// JSON, or `Value::Null` when it is not JSON).
pub(crate) async fn api(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> (u16, Value) {
    let (status, _, text) = request(addr, token, method, path, body).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// One HTTP/1.1 request: (status, head, body).
async fn request(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> (u16, String, String) {
    let s = TcpStream::connect(addr)
        .await
        .expect("connect to the HTTP listener");
    let host = addr.to_string();
    crate::observability::exchange(s, &host, token, method, path, body.unwrap_or_default()).await
}

/// Waits until `pred` holds for the answer to `GET path`, or fails naming `what`.
async fn eventually(
    addr: SocketAddr,
    token: &str,
    path: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, v) = api(addr, Some(token), "GET", path, None).await;
        if status == 200 && pred(&v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: last answer {status} {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The broker still runs and logged no panic.
fn unharmed(broker: &mut Broker) {
    broker.assert_running();
    let logs = broker.logs();
    assert!(
        !logs.iter().any(|l| l.contains("panicked")),
        "{}",
        logs.join("\n")
    );
}

fn ids(list: &Value, key: &str) -> Vec<String> {
    (list.as_array().into_iter().flatten())
        .filter_map(|c| c[key].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_guard_the_api_and_changes_are_logged() {
    let (broker, admin, read) = start_with_tokens("", "");
    let http = broker.http_addr();
    // The token is shown once, with the lines that configure it.
    let (token, toml) = token_new("x", "read");
    assert!(token.starts_with("sp_") && token.len() > 40, "{token}");
    assert!(
        toml.contains("[[http.token]]") && toml.contains("role = \"read\""),
        "{toml}"
    );
    assert!(
        !toml.contains(&token),
        "only the hash is kept in the configuration"
    );

    for bad in [None, Some("sp_wrong"), Some(token.as_str())] {
        let (status, head, body) = request(http, bad, "GET", "/api/v1/overview", None).await;
        assert_eq!(status, 401, "{bad:?}: {body}");
        assert!(
            head.to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{head}"
        );
        assert!(body.contains("\"error\""), "{body}");
    }
    let (status, v) = api(http, Some(&admin), "GET", "/api/v1/overview", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["sessions"]["online"].is_u64(), "{v}");
    // A read token reads and is refused every change.
    assert_eq!(
        api(http, Some(&read), "GET", "/api/v1/clients", None)
            .await
            .0,
        200
    );
    let (status, v) = api(http, Some(&read), "DELETE", "/api/v1/clients/x", None).await;
    assert_eq!(status, 403, "{v}");
    let body = br#"{"topic":"a","payload":"x"}"#;
    assert_eq!(
        api(http, Some(&read), "POST", "/api/v1/publish", Some(body))
            .await
            .0,
        403
    );
    // Metrics and health stay open by default.
    assert_eq!(request(http, None, "GET", "/metrics", None).await.0, 200);
    // Bad paths and methods are 4xx.
    assert_eq!(
        api(http, Some(&admin), "GET", "/api/v1/nothing", None)
            .await
            .0,
        404
    );
    assert_eq!(
        api(http, Some(&admin), "PUT", "/api/v1/clients", None)
            .await
            .0,
        405
    );
    assert_eq!(
        api(http, Some(&admin), "GET", "/api/v1/clients/%ZZ", None)
            .await
            .0,
        400
    );
    assert_eq!(
        api(http, Some(&admin), "DELETE", "/api/v1/clients/nobody", None)
            .await
            .0,
        404
    );
    // Every change is logged with the token's name (the log line may trail the answer).
    let logged = |b: &Broker| {
        b.logs().iter().any(|l| {
            l.contains("admin request")
                && l.contains("token=ops")
                && l.contains("/api/v1/clients/nobody")
                && l.contains("404")
        })
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while !logged(&broker) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(logged(&broker), "{}", broker.logs().join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_auth_closes_the_open_endpoints() {
    let (broker, admin, read) = start_with_tokens("metrics_auth = true", "");
    let http = broker.http_addr();
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(
            request(http, None, "GET", path, None).await.0,
            401,
            "{path}"
        );
        assert_eq!(
            request(http, Some(&read), "GET", path, None).await.0,
            200,
            "{path}"
        );
    }
    assert_eq!(
        request(http, Some(&admin), "GET", "/metrics", None).await.0,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_the_api_is_off() {
    let broker = Broker::start();
    let http = broker.http_addr();
    let (token, _) = token_new("x", "admin");
    assert_eq!(
        api(http, Some(&token), "GET", "/api/v1/overview", None)
            .await
            .0,
        401
    );
    assert_eq!(request(http, None, "GET", "/metrics", None).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_listed_shown_and_kicked() {
    let (mut broker, admin, _) = start_with_tokens("", "");
    let http = broker.http_addr();
    let mut five = v5::Client::connect(v5::options(&broker, "dev-5")).await;
    five.subscribe_ok("s/+/t", v5::QoS::AtLeastOnce).await;
    let three = v3::Client::connect(v3::options(&broker, "dev-3")).await;
    let mut raw5 = raw::connect_v5(&broker, "raw-5").await;

    let v = eventually(http, &admin, "/api/v1/clients", "three clients", |v| {
        ids(&v["clients"], "client_id").len() == 3
    })
    .await;
    assert_eq!(
        ids(&v["clients"], "client_id"),
        ["dev-3", "dev-5", "raw-5"],
        "sorted by id"
    );
    let c5 = &v["clients"][1];
    assert_eq!(c5["protocol"], "5.0");
    assert_eq!(c5["listener"], "default");
    assert_eq!(c5["keep_alive"], 30);
    assert!(
        c5["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{c5}"
    );
    assert!(
        c5["connected_at"]
            .as_u64()
            .is_some_and(|t| t > 1_700_000_000_000),
        "{c5}"
    );
    assert_eq!(v["clients"][0]["protocol"], "3.1.1");
    // Filters and pages.
    let (_, v) = api(
        http,
        Some(&admin),
        "GET",
        "/api/v1/clients?prefix=dev-&protocol=5",
        None,
    )
    .await;
    assert_eq!(ids(&v["clients"], "client_id"), ["dev-5"]);
    let (_, v) = api(http, Some(&admin), "GET", "/api/v1/clients?limit=2", None).await;
    assert_eq!(ids(&v["clients"], "client_id"), ["dev-3", "dev-5"]);
    assert_eq!(v["next"], "dev-5");
    let (_, v) = api(
        http,
        Some(&admin),
        "GET",
        "/api/v1/clients?limit=2&after=dev-5",
        None,
    )
    .await;
    assert_eq!(ids(&v["clients"], "client_id"), ["raw-5"]);
    assert_eq!(v["next"], Value::Null);
    // One client: what its connection holds.
    let (status, v) = api(http, Some(&admin), "GET", "/api/v1/clients/dev-5", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["subscriptions"][0]["filter"], "s/+/t");
    assert_eq!(v["subscriptions"][0]["qos"], 1);
    assert_eq!(v["inflight"], 0);
    // Kick: MQTT 5 gets DISCONNECT 0x98, 3.1.1 a closed connection.
    let (status, v) = api(http, Some(&admin), "DELETE", "/api/v1/clients/raw-5", None).await;
    assert_eq!((status, &v["kicked"]), (200, &json!("raw-5")), "{v}");
    assert_eq!(raw::disconnect_codes(&mut raw5).await, vec![0x98]);
    let mut three = three;
    assert_eq!(
        api(http, Some(&admin), "DELETE", "/api/v1/clients/dev-3", None)
            .await
            .0,
        200
    );
    assert!(
        three.inbox.closed_within(WAIT).await.is_some(),
        "3.1.1 client closed"
    );
    eventually(http, &admin, "/api/v1/clients", "two kicked", |v| {
        ids(&v["clients"], "client_id") == ["dev-5"]
    })
    .await;
    // The broker goes on serving the one left.
    five.publish("s/x/t", v5::QoS::AtLeastOnce, false, b"still")
        .await;
    assert_eq!(&five.recv().await.payload[..], b"still");
    unharmed(&mut broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_listed_and_discarded() {
    let (broker, admin, _) = start_with_tokens("", "");
    let http = broker.http_addr();
    let persistent = |id: &str| {
        let mut o = v3::options(&broker, id);
        o.set_clean_session(false);
        o
    };
    let mut keeper = v3::Client::connect(persistent("keeper")).await;
    keeper.subscribe_ok("q/#", v3::QoS::AtLeastOnce).await;
    keeper.disconnect().await;
    let mut pubr = v3::Client::connect(v3::options(&broker, "pub")).await;
    for i in 0..5u8 {
        pubr.publish("q/a", v3::QoS::AtLeastOnce, false, &[i]).await;
    }
    let v = eventually(
        http,
        &admin,
        "/api/v1/sessions",
        "the offline session",
        |v| {
            (v["sessions"].as_array().into_iter().flatten())
                .any(|s| s["client_id"] == "keeper" && s["queued"] == 5)
        },
    )
    .await;
    let keeper_row = (v["sessions"].as_array().into_iter().flatten())
        .find(|s| s["client_id"] == "keeper")
        .cloned()
        .unwrap_or_default();
    assert_eq!(keeper_row["online"], false);
    assert_eq!(keeper_row["subscriptions"], 1);
    let pub_row = (v["sessions"].as_array().into_iter().flatten())
        .find(|s| s["client_id"] == "pub")
        .cloned()
        .unwrap_or_default();
    assert_eq!(pub_row["online"], true);
    // Subscriptions of offline and online sessions.
    let mut online = v3::Client::connect(v3::options(&broker, "watcher")).await;
    online.subscribe_ok("w/+", v3::QoS::AtMostOnce).await;
    let (_, v) = api(http, Some(&admin), "GET", "/api/v1/subscriptions", None).await;
    let pairs: Vec<(String, String)> = (v["subscriptions"].as_array().into_iter().flatten())
        .map(|s| {
            (
                s["client_id"].as_str().unwrap_or("").into(),
                s["filter"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    assert_eq!(
        pairs,
        [
            ("keeper".into(), "q/#".into()),
            ("watcher".into(), "w/+".into())
        ]
    );
    let (_, v) = api(
        http,
        Some(&admin),
        "GET",
        "/api/v1/subscriptions?filter=w%2F%2B",
        None,
    )
    .await;
    assert_eq!(ids(&v["subscriptions"], "client_id"), ["watcher"]);

    // Discard: the queue and subscriptions go; the client comes back to nothing.
    let (status, v) = api(
        http,
        Some(&admin),
        "DELETE",
        "/api/v1/sessions/keeper",
        None,
    )
    .await;
    assert_eq!((status, &v["removed"]), (200, &json!("keeper")), "{v}");
    assert_eq!(
        api(
            http,
            Some(&admin),
            "DELETE",
            "/api/v1/sessions/keeper",
            None
        )
        .await
        .0,
        404
    );
    let mut back = v3::Client::connect(persistent("keeper")).await;
    assert!(!back.connack.session_present, "nothing to resume");
    back.expect_silence().await;
    // An online session is disconnected first.
    let (status, _) = api(
        http,
        Some(&admin),
        "DELETE",
        "/api/v1/sessions/watcher",
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(online.inbox.closed_within(WAIT).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_browsed_and_cleared() {
    let (broker, admin, _) = start_with_tokens("", "");
    let http = broker.http_addr();
    let mut p = v5::Client::connect(v5::options(&broker, "retainer")).await;
    p.publish("r/text", v5::QoS::AtLeastOnce, true, b"hello")
        .await;
    p.publish("r/bin", v5::QoS::AtMostOnce, true, &[0xff, 0x00])
        .await;
    p.publish("r/deep/x", v5::QoS::AtLeastOnce, true, b"x")
        .await;
    let v = eventually(http, &admin, "/api/v1/retained", "three retained", |v| {
        ids(&v["retained"], "topic").len() == 3
    })
    .await;
    assert_eq!(
        ids(&v["retained"], "topic"),
        ["r/bin", "r/deep/x", "r/text"]
    );
    assert_eq!(v["retained"][0]["payload"], Value::Null);
    assert_eq!(v["retained"][0]["payload_base64"], "/wA=");
    assert_eq!(v["retained"][2]["payload"], "hello");
    assert_eq!(v["retained"][2]["qos"], 1);
    let (_, v) = api(
        http,
        Some(&admin),
        "GET",
        "/api/v1/retained?filter=r%2F%2B&limit=1",
        None,
    )
    .await;
    assert_eq!(ids(&v["retained"], "topic"), ["r/bin"]);
    assert_eq!(v["next"], "r/bin");
    let (status, v) = api(http, Some(&admin), "GET", "/api/v1/retained/r/deep/x", None).await;
    assert_eq!((status, &v["payload"]), (200, &json!("x")), "{v}");
    assert_eq!(
        api(http, Some(&admin), "GET", "/api/v1/retained/r/none", None)
            .await
            .0,
        404
    );
    assert_eq!(
        api(
            http,
            Some(&admin),
            "GET",
            "/api/v1/retained?filter=a%2F%23%2Fb",
            None
        )
        .await
        .0,
        400
    );
    // Clearing: gone from the API and from what a new subscriber gets.
    let (status, v) = api(
        http,
        Some(&admin),
        "DELETE",
        "/api/v1/retained/r%2Ftext",
        None,
    )
    .await;
    assert_eq!((status, &v["cleared"]), (200, &json!("r/text")), "{v}");
    let mut s = v5::Client::connect(v5::options(&broker, "late")).await;
    s.subscribe_ok("r/#", v5::QoS::AtLeastOnce).await;
    let mut got = Vec::new();
    while let Some(m) = s.recv_within(Duration::from_millis(500)).await {
        got.push(v5::topic(&m));
    }
    got.sort();
    assert_eq!(got, ["r/bin", "r/deep/x"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_message_takes_the_pipeline() {
    let (mut broker, admin, _) = start_with_tokens("", "");
    let http = broker.http_addr();
    let mut s = v5::Client::connect(v5::options(&broker, "sub")).await;
    s.subscribe_ok("ops/#", v5::QoS::AtLeastOnce).await;
    let body = json!({"topic": "ops/note", "payload": "restart at 5", "qos": 1, "retain": true,
        "properties": {"content_type": "text/plain", "user_properties": [["by", "ops"]]}});
    let (status, v) = api(
        http,
        Some(&admin),
        "POST",
        "/api/v1/publish",
        Some(body.to_string().as_bytes()),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["delivered"], 1);
    let m = s.recv().await;
    assert_eq!(v5::topic(&m), "ops/note");
    assert_eq!(&m.payload[..], b"restart at 5");
    let props = m.properties.clone().unwrap_or_default();
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        props.user_properties,
        vec![("by".to_owned(), "ops".to_owned())]
    );
    // Retained like any message.
    let (status, v) = api(http, Some(&admin), "GET", "/api/v1/retained/ops/note", None).await;
    assert_eq!((status, &v["payload"]), (200, &json!("restart at 5")));
    // Bad input is a 400 that names the problem, and costs nothing else.
    for bad in [
        &b"{"[..],
        br#"{"topic":"ops/+"}"#,
        br#"{"topic":"ops/a","qos":7}"#,
        br#"{"topic":"$SYS/x","payload":"no"}"#,
        br#"{"topic":"ops/a","properties":{"nope":1}}"#,
    ] {
        let (status, v) = api(http, Some(&admin), "POST", "/api/v1/publish", Some(bad)).await;
        assert_eq!(status, 400, "{}: {v}", String::from_utf8_lossy(bad));
        assert!(v["error"].is_string(), "{v}");
    }
    let big = vec![b'x'; (1 << 20) + 10];
    assert_eq!(
        api(http, Some(&admin), "POST", "/api/v1/publish", Some(&big))
            .await
            .0,
        413
    );
    s.expect_silence().await;
    unharmed(&mut broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_are_listed_reloaded_disabled_and_enabled() {
    let dir = Broker::temp_dir();
    let plugins = dir.join("plugins");
    let rules = "[config]\ndefault = \"deny\"\n[[config.rules]]\nallow = \"readwrite\"\ntopic = \"open/#\"\n";
    crate::plugins::install_acl(&plugins, rules);
    std::fs::write(plugins.join("broken.wasm"), b"not a component").unwrap();
    let (broker, admin, _) = start_with_tokens_in(dir.clone(), "", "");
    let http = broker.http_addr();
    let v = eventually(
        http,
        &admin,
        "/api/v1/plugins",
        "acl loaded, broken failed",
        |v| ids(&v["plugins"], "name") == ["acl", "broken"],
    )
    .await;
    let acl = &v["plugins"][0];
    assert_eq!(acl["state"], "loaded");
    assert_eq!(acl["contract"], "0.1.1");
    let hooks = acl["hooks"].as_array().cloned().unwrap_or_default();
    assert!(hooks.contains(&json!("authorize")), "{acl}");
    assert!(acl["hash"].as_str().is_some_and(|h| h.len() == 12), "{acl}");
    let broken = &v["plugins"][1];
    assert_eq!(broken["state"], "failed");
    assert!(
        broken["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{broken}"
    );

    // The acl decides: closed/# is denied.
    let mut c = v3::Client::connect(v3::options(&broker, "c")).await;
    assert_eq!(
        c.subscribe("closed/x", v3::QoS::AtMostOnce).await,
        v3::SubscribeReasonCode::Failure
    );
    c.subscribe_ok("open/x", v3::QoS::AtMostOnce).await;
    let (_, v) = api(http, Some(&admin), "GET", "/api/v1/plugins", None).await;
    assert!(
        v["plugins"][0]["calls"]["authorize"]["calls"]
            .as_u64()
            .is_some_and(|n| n >= 2),
        "{v}"
    );

    // Reload: the same files, loaded again now.
    let (status, v) = api(
        http,
        Some(&admin),
        "POST",
        "/api/v1/plugins/acl/reload",
        None,
    )
    .await;
    assert_eq!((status, &v["state"]), (200, &json!("loaded")), "{v}");
    let (status, v) = api(
        http,
        Some(&admin),
        "POST",
        "/api/v1/plugins/broken/reload",
        None,
    )
    .await;
    assert_eq!(status, 422, "{v}");
    assert_eq!(
        api(
            http,
            Some(&admin),
            "POST",
            "/api/v1/plugins/none/reload",
            None
        )
        .await
        .0,
        404
    );

    // Disable: unloaded (everything allowed again) and still disabled after a restart.
    let (status, v) = api(
        http,
        Some(&admin),
        "POST",
        "/api/v1/plugins/acl/disable",
        None,
    )
    .await;
    assert_eq!((status, &v["state"]), (200, &json!("disabled")), "{v}");
    let mut d = v3::Client::connect(v3::options(&broker, "d")).await;
    d.subscribe_ok("closed/x", v3::QoS::AtMostOnce).await;
    d.disconnect().await;
    c.disconnect().await;
    let dir = broker.stop();
    let (mut broker, admin, _) = start_with_tokens_in(dir, "", "");
    let http = broker.http_addr();
    let (_, v) = api(http, Some(&admin), "GET", "/api/v1/plugins", None).await;
    let acl = (v["plugins"].as_array().into_iter().flatten())
        .find(|p| p["name"] == "acl")
        .cloned();
    assert_eq!(
        acl.map(|p| p["state"].clone()),
        Some(json!("disabled")),
        "{v}"
    );
    let mut e = v3::Client::connect(v3::options(&broker, "e")).await;
    e.subscribe_ok("closed/y", v3::QoS::AtMostOnce).await;
    // Enable: the acl decides again.
    let (status, v) = api(
        http,
        Some(&admin),
        "POST",
        "/api/v1/plugins/acl/enable",
        None,
    )
    .await;
    assert_eq!((status, &v["state"]), (200, &json!("loaded")), "{v}");
    let mut f = v3::Client::connect(v3::options(&broker, "f")).await;
    assert_eq!(
        f.subscribe("closed/z", v3::QoS::AtMostOnce).await,
        v3::SubscribeReasonCode::Failure
    );
    e.disconnect().await;
    unharmed(&mut broker);
}

/// `sandpiper ctl ARGS` against `http` with `token`: (exit code, standard output, standard
/// error).
async fn ctl(http: SocketAddr, token: &str, args: &[&str]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sandpiper"));
    cmd.arg("ctl")
        .args(args)
        .env("SANDPIPER_URL", format!("http://{http}"))
        .env("SANDPIPER_TOKEN", token);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("run sandpiper ctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_drives_the_api() {
    let (mut broker, admin, read) = start_with_tokens("", "");
    let http = broker.http_addr();
    let mut sub = v5::Client::connect(v5::options(&broker, "ctl-sub")).await;
    sub.subscribe_ok("ctl/#", v5::QoS::AtLeastOnce).await;
    let mut victim = raw::connect_v5(&broker, "ctl-victim").await;
    eventually(http, &admin, "/api/v1/clients", "two clients", |v| {
        ids(&v["clients"], "client_id").len() == 2
    })
    .await;

    // A table with a header row, one row per client.
    let (code, out, err) = ctl(http, &admin, &["clients", "list"]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("CLIENT ID") && lines[0].contains("PROTO"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("ctl-sub") && lines[1].contains("5.0"),
        "{out}"
    );
    assert!(lines[2].starts_with("ctl-victim"), "{out}");
    // --json is the API's JSON.
    let (code, out, _) = ctl(http, &admin, &["--json", "clients", "show", "ctl-sub"]).await;
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["subscriptions"][0]["filter"], "ctl/#");
    // Publish, retained get and rm.
    let (code, out, err) = ctl(
        http,
        &admin,
        &["publish", "ctl/a b", "from ctl", "--qos", "1", "--retain"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("published"), "{out}");
    let m = sub.recv().await;
    assert_eq!(
        (v5::topic(&m).as_str(), &m.payload[..]),
        ("ctl/a b", &b"from ctl"[..])
    );
    let (code, out, _) = ctl(http, &admin, &["retained", "get", "ctl/a b"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("from ctl"), "{out}");
    assert_eq!(ctl(http, &admin, &["retained", "rm", "ctl/a b"]).await.0, 0);
    let (code, _, err) = ctl(http, &admin, &["retained", "get", "ctl/a b"]).await;
    assert_eq!(code, 1, "a 404 is exit code 1");
    assert!(err.contains("404"), "{err}");
    // Kick.
    let (code, out, _) = ctl(http, &admin, &["clients", "kick", "ctl-victim"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("kicked ctl-victim"), "{out}");
    assert_eq!(raw::disconnect_codes(&mut victim).await, vec![0x98]);
    // A read token cannot change anything; a bad token and an unreachable broker say so.
    let (code, _, err) = ctl(http, &read, &["clients", "kick", "ctl-sub"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("403"), "{err}");
    let (code, _, err) = ctl(http, "sp_nope", &["overview"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");
    let gone = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let (code, _, err) = ctl(gone, &admin, &["overview"]).await;
    assert_eq!(code, 2, "{err}");
    let (code, out, _) = ctl(http, &admin, &["overview"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("version:"), "{out}");
    unharmed(&mut broker);
}

/// The configuration text of [`start_with_tokens_in`], for rewriting it.
fn config_text(admin_toml: &str, mqtt: &str, sys: &str, level: &str) -> String {
    format!(
        "[[listener]]\nname = \"default\"\nbind = \"127.0.0.1:0\"\n\n[log]\nlevel = \"{level}\"\n\n\
         [mqtt]\n{mqtt}\n\n[sys]\n{sys}\n\n[http]\nbind = \"127.0.0.1:0\"\n\n{admin_toml}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_reloads_live_and_says_what_waits_for_a_restart() {
    let dir = Broker::temp_dir();
    let (admin, admin_toml) = token_new("ops", "admin");
    let file = dir.join("sandpiper.toml");
    let text = config_text(
        &admin_toml,
        "max_packet_size = 100000",
        "interval = 0",
        "info",
    );
    let mut broker = Broker::start_config_in(dir.clone(), &text);
    let http = broker.http_addr();
    let mut before = raw::connect_v5(&broker, "before").await;

    // A file that does not validate changes nothing.
    std::fs::write(&file, format!("{text}\n[mqtt]\nbogus = 1\n")).unwrap();
    let (status, v) = api(http, Some(&admin), "POST", "/api/v1/config/reload", None).await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("not reloaded")),
        "{v}"
    );

    // Limits for new connections, $SYS, tokens and the log level apply at once; the
    // listeners wait for a restart, and say so.
    let (viewer, viewer_toml) = token_new("viewer", "read");
    let mut new_text = config_text(
        &viewer_toml,
        "max_packet_size = 1024",
        "interval = 1",
        "debug",
    );
    new_text = new_text.replacen(
        "bind = \"127.0.0.1:0\"\n",
        "bind = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"extra\"\nbind = \"127.0.0.1:0\"\n",
        1,
    );
    std::fs::write(&file, &new_text).unwrap();
    let (status, v) = api(http, Some(&admin), "POST", "/api/v1/config/reload", None).await;
    assert_eq!(status, 200, "{v}");
    for key in [
        "log.level",
        "sys.interval",
        "http.token",
        "mqtt.max_packet_size",
    ] {
        assert!(
            v["applied"]
                .as_array()
                .is_some_and(|a| a.contains(&json!(key))),
            "{key}: {v}"
        );
    }
    assert!(
        v["applied"]
            .as_array()
            .is_some_and(|a| a.contains(&json!("listener.extra opened"))),
        "{v}"
    );
    assert_eq!(v["not_applied"], json!([]), "{v}");
    // The new listener serves.
    let extra = broker.listener_addr("extra");
    let mut on_extra = TcpStream::connect(extra)
        .await
        .expect("connect to the new listener");
    raw::send(
        &mut on_extra,
        &raw::connect("MQTT", 5, "on-extra", true, 30, None),
    )
    .await;
    let (kind, _) = raw::expect_packet(&mut on_extra).await;
    assert_eq!(kind, 0x20, "CONNACK on the listener a reload opened");
    crate::plugins::wait_for_log(&broker, "configuration reloaded").await;
    // The old token is gone, the new one reads (and may not change anything).
    assert_eq!(
        api(http, Some(&admin), "GET", "/api/v1/overview", None)
            .await
            .0,
        401
    );
    assert_eq!(
        api(http, Some(&viewer), "GET", "/api/v1/overview", None)
            .await
            .0,
        200
    );
    // A new connection gets the new Maximum Packet Size; the one before keeps its own.
    let mut after = raw::connect_v5(&broker, "after").await;
    raw::send(
        &mut after,
        &raw::publish("big/t", 0, false, 0, &[b'x'; 4000], true),
    )
    .await;
    assert_eq!(raw::disconnect_codes(&mut after).await, vec![0x95]);
    raw::send(
        &mut before,
        &raw::publish("big/t", 1, false, 7, &[b'x'; 4000], true),
    )
    .await;
    let (kind, _) = raw::expect_packet(&mut before).await;
    assert_eq!(
        kind >> 4,
        4,
        "PUBACK for the connection made before the reload"
    );
    // $SYS goes from off to every second.
    let mut sys = v5::Client::connect(v5::options(&broker, "sys-reader")).await;
    sys.subscribe_ok("$SYS/broker/uptime", v5::QoS::AtMostOnce)
        .await;
    let m = sys.recv().await;
    assert_eq!(v5::topic(&m), "$SYS/broker/uptime");
    // SIGHUP does the same; a later file back at `info`, with JSON lines, applies too.
    let last = config_text(
        &viewer_toml,
        "max_packet_size = 1024",
        "interval = 1",
        "info",
    );
    let last = last.replacen("level = \"info\"", "level = \"info\"\nformat = \"json\"", 1);
    std::fs::write(&file, last).unwrap();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &broker.pid().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
    crate::plugins::wait_for_logs(&broker, "configuration reloaded", 2).await;
    assert!(
        broker
            .logs()
            .iter()
            .any(|l| l.contains("configuration reloaded")
                && l.contains("log.level")
                && l.contains("listener")),
        "{}",
        broker.logs().join("\n")
    );
    unharmed(&mut broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_lists_sessions_subscriptions_retained_and_controls_plugins() {
    let dir = Broker::temp_dir();
    let rules = "[config]\ndefault = \"allow\"\n";
    crate::plugins::install_acl(&dir.join("plugins"), rules);
    let (mut broker, admin, _) = start_with_tokens_in(dir, "", "");
    let http = broker.http_addr();
    crate::plugins::wait_for_log(&broker, "plugin loaded").await;
    let mut o = v3::options(&broker, "ctl-keeper");
    o.set_clean_session(false);
    let mut keeper = v3::Client::connect(o).await;
    keeper.subscribe_ok("keep/#", v3::QoS::AtLeastOnce).await;
    keeper
        .publish("keep/r", v3::QoS::AtLeastOnce, true, b"kept")
        .await;
    keeper.disconnect().await;
    eventually(http, &admin, "/api/v1/sessions", "offline session", |v| {
        (v["sessions"].as_array().into_iter().flatten())
            .any(|s| s["client_id"] == "ctl-keeper" && s["online"] == false)
    })
    .await;

    let (code, out, err) = ctl(http, &admin, &["sessions", "list"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines()
            .next()
            .is_some_and(|h| h.starts_with("CLIENT ID")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("ctl-keeper") && l.contains("no")),
        "{out}"
    );
    let (code, out, _) = ctl(http, &admin, &["subs", "list", "--client", "ctl-keeper"]).await;
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .any(|l| l.starts_with("ctl-keeper") && l.contains("keep/#")),
        "{out}"
    );
    let (code, out, _) = ctl(http, &admin, &["retained", "list", "--filter", "keep/#"]).await;
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .any(|l| l.starts_with("keep/r") && l.contains("kept")),
        "{out}"
    );
    let (code, out, _) = ctl(http, &admin, &["sessions", "rm", "ctl-keeper"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("removed ctl-keeper"), "{out}");
    let (_, out, _) = ctl(http, &admin, &["--json", "sessions", "list"]).await;
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert!(
        !ids(&v["sessions"], "client_id").contains(&"ctl-keeper".to_owned()),
        "{v}"
    );

    let (code, out, _) = ctl(http, &admin, &["plugins", "list"]).await;
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .any(|l| l.starts_with("acl") && l.contains("loaded")),
        "{out}"
    );
    for (verb, state) in [
        ("reload", "loaded"),
        ("disable", "disabled"),
        ("enable", "loaded"),
    ] {
        let (code, out, err) = ctl(http, &admin, &["--json", "plugins", verb, "acl"]).await;
        assert_eq!(code, 0, "{verb}: {err}");
        let v: Value = serde_json::from_str(&out).expect("JSON");
        assert_eq!(v["state"], state, "{verb}: {v}");
    }
    let (code, _, err) = ctl(http, &admin, &["plugins", "reload", "nothing"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");
    unharmed(&mut broker);
}

/// `GET /api/v1/bridges` and `sandpiper ctl bridges`: a bridge to a second broker shows
/// connected with what it sent; one to a closed port shows not connected, counting its
/// attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridges_are_listed_with_their_state() {
    let remote = Broker::start();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let bridges = format!(
        "[[bridge]]\nname = \"up\"\naddress = \"mqtt://{}\"\nreconnect_min_ms = 100\n\
         reconnect_max_ms = 200\n[[bridge.topic]]\ndirection = \"out\"\nfilter = \"up/#\"\n\
         remote_prefix = \"site/\"\nqos = 1\n\n\
         [[bridge]]\nname = \"nowhere\"\naddress = \"mqtt://127.0.0.1:{closed}\"\n\
         reconnect_min_ms = 100\nreconnect_max_ms = 200\n[[bridge.topic]]\n\
         direction = \"in\"\nfilter = \"cmd/#\"\n",
        remote.addr()
    );
    let (mut broker, _admin, read) = start_with_tokens("", &bridges);
    let http = broker.http_addr();
    let mut sub = v3::Client::connect(v3::options(&remote, "bridged-sub")).await;
    sub.subscribe_ok("site/#", v3::QoS::AtLeastOnce).await;
    eventually(http, &read, "/api/v1/bridges", "bridge up connected", |v| {
        v["bridges"][0]["connected"] == json!(true)
    })
    .await;
    let mut publisher = v3::Client::connect(v3::options(&broker, "bridged-pub")).await;
    publisher
        .publish("up/1", v3::QoS::AtLeastOnce, false, b"one")
        .await;
    assert_eq!(sub.recv().await.topic, "site/up/1");
    let v = eventually(
        http,
        &read,
        "/api/v1/bridges",
        "sent 1, nowhere retried",
        |v| v["bridges"][0]["sent"] == json!(1) && v["bridges"][1]["reconnects"].as_u64() > Some(0),
    )
    .await;
    let up = &v["bridges"][0];
    assert_eq!(up["name"], "up");
    assert_eq!(up["protocol"], "5");
    assert_eq!(up["client_id"], "sandpiper-bridge-up");
    assert_eq!(up["queued"], 0);
    assert_eq!(
        up["topics"],
        json!([{"direction": "out", "local": "up/#", "remote": "site/up/#", "qos": 1}])
    );
    assert_eq!(v["bridges"][1]["connected"], json!(false));

    let (code, out, err) = ctl(http, &read, &["bridges"]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("CONNECTED"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("up ") && lines[1].contains(" yes "),
        "{out}"
    );
    assert!(
        lines[2].starts_with("nowhere ") && lines[2].contains(" no "),
        "{out}"
    );
    unharmed(&mut broker);
}

/// How many idle connections wait in the park, from the metrics.
async fn parked(http: SocketAddr) -> u64 {
    let (_, _, body) = crate::observability::http(http, "GET", "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix("sandpiper_connections_parked "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no parked gauge in {body}"))
}

/// Waits until `n` connections are parked.
async fn until_parked(http: SocketAddr, n: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = parked(http).await;
        if now == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{now} connections parked, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A parked MQTT 5 client keeps what its CONNECT set, which a parked connection stores
/// compactly or in a box of its own: its Maximum Packet Size (a message over it is not
/// sent to it, MQTT-3.1.2-25) and the topic aliases the broker defined toward it (the
/// alias of the first delivery names the topic in the later ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_v5_client_keeps_its_packet_limit_and_topic_aliases() {
    let (mut broker, _, _) = start_with_tokens("", "");
    let http = broker.http_addr();
    let mut o = v5::options(&broker, "parked-v5");
    o.set_topic_alias_max(Some(4));
    o.set_max_packet_size(Some(200));
    let mut sub = v5::Client::connect(o).await;
    sub.subscribe_ok("pk/#", v5::QoS::AtMostOnce).await;
    until_parked(http, 1).await;
    let mut publisher = v5::Client::connect(v5::options(&broker, "parked-v5-pub")).await;
    publisher
        .publish("pk/t", v5::QoS::AtMostOnce, false, &[b'x'; 300])
        .await;
    publisher
        .publish("pk/t", v5::QoS::AtMostOnce, false, b"1")
        .await;
    let first = sub.recv().await;
    assert_eq!(
        (v5::topic(&first).as_str(), &first.payload[..]),
        ("pk/t", &b"1"[..]),
        "the message over the subscriber's Maximum Packet Size is not sent"
    );
    let alias = first.properties.as_ref().and_then(|p| p.topic_alias);
    assert!(alias.is_some(), "the first delivery defines an alias");
    // Both parked again; the next delivery wakes the subscriber, which names the topic
    // by the alias it defined before.
    until_parked(http, 2).await;
    publisher
        .publish("pk/t", v5::QoS::AtMostOnce, false, b"2")
        .await;
    let second = sub.recv().await;
    assert_eq!(&second.payload[..], b"2");
    assert_eq!(second.properties.and_then(|p| p.topic_alias), alias);
    unharmed(&mut broker);
}

/// An idle plain TCP connection waits without a task (parked), and everything that
/// concerns it still reaches it: the admin API's question and kick, a delivery, a takeover,
/// the client's hang-up (its will), and the broker's shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_is_served_kicked_taken_over_and_closed() {
    let (mut broker, admin, _) = start_with_tokens("", "");
    let http = broker.http_addr();
    let mut sub = raw::connect_v5(&broker, "park-sub").await;
    raw::send(&mut sub, &raw::subscribe(1, ["park/#"], true)).await;
    assert_eq!(raw::expect_packet(&mut sub).await.0, 0x90, "SUBACK");
    let mut kicked = raw::connect_v5(&broker, "park-kick").await;
    let mut taken = raw::connect_v5(&broker, "park-take").await;
    let mut stopped = raw::connect_v5(&broker, "park-stop").await;
    let mut will = raw::connect_tcp(&broker).await;
    let w = raw::Will {
        topic: "park/will",
        payload: b"gone",
        qos: 0,
    };
    raw::send(
        &mut will,
        &raw::connect("MQTT", 4, "park-will", true, 30, Some(w)),
    )
    .await;
    assert_eq!(
        raw::expect_packet(&mut will).await,
        (0x20, vec![0x00, 0x00])
    );
    until_parked(http, 5).await;

    // The admin API's question is answered by the connection it wakes.
    let (status, v) = api(http, Some(&admin), "GET", "/api/v1/clients/park-sub", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["subscriptions"][0]["filter"], "park/#", "{v}");
    until_parked(http, 5).await;

    // A delivery wakes the subscriber.
    let mut p = v3::Client::connect(v3::options(&broker, "park-pub")).await;
    p.publish("park/t", v3::QoS::AtLeastOnce, false, b"to a parked one")
        .await;
    let (first, body) = raw::expect_packet(&mut sub).await;
    assert_eq!(first & 0xF0, 0x30, "PUBLISH");
    assert!(body.ends_with(b"to a parked one"), "{body:?}");
    drop(p);
    until_parked(http, 5).await;

    // The client's hang-up wakes its connection: the will goes out.
    drop(will);
    let (first, body) = raw::expect_packet(&mut sub).await;
    assert_eq!(first & 0xF0, 0x30, "PUBLISH");
    assert!(body.ends_with(b"gone"), "{body:?}");
    until_parked(http, 4).await;

    // A kick: DISCONNECT 0x98.
    let (status, _) = api(
        http,
        Some(&admin),
        "DELETE",
        "/api/v1/clients/park-kick",
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(raw::disconnect_codes(&mut kicked).await, vec![0x98]);

    // A takeover: DISCONNECT 0x8E to the parked one, CONNACK to the new one.
    let _new = raw::connect_v5(&broker, "park-take").await;
    assert_eq!(raw::disconnect_codes(&mut taken).await, vec![0x8E]);

    // Shutdown: DISCONNECT 0x8B, and the broker exits cleanly.
    until_parked(http, 3).await;
    unharmed(&mut broker);
    broker.terminate();
    assert_eq!(raw::disconnect_codes(&mut stopped).await, vec![0x8B]);
    assert_eq!(raw::disconnect_codes(&mut sub).await, vec![0x8B]);
    let status = broker.wait_exit(WAIT).await.expect("exits");
    assert!(status.success(), "{status:?}");
}
