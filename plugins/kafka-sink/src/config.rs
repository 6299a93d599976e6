//! The plugin's `[config]` table, checked once when the plugin loads.

use std::time::Duration;

use serde::Deserialize;

use crate::kafka::{Rejected, Settings};
use crate::template::Template;

/// What the Kafka record's key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Key {
    /// The MQTT topic (default): a topic's messages share a partition, in order.
    #[default]
    Topic,
    /// The publisher's client id: a client's messages share a partition, in order.
    ClientId,
    /// No key: every record goes to partition 0.
    None,
}

/// Either one address or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Addresses {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum OnRejected {
    #[default]
    Retry,
    Drop,
}

/// The `[config]` table as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    bootstrap: Addresses,
    kafka_topic: String,
    #[serde(default)]
    key: Key,
    #[serde(default = "default_client_id")]
    client_id: String,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_connect_timeout_ms")]
    connect_timeout_ms: u64,
    #[serde(default = "default_true")]
    auto_create_topics: bool,
    #[serde(default = "default_max_batch_bytes")]
    max_batch_bytes: usize,
    #[serde(default)]
    on_rejected: OnRejected,
    #[serde(default = "default_true")]
    headers: bool,
    #[serde(default = "default_metadata_max_age_ms")]
    metadata_max_age_ms: u64,
}

fn default_client_id() -> String {
    "sandpiper".into()
}
fn default_timeout_ms() -> u64 {
    8_000
}
fn default_connect_timeout_ms() -> u64 {
    3_000
}
fn default_true() -> bool {
    true
}
fn default_max_batch_bytes() -> usize {
    // Below Kafka's default `message.max.bytes` (1 MiB + 12).
    1_000_000
}
fn default_metadata_max_age_ms() -> u64 {
    300_000
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The Kafka topic of a message.
    pub topic: Template,
    /// What the record key is.
    pub key: Key,
    /// Whether records carry headers (user properties, `mqtt_topic`, ...).
    pub headers: bool,
    /// The producer's settings.
    pub kafka: Settings,
}

impl Config {
    /// Parses and checks the text of a `[config]` table.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        let raw: Raw = sandpiper_plugin::config::from_str(text).map_err(|e| e.to_string())?;
        Config::check(raw)
    }

    /// Parses and checks the `[config]` table of a whole sidecar file (tests, examples).
    pub fn from_sidecar(text: &str) -> Result<Config, String> {
        let raw: Raw = sandpiper_plugin::config::from_sidecar(text).map_err(|e| e.to_string())?;
        Config::check(raw)
    }

    fn check(raw: Raw) -> Result<Config, String> {
        let bootstrap = match raw.bootstrap {
            Addresses::One(a) => vec![a],
            Addresses::Many(v) => v,
        };
        if bootstrap.is_empty() {
            return Err("bootstrap: give at least one host:port".into());
        }
        for a in &bootstrap {
            let ok = a.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !ok {
                return Err(format!("bootstrap: {a:?} is not host:port"));
            }
        }
        let topic = Template::parse(&raw.kafka_topic).map_err(|e| format!("kafka_topic: {e}"))?;
        let ms = |name: &str, v: u64| {
            if (1..=600_000).contains(&v) {
                Ok(Duration::from_millis(v))
            } else {
                Err(format!("{name}: {v} is not between 1 and 600000"))
            }
        };
        let timeout = ms("timeout_ms", raw.timeout_ms)?;
        let connect_timeout = ms("connect_timeout_ms", raw.connect_timeout_ms)?;
        let metadata_max_age = ms("metadata_max_age_ms", raw.metadata_max_age_ms)?;
        if !(1024..=(64 << 20)).contains(&raw.max_batch_bytes) {
            return Err(format!(
                "max_batch_bytes: {} is not between 1024 and 67108864",
                raw.max_batch_bytes
            ));
        }
        Ok(Config {
            topic,
            key: raw.key,
            headers: raw.headers,
            kafka: Settings {
                bootstrap,
                client_id: raw.client_id,
                connect_timeout,
                timeout,
                auto_create_topics: raw.auto_create_topics,
                max_batch_bytes: raw.max_batch_bytes,
                on_rejected: match raw.on_rejected {
                    OnRejected::Retry => Rejected::Retry,
                    OnRejected::Drop => Rejected::Drop,
                },
                metadata_max_age,
            },
        })
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly on purpose"
)]
mod tests {
    use super::*;

    #[test]
    fn the_example_sidecar_is_valid() {
        let c = Config::from_sidecar(include_str!("../kafka-sink.example.toml")).unwrap();
        assert_eq!(c.kafka.bootstrap, vec!["127.0.0.1:9092".to_owned()]);
        assert_eq!(c.topic.render("sensors/room1/temp"), "mqtt.sensors");
        assert_eq!(c.key, Key::Topic);
        assert_eq!(c.kafka.on_rejected, Rejected::Retry);
    }

    #[test]
    fn defaults() {
        let c = Config::from_toml("bootstrap = \"k:9092\"\nkafka_topic = \"t\"\n").unwrap();
        assert_eq!(c.kafka.bootstrap, vec!["k:9092".to_owned()]);
        assert_eq!(c.kafka.client_id, "sandpiper");
        assert_eq!(c.kafka.timeout, Duration::from_secs(8));
        assert_eq!(c.kafka.connect_timeout, Duration::from_secs(3));
        assert!(c.kafka.auto_create_topics && c.headers);
        assert_eq!(c.key, Key::Topic);
        let c = Config::from_toml(
            "bootstrap = [\"a:1\", \"[::1]:9092\"]\nkafka_topic = \"t\"\nkey = \"client_id\"\non_rejected = \"drop\"\n",
        )
        .unwrap();
        assert_eq!(c.kafka.bootstrap.len(), 2);
        assert_eq!(c.key, Key::ClientId);
        assert_eq!(c.kafka.on_rejected, Rejected::Drop);
    }

    #[test]
    fn refusals_say_which_key() {
        for (text, needle) in [
            ("kafka_topic = \"t\"\n", "bootstrap"),
            ("bootstrap = \"k:9092\"\n", "kafka_topic"),
            ("bootstrap = []\nkafka_topic = \"t\"\n", "bootstrap"),
            ("bootstrap = \"k\"\nkafka_topic = \"t\"\n", "bootstrap"),
            ("bootstrap = \"k:0\"\nkafka_topic = \"t\"\n", "bootstrap"),
            (
                "bootstrap = \"k:1\"\nkafka_topic = \"a/b\"\n",
                "kafka_topic",
            ),
            (
                "bootstrap = \"k:1\"\nkafka_topic = \"t\"\ntimeout_ms = 0\n",
                "timeout_ms",
            ),
            (
                "bootstrap = \"k:1\"\nkafka_topic = \"t\"\nkey = \"qos\"\n",
                "key",
            ),
            (
                "bootstrap = \"k:1\"\nkafka_topic = \"t\"\nmax_batch_bytes = 10\n",
                "max_batch_bytes",
            ),
            (
                "bootstrap = \"k:1\"\nkafka_topic = \"t\"\ntopics = 1\n",
                "topics",
            ),
        ] {
            let e = Config::from_toml(text).unwrap_err();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }
}
