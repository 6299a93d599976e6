//! Native tests of the settings and the document (the request itself is tested through
//! the broker, `tests/e2e/sink_webhook.rs`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly on purpose"
)]

use sandpiper_plugin::sink::SinkRecord;
use sandpiper_plugin::types::{Message, Qos, UserProperty};
use serde_json::{Value, json};

use crate::body::document;
use crate::config::{Config, Scheme, Target, parse_url};

fn target(scheme: Scheme, authority: &str, path: &str) -> Target {
    Target {
        scheme,
        authority: authority.to_owned(),
        path_with_query: path.to_owned(),
    }
}

#[test]
fn the_example_sidecar_is_valid() {
    let c: Config =
        sandpiper_plugin::config::from_sidecar(include_str!("../webhook.example.toml")).unwrap();
    let (t, headers) = c.check().unwrap();
    assert_eq!(t, target(Scheme::Https, "hooks.example.com", "/mqtt"));
    assert_eq!(
        headers,
        vec![("authorization".to_owned(), "Bearer change-me".to_owned())]
    );
    assert_eq!(c.timeout_ms, 5000);
}

#[test]
fn urls() {
    assert_eq!(
        parse_url("http://127.0.0.1:8080/in?x=1").unwrap(),
        target(Scheme::Http, "127.0.0.1:8080", "/in?x=1")
    );
    assert_eq!(
        parse_url("HTTPS://h.example").unwrap(),
        target(Scheme::Https, "h.example", "/")
    );
    assert_eq!(
        parse_url("http://h:1?q").unwrap(),
        target(Scheme::Http, "h:1", "/?q")
    );
    assert_eq!(
        parse_url("http://[::1]:9/p").unwrap(),
        target(Scheme::Http, "[::1]:9", "/p")
    );
    for bad in [
        "ftp://h/",
        "h:80/x",
        "http:///x",
        "http://:80/x",
        "http://u:p@h/",
        "http://h:99999/",
        "http://h:x/",
        "http://[::1/",
        "http://[::1]x/",
        "http://h/a b",
        "http://h/#frag",
    ] {
        assert!(parse_url(bad).is_err(), "{bad} accepted");
    }
}

#[test]
fn settings_are_checked() {
    let check = |text: &str| {
        sandpiper_plugin::config::from_str::<Config>(text)
            .map_err(|e| e.to_string())
            .and_then(|c| c.check())
    };
    assert!(check("url = \"http://h/\"").is_ok());
    assert!(check("").is_err(), "url is required");
    assert!(check("url = \"http://h/\"\nbogus = 1").is_err());
    assert!(check("url = \"http://h/\"\ntimeout_ms = 0").is_err());
    assert!(check("url = \"http://h/\"\ntimeout_ms = 60001").is_err());
    assert!(check("url = \"http://h/\"\n[headers]\n\"bad name\" = \"x\"").is_err());
    assert!(check("url = \"http://h/\"\n[headers]\nHost = \"x\"").is_err());
    assert!(check("url = \"http://h/\"\n[headers]\nContent-Type = \"x\"").is_err());
    assert!(check("url = \"http://h/\"\n[headers]\nX-A = \"a\\r\\nX-B: b\"").is_err());
}

fn record(publisher: &str, topic: &str, payload: &[u8]) -> SinkRecord {
    let mut message = Message::new(topic, payload);
    message.qos = Qos::AtLeastOnce;
    SinkRecord {
        publisher: publisher.to_owned(),
        received_at: 1_767_225_600_000,
        message,
    }
}

#[test]
fn a_batch_is_one_document_in_order() {
    let mut first = record("sensor-1", "sensors/1/temp", b"21.5");
    first.message.retain = true;
    first.message.properties.content_type = Some("text/plain".into());
    first.message.properties.user_properties = vec![
        UserProperty {
            name: "unit".into(),
            value: "C".into(),
        },
        UserProperty {
            name: "tag".into(),
            value: "a".into(),
        },
        UserProperty {
            name: "tag".into(),
            value: "b".into(),
        },
    ];
    let mut second = record("", "sensors/2/raw", &[0xff, 0x00, 0x10]);
    second.message.qos = Qos::AtMostOnce;
    let doc: Value = serde_json::from_slice(&document(&[first, second]).unwrap()).unwrap();
    assert_eq!(
        doc,
        json!({"messages": [
            {"topic": "sensors/1/temp", "payload": "21.5", "payload_encoding": "utf8",
             "qos": 1, "retain": true, "publisher": "sensor-1",
             "received_at": 1_767_225_600_000u64,
             "user_properties": {"unit": "C", "tag": ["a", "b"]},
             "content_type": "text/plain"},
            {"topic": "sensors/2/raw", "payload": "/wAQ", "payload_encoding": "base64",
             "qos": 0, "retain": false, "publisher": null,
             "received_at": 1_767_225_600_000u64, "user_properties": {}},
        ]})
    );
}
