//! `json-enrich`: adds fields to JSON object payloads of published messages (the
//! `transform` hook), configured in the `[config]` table of its sidecar
//! `json-enrich.toml`:
//!
//! ```toml
//! [config]
//! drop_non_json = false          # true: drop messages whose payload is not JSON
//! [config.fields]                # what to add, and under which name; absent: not added
//! received_at = "received_at"    # when the broker received it, Unix time in ms
//! client_id = "client_id"        # the publisher's client id
//! username = "username"          # its user name (null when it has none)
//! ```
//!
//! Added fields replace members of the same name (a publisher cannot forge them). JSON
//! that is not an object passes unchanged, and so does an empty retained message (it
//! clears the topic's retained message). Only the payload changes: the message's
//! properties (payload format, content type, user properties) stay as published.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use sandpiper_plugin::prelude::*;

mod enrich;

use enrich::{Enriched, json_string};

/// The `[config]` table.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    drop_non_json: bool,
    #[serde(default)]
    fields: Fields,
}

/// The name of each field to add; `None`: not added.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Fields {
    received_at: Option<String>,
    client_id: Option<String>,
    username: Option<String>,
}

impl Config {
    fn check(self) -> Result<Config, String> {
        let f = &self.fields;
        let names: Vec<&str> = [&f.received_at, &f.client_id, &f.username]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect();
        if names.iter().any(|n| n.is_empty()) {
            return Err("invalid [config]: a field name is empty".to_owned());
        }
        if let Some(dup) = names
            .iter()
            .enumerate()
            .find_map(|(i, n)| names[..i].contains(n).then_some(n))
        {
            return Err(format!("invalid [config]: field name {dup:?} used twice"));
        }
        Ok(self)
    }

    /// The members to add for `publisher`'s messages received at `now_ms`.
    fn members(&self, publisher: &Client, now_ms: u64) -> Vec<(&str, String)> {
        let f = &self.fields;
        let mut add = Vec::with_capacity(3);
        if let Some(name) = &f.received_at {
            add.push((name.as_str(), now_ms.to_string()));
        }
        if let Some(name) = &f.client_id {
            add.push((name.as_str(), json_string(&publisher.client_id)));
        }
        if let Some(name) = &f.username {
            let value = publisher
                .username
                .as_deref()
                .map_or_else(|| "null".to_owned(), json_string);
            add.push((name.as_str(), value));
        }
        add
    }
}

fn config() -> &'static Result<Config, String> {
    static CONFIG: OnceLock<Result<Config, String>> = OnceLock::new();
    CONFIG.get_or_init(|| {
        sandpiper_plugin::config::<Config>()
            .map_err(|e| e.to_string())
            .and_then(Config::check)
    })
}

fn now_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

struct JsonEnrich;

impl Init for JsonEnrich {
    fn init() -> Result<(), String> {
        config().as_ref().map(|_| ()).map_err(Clone::clone)
    }
}

impl Transform for JsonEnrich {
    /// One receive time for the batch: everything decoded from one read.
    fn transform(publisher: Client, messages: Vec<Message>) -> Vec<Outcome> {
        let Ok(cfg) = config() else {
            return messages.iter().map(|_| Outcome::Keep).collect();
        };
        let add = cfg.members(&publisher, now_ms());
        messages
            .into_iter()
            .map(|mut m| {
                if m.payload.is_empty() && m.retain {
                    return Outcome::Keep;
                }
                match enrich::enrich(&m.payload, &add) {
                    Enriched::Payload(p) => {
                        m.payload = p;
                        Outcome::Replace(m)
                    }
                    Enriched::NotAnObject => Outcome::Keep,
                    Enriched::NotJson if cfg.drop_non_json => Outcome::Drop,
                    Enriched::NotJson => Outcome::Keep,
                }
            })
            .collect()
    }
}

sandpiper_plugin::export!(JsonEnrich with [init, transform]);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn client(username: Option<&str>) -> Client {
        Client {
            client_id: "dev\"1".to_owned(),
            username: username.map(str::to_owned),
            listener: "default".to_owned(),
            attributes: Vec::new(),
        }
    }

    #[test]
    fn only_configured_fields_are_added() {
        let cfg: Config =
            sandpiper_plugin::config::from_str("[fields]\nusername = \"user\"\n").unwrap();
        assert_eq!(
            cfg.members(&client(None), 5),
            vec![("user", "null".to_owned())]
        );
        let cfg = Config::default();
        assert!(cfg.members(&client(Some("a")), 5).is_empty());
    }

    #[test]
    fn the_example_sidecar_adds_all_three() {
        let cfg: Config =
            sandpiper_plugin::config::from_sidecar(include_str!("../json-enrich.example.toml"))
                .unwrap();
        let cfg = cfg.check().unwrap();
        assert!(!cfg.drop_non_json);
        assert_eq!(
            cfg.members(&client(Some("alice")), 1_700_000_000_123),
            vec![
                ("received_at", "1700000000123".to_owned()),
                ("client_id", r#""dev\"1""#.to_owned()),
                ("username", r#""alice""#.to_owned()),
            ]
        );
    }

    #[test]
    fn field_names_are_checked() {
        let bad = |t: &str| {
            sandpiper_plugin::config::from_str::<Config>(t)
                .map_err(|e| e.to_string())
                .and_then(Config::check)
                .err()
                .unwrap()
        };
        assert!(bad("[fields]\nclient_id = \"\"\n").contains("empty"));
        assert!(bad("[fields]\nclient_id = \"x\"\nusername = \"x\"\n").contains("twice"));
        assert!(bad("[fields]\nhost = \"h\"\n").contains("unknown field"));
    }

    #[test]
    fn now_is_unix_milliseconds() {
        assert!(now_ms() > 1_600_000_000_000);
    }
}
