//! An MQTT message, as the sink receives it, becomes a Kafka record.
//!
//! - topic: the `kafka_topic` template applied to the MQTT topic;
//! - key: the MQTT topic, the publisher's client id, or none (`key`);
//! - value: the payload, unchanged (an empty payload is an empty value, not a tombstone);
//! - timestamp: when the broker received the message (create time);
//! - headers (unless `headers = false`): the MQTT 5 user properties in order (names may
//!   repeat), then `mqtt_topic`, `mqtt_client_id` (when the publisher was a client) and
//!   `content_type` (when the publisher set one).

use sandpiper_plugin::sink::SinkRecord;

use crate::config::{Config, Key};
use crate::kafka::{Outgoing, Record};

/// The Kafka record for `r`.
pub fn outgoing(config: &Config, r: SinkRecord) -> Outgoing {
    let m = r.message;
    let topic = config.topic.render(&m.topic);
    let key = match config.key {
        Key::Topic => Some(m.topic.as_bytes().to_vec()),
        Key::ClientId => Some(r.publisher.as_bytes().to_vec()),
        Key::None => None,
    };
    let mut headers = Vec::new();
    if config.headers {
        headers.extend(
            m.properties
                .user_properties
                .into_iter()
                .map(|p| (p.name, p.value.into_bytes())),
        );
        headers.push(("mqtt_topic".to_owned(), m.topic.into_bytes()));
        if !r.publisher.is_empty() {
            headers.push(("mqtt_client_id".to_owned(), r.publisher.into_bytes()));
        }
        if let Some(ct) = m.properties.content_type {
            headers.push(("content_type".to_owned(), ct.into_bytes()));
        }
    }
    Outgoing {
        topic,
        record: Record {
            key,
            value: m.payload,
            headers,
            // Milliseconds since 1970 fit an i64 for the next 292 million years.
            timestamp_ms: i64::try_from(r.received_at).unwrap_or(i64::MAX),
        },
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly on purpose"
)]
mod tests {
    use sandpiper_plugin::types::{Message, Qos, UserProperty};

    use super::*;

    fn config(extra: &str) -> Config {
        Config::from_toml(&format!(
            "bootstrap = \"k:9092\"\nkafka_topic = \"mqtt.{{1}}\"\n{extra}"
        ))
        .unwrap()
    }

    fn record() -> SinkRecord {
        let mut message = Message::new("sensors/room1/temp", b"21.5".to_vec());
        message.qos = Qos::AtLeastOnce;
        message.properties.content_type = Some("text/plain".into());
        for (n, v) in [("unit", "C"), ("tag", "a"), ("tag", "b")] {
            message.properties.user_properties.push(UserProperty {
                name: n.into(),
                value: v.into(),
            });
        }
        SinkRecord {
            publisher: "dev-1".into(),
            received_at: 1_700_000_000_123,
            message,
        }
    }

    #[test]
    fn maps_topic_key_value_headers_and_time() {
        let o = outgoing(&config(""), record());
        assert_eq!(o.topic, "mqtt.sensors");
        assert_eq!(o.record.key.as_deref(), Some(&b"sensors/room1/temp"[..]));
        assert_eq!(o.record.value, b"21.5");
        assert_eq!(o.record.timestamp_ms, 1_700_000_000_123);
        let h: Vec<(&str, &[u8])> = o
            .record
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        assert_eq!(
            h,
            vec![
                ("unit", &b"C"[..]),
                ("tag", b"a"),
                ("tag", b"b"),
                ("mqtt_topic", b"sensors/room1/temp"),
                ("mqtt_client_id", b"dev-1"),
                ("content_type", b"text/plain"),
            ]
        );
    }

    #[test]
    fn key_choice_and_no_headers() {
        let o = outgoing(&config("key = \"client_id\"\nheaders = false\n"), record());
        assert_eq!(o.record.key.as_deref(), Some(&b"dev-1"[..]));
        assert!(o.record.headers.is_empty());
        let o = outgoing(&config("key = \"none\"\n"), record());
        assert_eq!(o.record.key, None);
        // A plugin's own message has no publisher: no client id header.
        let mut r = record();
        r.publisher.clear();
        let o = outgoing(&config(""), r);
        assert!(o.record.headers.iter().all(|(n, _)| n != "mqtt_client_id"));
    }
}
