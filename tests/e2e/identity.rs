//! Identity through the binary, with the bundled `password-auth` and `acl` plugins: a
//! session belongs to the principal that made it (refused to anyone else by default, also
//! after a crash), a user name a CONNECT merely claims is no identity for `authorize`, and
//! what is already granted follows changes of the authorization policy (at resume, and
//! while connected).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::{Broker, v3, v5};
use crate::plugins::{bundled, count_logs, install_acl, wait_for_log, wait_for_logs};

/// A `password-auth` users-table line for `user` with `password` (PBKDF2-SHA256, 10,000
/// iterations: fast enough for tests).
pub(crate) fn user_line(user: &str, password: &str) -> String {
    use base64::Engine as _;
    let salt = format!("salt-of-{user}");
    let mut hash = [0u8; 32];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        std::num::NonZeroU32::new(10_000).unwrap(),
        salt.as_bytes(),
        password.as_bytes(),
        &mut hash,
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    format!(
        "{user:?} = \"pbkdf2-sha256$10000${}${}\"\n",
        b64.encode(salt),
        b64.encode(hash)
    )
}

/// A broker that authenticates alice and bob (no anonymous clients), with `mqtt` lines in
/// its `[mqtt]` table, in `dir`.
fn start_with_users(dir: &Path, mqtt: &str) -> Broker {
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::write(
        plugins.join("password-auth.toml"),
        format!(
            "[config.users]\n{}{}",
            user_line("alice", "a-pw"),
            user_line("bob", "b-pw")
        ),
    )
    .unwrap();
    let wasm = plugins.join("password-auth.wasm");
    if !wasm.exists() {
        std::fs::copy(bundled("password-auth"), &wasm).unwrap();
    }
    Broker::start_config_in(
        dir.to_path_buf(),
        &format!(
            "[[listener]]\nname = \"default\"\nbind = \"127.0.0.1:0\"\nallow_anonymous = false\n\n\
             [mqtt]\n{mqtt}\n"
        ),
    )
}

fn as_user5(broker: &Broker, id: &str, user: &str, expiry: u32) -> v5::MqttOptions {
    let mut o = v5::options(broker, id);
    o.set_credentials(user, if user == "alice" { "a-pw" } else { "b-pw" });
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(expiry));
    o
}

/// The refusal code of a CONNECT rumqttc reports as an error.
fn refused(e: &v5::ConnectionError) -> String {
    format!("{e:?}")
}

/// By default a CONNECT for a client id whose session belongs to another user is
/// refused with 0x87 (3.x: return code 5): the owner stays connected, and its session
/// (subscriptions, queue) is untouched, while connected, while detached and after a
/// kill -9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_belongs_to_its_principal() {
    let dir = Broker::temp_dir();
    let broker = start_with_users(&dir, "");
    wait_for_log(&broker, "plugin loaded").await;
    let mut alice = v5::Client::connect(as_user5(&broker, "dev", "alice", 600)).await;
    alice.subscribe_ok("dev/#", v5::QoS::AtLeastOnce).await;

    let e = v5::Client::try_connect(as_user5(&broker, "dev", "bob", 600))
        .await
        .err()
        .expect("bob refused");
    assert!(refused(&e).contains("NotAuthorized"), "{e:?}");
    let mut o = v3::options(&broker, "dev");
    o.set_credentials("bob", "b-pw");
    o.set_clean_session(true);
    let e = v3::Client::try_connect(o)
        .await
        .err()
        .expect("3.1.1 bob refused");
    assert!(format!("{e:?}").contains("NotAuthorized"), "{e:?}");
    // Alice was not disturbed.
    alice
        .publish("dev/x", v5::QoS::AtLeastOnce, false, b"still here")
        .await;
    assert_eq!(&alice.recv().await.payload[..], b"still here");
    alice.disconnect().await;

    // Detached: bob still refused; alice's queue waits for her.
    let mut p = v5::Client::connect(as_user5(&broker, "alice-pub", "alice", 0)).await;
    p.publish("dev/x", v5::QoS::AtLeastOnce, false, b"queued")
        .await;
    assert!(
        v5::Client::try_connect(as_user5(&broker, "dev", "bob", 600))
            .await
            .is_err()
    );
    // The owner is kept durably.
    let dir = broker.kill9();
    let broker = start_with_users(&dir, "");
    wait_for_log(&broker, "plugin loaded").await;
    assert!(
        v5::Client::try_connect(as_user5(&broker, "dev", "bob", 600))
            .await
            .is_err(),
        "bob refused after a restart"
    );
    let mut alice = v5::Client::connect(as_user5(&broker, "dev", "alice", 600)).await;
    assert!(alice.connack.session_present);
    assert_eq!(&alice.recv().await.payload[..], b"queued");
}

