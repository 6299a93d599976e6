//! Configuration: TOML → typed [`Config`], validated once at start. Every key has a default,
//! unknown keys are rejected, so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

pub use crate::store::{Durability, StoreConfig};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners; the default is one TCP listener on 127.0.0.1:1883.
    #[serde(default = "default_listeners", rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    /// MQTT protocol settings and per-client limits.
    #[serde(default)]
    pub mqtt: MqttConfig,
    /// Durable storage.
    #[serde(default)]
    pub store: StoreConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
}

/// One listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Name used in logs; defaults to `listener-N`.
    pub name: Option<String>,
    /// Address and port to bind; port 0 picks a free port (logged at start).
    pub bind: SocketAddr,
    /// Whether clients may connect without being authenticated. Defaults to true only when
    /// `bind` is a loopback address: a broker reachable from the network is closed unless
    /// the operator opens it.
    pub allow_anonymous: Option<bool>,
}

impl ListenerConfig {
    /// The effective anonymous policy of this listener.
    pub fn anonymous_allowed(&self) -> bool {
        self.allow_anonymous.unwrap_or(self.bind.ip().is_loopback())
    }
}

/// MQTT protocol settings and per-client limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Largest packet accepted from a client, in bytes (fixed header included). Announced to
    /// MQTT 5 clients as Maximum Packet Size.
    pub max_packet_size: u32,
    /// Seconds a new connection has to send its CONNECT.
    pub connect_timeout: u64,
    /// Largest keep alive accepted; an MQTT 5 client asking for more (or for 0) is told this
    /// value as Server Keep Alive.
    pub max_keep_alive: u16,
    /// How many QoS 2 PUBLISHes a client may have awaiting PUBREL (our Receive Maximum).
    pub receive_maximum: u16,
    /// Most unacknowledged QoS 1/2 messages in flight to one client; MQTT 5 clients may ask
    /// for fewer with their Receive Maximum.
    pub max_inflight: u16,
    /// Most messages queued for one session beyond those in flight.
    pub max_queued_messages: usize,
    /// Most bytes (topic + payload) queued for one session beyond those in flight.
    pub max_queued_bytes: usize,
    /// How long a publisher is held back when a connected subscriber's queue is half full,
    /// in milliseconds. A subscriber that does not make room in that time is marked slow:
    /// its messages overflow (are dropped) instead, until it catches up. 0 turns
    /// back-pressure off (queues overflow at once).
    pub backpressure_timeout_ms: u64,
    /// Topic aliases an MQTT 5 client may define toward the broker.
    pub topic_alias_maximum: u16,
    /// Upper bound of a session's expiry interval, in seconds; also the expiry of MQTT 3.x
    /// persistent sessions. 4294967295 means never.
    pub max_session_expiry: u32,
    /// Whether retained messages are supported.
    pub retain_available: bool,
    /// Whether clients may connect with an empty client identifier (then one is assigned).
    pub allow_empty_client_id: bool,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            max_packet_size: 1024 * 1024,
            connect_timeout: 10,
            max_keep_alive: u16::MAX,
            receive_maximum: 256,
            max_inflight: 128,
            max_queued_messages: 1000,
            max_queued_bytes: 16 * 1024 * 1024,
            backpressure_timeout_ms: 1000,
            topic_alias_maximum: 64,
            max_session_expiry: u32::MAX,
            retain_available: true,
            allow_empty_client_id: true,
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter such as `info` or `sandpiper=debug`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_owned(),
        }
    }
}

fn default_listeners() -> Vec<ListenerConfig> {
    vec![ListenerConfig {
        name: Some("default".to_owned()),
        bind: SocketAddr::from(([127, 0, 0, 1], 1883)),
        allow_anonymous: None,
    }]
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listeners: default_listeners(),
            mqtt: MqttConfig::default(),
            store: StoreConfig::default(),
            log: LogConfig::default(),
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML does not parse or has unknown keys or wrong types.
    #[error("{0}")]
    Parse(#[from] toml::de::Error),
    /// A value is out of range.
    #[error("invalid setting {key}: {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text)
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text)?;
        config.validate()?;
        for (i, l) in config.listeners.iter_mut().enumerate() {
            if l.name.is_none() {
                l.name = Some(format!("listener-{i}"));
            }
        }
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.mqtt;
        let invalid = |key, reason| Err(ConfigError::Invalid { key, reason });
        if self.listeners.is_empty() {
            return invalid("listener", "at least one listener is required");
        }
        if !(64..=268_435_460).contains(&m.max_packet_size) {
            return invalid("mqtt.max_packet_size", "must be between 64 and 268435460");
        }
        if m.receive_maximum == 0 {
            return invalid("mqtt.receive_maximum", "must be at least 1");
        }
        if m.max_inflight == 0 {
            return invalid("mqtt.max_inflight", "must be at least 1");
        }
        if m.connect_timeout == 0 {
            return invalid("mqtt.connect_timeout", "must be at least 1 second");
        }
        if m.max_queued_messages == 0 || m.max_queued_bytes == 0 {
            return invalid(
                "mqtt.max_queued_messages",
                "queue limits must be at least 1",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].bind.port(), 1883);
        assert!(c.listeners[0].anonymous_allowed());
        assert_eq!(c.mqtt.max_inflight, 128);
    }

    #[test]
    fn unknown_key_is_rejected() {
        let err = Config::parse("[mqtt]\nmax_inflght = 3\n").unwrap_err();
        assert!(err.to_string().contains("max_inflght"), "{err}");
    }

    #[test]
    fn non_loopback_listener_is_closed_by_default() {
        let c = Config::parse("[[listener]]\nbind = \"0.0.0.0:1883\"\n").unwrap();
        assert!(!c.listeners[0].anonymous_allowed());
        assert_eq!(c.listeners[0].name.as_deref(), Some("listener-0"));
    }

    #[test]
    fn zero_inflight_is_rejected() {
        assert!(Config::parse("[mqtt]\nmax_inflight = 0\n").is_err());
    }
}
