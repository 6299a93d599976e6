//! `[[listener]]`: where clients connect, with what transport and which rules.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;
use crate::codec::ProtocolVersion;

/// One listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Name used in logs; defaults to `listener-N`.
    pub name: Option<String>,
    /// Transport: `tcp` (default), `tls`, `ws` or `wss`.
    #[serde(default)]
    pub kind: ListenerKind,
    /// Address and port to bind; port 0 picks a free port (logged at start).
    pub bind: SocketAddr,
    /// Whether clients may connect without being authenticated. Defaults to true only when
    /// `bind` is a loopback address: a broker reachable from the network is closed unless
    /// the operator opens it.
    pub allow_anonymous: Option<bool>,
    /// PEM certificate chain (server certificate first); `tls` and `wss` only, required there.
    /// A relative path is relative to the configuration file's folder.
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `cert`.
    pub key: Option<PathBuf>,
    /// PEM certificates of the CAs that sign client certificates: turns on mutual TLS.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: whether a client must present a certificate (default true). With
    /// false a client without one is served as any other client; a presented certificate
    /// must still verify.
    pub require_client_cert: Option<bool>,
    /// With `client_ca`: the Common Name of a verified client certificate becomes the
    /// client's user name, and such a client counts as authenticated (it is let in even
    /// where anonymous clients are not).
    #[serde(default)]
    pub username_from_cert: bool,
    /// HTTP path of the WebSocket endpoint (`ws` and `wss`); default `/mqtt`.
    pub path: Option<String>,
    /// Browser origins (`scheme://host[:port]`, or `"*"` for any) whose pages may connect
    /// to a `ws` / `wss` listener; requests without an `Origin` header (not from a
    /// browser) are not affected. Default: none where anonymous clients are allowed (a
    /// page in a local browser must not reach a loopback broker), any elsewhere.
    pub allowed_origins: Option<Vec<String>>,
    /// Most connections open at once on this listener; 0 = only the global
    /// `[mqtt] max_connections` applies.
    #[serde(default)]
    pub max_connections: usize,
    /// Most new connections per second from one source IP address. Default: no limit on a
    /// loopback `bind`, 100 otherwise. 0 = no limit.
    pub max_connection_rate: Option<u32>,
    /// MQTT versions accepted on this listener (`"3.1"`, `"3.1.1"`, `"5"`); default all.
    pub protocols: Option<Vec<Protocol>>,
}

/// Transport of a listener.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKind {
    /// MQTT over plain TCP.
    #[default]
    Tcp,
    /// MQTT over TLS (rustls, TLS 1.2 and 1.3).
    Tls,
    /// MQTT over WebSocket (subprotocol `mqtt`).
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss,
}

impl ListenerKind {
    /// Whether the transport is encrypted.
    pub fn is_tls(self) -> bool {
        matches!(self, ListenerKind::Tls | ListenerKind::Wss)
    }

    /// Whether the transport is WebSocket.
    pub fn is_ws(self) -> bool {
        matches!(self, ListenerKind::Ws | ListenerKind::Wss)
    }
}

/// An MQTT protocol version as named in `protocols`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    /// MQTT 3.1 (protocol level 3).
    #[serde(rename = "3.1")]
    V3_1,
    /// MQTT 3.1.1 (protocol level 4).
    #[serde(rename = "3.1.1")]
    V3_1_1,
    /// MQTT 5.0 (protocol level 5).
    #[serde(rename = "5", alias = "5.0")]
    V5,
}

impl Protocol {
    /// The codec's version.
    pub fn version(self) -> ProtocolVersion {
        match self {
            Protocol::V3_1 => ProtocolVersion::V3_1,
            Protocol::V3_1_1 => ProtocolVersion::V3_1_1,
            Protocol::V5 => ProtocolVersion::V5,
        }
    }
}

/// Connections per second per source IP allowed by default on a non-loopback listener.
pub const DEFAULT_CONNECTION_RATE: u32 = 100;

