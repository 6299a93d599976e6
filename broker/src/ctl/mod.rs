//! `sandpiper ctl`: a command-line client of the admin API (`docs/admin-api.md`). One
//! blocking HTTP/1.1 request per connection over std's `TcpStream` (rustls for `https://`);
//! answers print as aligned tables or `key: value` lines, or with `--json` as the API's JSON.
//! A list follows `next` page after page.
//!
//! The response parser does no I/O: it takes the bytes read so far and says whether a whole
//! answer is there (`Ok(None)` for too few), as `codec` does with packets. Nothing the
//! server sends is trusted: sizes are capped before bytes are kept, and text is printed with
//! control characters escaped.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

mod http;
mod render;

use http::*;
use render::*;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{self, ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// Connect, read and write timeout.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer body taken.
const MAX_BODY: usize = 64 << 20;
/// Largest answer header, chunk size line or trailer section taken.
const MAX_HEAD: usize = 64 << 10;
/// Rows a list collects at most without `--limit`.
const MAX_ROWS: usize = 100_000;
/// A missing field.
static NULL: Value = Value::Null;

/// `sandpiper ctl`: the admin API from the command line.
#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// The broker's `[http]` listener [default: $SANDPIPER_URL, else http://127.0.0.1:8083].
    #[arg(long, global = true)]
    pub url: Option<String>,
    /// Admin API token [default: $SANDPIPER_TOKEN, which keeps it out of the process list].
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// PEM CA certificates that verify the broker's certificate (for an https URL).
    #[arg(long, global = true, value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// Print the API's JSON (pretty-printed) instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to ask.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// A request to the admin API.
#[derive(Debug, clap::Subcommand)]
pub enum CtlCommand {
    /// Connected clients.
    #[command(subcommand)]
    Clients(ClientsCommand),
    /// Sessions, online and offline.
    #[command(subcommand)]
    Sessions(SessionsCommand),
    /// Subscriptions.
    #[command(subcommand)]
    Subs(SubsCommand),
    /// Retained messages.
    #[command(subcommand)]
    Retained(RetainedCommand),
    /// Publishes a message as the broker (through the pipeline any message takes).
    Publish {
        /// The topic name.
        topic: String,
        /// The payload, as text.
        payload: String,
        /// QoS 0, 1 or 2.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
        qos: u8,
        /// Keep it as the topic's retained message.
        #[arg(long)]
        retain: bool,
    },
    /// Plugins: state and calls; reload, disable, enable.
    #[command(subcommand)]
    Plugins(PluginsCommand),
    /// Bridges to other brokers: state and counters.
    Bridges,
    /// Version, uptime, connections and message totals.
    Overview,
}

/// `ctl clients`.
#[derive(Debug, clap::Subcommand)]
pub enum ClientsCommand {
    /// Lists connected clients.
    List {
        /// Only client ids that start with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Only clients of this user.
        #[arg(long)]
        user: Option<String>,
        /// Only clients of this listener.
        #[arg(long)]
        listener: Option<String>,
        /// Only clients of this protocol version.
        #[arg(long, value_parser = ["3.1", "3.1.1", "5"])]
        protocol: Option<String>,
        /// At most this many rows [default: all, up to 100000].
        #[arg(long)]
        limit: Option<NonZeroU32>,
    },
    /// Shows a connected client and its subscriptions.
    Show {
        /// The client id.
        id: String,
    },
    /// Disconnects a client (its session stays as its expiry says).
    Kick {
        /// The client id.
        id: String,
    },
}

/// `ctl sessions`.
#[derive(Debug, clap::Subcommand)]
pub enum SessionsCommand {
    /// Lists sessions.
    List {
        /// Only client ids that start with this.
        #[arg(long)]
        prefix: Option<String>,
        /// At most this many rows [default: all, up to 100000].
        #[arg(long)]
        limit: Option<NonZeroU32>,
    },
    /// Discards a session: disconnects its client, drops its subscriptions and queue.
    Rm {
        /// The client id.
        id: String,
    },
}

/// `ctl subs`.
#[derive(Debug, clap::Subcommand)]
pub enum SubsCommand {
    /// Lists subscriptions.
    List {
        /// Only this client id.
        #[arg(long)]
        client: Option<String>,
        /// Only this filter, as subscribed (with any `$share/GROUP/`).
        #[arg(long)]
        filter: Option<String>,
        /// At most this many rows [default: all, up to 100000].
        #[arg(long)]
        limit: Option<NonZeroU32>,
    },
}

/// `ctl retained`.
#[derive(Debug, clap::Subcommand)]
pub enum RetainedCommand {
    /// Lists retained messages.
    List {
        /// Only topics that match this filter [default: #].
        #[arg(long)]
        filter: Option<String>,
        /// At most this many rows [default: all, up to 100000].
        #[arg(long)]
        limit: Option<NonZeroU32>,
    },
    /// Shows a topic's retained message with its properties.
    Get {
        /// The topic name.
        topic: String,
    },
    /// Clears a topic's retained message.
    Rm {
        /// The topic name.
        topic: String,
    },
}

/// `ctl plugins`.
#[derive(Debug, clap::Subcommand)]
pub enum PluginsCommand {
    /// Lists plugins.
    List,
    /// Loads a plugin's file again now.
    Reload {
        /// The plugin's name (its file name without `.wasm`).
        name: String,
    },
    /// Unloads a plugin and keeps it unloaded, across restarts, until `enable`.
    Disable {
        /// The plugin's name.
        name: String,
    },
    /// Loads a disabled plugin again.
    Enable {
        /// The plugin's name.
        name: String,
    },
}

/// Why a command failed; each cause has its exit code.
#[derive(Debug)]
enum Failure {
    /// The broker could not be reached, or the connection broke (exit 2).
    Connect(String),
    /// An error answer: its status and message (exit 1).
    Status(u16, String),
    /// A bad argument, a local file, or an answer the API does not give (exit 1).
    Other(String),
}

/// Runs `sandpiper ctl`: the answer on standard output or the failure on standard error.
/// Exit code 0; 1 for an error answer or anything else that fails; 2 when the broker
/// cannot be reached.
pub fn run(args: CtlArgs) -> ExitCode {
    let result = Api::new(args.url, args.token, args.cacert.as_deref())
        .and_then(|api| execute(&api, args.command, args.json));
    let (code, message): (u8, String) = match result {
        Ok(text) => {
            let mut out = std::io::stdout().lock();
            // A closed pipe (`| head`) is no failure of ours.
            let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
            return ExitCode::SUCCESS;
        }
        Err(Failure::Connect(e)) => (2, e),
        Err(Failure::Status(status, e)) => (1, format!("{status} {e}")),
        Err(Failure::Other(e)) => (1, e),
    };
    eprintln!("sandpiper ctl: {message}");
    ExitCode::from(code)
}

/// How an answer prints without `--json`.
enum Human {
    /// A table of the list under the key, one column per field named.
    Table(&'static str, &'static str),
    /// `key: value` lines, these keys first.
    Fields(&'static [&'static str]),
    /// One line saying what changed.
    Done(String),
}

