//! The message and event hooks through the binary, with the test plugin `probe` (built
//! from `tests/plugins/probe`): transform chains in order and by priority, drop and
//! reject at transform (MQTT 5 PUBACK codes and DISCONNECT 0x96, 3.1.1 silent drop),
//! deliver per subscriber, events published back into the broker through the `publish`
//! import, will and retained-message authorization; and a live reload of the acl plugin
//! under QoS 1 load.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::harness::{Broker, raw, v3, v5};
use crate::plugins::{hostile, install_acl, wait_for_log};

fn probe() -> PathBuf {
    hostile().with_file_name("probe.wasm")
}

/// Writes `NAME.toml` then `NAME.wasm` (a copy of `wasm`) into `plugins`, each by rename.
fn install(plugins: &Path, name: &str, wasm: &Path, sidecar: &str) {
    std::fs::create_dir_all(plugins).unwrap();
    let toml = plugins.join(format!("{name}.toml"));
    std::fs::write(toml.with_extension("tmp"), sidecar).unwrap();
    std::fs::rename(toml.with_extension("tmp"), &toml).unwrap();
    let target = plugins.join(format!("{name}.wasm"));
    let tmp = plugins.join(format!("{name}.wasm.tmp"));
    std::fs::copy(wasm, &tmp).unwrap();
    std::fs::rename(&tmp, &target).unwrap();
}

/// A broker whose plugins folder (returned) holds the given probes `(name, sidecar)`,
/// loaded.
async fn broker_with_probes(probes: &[(&str, &str)]) -> (Broker, PathBuf) {
    let dir = Broker::temp_dir();
    let plugins = dir.join("plugins");
    for (name, sidecar) in probes {
        install(&plugins, name, &probe(), sidecar);
    }
    let broker = Broker::start_in(dir, "");
    for (name, _) in probes {
        wait_for_log(&broker, &format!("plugin={name}")).await;
    }
    (broker, plugins)
}