impl ListenerConfig {
    /// The effective anonymous policy of this listener.
    pub fn anonymous_allowed(&self) -> bool {
        self.allow_anonymous.unwrap_or(self.bind.ip().is_loopback())
    }

    /// The effective per-source-IP connection rate (per second); 0 = unlimited.
    pub fn connection_rate(&self) -> u32 {
        self.max_connection_rate
            .unwrap_or(if self.bind.ip().is_loopback() {
                0
            } else {
                DEFAULT_CONNECTION_RATE
            })
    }

    /// The WebSocket path.
    pub fn ws_path(&self) -> &str {
        self.path.as_deref().unwrap_or("/mqtt")
    }

    /// The effective origin policy of a `ws` / `wss` listener.
    pub fn origins(&self) -> crate::transport::ws::Origins {
        use crate::transport::ws::Origins;
        match &self.allowed_origins {
            Some(list) if list.iter().any(|o| o == "*") => Origins::Any,
            Some(list) => Origins::Only(list.clone()),
            None if self.anonymous_allowed() => Origins::Only(Vec::new()),
            None => Origins::Any,
        }
    }

    /// The protocol versions accepted.
    pub fn versions(&self) -> Vec<ProtocolVersion> {
        match &self.protocols {
            Some(p) => p.iter().map(|p| p.version()).collect(),
            None => vec![
                ProtocolVersion::V3_1,
                ProtocolVersion::V3_1_1,
                ProtocolVersion::V5,
            ],
        }
    }

    pub(super) fn validate(&self, i: usize) -> Result<(), ConfigError> {
        let invalid = |reason: String| {
            Err(ConfigError::Listener {
                listener: self.name.clone().unwrap_or_else(|| format!("listener-{i}")),
                reason,
            })
        };
        if self.kind.is_tls() {
            if self.cert.is_none() || self.key.is_none() {
                return invalid("a tls or wss listener needs `cert` and `key`".to_owned());
            }
        } else {
            for (key, set) in [
                ("cert", self.cert.is_some()),
                ("key", self.key.is_some()),
                ("client_ca", self.client_ca.is_some()),
            ] {
                if set {
                    return invalid(format!("`{key}` is only for tls and wss listeners"));
                }
            }
        }
        if self.client_ca.is_none()
            && (self.require_client_cert.is_some() || self.username_from_cert)
        {
            return invalid(
                "`require_client_cert` and `username_from_cert` need `client_ca`".to_owned(),
            );
        }
        match &self.path {
            Some(_) if !self.kind.is_ws() => {
                return invalid("`path` is only for ws and wss listeners".to_owned());
            }
            Some(p) if !p.starts_with('/') => {
                return invalid("`path` must start with /".to_owned());
            }
            _ => {}
        }
        if let Some(origins) = &self.allowed_origins {
            if !self.kind.is_ws() {
                return invalid("`allowed_origins` is only for ws and wss listeners".to_owned());
            }
            if let Some(bad) = origins
                .iter()
                .find(|o| *o != "*" && !(o.starts_with("http://") || o.starts_with("https://")))
            {
                return invalid(format!(
                    "`allowed_origins`: {bad:?} is not \"*\" or an origin such as \"https://app.example.com\""
                ));
            }
        }
        if self.protocols.as_ref().is_some_and(|p| p.is_empty()) {
            return invalid("`protocols` must name at least one version".to_owned());
        }
        Ok(())
    }
}

pub(super) fn default_listeners() -> Vec<ListenerConfig> {
    vec![ListenerConfig {
        name: Some("default".to_owned()),
        kind: ListenerKind::Tcp,
        bind: SocketAddr::from(([127, 0, 0, 1], 1883)),
        allow_anonymous: None,
        cert: None,
        key: None,
        client_ca: None,
        require_client_cert: None,
        username_from_cert: false,
        path: None,
        allowed_origins: None,
        max_connections: 0,
        max_connection_rate: None,
        protocols: None,
    }]
}
