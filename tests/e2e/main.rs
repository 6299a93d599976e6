//! End-to-end tests: the real `sandpiper` binary, started per test on `127.0.0.1:0`,
//! driven by rumqttc's MQTT 3.1.1 and MQTT 5 clients (and raw bytes where rumqttc
//! cannot produce the packet under test).
//!
//! Every test starts its own broker, so tests are independent and run in parallel.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests report failures by panicking"
)]

mod harness;

mod admin;
mod basic;
mod cli;
mod durability;
mod hostile;
mod identity;
mod limits;
mod load;
mod observability;
mod passwords;
mod plugin_c;
mod plugin_hooks;
mod plugin_jwt;
mod plugin_languages;
mod plugin_sink;
mod plugin_transforms;
mod plugins;
mod qos;
mod retained;
mod sessions;
mod shared;
mod shutdown;
mod sink_kafka;
mod sink_postgres;
mod sink_webhook;
mod transports;
mod v5;
mod will;
