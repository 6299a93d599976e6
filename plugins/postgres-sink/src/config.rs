//! The `[config]` table of `postgres-sink.toml`: where PostgreSQL is, who to log in as,
//! which table gets the rows, and how long to wait.

use std::time::Duration;

use serde::Deserialize;

use crate::row;
use crate::wire::Params;

/// The plugin's settings. Only `user` is required.
#[derive(Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Host name or IP address of the server (it, or what it resolves to, must also be
    /// in the sidecar's top-level `network` list).
    #[serde(default = "default_host")]
    pub host: String,
    /// TCP port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Role to log in as.
    pub user: String,
    /// Its password (SCRAM-SHA-256, md5 or cleartext, as the server asks).
    #[serde(default)]
    pub password: Option<String>,
    /// Database; default: the user name, as libpq does.
    #[serde(default)]
    pub database: Option<String>,
    /// Table for the rows, `name` or `schema.name`, used as written (quoted: case
    /// matters).
    #[serde(default = "default_table")]
    pub table: String,
    /// Create the table (`CREATE TABLE IF NOT EXISTS`) on every new connection.
    #[serde(default)]
    pub create_table: bool,
    /// What to do with a batch PostgreSQL refuses for its data (SQLSTATE class 22, data
    /// exception, or 23, integrity constraint violation: a CHECK, a unique index of
    /// your table): retry it (default) or insert it row by row and drop the rows it
    /// refuses.
    #[serde(default)]
    pub on_rejected: OnRejected,
    /// Bound of connecting: TCP connect, startup and authentication together.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Bound of one request (the INSERT, or CREATE TABLE): from sending it to its answer.
    /// A write call takes at most `connect_timeout_ms + io_timeout_ms`.
    #[serde(default = "default_io_timeout_ms")]
    pub io_timeout_ms: u64,
}

impl std::fmt::Debug for Config {
    /// Everything but the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("database", &self.database)
            .field("table", &self.table)
            .field("create_table", &self.create_table)
            .field("on_rejected", &self.on_rejected)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("io_timeout_ms", &self.io_timeout_ms)
            .finish_non_exhaustive()
    }
}

/// `on_rejected`.
#[derive(Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnRejected {
    /// Keep retrying the batch (the sink waits until the table or the data is fixed).
    #[default]
    Retry,
    /// Insert the batch row by row, each in its own transaction, dropping refused rows.
    Drop,
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    5432
}
fn default_table() -> String {
    "mqtt_messages".into()
}
fn default_connect_timeout_ms() -> u64 {
    3000
}
fn default_io_timeout_ms() -> u64 {
    5000
}

/// The longest timeout accepted: a sink call must end within the sidecar's `time_ms`.
const MAX_TIMEOUT_MS: u64 = 600_000;

impl Config {
    /// Checks what serde cannot: a usable table name, non-empty host and user, timeouts
    /// between 1 ms and 10 minutes.
    pub fn validate(&self) -> Result<(), String> {
        if self.host.is_empty() {
            return Err("host is empty".into());
        }
        if self.user.is_empty() {
            return Err("user is empty".into());
        }
        row::check_table(&self.table)?;
        for (name, ms) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("io_timeout_ms", self.io_timeout_ms),
        ] {
            if ms == 0 || ms > MAX_TIMEOUT_MS {
                return Err(format!("{name} = {ms}: between 1 and {MAX_TIMEOUT_MS}"));
            }
        }
        Ok(())
    }

    /// The connection parameters.
    pub fn params(&self) -> Params {
        Params {
            host: self.host.clone(),
            port: self.port,
            user: self.user.clone(),
            password: self.password.clone(),
            database: self.database.clone().unwrap_or_else(|| self.user.clone()),
        }
    }

    /// `connect_timeout_ms`.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// `io_timeout_ms`.
    pub fn io_timeout(&self) -> Duration {
        Duration::from_millis(self.io_timeout_ms)
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

    fn parse(text: &str) -> Result<Config, String> {
        let c: Config = sandpiper_plugin::config::from_str(text).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn defaults_need_only_a_user() {
        let c = parse("user = \"sink\"\n").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 5432));
        assert_eq!(c.table, "mqtt_messages");
        assert!(!c.create_table);
        assert_eq!(c.on_rejected, OnRejected::Retry);
        assert_eq!(
            c.params().database,
            "sink",
            "database defaults to the user name"
        );
        assert_eq!(c.connect_timeout(), Duration::from_secs(3));
        assert_eq!(c.io_timeout(), Duration::from_secs(5));
        assert!(parse("").is_err(), "user is required");
        let c = parse("user = \"u\"\non_rejected = \"drop\"\n").unwrap();
        assert_eq!(c.on_rejected, OnRejected::Drop);
        assert!(parse("user = \"u\"\non_rejected = \"ignore\"\n").is_err());
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(parse("user = \"u\"\ntable = \"a.b.c\"\n").is_err());
        assert!(parse("user = \"u\"\nio_timeout_ms = 0\n").is_err());
        assert!(parse("user = \"u\"\nconnect_timeout_ms = 99999999\n").is_err());
        assert!(parse("user = \"\"\n").is_err());
        assert!(parse("user = \"u\"\nport = 70000\n").is_err());
        assert!(
            parse("user = \"u\"\nhots = \"x\"\n").is_err(),
            "unknown key"
        );
    }

    #[test]
    fn the_password_stays_out_of_debug_output() {
        let c = parse("user = \"u\"\npassword = \"hunter2\"\n").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!format!("{:?}", c.params()).contains("hunter2"));
    }

    #[test]
    fn the_example_sidecar_parses() {
        let c: Config =
            sandpiper_plugin::config::from_sidecar(include_str!("../postgres-sink.example.toml"))
                .unwrap();
        c.validate().unwrap();
        let sidecar: toml_check::Sidecar =
            toml_check::parse(include_str!("../postgres-sink.example.toml"));
        assert!(
            sidecar
                .network
                .iter()
                .any(|a| a == &format!("{}:{}", c.host, c.port)),
            "the example's network list allows its server"
        );
        assert!(!sidecar.topics.is_empty());
    }

    /// The sidecar keys outside `[config]` that the example must get right.
    mod toml_check {
        #[derive(serde::Deserialize)]
        pub struct Sidecar {
            #[serde(default)]
            pub network: Vec<String>,
            #[serde(default)]
            pub topics: Vec<String>,
        }

        pub fn parse(text: &str) -> Sidecar {
            toml::from_str(text).unwrap()
        }
    }
}
