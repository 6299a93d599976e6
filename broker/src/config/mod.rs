//! Configuration: TOML → typed [`Config`], validated once at start. Every key has a default,
//! unknown keys are rejected, so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod bridge;
mod cluster;
mod listener;

pub use bridge::{BridgeConfig, BridgeProtocol, BridgeTopic, Direction, Remote};
pub use cluster::{ClusterConfig, NatsOrder};
pub use listener::DEFAULT_CONNECTION_RATE;
use listener::default_listeners;
pub use listener::{ListenerConfig, ListenerKind, Protocol};

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
    /// Threads that serve connections.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// The plugin host.
    #[serde(default)]
    pub plugins: PluginsConfig,
    /// The HTTP listener (metrics, health).
    #[serde(default)]
    pub http: HttpConfig,
    /// The `$SYS` tree.
    #[serde(default)]
    pub sys: SysConfig,
    /// Bridges to other MQTT brokers (`[[bridge]]`).
    #[serde(default, rename = "bridge")]
    pub bridges: Vec<BridgeConfig>,
    /// This node's place in a cluster (`[cluster]`); none: a single node.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
}

/// `[sys]`: the `$SYS/broker/...` tree.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SysConfig {
    /// Seconds between two publications; 0 turns the tree off. Default 10.
    pub interval: u64,
}

impl Default for SysConfig {
    fn default() -> Self {
        SysConfig { interval: 10 }
    }
}

/// `[http]`: the listener that serves `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to bind; empty turns the listener off. Unset: [`DEFAULT_HTTP`], and a
    /// failure to bind it is logged, not fatal (another broker on the machine may hold
    /// it); an address set here that cannot be bound stops the broker like any listener.
    pub bind: Option<String>,
    /// PEM certificate chain: with `key`, the listener serves HTTPS (the same keys as a
    /// `tls` listener; the files are read again on SIGHUP or when they change).
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// PEM CA certificates: clients must present a certificate it signed (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// Whether `/metrics`, `/healthz` and `/readyz` need a token too (any role).
    pub metrics_auth: bool,
    /// Tokens of the admin API (`[[http.token]]`); none: the API is off.
    pub token: Vec<TokenConfig>,
}

/// One `[[http.token]]`: a bearer token of the admin API, kept as its hash.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Named in the log line of every changing request made with it.
    pub name: String,
    /// The token's PHC string (`sandpiper token new` prints it).
    pub hash: String,
    /// What the token may do.
    #[serde(default)]
    pub role: Role,
}

/// What a token of the admin API may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything.
    #[default]
    Admin,
    /// Reads only (`GET`, `HEAD`).
    Read,
}

/// Where the HTTP listener binds unless `[http] bind` says otherwise.
pub const DEFAULT_HTTP: &str = "127.0.0.1:8083";

impl HttpConfig {
    /// The address to bind, or `None` when the listener is off.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.bind.as_deref().unwrap_or(DEFAULT_HTTP).parse().ok()
    }

    /// Whether the address was set in the configuration (then failing to bind is fatal).
    pub fn explicit(&self) -> bool {
        self.bind.is_some()
    }
}

/// `[plugins]`: where the broker looks for WebAssembly plugins.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Folder watched for `NAME.wasm` (+ sidecar `NAME.toml`); relative to the
    /// configuration file (or the working directory without one). A missing folder holds
    /// no plugins (and is picked up when it appears).
    pub dir: PathBuf,
    /// Whether plugins are loaded at all.
    pub enabled: bool,
    /// Plugins (by name) the broker does not serve without: the listeners open only once
    /// every one is loaded, a broker that cannot load one at start exits naming it, and
    /// removing one's file leaves it loaded (logged) until the file is back.
    pub required: Vec<String>,
    /// Most `authenticate` calls (CONNECTs and enhanced-authentication rounds) running at
    /// once, per core the process may use. A CONNECT beyond waits for one to finish, up
    /// to `connect_timeout`, and is then refused with CONNACK 0x89 (Server busy; MQTT 3.x:
    /// return code 3).
    pub authentications_per_core: usize,
}

