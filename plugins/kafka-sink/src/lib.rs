//! `kafka-sink`: a sink plugin that produces the MQTT messages matching its sidecar's
//! `topics` to Kafka, with acks=all, over WASI sockets.
//!
//! ```toml
//! topics = ["sensors/#"]              # what the sink receives
//! time_ms = 10000                     # budget of one write call (above timeout_ms)
//! network = ["127.0.0.1:9092"]        # every Kafka broker address it may connect to
//! [config]
//! bootstrap = "127.0.0.1:9092"        # or a list
//! kafka_topic = "mqtt.{1}"            # template: {topic}, {1}, {2}, ... (see template.rs)
//! key = "topic"                       # or "client_id", "none"
//! ```
//!
//! Each call of the sink hook gets a batch, oldest first, and answers `ok` only once the
//! leader of every partition written has acknowledged with acks=all; anything else is
//! `retry(why)`, and the broker calls again later with the same batch. Delivery is
//! therefore at least once: a batch retried after a partial write repeats records.
//! Records of one partition are sent in batch order, in one Produce request per leader
//! (more when a partition's records exceed `max_batch_bytes`).
//!
//! Layers: [`kafka`] is the Kafka client (no SDK: built and tested natively), [`config`],
//! [`template`] and [`mapping`] are pure, and `plugin.rs` (built for wasm32 only) is the only
//! one that talks to the host (config, log, metrics) and exports the hooks.

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod config;
pub mod kafka;
pub mod mapping;
#[cfg(target_arch = "wasm32")]
mod plugin;
pub mod template;
