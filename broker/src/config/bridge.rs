//! `[[bridge]]`: a connection to another MQTT broker that forwards topics both ways.

use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;
use crate::codec::{QoS, TopicFilter, TopicName};

/// One bridge.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// Its name: logs, metrics, `$SYS`, and its durable queue (letters, digits, `-`, `_`).
    pub name: String,
    /// `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]` (8883).
    pub address: String,
    /// MQTT version spoken to the remote: `"5"` (default) or `"3.1.1"`.
    #[serde(default)]
    pub protocol: BridgeProtocol,
    /// Client identifier at the remote; default `sandpiper-bridge-NAME`.
    pub client_id: Option<String>,
    /// Clean Start (MQTT 5) / Clean Session (3.1.1). Default false: the remote keeps the
    /// bridge's subscriptions and queues for it while it is away.
    #[serde(default)]
    pub clean_start: bool,
    /// MQTT 5 Session Expiry Interval asked of the remote, seconds (default 86400).
    #[serde(default = "default_session_expiry")]
    pub session_expiry: u32,
    /// User Name at the remote.
    pub username: Option<String>,
    /// Password at the remote (or `password_file`, whose first line is read at start).
    pub password: Option<String>,
    /// A file holding the password on its first line.
    pub password_file: Option<PathBuf>,
    /// PEM CA certificates that sign the remote's certificate (`mqtts`); default the
    /// system's bundle (`/etc/ssl/certs/ca-certificates.crt`).
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS (with `key`).
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// TLS server name to verify, when it differs from the address's host.
    pub server_name: Option<String>,
    /// Keep alive, seconds (default 60; 0 turns it off).
    #[serde(default = "default_keep_alive")]
    pub keep_alive: u16,
    /// Whether RETAIN flags pass both ways (default true); false sends every message
    /// unretained.
    #[serde(default = "yes")]
    pub retain: bool,
    /// MQTT 3.1.1 only: announce the connection as a bridge the way Mosquitto does (the
    /// protocol level's top bit), so that a remote that understands it (Mosquitto,
    /// Sandpiper) never sends the bridge's own messages back. Default true; turn it off for
    /// a remote that refuses such a CONNECT.
    #[serde(default = "yes")]
    pub try_private: bool,
    /// Most QoS 1/2 messages waiting in the durable outbound queue; beyond it the oldest
    /// are dropped and counted (default 100000).
    #[serde(default = "default_max_queue")]
    pub max_queue: u64,
    /// Most outbound QoS 1/2 messages sent and not yet acknowledged by the remote
    /// (default 100; the remote's Receive Maximum may lower it).
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// First wait before reconnecting, milliseconds (default 1000); doubled after each
    /// failure up to `reconnect_max_ms` (default 60000), with random jitter.
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min_ms: u64,
    /// Longest wait before reconnecting, milliseconds.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_ms: u64,
    /// Seconds to wait for the TCP connection, the TLS handshake and CONNACK (default 10).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: u64,
    /// The topics it forwards (`[[bridge.topic]]`), at least one.
    #[serde(default, rename = "topic")]
    pub topics: Vec<BridgeTopic>,
}

/// One topic pattern of a bridge.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BridgeTopic {
    /// `out` (local → remote), `in` (remote → local) or `both`.
    pub direction: Direction,
    /// The pattern without prefixes, a topic filter.
    pub filter: String,
    /// Local topics are `local_prefix + filter`.
    #[serde(default)]
    pub local_prefix: String,
    /// Remote topics are `remote_prefix + filter`.
    #[serde(default)]
    pub remote_prefix: String,
    /// The highest QoS forwarded: a message goes at the lower of its own and this one
    /// (default 2: its own).
    #[serde(default = "default_qos")]
    pub qos: u8,
}

/// Which way a bridge topic forwards.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Local → remote.
    Out,
    /// Remote → local.
    In,
    /// Both ways.
    Both,
}

impl Direction {
    /// Whether local messages go out.
    pub fn out(self) -> bool {
        matches!(self, Direction::Out | Direction::Both)
    }

    /// Whether remote messages come in.
    pub fn inbound(self) -> bool {
        matches!(self, Direction::In | Direction::Both)
    }

