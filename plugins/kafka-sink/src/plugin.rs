//! The component's side: the hooks exported to the broker, the host's config, log and
//! metrics. Built for wasm32 only (natively the crate is a library for tests).

use std::sync::{Mutex, OnceLock};

use sandpiper_plugin::prelude::*;
use sandpiper_plugin::sink::{SinkRecord, WriteResult};
use sandpiper_plugin::{log, metrics};

use crate::config::Config;
use crate::kafka::{self, Producer};
use crate::mapping;

/// Connections abandoned after timeouts (see `kafka::abandoned_connections`) before this
/// instance ends itself so that the host frees them.
const MAX_ABANDONED: usize = 8;

fn config() -> &'static Result<Config, String> {
    static CONFIG: OnceLock<Result<Config, String>> = OnceLock::new();
    CONFIG.get_or_init(|| Config::from_toml(&sandpiper_plugin::config::toml()))
}

/// The producer, kept between calls (the instance is long-lived) so that connections
/// and metadata are reused; it reconnects by itself after errors.
static PRODUCER: Mutex<Option<Producer>> = Mutex::new(None);

struct KafkaSink;

impl Init for KafkaSink {
    fn init() -> Result<(), String> {
        config().as_ref().map(|_| ()).map_err(Clone::clone)
    }
}

impl Sink for KafkaSink {
    fn write(batch: Vec<SinkRecord>) -> WriteResult {
        let config = match config() {
            Ok(c) => c,
            Err(e) => return WriteResult::Retry(e.clone()),
        };
        let records: Vec<_> = batch
            .into_iter()
            .map(|r| mapping::outgoing(config, r))
            .collect();
        let mut slot = PRODUCER.lock().unwrap_or_else(|p| p.into_inner());
        let producer = slot.get_or_insert_with(|| Producer::new(config.kafka.clone()));
        let result = producer.produce(&records);
        drop(slot);
        match result {
            Ok(report) => {
                metrics::counter_add("records_produced", count(report.acknowledged));
                for (topic, partition, n, why) in &report.dropped {
                    metrics::counter_add("records_dropped", count(*n));
                    let (p, n) = (partition.to_string(), n.to_string());
                    log::log(
                        log::Level::Warn,
                        "records refused by Kafka dropped (on_rejected = \"drop\")",
                        &[
                            ("topic", topic),
                            ("partition", &p),
                            ("records", &n),
                            ("why", why),
                        ],
                    );
                }
                WriteResult::Ok
            }
            Err(e) => {
                metrics::counter_add("write_retries", 1);
                if kafka::abandoned_connections() >= MAX_ABANDONED {
                    log::error(
                        "too many connections abandoned after timeouts; ending this instance so the broker frees them",
                    );
                    std::process::abort();
                }
                WriteResult::Retry(e.to_string())
            }
        }
    }
}

fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

sandpiper_plugin::export!(KafkaSink with [init, sink]);