impl PluginsConfig {
    /// How many authentications may run at once.
    pub fn max_authentications(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.authentications_per_core.saturating_mul(cores).max(1)
    }
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            dir: PathBuf::from("plugins"),
            enabled: true,
            required: Vec::new(),
            authentications_per_core: 4,
        }
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
    /// persistent sessions. 4294967295 means never. The default, 7 days, lets a device that
    /// is gone for good cost nothing after a week: a detached session keeps its
    /// subscriptions in memory and its queue on disk until it expires.
    pub max_session_expiry: u32,
    /// Whether retained messages are supported.
    pub retain_available: bool,
    /// Whether clients may connect with an empty client identifier (then one is assigned).
    pub allow_empty_client_id: bool,
    /// Most client connections open at once over all listeners; beyond it a CONNECT is
    /// answered with 0x97 (MQTT 5) or return code 3 (3.x).
    pub max_connections: usize,
    /// Seconds a client has to finish a packet it started; a partial packet older than
    /// this closes the connection. Idle connections are the keep alive's business.
    pub packet_timeout: u64,
    /// Most subscriptions one session may hold; the excess filters of a SUBSCRIBE get
    /// 0x97 quota exceeded (3.x: 0x80).
    pub max_subscriptions: usize,
    /// Longest topic name or filter, in bytes.
    pub max_topic_length: usize,
    /// Most levels (`/`-separated parts) in a topic name or filter.
    pub max_topic_levels: usize,
    /// Most topic filters in one SUBSCRIBE or UNSUBSCRIBE; a packet with more is a
    /// protocol violation of ours: MQTT 5 DISCONNECT 0x97, 3.x closed.
    pub max_filters_per_packet: usize,
    /// Most User Properties in one packet (in one property section); beyond: MQTT 5
    /// DISCONNECT 0x97 (CONNACK 0x97 for a CONNECT).
    pub max_user_properties: usize,
    /// Most bytes of User Property names and values in one packet; beyond, as above.
    pub max_user_property_bytes: usize,
    /// Largest packet accepted before CONNACK (CONNECT, and AUTH during enhanced
    /// authentication), in bytes: an unauthenticated client holds no more than this (nor
    /// more than `max_packet_size`).
    pub max_connect_packet_size: u32,
    /// Most retained messages kept; a retained PUBLISH beyond is refused (MQTT 5: 0x97)
    /// or, from MQTT 3.x, routed without being retained.
    pub max_retained_messages: usize,
    /// Most bytes of retained messages kept (topic, payload and properties).
    pub max_retained_bytes: usize,
    /// What a CONNECT gets for a client id whose session (connected or not) belongs to
    /// another principal (another authenticated user; for anonymous clients, another
    /// listener): `refuse` (CONNACK 0x87, the owner undisturbed), `allow` (taken over,
    /// as MQTT alone says) or `fresh` (a new session; the owner's is ended).
    pub session_principal: PrincipalPolicy,
}

impl MqttConfig {
    /// What the codec accepts from a client after CONNACK.
    pub fn decode_limits(&self) -> crate::codec::DecodeLimits {
        crate::codec::DecodeLimits {
            max_packet_size: self.max_packet_size,
            max_user_properties: self.max_user_properties,
            max_user_property_bytes: self.max_user_property_bytes,
            max_filters: self.max_filters_per_packet,
        }
    }

    /// What the codec accepts from a client before CONNACK.
    pub fn connect_limits(&self) -> crate::codec::DecodeLimits {
        crate::codec::DecodeLimits {
            max_packet_size: self.max_connect_packet_size.min(self.max_packet_size),
            ..self.decode_limits()
        }
    }

    /// `max_topic_length` and `max_topic_levels`.
    pub fn topic_limits(&self) -> TopicLimits {
        TopicLimits {
            max_length: self.max_topic_length,
            max_levels: self.max_topic_levels,
        }
    }
}

/// The bounds of a topic name or filter (`max_topic_length`, `max_topic_levels`), for
/// every topic that enters the broker: published, subscribed, in a will, from a plugin,
/// read back from the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    /// Longest topic, in bytes.
    pub max_length: usize,
    /// Most levels.
    pub max_levels: usize,
}

impl TopicLimits {
    /// Whether `topic` is within both bounds.
    pub fn fits(&self, topic: &str) -> bool {
        topic.len() <= self.max_length
            && topic.bytes().filter(|&b| b == b'/').count() < self.max_levels
    }
}

impl Default for TopicLimits {
    fn default() -> Self {
        MqttConfig::default().topic_limits()
    }
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
            max_session_expiry: 7 * 24 * 3600,
            retain_available: true,
            allow_empty_client_id: true,
            max_connections: 100_000,
            packet_timeout: 30,
            max_subscriptions: 1000,
            max_topic_length: 65535,
            max_topic_levels: 128,
            max_filters_per_packet: 256,
            max_user_properties: 128,
            max_user_property_bytes: 64 * 1024,
            max_connect_packet_size: 128 * 1024,
            max_retained_messages: 100_000,
            max_retained_bytes: 256 * 1024 * 1024,
            session_principal: PrincipalPolicy::Refuse,
        }
    }
}

/// `[runtime]`: the threads that serve connections.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Worker threads serving connections; 0 means one fewer than the cores the process
    /// may run on (its CPU affinity and cgroup quota count), and at least one.
    pub workers: usize,
}