    /// As the configuration writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Out => "out",
            Direction::In => "in",
            Direction::Both => "both",
        }
    }
}

/// MQTT version a bridge speaks.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum BridgeProtocol {
    /// MQTT 3.1.1.
    #[serde(rename = "3.1.1")]
    V3_1_1,
    /// MQTT 5.0.
    #[default]
    #[serde(rename = "5")]
    V5,
}

impl BridgeProtocol {
    /// As the configuration writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            BridgeProtocol::V3_1_1 => "3.1.1",
            BridgeProtocol::V5 => "5",
        }
    }
}

fn default_session_expiry() -> u32 {
    86_400
}
fn default_keep_alive() -> u16 {
    60
}
fn yes() -> bool {
    true
}
fn default_max_queue() -> u64 {
    100_000
}
fn default_max_inflight() -> u16 {
    100
}
fn default_reconnect_min() -> u64 {
    1_000
}
fn default_reconnect_max() -> u64 {
    60_000
}
fn default_connect_timeout() -> u64 {
    10
}
fn default_qos() -> u8 {
    2
}

/// Where a bridge connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Whether the connection is TLS (`mqtts://`).
    pub tls: bool,
}

impl BridgeConfig {
    /// The remote's address, parsed (validated at load).
    pub fn remote(&self) -> Option<Remote> {
        let (tls, rest) = if let Some(r) = self.address.strip_prefix("mqtts://") {
            (true, r)
        } else {
            (false, self.address.strip_prefix("mqtt://")?)
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let default_port = if tls { 8883 } else { 1883 };
        // `[v6]:port`, `[v6]`, `host:port`, `host`.
        let (host, port) = if let Some(r) = rest.strip_prefix('[') {
            let (h, after) = r.split_once(']')?;
            match after.strip_prefix(':') {
                Some(p) => (h, p.parse().ok()?),
                None if after.is_empty() => (h, default_port),
                None => return None,
            }
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h, p.parse().ok()?),
                None => (rest, default_port),
            }
        };
        if host.is_empty() || host.contains(['/', '@', ' ']) || port == 0 {
            return None;
        }
        Some(Remote {
            host: host.to_owned(),
            port,
            tls,
        })
    }

    /// The client identifier used at the remote.
    pub fn client_id(&self) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("sandpiper-bridge-{}", self.name))
    }

    /// Checks one bridge's settings.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let bad = |reason: String| {
            Err(ConfigError::Bridge {
                bridge: self.name.clone(),
                reason,
            })
        };
        if !super::is_name(&self.name) {
            return bad("`name` must be letters, digits, `-` and `_` only".into());
        }
        if self.remote().is_none() {
            return bad(format!(
                "`address` {:?} is not mqtt://host[:port] or mqtts://host[:port]",
                self.address
            ));
        }
        if self.client_id().is_empty() || self.client_id().len() > 65_535 {
            return bad("`client_id` must not be empty".into());
        }
        if self.password.is_some() && self.password_file.is_some() {
            return bad("set `password` or `password_file`, not both".into());
        }
        if self.cert.is_some() != self.key.is_some() {
            return bad("`cert` and `key` go together".into());
        }
        if self.max_queue == 0 || self.max_inflight == 0 {
            return bad("`max_queue` and `max_inflight` must be at least 1".into());
        }
        if self.reconnect_min_ms == 0 || self.reconnect_max_ms < self.reconnect_min_ms {
            return bad(
                "`reconnect_min_ms` must be at least 1 and at most `reconnect_max_ms`".into(),
            );
        }
        if self.connect_timeout == 0 {
            return bad("`connect_timeout` must be at least 1 second".into());
        }
        if self.topics.is_empty() {
            return bad("needs at least one [[bridge.topic]]".into());
        }
        for t in &self.topics {
            if t.qos > 2 {
                return bad(format!("topic {:?}: `qos` must be 0, 1 or 2", t.filter));
            }
            if t.filter.is_empty() {
                return bad("a topic's `filter` must not be empty".into());
            }
            for (what, prefix) in [
                ("local_prefix", &t.local_prefix),
                ("remote_prefix", &t.remote_prefix),
            ] {
                if !prefix.is_empty() && TopicName::new(prefix).is_err() {
                    return bad(format!(
                        "topic {:?}: `{what}` {prefix:?} is not a topic name prefix (no wildcards)",
                        t.filter
                    ));
                }
            }
            for full in [t.local(), t.remote()] {
                if TopicFilter::new(&full).is_err() {
                    return bad(format!(
                        "topic {:?}: {full:?} is not a valid topic filter",
                        t.filter
                    ));
                }
                if full.starts_with("$share/") {
                    return bad(format!(
                        "topic {:?}: a bridge does not forward shared subscriptions",
                        t.filter
                    ));
                }
            }
        }
        Ok(())
    }
}