const CLIENT_COLUMNS: &str = "client_id user listener peer protocol keep_alive queued";
const SESSION_COLUMNS: &str = "client_id online expiry subscriptions queued";
const SUB_COLUMNS: &str = "client_id filter qos no_local retain_as_published retain_handling id";
const RETAINED_COLUMNS: &str = "topic qos size payload";
const PLUGIN_COLUMNS: &str = "name state hooks priority calls failures last_error";
const BRIDGE_COLUMNS: &str = "name address connected queued sent received dropped reconnects";
const CLIENT_ORDER: &[&str] = &["client_id", "user", "listener", "peer", "protocol"];
const RETAINED_ORDER: &[&str] = &["topic", "qos", "size", "payload"];
const OVERVIEW_ORDER: &[&str] = &["version", "contract", "uptime_seconds", "connections"];

/// One command: its requests, and the text to print.
fn execute(api: &Api, command: CtlCommand, json: bool) -> Result<String, Failure> {
    use Human::{Done, Fields, Table};
    let one = |kind: &str, id: &str| format!("/{kind}/{}", encode(id, false));
    let topic_path = |topic: &str| format!("/retained/{}", encode(topic, true));
    let (answer, human) = match command {
        CtlCommand::Clients(ClientsCommand::List {
            prefix,
            user,
            listener,
            protocol,
            limit,
        }) => {
            let filters = [
                ("prefix", prefix),
                ("user", user),
                ("listener", listener),
                ("protocol", protocol),
            ];
            (
                list(api, "clients", &filters, limit)?,
                Table("clients", CLIENT_COLUMNS),
            )
        }
        CtlCommand::Clients(ClientsCommand::Show { id }) => (
            api.call("GET", &one("clients", &id), None)?,
            Fields(CLIENT_ORDER),
        ),
        CtlCommand::Clients(ClientsCommand::Kick { id }) => {
            let answer = api.call("DELETE", &one("clients", &id), None)?;
            (answer, Done(format!("kicked {id}")))
        }
        CtlCommand::Sessions(SessionsCommand::List { prefix, limit }) => {
            let answer = list(api, "sessions", &[("prefix", prefix)], limit)?;
            (answer, Table("sessions", SESSION_COLUMNS))
        }
        CtlCommand::Sessions(SessionsCommand::Rm { id }) => {
            let answer = api.call("DELETE", &one("sessions", &id), None)?;
            (answer, Done(format!("removed {id}")))
        }
        CtlCommand::Subs(SubsCommand::List {
            client,
            filter,
            limit,
        }) => {
            let filters = [("client", client), ("filter", filter)];
            let answer = list(api, "subscriptions", &filters, limit)?;
            (answer, Table("subscriptions", SUB_COLUMNS))
        }
        CtlCommand::Retained(RetainedCommand::List { filter, limit }) => {
            let answer = list(api, "retained", &[("filter", filter)], limit)?;
            (answer, Table("retained", RETAINED_COLUMNS))
        }
        CtlCommand::Retained(RetainedCommand::Get { topic }) => (
            api.call("GET", &topic_path(&topic), None)?,
            Fields(RETAINED_ORDER),
        ),
        CtlCommand::Retained(RetainedCommand::Rm { topic }) => {
            let answer = api.call("DELETE", &topic_path(&topic), None)?;
            (answer, Done(format!("cleared {topic}")))
        }
        CtlCommand::Publish {
            topic,
            payload,
            qos,
            retain,
        } => {
            let body = json!({"topic": topic, "payload": payload, "qos": qos, "retain": retain});
            let answer = api.call("POST", "/publish", Some(&body))?;
            (answer, Done(format!("published {topic}")))
        }
        CtlCommand::Plugins(PluginsCommand::List) => (
            api.call("GET", "/plugins", None)?,
            Table("plugins", PLUGIN_COLUMNS),
        ),
        CtlCommand::Plugins(PluginsCommand::Reload { name }) => {
            plugin(api, "reload", "reloaded", &name)?
        }
        CtlCommand::Plugins(PluginsCommand::Disable { name }) => {
            plugin(api, "disable", "disabled", &name)?
        }
        CtlCommand::Plugins(PluginsCommand::Enable { name }) => {
            plugin(api, "enable", "enabled", &name)?
        }
        CtlCommand::Bridges => (
            api.call("GET", "/bridges", None)?,
            Table("bridges", BRIDGE_COLUMNS),
        ),
        CtlCommand::Overview => (api.call("GET", "/overview", None)?, Fields(OVERVIEW_ORDER)),
    };
    Ok(match human {
        _ if json => {
            let text = serde_json::to_string_pretty(&answer).unwrap_or_else(|_| answer.to_string());
            format!("{text}\n")
        }
        Table(key, columns) => {
            let rows = answer.get(key).and_then(Value::as_array);
            table(columns, rows.map(Vec::as_slice).unwrap_or_default())
        }
        Fields(order) => fields(&answer, order),
        Done(line) => format!("{}\n", clean(&line)),
    })
}

