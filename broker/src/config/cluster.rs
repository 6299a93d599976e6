//! `[cluster]`: this node's name and the NATS servers through which the nodes of one
//! cluster route messages to each other (`cluster` module).

use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;

/// `[cluster]`; without it the broker is a single node.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's name, unique in the cluster: letters, digits, `-` and `_`, at most 64.
    pub node: String,
    /// NATS servers (`nats://host:port`, or `host:port`); the client connects to one
    /// (which one: `nats_order`) and learns the others from it.
    pub nats: Vec<String>,
    /// Which of `nats` the node connects to: one at random (the default, which spreads
    /// the nodes over the servers), or the first it can reach in the order listed.
    #[serde(default)]
    pub nats_order: NatsOrder,
    /// User name at NATS (with `password`).
    pub user: Option<String>,
    /// Password at NATS.
    pub password: Option<String>,
    /// Token at NATS (instead of a user name and password).
    pub token: Option<String>,
    /// A NATS credentials file (`.creds`: the user's JWT and its NKEY seed, as `nsc` and
    /// the NATS account servers write them), for servers in operator (JWT) mode; read when
    /// the node starts.
    pub creds: Option<PathBuf>,
    /// A file holding an NKEY user seed (`SU...`), for servers whose users are NKEYs
    /// without JWTs; read when the node starts.
    pub nkey: Option<PathBuf>,
    /// PEM CA certificates that sign the NATS servers' certificates. Given (or `cert`),
    /// the connection to NATS must be TLS; without it a `tls://` address is verified
    /// against the system's CAs.
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain this node shows NATS (with `key`), for servers that
    /// verify clients.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// JetStream replicas of the cluster's state kept in NATS (the retained messages'
    /// bucket): 1 to 5, at most the NATS servers with JetStream (default 1).
    #[serde(default = "one")]
    pub replicas: usize,
    /// A node not heard from for this long (milliseconds; default 10000) is taken as
    /// gone: nothing more is routed to it.
    #[serde(default = "default_node_timeout")]
    pub node_timeout_ms: u64,
    /// Most bytes of QoS 1/2 messages JetStream keeps for nodes that have not taken them
    /// yet (stream `sandpiper_messages`; default 1 GiB, at least 1 MiB). When it is full,
    /// QoS 1/2 messages for other nodes wait, then are refused.
    #[serde(default = "default_queue_max_bytes")]
    pub queue_max_bytes: u64,
}

/// `[cluster] nats_order`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NatsOrder {
    /// A server picked at random, another at random when it fails.
    #[default]
    Random,
    /// The first server listed that answers, the next ones in turn when it fails: a node
    /// beside its own NATS server lists that one first, and its messages to the nodes on
    /// that server cross no NATS route. A node that moved stays on its server until that
    /// connection fails; each reconnection tries the list from the top.
    Listed,
}

fn default_queue_max_bytes() -> u64 {
    1 << 30
}

fn one() -> usize {
    1
}

fn default_node_timeout() -> u64 {
    10_000
}

impl ClusterConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |reason: &'static str| {
            Err(ConfigError::Invalid {
                key: "cluster",
                reason,
            })
        };
        if !super::is_name(&self.node) || self.node.len() > 64 {
            return invalid("node: 1 to 64 letters, digits, '-' or '_'");
        }
        if self.nats.is_empty() {
            return invalid("nats: at least one server address");
        }
        for a in &self.nats {
            if a.parse::<async_nats::ServerAddr>().is_err() {
                return invalid("nats: an address is not nats://host:port");
            }
        }
        if self.user.is_some() != self.password.is_some() {
            return invalid("user and password go together");
        }
        let ways = [
            self.user.is_some(),
            self.token.is_some(),
            self.creds.is_some(),
            self.nkey.is_some(),
        ];
        if ways.into_iter().filter(|w| *w).count() > 1 {
            return invalid(
                "one way to authenticate at NATS: user and password, token, creds or nkey",
            );
        }
        if self.cert.is_some() != self.key.is_some() {
            return invalid("cert and key go together");
        }
        if !(1..=5).contains(&self.replicas) {
            return invalid("replicas: 1 to 5");
        }
        // Heartbeats come every second: fewer than three missed is no sign.
        if !(3_000..=3_600_000).contains(&self.node_timeout_ms) {
            return invalid("node_timeout_ms: 3000 to 3600000");
        }
        if self.queue_max_bytes < 1 << 20 || self.queue_max_bytes > i64::MAX as u64 {
            return invalid("queue_max_bytes: at least 1048576");
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::super::Config;

    fn parse(body: &str) -> Result<Config, String> {
        Config::parse(&format!("[cluster]\n{body}")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_cluster_needs_a_node_name_and_servers() {
        let c = parse("node = \"a-1\"\nnats = [\"nats://127.0.0.1:4222\", \"127.0.0.1:4223\"]\n")
            .unwrap();
        let cl = c.cluster.unwrap();
        assert_eq!(cl.node, "a-1");
        assert_eq!(cl.node_timeout_ms, 10_000);
        assert_eq!(cl.nats_order, super::NatsOrder::Random);
        let listed = parse("node = \"a\"\nnats = [\"127.0.0.1:4222\"]\nnats_order = \"listed\"\n");
        assert_eq!(
            listed.unwrap().cluster.unwrap().nats_order,
            super::NatsOrder::Listed
        );
        for bad in [
            "node = \"a\"\nnats = [\"nats://127.0.0.1:4222\"]\nnats_order = \"first\"",
            "node = \"a.b\"\nnats = [\"nats://127.0.0.1:4222\"]",
            "node = \"\"\nnats = [\"nats://127.0.0.1:4222\"]",
            "node = \"a\"\nnats = []",
            "node = \"a\"\nnats = [\"nats://127.0.0.1:4222\"]\nuser = \"u\"",
            "node = \"a\"\nnats = [\"nats://127.0.0.1:4222\"]\nuser = \"u\"\npassword = \"p\"\ntoken = \"t\"",
            "node = \"a\"\nnats = [\"nats://127.0.0.1:4222\"]\ntoken = \"t\"\ncreds = \"u.creds\"",
            "node = \"a\"\nnats = [\"nats://127.0.0.1:4222\"]\ncreds = \"u.creds\"\nnkey = \"u.nk\"",
            "node = \"a\"\nnats = [\"nats://127.0.0.1:4222\"]\nreplicas = 0",
            "node = \"a\"\nnats = [\"nats://127.0.0.1:4222\"]\nreplicas = 6",
            "node = \"a\"\nnats = [\"nats://127.0.0.1:4222\"]\nreplica = 3",
            "node = \"a\"\nnats = [\"nats://127.0.0.1:4222\"]\ncert = \"c.pem\"",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