impl BridgeTopic {
    /// The local pattern: `local_prefix + filter`.
    pub fn local(&self) -> String {
        format!("{}{}", self.local_prefix, self.filter)
    }

    /// The remote pattern: `remote_prefix + filter`.
    pub fn remote(&self) -> String {
        format!("{}{}", self.remote_prefix, self.filter)
    }

    /// The QoS ceiling.
    pub fn max_qos(&self) -> QoS {
        match self.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        }
    }
}

/// Checks every bridge and that their names differ.
pub(super) fn validate_all(bridges: &[BridgeConfig]) -> Result<(), ConfigError> {
    let mut names = std::collections::HashSet::new();
    for b in bridges {
        b.validate()?;
        if !names.insert(b.name.as_str()) {
            return Err(ConfigError::Bridge {
                bridge: b.name.clone(),
                reason: "two bridges have this name".into(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;

    fn bridge(address: &str) -> BridgeConfig {
        let text = format!(
            "[[bridge]]\nname = \"b\"\naddress = \"{address}\"\n[[bridge.topic]]\ndirection = \"out\"\nfilter = \"a/#\"\n"
        );
        let c: super::super::Config = toml::from_str(&text).unwrap();
        c.bridges.into_iter().next().unwrap()
    }

    #[test]
    fn addresses() {
        let r = |a: &str| bridge(a).remote();
        let remote = |host: &str, port, tls| {
            Some(Remote {
                host: host.into(),
                port,
                tls,
            })
        };
        assert_eq!(r("mqtt://h"), remote("h", 1883, false));
        assert_eq!(r("mqtts://h"), remote("h", 8883, true));
        assert_eq!(r("mqtt://127.0.0.1:1884"), remote("127.0.0.1", 1884, false));
        assert_eq!(r("mqtts://[::1]:9"), remote("::1", 9, true));
        assert_eq!(r("mqtt://[::1]"), remote("::1", 1883, false));
        assert_eq!(r("mqtt://h:0"), None);
        assert_eq!(r("tcp://h:1"), None);
        assert_eq!(r("mqtt://"), None);
        assert_eq!(r("mqtt://u@h"), None);
        assert_eq!(r("mqtt://h:x"), None);
    }

    #[test]
    fn defaults_and_refusals() {
        let b = bridge("mqtt://h");
        assert_eq!(b.protocol, BridgeProtocol::V5);
        assert_eq!(b.client_id(), "sandpiper-bridge-b");
        assert!(!b.clean_start && b.retain && b.try_private);
        assert_eq!(b.topics[0].max_qos(), QoS::ExactlyOnce);
        assert!(b.validate().is_ok());
        let refused = |f: &dyn Fn(&mut BridgeConfig)| {
            let mut b = bridge("mqtt://h");
            f(&mut b);
            b.validate().is_err()
        };
        assert!(refused(&|b| b.name = "a b".into()));
        assert!(refused(&|b| b.topics.clear()));
        assert!(refused(&|b| b.topics[0].qos = 3));
        assert!(refused(&|b| b.topics[0].filter = "a/#/b".into()));
        assert!(refused(&|b| b.topics[0].local_prefix = "x/+/".into()));
        assert!(refused(&|b| b.topics[0].filter = "".into()));
        assert!(refused(&|b| b.topics[0].filter = "$share/g/a".into()));
        assert!(refused(&|b| {
            b.password = Some("x".into());
            b.password_file = Some("p".into());
        }));
        assert!(refused(&|b| b.cert = Some("c".into())));
        assert!(refused(&|b| b.reconnect_max_ms = 10));
    }
}
