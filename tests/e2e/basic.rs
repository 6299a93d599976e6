//! Connection handshake (3.1, 3.1.1, 5), CONNACK contents, protocol violations at
//! connect time, topic wildcards and `$` topics.

use std::time::{Duration, Instant};

use crate::harness::{Broker, QUIET, WAIT, queue, raw, v3, v5};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_connect_is_accepted_with_clean_session() {
    let broker = Broker::start();
    let mut c = v3::Client::connect(v3::options(&broker, "basic-311")).await;
    assert_eq!(c.connack.code, v3::ConnectReturnCode::Success);
    // [MQTT-3.2.2-1] clean session → session present 0.
    assert!(!c.connack.session_present);
    // The connection is usable: a message to itself comes back.
    c.subscribe_ok("basic/self", v3::QoS::AtLeastOnce).await;
    c.publish("basic/self", v3::QoS::AtLeastOnce, false, b"ping")
        .await;
    let p = c.recv().await;
    assert_eq!(p.topic, "basic/self");
    assert_eq!(&p.payload[..], b"ping");
    c.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_empty_client_id_with_clean_session_is_accepted() {
    let broker = Broker::start();
    // [MQTT-3.1.3-6] a zero-byte ClientId is allowed with CleanSession = 1.
    let mut c = v3::Client::connect(v3::options(&broker, "")).await;
    assert_eq!(c.connack.code, v3::ConnectReturnCode::Success);
    assert!(!c.connack.session_present);
    c.subscribe_ok("basic/anon", v3::QoS::AtMostOnce).await;
    c.publish("basic/anon", v3::QoS::AtMostOnce, false, b"x")
        .await;
    assert_eq!(&c.recv().await.payload[..], b"x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_empty_client_id_with_persistent_session_is_rejected_0x02() {
    let broker = Broker::start();
    // rumqttc panics on this combination, so the CONNECT is built by hand.
    let mut s = raw::connect_tcp(&broker).await;
    raw::send(&mut s, &raw::connect_v311("", false, 30)).await;
    // [MQTT-3.1.3-8] CONNACK 0x02 (identifier rejected), then close.
    let (first, body) = raw::expect_packet(&mut s).await;
    assert_eq!(first, 0x20, "CONNACK");
    assert_eq!(
        body,
        vec![0x00, 0x02],
        "session present 0, return code 0x02"
    );
    raw::expect_close(&mut s, WAIT, |_| false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v31_mqisdp_connect_is_accepted() {
    let broker = Broker::start();
    let mut s = raw::connect_tcp(&broker).await;
    raw::send(
        &mut s,
        &raw::connect("MQIsdp", 3, "old-client", true, 30, None),
    )
    .await;
    let (first, body) = raw::expect_packet(&mut s).await;
    assert_eq!(first, 0x20, "CONNACK");
    assert_eq!(body, vec![0x00, 0x00], "MQTT 3.1 connection accepted");
    // The connection is live: PINGREQ → PINGRESP.
    raw::send(&mut s, &[0xC0, 0x00]).await;
    assert_eq!(raw::expect_packet(&mut s).await, (0xD0, vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_protocol_level_is_refused_then_closed() {
    let broker = Broker::start();
    let mut s = raw::connect_tcp(&broker).await;
    raw::send(&mut s, &raw::connect("MQTT", 9, "future", true, 30, None)).await;
    // [MQTT-3.1.2-2] CONNACK 0x01 (3.1.1) or 0x84 (5.0), then close. In both layouts the
    // code is the second byte of the variable header.
    let (first, body) = raw::expect_packet(&mut s).await;
    assert_eq!(first, 0x20, "CONNACK");
    assert!(
        body.get(1) == Some(&0x01) || body.get(1) == Some(&0x84),
        "unacceptable protocol level code, got {body:?}"
    );
    raw::expect_close(&mut s, WAIT, |_| false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_packet_other_than_connect_closes_connection() {
    let broker = Broker::start();
    let mut s = raw::connect_tcp(&broker).await;
    // [MQTT-3.1.0-1] first packet must be CONNECT; PINGREQ instead → close, no reply.
    raw::send(&mut s, &[0xC0, 0x00]).await;
    raw::expect_close(&mut s, WAIT, |_| false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connect_closes_connection() {
    let broker = Broker::start();
    let mut s = raw::connect_tcp(&broker).await;
    raw::send(&mut s, &raw::connect_v311("twice", true, 30)).await;
    assert_eq!(raw::expect_packet(&mut s).await, (0x20, vec![0x00, 0x00]));
    // [MQTT-3.1.0-2] a second CONNECT is a protocol violation → close.
    raw::send(&mut s, &raw::connect_v311("twice", true, 30)).await;
    raw::expect_close(&mut s, WAIT, |_| false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_socket_is_closed_after_connect_timeout() {
    let broker = Broker::start_with("connect_timeout = 1");
    let started = Instant::now();
    let mut s = raw::connect_tcp(&broker).await;
    raw::expect_close(&mut s, WAIT, |_| false).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900),
        "closed after {elapsed:?}, before the 1 s connect_timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_connack_carries_configured_limits() {
    let broker = Broker::start_with(
        "receive_maximum = 17\ntopic_alias_maximum = 9\nmax_packet_size = 65536\nmax_keep_alive = 20",
    );
    // The client asks for 30 s, more than max_keep_alive.
    let c = v5::Client::connect(v5::options(&broker, "limits")).await;
    assert_eq!(c.connack.code, v5::ConnectReturnCode::Success);
    assert!(!c.connack.session_present);
    let props = c.connack_properties();
    // Absent would mean 65535 / 0 / unlimited [MQTT-3.2.2.3.3, 3.2.2.3.6, 3.2.2.3.8],
    // so each configured value must be sent.
    assert_eq!(props.receive_max, Some(17), "Receive Maximum");
    assert_eq!(props.topic_alias_max, Some(9), "Topic Alias Maximum");
    assert_eq!(props.max_packet_size, Some(65536), "Maximum Packet Size");
    // [MQTT-3.2.2-21] the client must use the Server Keep Alive.
    assert_eq!(props.server_keep_alive, Some(20), "Server Keep Alive");
    // retain_available defaults to true: absent or 1.
    assert!(matches!(props.retain_available, None | Some(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_keep_alive_within_limit_is_not_overridden() {
    let broker = Broker::start();
    let c = v5::Client::connect(v5::options(&broker, "ka")).await;
    let props = c.connack.properties.clone().unwrap_or_else(|| {
        panic!("v5 CONNACK without properties: {:?}", c.connack);
    });
    assert!(
        matches!(props.server_keep_alive, None | Some(30)),
        "30 s is within max_keep_alive; got {:?}",
        props.server_keep_alive
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_empty_client_id_gets_assigned_identifier() {
    let broker = Broker::start();
    let a = v5::Client::connect(v5::options(&broker, "")).await;
    let b = v5::Client::connect(v5::options(&broker, "")).await;
    // [MQTT-3.1.3-6]/[MQTT-3.1.3-7]: a unique identifier is assigned and returned.
    let id_a = a
        .connack_properties()
        .assigned_client_identifier
        .expect("Assigned Client Identifier for an empty id");
    let id_b = b
        .connack_properties()
        .assigned_client_identifier
        .expect("Assigned Client Identifier for an empty id");
    assert!(!id_a.is_empty());
    assert_ne!(id_a, id_b, "assigned identifiers must be unique");
    // Neither connection took the other over.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!a.inbox.is_closed() && !b.inbox.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_inbound_packet_closes_only_that_v311_client() {
    let broker = Broker::start_with("max_packet_size = 1024");
    let mut watcher = v3::Client::connect(v3::options(&broker, "watcher")).await;
    watcher.subscribe_ok("big/#", v3::QoS::AtLeastOnce).await;
    let mut big = v3::Client::connect(v3::options(&broker, "big")).await;
    queue(
        big.client
            .publish("big/t", v3::QoS::AtLeastOnce, false, vec![b'x'; 4000]),
        "PUBLISH",
    )
    .await;
    assert!(
        big.inbox.closed_within(WAIT).await.is_some(),
        "broker kept a 3.1.1 connection that sent a packet over max_packet_size"
    );
    // The oversized message was not delivered, and other clients are unaffected.
    watcher.expect_silence().await;
    let mut other = v3::Client::connect(v3::options(&broker, "other")).await;
    other
        .publish("big/ok", v3::QoS::AtLeastOnce, false, b"small")
        .await;
    let p = watcher.recv().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("big/ok", &b"small"[..])
    );
}

/// Publishes `topics` in order (QoS 1, acknowledged) and returns what `sub` receives
/// until it has been quiet for [`QUIET`].
async fn received_topics(
    pubr: &mut v3::Client,
    sub: &mut v3::Client,
    topics: &[&str],
) -> Vec<String> {
    for t in topics {
        pubr.publish(t, v3::QoS::AtLeastOnce, false, t.as_bytes())
            .await;
    }
    let mut got = Vec::new();
    while let Some(p) = sub.recv_within(QUIET).await {
        got.push(p.topic);
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_plus_and_hash_match_per_spec() {
    let broker = Broker::start();
    let mut plus = v3::Client::connect(v3::options(&broker, "plus")).await;
    plus.subscribe_ok("sport/+/player1", v3::QoS::AtLeastOnce)
        .await;
    let mut hash = v3::Client::connect(v3::options(&broker, "hash")).await;
    hash.subscribe_ok("sport/#", v3::QoS::AtLeastOnce).await;
    let mut pubr = v3::Client::connect(v3::options(&broker, "pub")).await;

    let topics = [
        "sport/tennis/player1",
        "sport",
        "sport/tennis/player2",
        "sport/tennis/player1/ranking",
        "sport/",
        "sports/tennis/player1",
        "other",
    ];
    for t in topics {
        pubr.publish(t, v3::QoS::AtLeastOnce, false, t.as_bytes())
            .await;
    }
    let mut got_hash = Vec::new();
    while let Some(p) = hash.recv_within(QUIET).await {
        got_hash.push(p.topic);
    }
    let mut got_plus = Vec::new();
    while let Some(p) = plus.recv_within(Duration::from_millis(100)).await {
        got_plus.push(p.topic);
    }
    // 4.7.1.2: "sport/#" also matches the parent "sport"; 4.7.1.3: "+" is exactly one level.
    assert_eq!(
        got_hash,
        vec![
            "sport/tennis/player1",
            "sport",
            "sport/tennis/player2",
            "sport/tennis/player1/ranking",
            "sport/",
        ]
    );
    assert_eq!(got_plus, vec!["sport/tennis/player1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dollar_topics_are_not_matched_by_leading_wildcards() {
    let broker = Broker::start();
    let mut all = v3::Client::connect(v3::options(&broker, "all")).await;
    all.subscribe_ok("#", v3::QoS::AtLeastOnce).await;
    let mut plus = v3::Client::connect(v3::options(&broker, "plus")).await;
    plus.subscribe_ok("+/info", v3::QoS::AtLeastOnce).await;
    let mut pubr = v3::Client::connect(v3::options(&broker, "pub")).await;

    // [MQTT-4.7.2-1] "#" and "+/..." must not match topics starting with '$'. The marker
    // published afterwards proves the broker processed the `$` message first.
    let got_all = received_topics(&mut pubr, &mut all, &["$test/info", "marker/info"]).await;
    let mut got_plus = Vec::new();
    while let Some(p) = plus.recv_within(Duration::from_millis(100)).await {
        got_plus.push(p.topic);
    }
    assert_eq!(got_all, vec!["marker/info"]);
    assert_eq!(got_plus, vec!["marker/info"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_workers_sets_the_threads_serving_connections() {
    let dir = Broker::temp_dir();
    let broker = Broker::start_config_in(
        dir,
        "[[listener]]\nname = \"default\"\nbind = \"127.0.0.1:0\"\n\n\
         [runtime]\nworkers = 1\n\n[log]\nlevel = \"info\"\n",
    );
    let started = |b: &Broker| b.logs().into_iter().find(|l| l.contains("runtime started"));
    let line = started(&broker).unwrap_or_default();
    assert!(line.contains("workers=1"), "log: {line:?}");
    // One worker serves every client: eight subscribers each get the message.
    let mut subs = Vec::new();
    for i in 0..8 {
        let mut c = v3::Client::connect(v3::options(&broker, &format!("one-worker-{i}"))).await;
        c.subscribe_ok("basic/one-worker", v3::QoS::AtLeastOnce)
            .await;
        subs.push(c);
    }
    let mut p = v3::Client::connect(v3::options(&broker, "one-worker-pub")).await;
    p.publish("basic/one-worker", v3::QoS::AtLeastOnce, false, b"w")
        .await;
    for s in &mut subs {
        assert_eq!(&s.recv().await.payload[..], b"w");
    }

    // The default leaves one of the cores the process may run on to other work.
    let default = Broker::start();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let want = cores.saturating_sub(1).max(1);
    let line = started(&default).unwrap_or_default();
    assert!(line.contains(&format!("workers={want}")), "log: {line:?}");
}

/// An idle connection drops its main loop's state and keeps no timer of its own (the
/// broker's keep-alive watch wakes it): pings further apart than the idle delay (0.5 s)
/// keep it open over several keep-alive periods, a delivery reaches it while it is idle,
/// and silence closes it after 1.5 × the keep alive, counted from its last packet
/// [MQTT-3.1.2-24].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_keeps_its_keep_alive_and_wakes_for_a_delivery() {
    let broker = Broker::start();
    let mut s = raw::connect_tcp(&broker).await;
    raw::send(&mut s, &raw::connect_v311("idle-ka", true, 2)).await;
    assert_eq!(raw::expect_packet(&mut s).await, (0x20, vec![0x00, 0x00]));
    raw::send(&mut s, &raw::subscribe(1, ["idle/t"], false)).await;
    assert_eq!(
        raw::expect_packet(&mut s).await,
        (0x90, vec![0x00, 0x01, 0x00])
    );
    // 5 pings 1.2 s apart: 6 s, twice the 3 s the keep alive allows a silence.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        raw::send(&mut s, &[0xC0, 0x00]).await;
        assert_eq!(raw::expect_packet(&mut s).await, (0xD0, vec![]));
    }
    let last_ping = Instant::now();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut p = v3::Client::connect(v3::options(&broker, "idle-pub")).await;
    p.publish("idle/t", v3::QoS::AtMostOnce, false, b"while idle")
        .await;
    let (first, body) = raw::expect_packet(&mut s).await;
    assert_eq!(first & 0xF0, 0x30, "PUBLISH");
    assert!(body.ends_with(b"while idle"), "{body:?}");
    // Receiving is not sending: the keep alive still counts from the last ping.
    raw::expect_close(&mut s, Duration::from_secs(10), |_| false).await;
    let silent = last_ping.elapsed();
    assert!(
        silent >= Duration::from_secs(3),
        "closed {silent:?} after the last ping, before 1.5 × the keep alive of 2 s"
    );
}
