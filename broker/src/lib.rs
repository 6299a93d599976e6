//! Sandpiper: an MQTT 3.1, 3.1.1 and 5.0 broker whose policy and integrations are
//! WebAssembly components.
//!
//! Data flows one way: `listener` accepts sockets, `transport` wraps them (TLS, WebSocket)
//! and hands each to a `connection` task,
//! which decodes packets with `codec`, keeps the client's `session` state and publishes
//! through the `router`, which queues deliveries in each subscriber's `mailbox`.

pub mod bridge;
pub mod broker;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod connection;
pub mod ctl;
pub(crate) mod http;
pub mod listener;
pub mod mailbox;
pub mod message;
pub(crate) mod metrics;
pub(crate) mod notify;
pub mod passwd;
pub(crate) mod pipeline;
pub mod plugins;
pub mod reload;
pub mod router;
pub mod server;
pub(crate) mod session;
pub mod store;
pub(crate) mod sys;
pub mod transport;

/// Makes `/metrics` report the log lines the binary's writer dropped (its standard error
/// was not read fast enough).
pub fn count_dropped_log_lines(counter: tracing_appender::non_blocking::ErrorCounter) {
    metrics::set_log_drops(counter);
}