impl RuntimeConfig {
    /// The number of worker threads to start. The default leaves a core to the store's
    /// thread, the plugin threads and the kernel's network processing: on a 2-core machine
    /// shared with a load generator, one worker delivered 1.5-1.7 times the messages two
    /// did (two workers and the other program take turns on the cores).
    pub fn worker_threads(&self) -> usize {
        if self.workers > 0 {
            return self.workers;
        }
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .saturating_sub(1)
            .max(1)
    }
}

/// Logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter such as `info` or `sandpiper=debug`; `RUST_LOG` overrides it.
    pub level: String,
    /// `text` (the default) or `json`: one JSON object per line, the event's fields as
    /// keys (and those of the spans it happened in, such as the client id and peer).
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listeners: default_listeners(),
            mqtt: MqttConfig::default(),
            store: StoreConfig::default(),
            log: LogConfig::default(),
            runtime: RuntimeConfig::default(),
            plugins: PluginsConfig::default(),
            http: HttpConfig::default(),
            sys: SysConfig::default(),
            bridges: Vec::new(),
            cluster: None,
        }
    }
}

/// Whether `s` is a name the configuration gives to something (a bridge, a cluster node):
/// letters, digits, `-` and `_`, at least one.
pub(crate) fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
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
    /// A listener's settings do not fit together.
    #[error("listener {listener}: {reason}")]
    Listener {
        /// The listener's name.
        listener: String,
        /// What is wrong.
        reason: String,
    },
    /// A bridge's settings do not fit together.
    #[error("bridge {bridge}: {reason}")]
    Bridge {
        /// The bridge's name.
        bridge: String,
        /// What is wrong.
        reason: String,
    },
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
        let mut config = Config::parse(&text)?;
        // Every relative path in the file is relative to the file's folder, whatever the
        // working directory: the data folder, the plugins folder and the certificates.
        let dir = std::fs::canonicalize(path)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        let rebase = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        rebase(&mut config.store.data_dir);
        rebase(&mut config.plugins.dir);
        for l in &mut config.listeners {
            for p in [&mut l.cert, &mut l.key, &mut l.client_ca]
                .into_iter()
                .flatten()
            {
                rebase(p);
            }
        }
        for b in &mut config.bridges {
            for p in [&mut b.ca, &mut b.cert, &mut b.key, &mut b.password_file]
                .into_iter()
                .flatten()
            {
                rebase(p);
            }
        }
        if let Some(c) = &mut config.cluster {
            for p in [&mut c.ca, &mut c.cert, &mut c.key].into_iter().flatten() {
                rebase(p);
            }
        }
        let h = &mut config.http;
        for p in [&mut h.cert, &mut h.key, &mut h.client_ca]
            .into_iter()
            .flatten()
        {
            rebase(p);
        }
        Ok(config)
    }

    /// The files and folders this configuration names, made absolute (against the working
    /// directory, for a configuration that did not come from a file), for the start-up log
    /// and `--check-config`: (what, path).
    pub fn paths(&self) -> Vec<(String, PathBuf)> {
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let mut out = vec![
            ("data_dir".to_owned(), abs(&self.store.data_dir)),
            ("plugins.dir".to_owned(), abs(&self.plugins.dir)),
        ];
        for (key, p) in [
            ("cert", &self.http.cert),
            ("key", &self.http.key),
            ("client_ca", &self.http.client_ca),
        ] {
            if let Some(p) = p {
                out.push((format!("http {key}"), abs(p)));
            }
        }
        for l in &self.listeners {
            let name = l.name.as_deref().unwrap_or("listener");
            for (key, p) in [
                ("cert", &l.cert),
                ("key", &l.key),
                ("client_ca", &l.client_ca),
            ] {
                if let Some(p) = p {
                    out.push((format!("listener {name} {key}"), abs(p)));
                }
            }
        }
        if let Some(c) = &self.cluster {
            for (key, p) in [("ca", &c.ca), ("cert", &c.cert), ("key", &c.key)] {
                if let Some(p) = p {
                    out.push((format!("cluster {key}"), abs(p)));
                }
            }
        }
        out
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
        if self.http.cert.is_some() != self.http.key.is_some() {
            return invalid("http.cert", "`cert` and `key` go together (both for HTTPS)");
        }
        if self.http.client_ca.is_some() && self.http.cert.is_none() {
            return invalid("http.client_ca", "needs `cert` and `key` (HTTPS)");
        }
        if self.http.bind.as_deref().is_some_and(|b| !b.is_empty()) && self.http.addr().is_none() {
            return invalid(
                "http.bind",
                "not an address such as 127.0.0.1:8083 (empty turns it off)",
            );
        }
        let mut names = std::collections::HashSet::new();
        for t in &self.http.token {
            if t.name.is_empty() || !names.insert(t.name.as_str()) {
                return invalid("http.token.name", "each token needs a name of its own");
            }
            if crate::passwd::Phc::parse(&t.hash).is_none() {
                return invalid(
                    "http.token.hash",
                    "not a hash printed by `sandpiper token new` ($pbkdf2-sha256$i=N,l=32$SALT$HASH)",
                );
            }
        }
        if self.listeners.is_empty() {
            return invalid("listener", "at least one listener is required");
        }
        for (i, l) in self.listeners.iter().enumerate() {
            l.validate(i)?;
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
        if m.packet_timeout == 0 {
            return invalid("mqtt.packet_timeout", "must be at least 1 second");
        }
        if m.max_connections == 0 {
            return invalid("mqtt.max_connections", "must be at least 1");
        }
        if m.max_topic_length == 0 || m.max_topic_levels == 0 {
            return invalid("mqtt.max_topic_length", "topic limits must be at least 1");
        }
        if !self.plugins.enabled && !self.plugins.required.is_empty() {
            return invalid(
                "plugins.required",
                "names plugins while plugins are disabled (enabled = false)",
            );
        }
        if self.plugins.authentications_per_core == 0 {
            return invalid("plugins.authentications_per_core", "must be at least 1");
        }
        if m.max_filters_per_packet == 0 {
            return invalid("mqtt.max_filters_per_packet", "must be at least 1");
        }
        if m.max_connect_packet_size < 64 {
            return invalid("mqtt.max_connect_packet_size", "must be at least 64");
        }
        if self.runtime.workers > 1024 {
            return invalid("runtime.workers", "must be at most 1024 (0: the default)");
        }
        bridge::validate_all(&self.bridges)?;
        if let Some(c) = &self.cluster {
            c.validate()?;
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
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use crate::codec::ProtocolVersion;

    #[test]
    fn runtime_workers() {
        let d = Config::parse("").unwrap().runtime;
        assert_eq!(d.workers, 0);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(d.worker_threads(), cores.saturating_sub(1).max(1));
        let c = Config::parse("[runtime]\nworkers = 1").unwrap();
        assert_eq!(c.runtime.worker_threads(), 1);
        assert!(Config::parse("[runtime]\nworkers = 5000").is_err());
        assert!(Config::parse("[runtime]\nthreads = 1").is_err());
    }

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
    fn listener_kinds_and_their_keys() {
        let c = Config::parse(
            "[[listener]]\nkind = \"wss\"\nbind = \"0.0.0.0:8084\"\ncert = \"c.pem\"\n\
             key = \"k.pem\"\nprotocols = [\"3.1.1\", \"5\"]\n",
        )
        .unwrap();
        let l = &c.listeners[0];
        assert_eq!(l.kind, ListenerKind::Wss);
        assert_eq!(l.ws_path(), "/mqtt");
        assert_eq!(l.connection_rate(), DEFAULT_CONNECTION_RATE);
        assert_eq!(
            l.versions(),
            vec![ProtocolVersion::V3_1_1, ProtocolVersion::V5]
        );
        for bad in [
            "[[listener]]\nkind = \"tls\"\nbind = \"127.0.0.1:0\"\n",
            "[[listener]]\nbind = \"127.0.0.1:0\"\ncert = \"c.pem\"\n",
            "[[listener]]\nbind = \"127.0.0.1:0\"\npath = \"/mqtt\"\n",
            "[[listener]]\nkind = \"ws\"\nbind = \"127.0.0.1:0\"\npath = \"mqtt\"\n",
            "[[listener]]\nbind = \"127.0.0.1:0\"\nusername_from_cert = true\n",
            "[[listener]]\nbind = \"127.0.0.1:0\"\nprotocols = []\n",
            "[[listener]]\nbind = \"127.0.0.1:0\"\nprotocols = [\"4\"]\n",
            "[[listener]]\nkind = \"quic\"\nbind = \"127.0.0.1:0\"\n",
        ] {
            assert!(Config::parse(bad).is_err(), "accepted: {bad}");
        }
    }

    #[test]
    fn zero_inflight_is_rejected() {
        assert!(Config::parse("[mqtt]\nmax_inflight = 0\n").is_err());
    }
}

/// What a CONNECT gets for a client id whose session belongs to another principal
/// (`[mqtt] session_principal`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrincipalPolicy {
    /// Refused (CONNACK 0x87, 3.x return code 5); the owner is not disturbed.
    #[default]
    Refuse,
    /// Taken over as if it were its own (the owner's connection is closed, its session
    /// resumed): what MQTT alone says.
    Allow,
    /// A fresh session instead: the owner's session is ended (its connection closed).
    Fresh,
}
