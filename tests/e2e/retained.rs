//! Retained messages: delivery on subscribe, replacement, clearing, QoS downgrade and
//! the MQTT 5 subscription options Retain Handling and Retain As Published.

use crate::harness::{Broker, v3, v5};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_message_is_sent_on_subscribe_with_retain_flag() {
    let broker = Broker::start();
    let mut pubr = v3::Client::connect(v3::options(&broker, "ret-pub")).await;
    pubr.publish("ret/a", v3::QoS::AtLeastOnce, true, b"hello")
        .await;

    let mut sub = v3::Client::connect(v3::options(&broker, "ret-sub")).await;
    sub.subscribe_ok("ret/#", v3::QoS::AtLeastOnce).await;
    let p = sub.recv().await;
    // 3.1.1 [MQTT-3.3.1-6]/[MQTT-3.3.1-8] retained message sent on a new subscription with RETAIN=1.
    assert_eq!(p.topic, "ret/a");
    assert_eq!(&p.payload[..], b"hello");
    assert!(p.retain, "retained delivery must carry RETAIN=1");
    assert_eq!(p.qos, v3::QoS::AtLeastOnce);

    // [MQTT-3.3.1-9] to an existing subscription RETAIN is 0, even for a retained publish.
    pubr.publish("ret/a", v3::QoS::AtLeastOnce, true, b"live")
        .await;
    let p = sub.recv().await;
    assert_eq!(&p.payload[..], b"live");
    assert!(!p.retain, "live delivery must carry RETAIN=0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_message_is_replaced_then_cleared_by_empty_payload() {
    let broker = Broker::start();
    let mut pubr = v3::Client::connect(v3::options(&broker, "rep-pub")).await;
    pubr.publish("rep/x", v3::QoS::AtLeastOnce, true, b"v1")
        .await;
    pubr.publish("rep/x", v3::QoS::AtLeastOnce, true, b"v2")
        .await;

    // 3.3.1.3: a new retained message replaces the stored one.
    let mut first = v3::Client::connect(v3::options(&broker, "rep-1")).await;
    first.subscribe_ok("rep/x", v3::QoS::AtLeastOnce).await;
    let p = first.recv().await;
    assert_eq!(&p.payload[..], b"v2");
    assert!(p.retain);
    first.expect_silence().await;

    // 3.1.1 [MQTT-3.3.1-10]: a zero-byte retained PUBLISH is forwarded as normal...
    pubr.publish("rep/x", v3::QoS::AtLeastOnce, true, b"").await;
    let p = first.recv().await;
    assert!(p.payload.is_empty());
    assert!(!p.retain);

    // ...and removes the retained message [MQTT-3.3.1-11]: a new subscriber gets none.
    let mut second = v3::Client::connect(v3::options(&broker, "rep-2")).await;
    second.subscribe_ok("rep/x", v3::QoS::AtLeastOnce).await;
    second.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_message_is_downgraded_to_granted_qos() {
    let broker = Broker::start();
    let mut pubr = v3::Client::connect(v3::options(&broker, "rq-pub")).await;
    pubr.publish("rq/t", v3::QoS::ExactlyOnce, true, b"q2")
        .await;
    let mut sub = v3::Client::connect(v3::options(&broker, "rq-sub")).await;
    sub.subscribe_ok("rq/t", v3::QoS::AtLeastOnce).await;
    let p = sub.recv().await;
    assert!(p.retain);
    assert_eq!(
        p.qos,
        v3::QoS::AtLeastOnce,
        "min(QoS 2 retained, QoS 1 granted)"
    );
}

fn filter(path: &str, rule: v5::RetainForwardRule, as_published: bool) -> v5::Filter {
    let mut f = v5::Filter::new(path, v5::QoS::AtLeastOnce);
    f.retain_forward_rule = rule;
    f.preserve_retain = as_published;
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_retain_handling_0_1_2() {
    let broker = Broker::start();
    let mut pubr = v5::Client::connect(v5::options(&broker, "rh-pub")).await;
    pubr.publish("rh/t", v5::QoS::AtLeastOnce, true, b"kept")
        .await;

    // MQTT 5 [MQTT-3.3.1-9] 0: sent at every subscribe, including a repeated one.
    let mut every = v5::Client::connect(v5::options(&broker, "rh-0")).await;
    for round in 0..2 {
        every
            .subscribe_filters(
                vec![filter(
                    "rh/t",
                    v5::RetainForwardRule::OnEverySubscribe,
                    false,
                )],
                None,
            )
            .await;
        let p = every.recv().await;
        assert_eq!(&p.payload[..], b"kept", "round {round}");
        assert!(p.retain);
    }

    // [MQTT-3.3.1-10] 1: sent only when the subscription did not exist yet.
    let mut new_only = v5::Client::connect(v5::options(&broker, "rh-1")).await;
    new_only
        .subscribe_filters(
            vec![filter("rh/t", v5::RetainForwardRule::OnNewSubscribe, false)],
            None,
        )
        .await;
    assert_eq!(&new_only.recv().await.payload[..], b"kept");
    new_only
        .subscribe_filters(
            vec![filter("rh/t", v5::RetainForwardRule::OnNewSubscribe, false)],
            None,
        )
        .await;

    // [MQTT-3.3.1-11] 2: never sent at subscribe.
    let mut never = v5::Client::connect(v5::options(&broker, "rh-2")).await;
    never
        .subscribe_filters(
            vec![filter("rh/t", v5::RetainForwardRule::Never, false)],
            None,
        )
        .await;

    // Neither the repeated rule-1 subscribe nor rule 2 gets the retained message; both
    // silence windows run concurrently.
    tokio::join!(new_only.expect_silence(), never.expect_silence());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_retain_as_published_keeps_flag_on_live_delivery() {
    let broker = Broker::start();
    let mut rap = v5::Client::connect(v5::options(&broker, "rap-1")).await;
    rap.subscribe_filters(
        vec![filter("rap/t", v5::RetainForwardRule::Never, true)],
        None,
    )
    .await;
    let mut plain = v5::Client::connect(v5::options(&broker, "rap-0")).await;
    plain
        .subscribe_filters(
            vec![filter("rap/t", v5::RetainForwardRule::Never, false)],
            None,
        )
        .await;
    let mut pubr = v5::Client::connect(v5::options(&broker, "rap-pub")).await;
    pubr.publish("rap/t", v5::QoS::AtLeastOnce, true, b"flag")
        .await;
    // MQTT 5 [MQTT-3.3.1-12] Retain As Published 0 → RETAIN 0; [MQTT-3.3.1-13] 1 → as published.
    assert!(
        rap.recv().await.retain,
        "retain-as-published keeps RETAIN=1"
    );
    assert!(!plain.recv().await.retain, "default clears RETAIN");
}
