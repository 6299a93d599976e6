//! `webhook`: POSTs each batch of the messages matching the sidecar's `topics` to a URL
//! as one JSON document (see [`body`] for its shape), over `wasi:http`.
//!
//! A `2xx` answer hands the batch over. Anything else (another status, a refused or
//! dropped connection, a timeout, a request the broker refused because the URL's
//! `host:port` is not in the sidecar's `network` list) answers `retry` with the reason,
//! and the broker offers the same batch again after its back-off: delivery is at least
//! once, in order, and a batch whose answer was lost is posted again.
//!
//! Settings (`[config]`, only `url` required):
//!
//! ```toml
//! [config]
//! url = "https://hooks.example.com/mqtt"   # http:// or https://
//! timeout_ms = 5000                        # connect, first byte of the answer, between bytes
//! [config.headers]
//! Authorization = "Bearer change-me"
//! ```
//!
//! Layout: [`config`] checks the settings, [`body`] builds the document, `http` sends
//! it; only this file talks to the broker (SDK). Counters: `posted` (records handed
//! over), `failed` (requests that did not get a 2xx).

#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

use std::sync::OnceLock;

use sandpiper_plugin::metrics;
use sandpiper_plugin::prelude::*;
use sandpiper_plugin::sink::{SinkRecord, WriteResult};

pub mod body;
pub mod config;
mod http;

#[cfg(test)]
mod tests;

use crate::config::{Config, Target};

/// The plugin.
pub struct Webhook;

/// The checked settings.
struct Settings {
    /// The URL without its query, for messages.
    url: String,
    target: Target,
    headers: Vec<(String, String)>,
    timeout_ms: u32,
}

/// The sidecar's `[config]`, parsed and checked once per instance.
fn settings() -> &'static Result<Settings, String> {
    static SETTINGS: OnceLock<Result<Settings, String>> = OnceLock::new();
    SETTINGS.get_or_init(|| {
        let c: Config = sandpiper_plugin::config().map_err(|e| e.to_string())?;
        let (target, headers) = c.check().map_err(|e| format!("invalid [config]: {e}"))?;
        // For log lines: without the query, which may carry a token.
        let scheme = match target.scheme {
            config::Scheme::Http => "http",
            config::Scheme::Https => "https",
        };
        let path = target.path_with_query.split('?').next().unwrap_or("/");
        Ok(Settings {
            url: format!("{scheme}://{}{path}", target.authority),
            target,
            headers,
            timeout_ms: c.timeout_ms,
        })
    })
}

impl sandpiper_plugin::Init for Webhook {
    /// Settings that do not parse or check refuse this version (the previous one keeps
    /// serving) instead of retrying every batch forever.
    fn init() -> Result<(), String> {
        settings().as_ref().map(|_| ()).map_err(Clone::clone)
    }
}

impl Sink for Webhook {
    fn write(batch: Vec<SinkRecord>) -> WriteResult {
        let s = match settings() {
            Ok(s) => s,
            Err(e) => return WriteResult::Retry(e.clone()),
        };
        let result = body::document(&batch)
            .and_then(|doc| http::post(&s.target, &s.headers, s.timeout_ms, &doc));
        match result {
            Ok(status) if (200..300).contains(&status) => {
                metrics::counter_add("posted", batch.len() as u64);
                WriteResult::Ok
            }
            Ok(status) => {
                metrics::counter_add("failed", 1);
                WriteResult::Retry(format!("POST {}: HTTP status {status}", s.url))
            }
            Err(why) => {
                metrics::counter_add("failed", 1);
                WriteResult::Retry(format!("POST {}: {why}", s.url))
            }
        }
    }
}

sandpiper_plugin::export!(Webhook with [init, sink]);