/// `session_principal = "allow"`: another user takes the session over (what MQTT alone
/// says); `"fresh"`: it gets a new session and the owner's is ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_principal_allow_and_fresh() {
    let broker = start_with_users(&Broker::temp_dir(), "session_principal = \"allow\"");
    wait_for_log(&broker, "plugin loaded").await;
    let mut alice = v5::Client::connect(as_user5(&broker, "shared-id", "alice", 600)).await;
    alice.subscribe_ok("s/#", v5::QoS::AtLeastOnce).await;
    let bob = v5::Client::connect(as_user5(&broker, "shared-id", "bob", 600)).await;
    assert!(
        bob.connack.session_present,
        "allow: bob resumes alice's session"
    );
    assert!(
        alice
            .inbox
            .closed_within(Duration::from_secs(5))
            .await
            .is_some()
    );
    drop(bob);

    let broker = start_with_users(&Broker::temp_dir(), "session_principal = \"fresh\"");
    wait_for_log(&broker, "plugin loaded").await;
    let mut alice = v5::Client::connect(as_user5(&broker, "shared-id", "alice", 600)).await;
    alice.subscribe_ok("s/#", v5::QoS::AtLeastOnce).await;
    alice.disconnect().await;
    let bob = v5::Client::connect(as_user5(&broker, "shared-id", "bob", 600)).await;
    assert!(
        !bob.connack.session_present,
        "fresh: bob gets a new session"
    );
    bob.disconnect().await;
    let again = v5::Client::connect(as_user5(&broker, "shared-id", "bob", 600)).await;
    assert!(again.connack.session_present, "the session is bob's now");
    let e = v5::Client::try_connect(as_user5(&broker, "shared-id", "alice", 600)).await;
    assert!(e.is_ok(), "fresh again for alice: {:?}", e.err());
}

/// On a listener that lets anonymous clients in, the user name a CONNECT claims (without
/// anything verifying it) is not the client's identity: an acl rule for `admin` does not
/// apply to a client that merely says it is admin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_user_name_is_not_an_identity() {
    let dir = Broker::temp_dir();
    install_acl(
        &dir.join("plugins"),
        "[config]\ndefault = \"deny\"\n[[config.rules]]\nallow = \"readwrite\"\ntopic = \"#\"\n\
         username = \"admin\"\n[[config.rules]]\nallow = \"readwrite\"\ntopic = \"open/#\"\n",
    );
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;
    let mut o = v3::options(&broker, "pretender");
    o.set_credentials("admin", "");
    let mut c = v3::Client::connect(o).await;
    assert_eq!(
        c.subscribe("#", v3::QoS::AtMostOnce).await,
        v3::SubscribeReasonCode::Failure,
        "an unverified user name granted admin's rule"
    );
    c.subscribe_ok("open/x", v3::QoS::AtMostOnce).await;
}

/// Subscriptions already granted follow the policy: when the acl rules change, a held
/// subscription they no longer allow stops receiving (logged), for a connected client at
/// once and for a persistent session when it resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_subscriptions_follow_policy_changes() {
    let dir = Broker::temp_dir();
    let plugins = dir.join("plugins");
    let open = "[[config.rules]]\nallow = \"readwrite\"\ntopic = \"feed/#\"\n";
    install_acl(&plugins, open);
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;
    let mut live = v3::Client::connect(v3::options(&broker, "live")).await;
    live.subscribe_ok("feed/#", v3::QoS::AtLeastOnce).await;
    let mut away = {
        let mut o = v3::options(&broker, "away");
        o.set_clean_session(false);
        let mut c = v3::Client::connect(o).await;
        c.subscribe_ok("feed/#", v3::QoS::AtLeastOnce).await;
        c
    };
    let mut publisher = v3::Client::connect(v3::options(&broker, "feeder")).await;
    publisher
        .publish("feed/a", v3::QoS::AtLeastOnce, false, b"1")
        .await;
    assert_eq!(&live.recv().await.payload[..], b"1");
    assert_eq!(&away.recv().await.payload[..], b"1");
    away.disconnect().await;

    // The new rules deny reading feed/secret/#: "feed/#" can match it, so it goes.
    let closed = format!("{open}[[config.rules]]\ndeny = \"read\"\ntopic = \"feed/secret/#\"\n");
    std::fs::write(plugins.join("acl.toml.tmp"), closed).unwrap();
    std::fs::rename(plugins.join("acl.toml.tmp"), plugins.join("acl.toml")).unwrap();
    wait_for_log(&broker, "plugin replaced").await;
    publisher
        .publish("feed/secret/x", v3::QoS::AtLeastOnce, false, b"2")
        .await;
    live.expect_silence().await;
    wait_for_log(&broker, "subscription no longer authorized").await;

    let mut o = v3::options(&broker, "away");
    o.set_clean_session(false);
    let mut away = v3::Client::connect(o).await;
    assert!(away.connack.session_present);
    publisher
        .publish("feed/b", v3::QoS::AtLeastOnce, false, b"3")
        .await;
    away.expect_silence().await;
}