fn payload(p: &v3::Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transforms_compose_in_chain_order_and_priority_reorders_them() {
    let (broker, plugins) = broker_with_probes(&[
        ("a", "[config]\ntag = \"[a]\"\n"),
        ("b", "[config]\ntag = \"[b]\"\n"),
    ])
    .await;
    let mut sub = v3::Client::connect(v3::options(&broker, "sub")).await;
    sub.subscribe_ok("t/#", v3::QoS::AtLeastOnce).await;
    sub.subscribe_ok("moved/#", v3::QoS::AtLeastOnce).await;
    let mut publ = v3::Client::connect(v3::options(&broker, "pub")).await;

    // By file name: a, then b (which sees a's output).
    publ.publish("t/x", v3::QoS::AtLeastOnce, false, b"p").await;
    let p = sub.recv().await;
    assert_eq!((p.topic.as_str(), payload(&p).as_str()), ("t/x", "[b][a]p"));
    // A rewritten topic is routed to the new topic's subscribers.
    publ.publish("t/move", v3::QoS::AtMostOnce, false, b"m")
        .await;
    let p = sub.recv().await;
    assert_eq!(
        (p.topic.as_str(), payload(&p).as_str()),
        ("moved/t", "[b][a]m")
    );

    // A priority in b's sidecar puts it first, live, within a second.
    install(
        &plugins,
        "b",
        &probe(),
        "priority = 1\n[config]\ntag = \"[b]\"\n",
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    let changed = loop {
        publ.publish("t/x", v3::QoS::AtLeastOnce, false, b"p").await;
        let got = payload(&sub.recv().await);
        if got == "[a][b]p" {
            break Instant::now();
        }
        assert_eq!(got, "[b][a]p");
        assert!(Instant::now() < deadline, "priority change not applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(changed < deadline);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transform_drop_and_reject_answer_each_protocol_as_the_spec_allows() {
    let (broker, _) = broker_with_probes(&[("p", "[config]\ntag = \"\"\n")]).await;
    let mut sub = v3::Client::connect(v3::options(&broker, "sub")).await;
    sub.subscribe_ok("r/#", v3::QoS::AtLeastOnce).await;

    // MQTT 3.1.1: dropped and rejected messages are acknowledged and not delivered; the
    // connection stays.
    let mut v3p = v3::Client::connect(v3::options(&broker, "v3p")).await;
    v3p.publish("r/a", v3::QoS::AtLeastOnce, false, b"drop")
        .await;
    v3p.publish("r/a", v3::QoS::AtLeastOnce, false, b"reject:96")
        .await;
    v3p.publish("r/a", v3::QoS::AtLeastOnce, false, b"kept")
        .await;
    assert_eq!(payload(&sub.recv().await), "kept");
    sub.expect_silence().await;

    // MQTT 5: a PUBACK code answers a QoS 1 message; a DISCONNECT-only code (0x96,
    // message rate too high) disconnects.
    let mut s = raw::connect_v5(&broker, "v5p").await;
    raw::send(
        &mut s,
        &raw::publish("r/b", 1, false, 7, b"reject:97", true),
    )
    .await;
    let (first, body) = raw::expect_packet(&mut s).await;
    assert_eq!(first, 0x40, "PUBACK");
    assert_eq!(&body[..3], &[0, 7, 0x97], "PUBACK 0x97 quota exceeded");
    raw::send(&mut s, &raw::publish("r/b", 1, false, 8, b"drop", true)).await;
    let (first, body) = raw::expect_packet(&mut s).await;
    assert_eq!(first, 0x40, "PUBACK");
    assert!(
        body.len() == 2 || body[2] == 0,
        "a dropped message is accepted: {body:?}"
    );
    raw::send(
        &mut s,
        &raw::publish("r/b", 0, false, 0, b"reject:96", true),
    )
    .await;
    assert_eq!(raw::disconnect_codes(&mut s).await, vec![0x96]);
    sub.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliver_hook_rewrites_and_filters_per_subscriber() {
    let (broker, _) = broker_with_probes(&[("d", "[config]\ndeliver_tag = \"|to:\"\n")]).await;
    let mut alice = v3::Client::connect(v3::options(&broker, "alice")).await;
    alice.subscribe_ok("d/#", v3::QoS::AtLeastOnce).await;
    let mut bob = v5::Client::connect(v5::options(&broker, "nosecret-bob")).await;
    bob.subscribe_ok("d/#", v5::QoS::AtLeastOnce).await;
    let mut publ = v3::Client::connect(v3::options(&broker, "pub")).await;

    publ.publish("d/1", v3::QoS::AtLeastOnce, false, b"hello")
        .await;
    publ.publish("d/2", v3::QoS::AtMostOnce, false, b"secret")
        .await;
    publ.publish("d/3", v3::QoS::AtLeastOnce, false, b"bye")
        .await;
    assert_eq!(payload(&alice.recv().await), "hello|to:alice");
    assert_eq!(payload(&alice.recv().await), "secret|to:alice");
    assert_eq!(payload(&alice.recv().await), "bye|to:alice");
    let got: Vec<String> = [bob.recv().await, bob.recv().await]
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect();
    assert_eq!(got, ["hello|to:nosecret-bob", "bye|to:nosecret-bob"]);
    bob.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_the_plugin_and_its_publishes_reach_subscribers() {
    let (broker, _) = broker_with_probes(&[("e", "[config]\nevents = \"true\"\n")]).await;
    let mut watch = v3::Client::connect(v3::options(&broker, "probe-watch")).await;
    watch
        .subscribe_ok("probe-events/#", v3::QoS::AtLeastOnce)
        .await;

    let mut c = v3::Client::connect(v3::options(&broker, "ev1")).await;
    c.subscribe_ok("e/#", v3::QoS::AtLeastOnce).await;
    c.client.unsubscribe("e/#").await.unwrap();
    c.inbox
        .take("UNSUBACK", |p| matches!(p, v3::Packet::UnsubAck(_)))
        .await;
    c.disconnect().await;
    let mut opts = v5::options(&broker, "ev2");
    opts.set_session_expiry_interval(Some(1));
    let c2 = v5::Client::connect(opts).await;
    c2.disconnect().await;

    let want = [
        ("probe-events/connected", "ev1"),
        ("probe-events/subscribed", "ev1:e/#"),
        ("probe-events/unsubscribed", "ev1:e/#"),
        ("probe-events/disconnected", "ev1:Some(0)"),
        ("probe-events/connected", "ev2"),
        ("probe-events/disconnected", "ev2:Some(0)"),
        ("probe-events/session-expired", "ev2"),
    ];
    let mut got = Vec::new();
    while got.len() < want.len() {
        let Some(p) = watch.recv_within(Duration::from_secs(5)).await else {
            panic!("events so far: {got:?}");
        };
        got.push((p.topic.clone(), payload(&p)));
    }
    let got: Vec<(&str, &str)> = got.iter().map(|(t, p)| (t.as_str(), p.as_str())).collect();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_covers_wills_and_retained_delivery() {
    let (broker, _) = broker_with_probes(&[("z", "[config]\nauthorize = \"true\"\n")]).await;
    let mut publ = v3::Client::connect(v3::options(&broker, "pub")).await;
    publ.publish("hidden/a", v3::QoS::AtLeastOnce, true, b"h")
        .await;
    publ.publish("shown/a", v3::QoS::AtLeastOnce, true, b"s")
        .await;

    // Retained messages are authorized per topic at subscribe time.
    let mut sub = v3::Client::connect(v3::options(&broker, "sub")).await;
    sub.subscribe_ok("+/a", v3::QoS::AtLeastOnce).await;
    let p = sub.recv().await;
    assert_eq!((p.topic.as_str(), p.retain), ("shown/a", true));
    sub.expect_silence().await;
    // Live messages on the topic are not retained deliveries: they flow.
    publ.publish("hidden/a", v3::QoS::AtLeastOnce, false, b"live")
        .await;
    assert_eq!(payload(&sub.recv().await), "live");

    // A will the plugin denies refuses the CONNECT (MQTT 5 §3.1.2.5: 0x87 → 3.1.1 code 5).
    let mut s = raw::connect_tcp(&broker).await;
    let will = raw::Will {
        topic: "forbidden-will/x",
        payload: b"w",
        qos: 0,
    };
    raw::send(&mut s, &raw::connect("MQTT", 4, "w1", true, 30, Some(will))).await;
    let (first, body) = raw::expect_packet(&mut s).await;
    assert_eq!((first, body[1]), (0x20, 5), "CONNACK not authorized");
    let mut s = raw::connect_tcp(&broker).await;
    let will = raw::Will {
        topic: "fine-will/x",
        payload: b"w",
        qos: 0,
    };
    raw::send(&mut s, &raw::connect("MQTT", 4, "w2", true, 30, Some(will))).await;
    let (first, body) = raw::expect_packet(&mut s).await;
    assert_eq!((first, body[1]), (0x20, 0), "CONNACK accepted");
}

const LOAD_V1: &str = r#"
[config]
[[config.rules]]
allow = "readwrite"
topic = "load/#"
[[config.rules]]
allow = "readwrite"
topic = "probe/#"
[[config.rules]]
deny = "write"
topic = "probe/blocked"
"#;

const LOAD_V2: &str = r#"
[config]
[[config.rules]]
allow = "readwrite"
topic = "load/#"
[[config.rules]]
allow = "readwrite"
topic = "probe/#"
"#;

/// Replacing the acl plugin while four QoS 1 publishers run: no connection drops, every
/// acknowledged message arrives, the new rules apply within a second, and a broken
/// replacement leaves the running version serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_reload_under_qos1_load_loses_nothing() {
    let dir = Broker::temp_dir();
    let plugins = dir.join("plugins");
    install_acl(&plugins, LOAD_V1);
    let broker = Broker::start_in(dir, "");
    wait_for_log(&broker, "plugin loaded").await;

    let mut sub = v3::Client::connect(v3::options(&broker, "load-sub")).await;
    sub.subscribe_ok("load/#", v3::QoS::AtLeastOnce).await;
    let mut checker = v3::Client::connect(v3::options(&broker, "checker")).await;
    checker.subscribe_ok("probe/#", v3::QoS::AtLeastOnce).await;

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let mut publishers = Vec::new();
    for i in 0..4 {
        let (stop, acked) = (stop.clone(), acked.clone());
        let mut c = v3::Client::connect(v3::options(&broker, &format!("load-{i}"))).await;
        publishers.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let body = format!("{i}:{n}");
                c.publish(
                    &format!("load/{i}"),
                    v3::QoS::AtLeastOnce,
                    false,
                    body.as_bytes(),
                )
                .await;
                acked.fetch_add(1, Ordering::Relaxed);
                sent.push(body);
                n += 1;
            }
            assert!(!c.inbox.is_closed(), "publisher {i} lost its connection");
            c.disconnect().await;
            sent
        }));
    }
    let mut received = HashSet::new();
    // Under the old rules probe/blocked is refused.
    checker
        .publish("probe/blocked", v3::QoS::AtLeastOnce, false, b"old")
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drain_for(&mut sub, &mut received, Duration::from_millis(20)).await;
    // New rules, live.
    install_acl(&plugins, LOAD_V2);
    let swapped = Instant::now();
    loop {
        checker
            .publish("probe/blocked", v3::QoS::AtLeastOnce, false, b"new")
            .await;
        if let Some(p) = checker.recv_within(Duration::from_millis(50)).await {
            assert_eq!(payload(&p), "new", "the old rules let a message through");
            break;
        }
        // Keep the subscriber flowing, for 20 ms at most (what is left is collected at the
        // end).
        drain_for(&mut sub, &mut received, Duration::from_millis(20)).await;
        assert!(
            swapped.elapsed() < Duration::from_secs(1),
            "new rules not applied within 1 s"
        );
    }
    // A broken replacement is refused; the running version keeps serving.
    std::fs::write(plugins.join("acl.wasm.tmp"), b"\0asm broken").unwrap();
    std::fs::rename(plugins.join("acl.wasm.tmp"), plugins.join("acl.wasm")).unwrap();
    wait_for_log(&broker, "plugin refused").await;
    checker
        .publish("probe/blocked", v3::QoS::AtLeastOnce, false, b"still")
        .await;
    assert_eq!(payload(&checker.recv().await), "still");

    drain_for(&mut sub, &mut received, Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = Vec::new();
    for p in publishers {
        sent.extend(p.await.unwrap());
    }
    while let Some(p) = sub.recv_within(Duration::from_millis(500)).await {
        received.insert(payload(&p));
    }
    let lost: Vec<&String> = sent.iter().filter(|s| !received.contains(*s)).collect();
    assert!(
        sent.len() > 100,
        "only {} messages acknowledged",
        sent.len()
    );
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages lost, e.g. {:?}",
        lost.len(),
        sent.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(!sub.inbox.is_closed(), "subscriber lost its connection");
}

/// Collects what `sub` receives for `time` at most: under a flood its inbox never runs
/// dry, so a drain that waits for a quiet moment would never end while publishers run.
async fn drain_for(sub: &mut v3::Client, received: &mut HashSet<String>, time: Duration) {
    let until = Instant::now() + time;
    while Instant::now() < until {
        if let Some(p) = sub.recv_within(Duration::from_millis(1)).await {
            received.insert(payload(&p));
        }
    }
}

/// `(id, bytes)` MQTT 5 properties from a property block at `at` (length varint first);
/// user properties are skipped.
fn properties(body: &[u8], at: usize) -> Vec<(u8, Vec<u8>)> {
    let (mut len, mut i, mut shift) = (0usize, at, 0);
    loop {
        let b = body[i];
        len |= usize::from(b & 0x7F) << shift;
        i += 1;
        shift += 7;
        if b & 0x80 == 0 {
            break;
        }
    }
    let end = i + len;
    let mut out = Vec::new();
    while i < end {
        let id = body[i];
        i += 1;
        let n = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => 1,
            0x13 | 0x21 | 0x22 | 0x23 => 2,
            0x02 | 0x11 | 0x18 | 0x27 => 4,
            0x26 => {
                // A name/value pair: skip both strings.
                let a = usize::from(u16::from_be_bytes([body[i], body[i + 1]]));
                let b = usize::from(u16::from_be_bytes([body[i + 2 + a], body[i + 3 + a]]));
                i += 4 + a + b;
                continue;
            }
            _ => {
                let n = usize::from(u16::from_be_bytes([body[i], body[i + 1]]));
                out.push((id, body[i + 2..i + 2 + n].to_vec()));
                i += 2 + n;
                continue;
            }
        };
        out.push((id, body[i..i + n].to_vec()));
        i += n;
    }
    out
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// An MQTT 5 CONNECT (clean start) with an Authentication Method.
fn connect_with_method(client_id: &str, method: &str) -> Vec<u8> {
    let mut props = vec![0x15];
    put_str(&mut props, method.as_bytes());
    let mut body = Vec::new();
    put_str(&mut body, b"MQTT");
    body.extend_from_slice(&[5, 0x02, 0, 30, props.len() as u8]);
    body.extend_from_slice(&props);
    put_str(&mut body, client_id.as_bytes());
    raw::packet(0x10, &body)
}

/// An AUTH packet with `reason`, the method and optional data.
fn auth(reason: u8, method: &str, data: Option<&[u8]>) -> Vec<u8> {
    let mut props = vec![0x15];
    put_str(&mut props, method.as_bytes());
    if let Some(d) = data {
        props.push(0x16);
        put_str(&mut props, d);
    }
    let mut body = vec![reason, props.len() as u8];
    body.extend_from_slice(&props);
    raw::packet(0xF0, &body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enhanced_authentication_runs_challenges_through_the_plugin() {
    let (broker, _) = broker_with_probes(&[("x", "")]).await;
    let method = "probe-challenge";

    // CONNECT → AUTH 0x18 (challenge) → AUTH 0x18 (answer) → CONNACK with the method and
    // the plugin's data.
    let mut s = raw::connect_tcp(&broker).await;
    raw::send(&mut s, &connect_with_method("ea1", method)).await;
    let (first, body) = raw::expect_packet(&mut s).await;
    assert_eq!((first, body[0]), (0xF0, 0x18), "AUTH continue: {body:?}");
    let p = properties(&body, 1);
    assert!(p.contains(&(0x15, method.as_bytes().to_vec())));
    assert!(p.contains(&(0x16, b"nonce".to_vec())));
    raw::send(&mut s, &auth(0x18, method, Some(b"answer:nonce"))).await;
    let (first, body) = raw::expect_packet(&mut s).await;
    assert_eq!((first, body[1]), (0x20, 0x00), "CONNACK success: {body:?}");
    let p = properties(&body, 2);
    assert!(p.contains(&(0x15, method.as_bytes().to_vec())));
    assert!(p.contains(&(0x16, b"welcome".to_vec())));

    // Re-authentication: AUTH 0x19 → AUTH 0x18 → answer → AUTH 0x00.
    raw::send(&mut s, &auth(0x19, method, None)).await;
    let (first, body) = raw::expect_packet(&mut s).await;
    assert_eq!(
        (first, body[0]),
        (0xF0, 0x18),
        "re-auth challenge: {body:?}"
    );
    raw::send(&mut s, &auth(0x18, method, Some(b"answer:nonce"))).await;
    let (first, body) = raw::expect_packet(&mut s).await;
    assert_eq!((first, body[0]), (0xF0, 0x00), "re-auth success: {body:?}");
    // A wrong answer to a re-authentication disconnects with 0x87.
    raw::send(&mut s, &auth(0x19, method, None)).await;
    let (first, _) = raw::expect_packet(&mut s).await;
    assert_eq!(first, 0xF0);
    raw::send(&mut s, &auth(0x18, method, Some(b"wrong"))).await;
    assert_eq!(raw::disconnect_codes(&mut s).await, vec![0x87]);

    // A wrong answer refuses the CONNECT with 0x87.
    let mut s = raw::connect_tcp(&broker).await;
    raw::send(&mut s, &connect_with_method("ea2", method)).await;
    let (first, _) = raw::expect_packet(&mut s).await;
    assert_eq!(first, 0xF0);
    raw::send(&mut s, &auth(0x18, method, Some(b"guess"))).await;
    let (first, body) = raw::expect_packet(&mut s).await;
    assert_eq!(
        (first, body[1]),
        (0x20, 0x87),
        "CONNACK not authorized: {body:?}"
    );

    // A method no plugin takes: 0x8C bad authentication method.
    let mut s = raw::connect_tcp(&broker).await;
    raw::send(&mut s, &connect_with_method("ea3", "SCRAM-SHA-1")).await;
    let (first, body) = raw::expect_packet(&mut s).await;
    assert_eq!(
        (first, body[1]),
        (0x20, 0x8C),
        "CONNACK bad method: {body:?}"
    );
}