/// `plugins reload|disable|enable NAME`: the answer is the plugin's object.
fn plugin(api: &Api, verb: &str, done: &str, name: &str) -> Result<(Value, Human), Failure> {
    let answer = api.call(
        "POST",
        &format!("/plugins/{}/{verb}", encode(name, false)),
        None,
    )?;
    let state = text("state", answer.get("state").unwrap_or(&NULL));
    let mut line = format!("{done} {name}");
    if state != done {
        line += &format!(" ({state})");
    }
    if let Some(e) = answer.get("last_error").and_then(Value::as_str) {
        line += &format!(": {e}");
    }
    Ok((answer, Human::Done(line)))
}

/// Fetches the list `/{key}` page after page (`limit` rows at most), as one answer of the
/// API's shape: `next` is where it stopped, `null` when nothing is left.
fn list(
    api: &Api,
    key: &str,
    filters: &[(&str, Option<String>)],
    limit: Option<NonZeroU32>,
) -> Result<Value, Failure> {
    let want = limit.map_or(MAX_ROWS, |n| usize::try_from(n.get()).unwrap_or(usize::MAX));
    let (mut rows, mut after) = (Vec::new(), None::<String>);
    loop {
        let mut pairs: Vec<(&str, String)> = filters
            .iter()
            .filter_map(|(k, v)| Some((*k, v.clone()?)))
            .collect();
        pairs.push((
            "limit",
            want.saturating_sub(rows.len()).min(1000).to_string(),
        ));
        pairs.extend(after.clone().map(|a| ("after", a)));
        let (batch, next) = page(
            api.call("GET", &format!("/{key}{}", query(&pairs)), None)?,
            key,
        )?;
        let got = batch.len();
        rows.extend(batch);
        rows.truncate(want);
        let next = match next {
            // An empty page or a key given twice ends the walk: a broken server cannot hold it.
            Some(n) if rows.len() < want && got > 0 && after.as_ref() != Some(&n) => {
                after = Some(n);
                continue;
            }
            Some(n) => {
                if limit.is_none() && rows.len() >= want {
                    eprintln!("sandpiper ctl: stopped at {MAX_ROWS} rows (more follow)");
                }
                Value::String(n)
            }
            None => Value::Null,
        };
        let mut answer = serde_json::Map::new();
        answer.insert(key.to_owned(), Value::Array(rows));
        answer.insert("next".to_owned(), next);
        return Ok(Value::Object(answer));
    }
}

/// A page's rows (under `key`) and its `next`.
fn page(answer: Value, key: &str) -> Result<(Vec<Value>, Option<String>), Failure> {
    let Value::Object(mut map) = answer else {
        return Err(Failure::Other(
            "the broker's answer is not an object".to_owned(),
        ));
    };
    let Some(Value::Array(rows)) = map.remove(key) else {
        return Err(Failure::Other(format!(
            "the broker's answer has no `{key}` list"
        )));
    };
    match map.remove("next") {
        None | Some(Value::Null) => Ok((rows, None)),
        Some(Value::String(next)) => Ok((rows, Some(next))),
        Some(_) => Err(Failure::Other("the broker's `next` is not text".to_owned())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]

    use super::*;

    #[test]
    fn pages() {
        let answer = json!({"clients": [{"client_id": "a"}], "next": "a"});
        let (rows, next) = page(answer, "clients").unwrap();
        assert_eq!((rows.len(), next.as_deref()), (1, Some("a")));
        assert!(page(json!({"clients": [], "next": 3}), "clients").is_err());
        assert!(page(json!({"sessions": []}), "clients").is_err());
    }
}