/// Anonymous clients on two listeners are two principals: the listener a session was
/// made on is part of its owner, so an anonymous client on the other listener cannot take
/// it (MQTT 5 0x87, 3.x return code 5) and the owner stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_is_part_of_an_anonymous_owner() {
    let broker = Broker::start_config_in(
        Broker::temp_dir(),
        "[[listener]]\nname = \"inside\"\nbind = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"outside\"\nbind = \"127.0.0.1:0\"\n",
    );
    let outside = broker.listener_addr("outside");
    let mut owner = v5::Client::connect({
        let mut o = v5::options(&broker, "meter");
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(600));
        o
    })
    .await;
    owner.subscribe_ok("meter/#", v5::QoS::AtLeastOnce).await;

    let mut o = v5::MqttOptions::new("meter", "127.0.0.1", outside.port());
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(600));
    let e = v5::Client::try_connect(o)
        .await
        .err()
        .expect("refused on the other listener");
    assert!(refused(&e).contains("NotAuthorized"), "{e:?}");
    let mut o3 = v3::MqttOptions::new("meter", "127.0.0.1", outside.port());
    o3.set_clean_session(true);
    let e = v3::Client::try_connect(o3)
        .await
        .err()
        .expect("3.1.1 refused on the other listener");
    assert!(format!("{e:?}").contains("NotAuthorized"), "{e:?}");

    // The owner was not disturbed, and takes its session back on its own listener.
    owner
        .publish("meter/x", v5::QoS::AtLeastOnce, false, b"mine")
        .await;
    assert_eq!(&owner.recv().await.payload[..], b"mine");
    owner.disconnect().await;
    let mut o = v5::options(&broker, "meter");
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(600));
    let back = v5::Client::connect(o).await;
    assert!(back.connack.session_present);
}

