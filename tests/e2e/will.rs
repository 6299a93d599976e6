//! Will messages: published on abnormal close, keep-alive timeout and takeover, not
//! after a normal DISCONNECT; MQTT 5 will properties and Will Delay Interval.

use std::time::{Duration, Instant};

use crate::harness::{Broker, WAIT, raw, v3, v5};

fn with_will(broker: &Broker, id: &str, topic: &str, retain: bool) -> v3::MqttOptions {
    let mut o = v3::options(broker, id);
    o.set_last_will(v3::LastWill::new(
        topic,
        "gone",
        v3::QoS::AtLeastOnce,
        retain,
    ));
    o
}

async fn watcher(broker: &Broker) -> v3::Client {
    let mut w = v3::Client::connect(v3::options(broker, "watcher")).await;
    w.subscribe_ok("will/#", v3::QoS::AtLeastOnce).await;
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_published_when_socket_drops() {
    let broker = Broker::start();
    let mut w = watcher(&broker).await;
    let c = v3::Client::connect(with_will(&broker, "dying", "will/dying", false)).await;
    c.kill().await;
    // [MQTT-3.1.2-8] network connection closed without DISCONNECT → will published.
    let p = w.recv().await;
    assert_eq!(p.topic, "will/dying");
    assert_eq!(&p.payload[..], b"gone");
    assert_eq!(p.qos, v3::QoS::AtLeastOnce);
    assert!(!p.retain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_not_published_after_disconnect() {
    let broker = Broker::start();
    let mut w = watcher(&broker).await;
    let c = v3::Client::connect(with_will(&broker, "polite", "will/polite", false)).await;
    c.disconnect().await;
    // [MQTT-3.1.2-10] the will is removed on DISCONNECT.
    w.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_with_retain_is_kept_as_retained_message() {
    let broker = Broker::start();
    let c = v3::Client::connect(with_will(&broker, "ret-will", "will/ret", true)).await;
    c.kill().await;
    // Give the broker a moment to notice the close; the late subscriber then gets the
    // retained will ([MQTT-3.1.2-17]: will retain 1 → published as retained).
    let mut late = v3::Client::connect(v3::options(&broker, "late")).await;
    let deadline = Instant::now() + WAIT;
    loop {
        late.subscribe_ok("will/ret", v3::QoS::AtLeastOnce).await;
        if let Some(p) = late.recv_within(Duration::from_millis(300)).await {
            assert_eq!(&p.payload[..], b"gone");
            assert!(p.retain);
            break;
        }
        assert!(Instant::now() < deadline, "retained will never appeared");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_published_on_keep_alive_timeout() {
    let broker = Broker::start();
    let mut w = watcher(&broker).await;
    let mut s = raw::connect_tcp(&broker).await;
    let will = raw::Will {
        topic: "will/silent",
        payload: b"timed out",
        qos: 1,
    };
    raw::send(
        &mut s,
        &raw::connect("MQTT", 4, "silent", true, 1, Some(will)),
    )
    .await;
    assert_eq!(raw::expect_packet(&mut s).await, (0x20, vec![0x00, 0x00]));
    let connected = Instant::now();
    // Keep alive 1 s and total silence: [MQTT-3.1.2-24] close after 1.5 s, will published.
    let p = w.recv().await;
    let elapsed = connected.elapsed();
    assert_eq!(p.topic, "will/silent");
    assert_eq!(&p.payload[..], b"timed out");
    assert!(
        elapsed >= Duration::from_millis(1000),
        "closed after {elapsed:?}, before the keep-alive grace (1.5 × 1 s)"
    );
    raw::expect_close(&mut s, WAIT, |_| false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_published_on_takeover() {
    let broker = Broker::start();
    let mut w = watcher(&broker).await;
    let _first = v3::Client::connect(with_will(&broker, "twin", "will/twin", false)).await;
    // The contract: takeover closes the old connection abnormally, so its will goes out.
    let _second = v3::Client::connect(v3::options(&broker, "twin")).await;
    let p = w.recv().await;
    assert_eq!(p.topic, "will/twin");
}

fn will5(broker: &Broker, id: &str, delay: u32) -> v5::MqttOptions {
    let mut o = v5::options(broker, id);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(60));
    o.set_last_will(v5::LastWill::new(
        "will5/t",
        "bye",
        v5::QoS::AtLeastOnce,
        false,
        Some(v5::LastWillProperties {
            delay_interval: Some(delay),
            payload_format_indicator: Some(1),
            message_expiry_interval: None,
            content_type: Some("text/plain".into()),
            response_topic: Some("will5/reply".into()),
            correlation_data: Some(bytes::Bytes::from_static(b"corr")),
            user_properties: vec![("k".into(), "v".into())],
        }),
    ));
    o
}

async fn watcher5(broker: &Broker) -> v5::Client {
    let mut w = v5::Client::connect(v5::options(broker, "watcher5")).await;
    w.subscribe_ok("will5/#", v5::QoS::AtLeastOnce).await;
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_will_waits_for_delay_interval_and_keeps_properties() {
    let broker = Broker::start();
    let mut w = watcher5(&broker).await;
    let c = v5::Client::connect(will5(&broker, "delayed", 2)).await;
    c.kill().await;
    let dropped = Instant::now();
    // 3.1.3.2.2: publication waits for the 2 s Will Delay Interval.
    if let Some(p) = w.recv_within(Duration::from_secs(1)).await {
        panic!(
            "will published {:?} after close, delay is 2 s: {p:?}",
            dropped.elapsed()
        );
    }
    let p = w.recv().await;
    let elapsed = dropped.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1800),
        "published after {elapsed:?}"
    );
    assert_eq!(v5::topic(&p), "will5/t");
    assert_eq!(&p.payload[..], b"bye");
    // 3.1.3.2: will properties travel with the Will Message, user properties in order
    // [MQTT-3.1.3-10].
    let props = p.properties.expect("will properties forwarded");
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(props.payload_format_indicator, Some(1));
    assert_eq!(props.response_topic.as_deref(), Some("will5/reply"));
    assert_eq!(props.correlation_data.as_deref(), Some(&b"corr"[..]));
    assert_eq!(
        props.user_properties,
        vec![("k".to_string(), "v".to_string())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_will_is_cancelled_by_reconnect_within_delay() {
    let broker = Broker::start();
    let mut w = watcher5(&broker).await;
    let c = v5::Client::connect(will5(&broker, "back", 1)).await;
    c.kill().await;
    // [MQTT-3.1.3-9] a new connection for the session before the delay → no will.
    let back = v5::Client::connect(will5(&broker, "back", 1)).await;
    assert!(back.connack.session_present);
    if let Some(p) = w.recv_within(Duration::from_secs(1)).await {
        panic!("will published although the client reconnected in time: {p:?}");
    }
    back.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_will_without_delay_is_published_immediately() {
    let broker = Broker::start();
    let mut w = watcher5(&broker).await;
    let c = v5::Client::connect(will5(&broker, "instant", 0)).await;
    c.kill().await;
    let dropped = Instant::now();
    let p = w.recv().await;
    assert_eq!(&p.payload[..], b"bye");
    assert!(dropped.elapsed() < Duration::from_secs(2));
}
