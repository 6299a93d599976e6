//! `postgres-sink`: inserts the messages matching the sidecar's `topics` into a
//! PostgreSQL table, one row per message:
//!
//! | column | type | from |
//! |---|---|---|
//! | `topic` | text | topic name |
//! | `payload` | bytea | payload |
//! | `qos` | smallint | QoS 0, 1, 2 |
//! | `client_id` | text | publisher (NULL for messages published by plugins) |
//! | `received_at` | timestamptz | when the broker received it |
//! | `user_properties` | jsonb | MQTT 5 user properties, `{"name": "value"}`; a repeated name maps to an array of its values |
//!
//! Each batch the broker hands over goes in as one binary `COPY ... FROM STDIN` when the
//! table's six columns have exactly the types above (as `create_table` makes them; looked
//! up once per connection and again after a COPY fails), else as one multi-row INSERT
//! (binary parameters, extended query protocol), whose parameters the server casts to
//! columns of other types; either way in one transaction: all rows or none. Any
//! failure answers `retry`, and the broker calls again later with the same batch, so
//! delivery is at least once: a batch whose commit succeeded but whose answer was lost
//! is inserted twice. A batch the table refuses for good (a CHECK constraint, a unique
//! index) is retried until that is fixed, unless `on_rejected = "drop"`.
//!
//! The connection is opened on the first batch over WASI sockets (the sidecar's
//! `network` list must allow the server's address), kept in the instance for the next
//! batches, and reopened after a failure. Every network wait is bounded: a write call
//! lasts at most `connect_timeout_ms + io_timeout_ms` (keep the sidecar's `time_ms`
//! above that). Settings (`[config]`, only `user` required):
//!
//! ```toml
//! [config]
//! host = "127.0.0.1"            # default
//! port = 5432                   # default
//! user = "sandpiper"
//! password = "..."              # SCRAM-SHA-256, md5 or cleartext, as the server asks
//! database = "mqtt"             # default: the user name
//! table = "mqtt_messages"       # default; or "schema.table"; used as written (quoted)
//! create_table = true           # CREATE TABLE IF NOT EXISTS on connect (default false)
//! connect_timeout_ms = 3000     # default
//! io_timeout_ms = 5000          # default
//! on_rejected = "retry"         # default; "drop": a batch refused for its data (a CHECK,
//!                               # a unique index) is inserted row by row without those rows
//! ```
//!
//! Layout: [`wire`] is the PostgreSQL client, [`row`] what a message becomes, [`writer`]
//! the connection and retry logic, [`config`] the settings; only this file talks to the
//! broker (SDK), so the others are tested natively against a real server.

#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

use std::sync::{Mutex, OnceLock};

use sandpiper_plugin::prelude::*;
use sandpiper_plugin::sink::{SinkRecord, WriteResult};
use sandpiper_plugin::{log, metrics};

pub mod config;
pub mod row;
pub mod wire;
pub mod writer;

#[cfg(test)]
mod testdb;
#[cfg(test)]
mod tests;

use crate::config::Config;
use crate::row::Row;
use crate::writer::Writer;

/// The plugin.
pub struct PostgresSink;

/// The sidecar's `[config]`, parsed and checked once per instance.
fn config() -> &'static Result<Config, String> {
    static CONFIG: OnceLock<Result<Config, String>> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let c: Config = sandpiper_plugin::config().map_err(|e| e.to_string())?;
        c.validate().map_err(|e| format!("invalid [config]: {e}"))?;
        Ok(c)
    })
}

/// This instance's writer and its connection, kept across calls (the broker keeps
/// instances alive; one that is replaced takes its connection with it).
static WRITER: Mutex<Option<Writer>> = Mutex::new(None);

impl Init for PostgresSink {
    /// Refuses a configuration that can never work; does not connect (the server may be
    /// down while the broker starts: batches wait in the broker's queue).
    fn init() -> Result<(), String> {
        config().clone().map(|_| ())
    }
}

impl Sink for PostgresSink {
    fn write(batch: Vec<SinkRecord>) -> WriteResult {
        let config = match config() {
            Ok(c) => c,
            Err(e) => return WriteResult::Retry(e.clone()),
        };
        let rows: Vec<Row> = batch.into_iter().map(to_row).collect();
        // A panic while holding the lock cannot happen with panic = "abort"; still,
        // a poisoned lock only means the writer's connection may be mid-request.
        let mut slot = WRITER.lock().unwrap_or_else(|p| p.into_inner());
        let writer = slot.get_or_insert_with(|| Writer::new(config.clone()));
        match writer.write(&rows) {
            Ok(w) => {
                if w.connected {
                    log::log(
                        log::Level::Info,
                        "connected to PostgreSQL",
                        &[
                            ("host", &config.host),
                            ("port", &config.port.to_string()),
                            ("table", &config.table),
                        ],
                    );
                }
                metrics::counter_add("rows_inserted", w.rows);
                if w.dropped > 0 {
                    metrics::counter_add("rows_dropped", w.dropped);
                    log::log(
                        log::Level::Warn,
                        "rows refused by PostgreSQL dropped (on_rejected = \"drop\")",
                        &[
                            ("dropped", &w.dropped.to_string()),
                            ("inserted", &w.rows.to_string()),
                            ("first_error", w.rejected.as_deref().unwrap_or_default()),
                        ],
                    );
                }
                WriteResult::Ok
            }
            Err(e) => {
                metrics::counter_add("write_failures", 1);
                WriteResult::Retry(e.to_string())
            }
        }
    }
}

/// A sink record as a row.
fn to_row(r: SinkRecord) -> Row {
    Row {
        topic: r.message.topic,
        payload: r.message.payload,
        qos: match r.message.qos {
            Qos::AtMostOnce => 0,
            Qos::AtLeastOnce => 1,
            Qos::ExactlyOnce => 2,
        },
        client_id: r.publisher,
        received_at_ms: r.received_at,
        user_properties: r
            .message
            .properties
            .user_properties
            .into_iter()
            .map(|p| (p.name, p.value))
            .collect(),
    }
}

sandpiper_plugin::export!(PostgresSink with [init, sink]);