/// Waits (1 s at most) until more than `before` log lines contain `needle`.
async fn within_a_second(broker: &Broker, needle: &str, before: usize) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while count_logs(broker, needle) <= before {
        assert!(Instant::now() < deadline, "no new {needle:?} within 1 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A plugin added to the authorize chain, or removed from it, is a policy change too:
/// within a second a held subscription the new chain denies is removed (logged, and an
/// `unsubscribed` event reaches observers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_subscriptions_follow_plugins_added_and_removed() {
    const GONE: &str = "subscription no longer authorized";
    let dir = Broker::temp_dir();
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    // An observer: every event is published on probe-events/<kind>.
    std::fs::write(plugins.join("probe.toml"), "[config]\nevents = \"true\"\n").unwrap();
    let probe = crate::plugins::hostile().with_file_name("probe.wasm");
    std::fs::copy(probe, plugins.join("probe.wasm")).unwrap();
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;

    // No authorize plugin: everything is allowed.
    let mut live = v3::Client::connect(v3::options(&broker, "live")).await;
    live.subscribe_ok("feed/#", v3::QoS::AtLeastOnce).await;
    let mut watch = v3::Client::connect(v3::options(&broker, "watch")).await;
    watch
        .subscribe_ok("probe-events/unsubscribed", v3::QoS::AtLeastOnce)
        .await;
    let mut feeder = v3::Client::connect(v3::options(&broker, "feeder")).await;
    feeder
        .publish("feed/a", v3::QoS::AtLeastOnce, false, b"1")
        .await;
    assert_eq!(&live.recv().await.payload[..], b"1");

    // Added: acl lets everyone publish on feed/# and read only the probe's events.
    let before = count_logs(&broker, GONE);
    install_acl(
        &plugins,
        "[[config.rules]]\nallow = \"write\"\ntopic = \"feed/#\"\n\
         [[config.rules]]\nallow = \"read\"\ntopic = \"probe-events/#\"\n",
    );
    wait_for_logs(&broker, "plugin loaded", 2).await;
    within_a_second(&broker, GONE, before).await;
    assert_eq!(&watch.recv().await.payload[..], b"live:feed/#");
    feeder
        .publish("feed/b", v3::QoS::AtLeastOnce, false, b"2")
        .await;
    live.expect_silence().await;

    // A gate ahead of acl (priority 10) lets everyone read feed/#: subscribed again.
    let gate = "priority = 10\n[config]\ndefault = \"ignore\"\n\
                [[config.rules]]\nallow = \"read\"\ntopic = \"feed/#\"\n";
    std::fs::write(plugins.join("gate.toml"), gate).unwrap();
    std::fs::copy(bundled("acl"), plugins.join("gate.wasm.tmp")).unwrap();
    std::fs::rename(plugins.join("gate.wasm.tmp"), plugins.join("gate.wasm")).unwrap();
    wait_for_logs(&broker, "plugin loaded", 3).await;
    live.subscribe_ok("feed/#", v3::QoS::AtLeastOnce).await;
    feeder
        .publish("feed/c", v3::QoS::AtLeastOnce, false, b"3")
        .await;
    assert_eq!(&live.recv().await.payload[..], b"3");

    // Removed: without the gate acl denies the read again.
    let before = count_logs(&broker, GONE);
    std::fs::remove_file(plugins.join("gate.wasm")).unwrap();
    wait_for_log(&broker, "plugin removed").await;
    within_a_second(&broker, GONE, before).await;
    assert_eq!(&watch.recv().await.payload[..], b"live:feed/#");
    feeder
        .publish("feed/d", v3::QoS::AtLeastOnce, false, b"4")
        .await;
    live.expect_silence().await;
}

/// Who may join a shared subscription's group (`share` hook, contract 0.1.1), with the
/// bundled `acl`: once a rule names a group, joining needs a rule naming it; a device
/// outside the rule's clients, or another group, is refused while the filter itself stays
/// readable; and when the rule goes, a held shared subscription goes with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_a_shared_group_is_authorized() {
    let dir = Broker::temp_dir();
    let plugins = dir.join("plugins");
    let read = "[[config.rules]]\nallow = \"readwrite\"\ntopic = \"jobs/#\"\n";
    let group = "[[config.rules]]\nallow = \"read\"\ntopic = \"jobs/#\"\ngroup = \"workers\"\nclient_id = \"worker-*\"\n";
    install_acl(&plugins, &format!("{read}{group}"));
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;
    let granted = v3::SubscribeReasonCode::Success(v3::QoS::AtLeastOnce);

    let mut worker = v3::Client::connect(v3::options(&broker, "worker-1")).await;
    assert_eq!(
        worker
            .subscribe("$share/workers/jobs/#", v3::QoS::AtLeastOnce)
            .await,
        granted
    );
    assert_eq!(
        worker
            .subscribe("$share/others/jobs/#", v3::QoS::AtLeastOnce)
            .await,
        v3::SubscribeReasonCode::Failure,
        "a group no rule names"
    );
    let mut intruder = v3::Client::connect(v3::options(&broker, "intruder")).await;
    assert_eq!(
        intruder
            .subscribe("$share/workers/jobs/#", v3::QoS::AtLeastOnce)
            .await,
        v3::SubscribeReasonCode::Failure,
        "a client the group rule does not name"
    );
    assert_eq!(
        intruder.subscribe("jobs/#", v3::QoS::AtLeastOnce).await,
        granted,
        "the filter itself is still readable"
    );
    let mut boss = v3::Client::connect(v3::options(&broker, "boss")).await;
    boss.publish("jobs/1", v3::QoS::AtLeastOnce, false, b"1")
        .await;
    assert_eq!(&worker.recv().await.payload[..], b"1");
    assert_eq!(&intruder.recv().await.payload[..], b"1");

    // Without the group rule, groups are open again... but the workers' rule is replaced
    // by one for another group, so worker-1's membership goes.
    let other = group.replace("workers", "night-shift");
    std::fs::write(plugins.join("acl.toml.tmp"), format!("{read}{other}")).unwrap();
    std::fs::rename(plugins.join("acl.toml.tmp"), plugins.join("acl.toml")).unwrap();
    wait_for_log(&broker, "plugin replaced").await;
    boss.publish("jobs/2", v3::QoS::AtLeastOnce, false, b"2")
        .await;
    assert_eq!(&intruder.recv().await.payload[..], b"2");
    worker.expect_silence().await;
    wait_for_log(&broker, "subscription no longer authorized").await;
}
