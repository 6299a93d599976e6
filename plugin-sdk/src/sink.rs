//! Receiving copies of messages in batches, off the hot path, at least once (WIT
//! interface `sink`).

use crate::bindings::sink::Guest;
pub use crate::bindings::sink::{SinkRecord, WriteResult};

/// Called with batches of the messages matching the plugin's `topics` filters, oldest
/// first. The broker queues them durably and calls again with the same batch after
/// [`WriteResult::Retry`], so handling must tolerate repeats.
///
/// Exported by `export!(P with [sink])`.
pub trait Sink {
    /// Handles a batch. Default: `write_one` for each record, stopping at the first
    /// error, which asks for the whole batch again.
    fn write(batch: Vec<SinkRecord>) -> WriteResult {
        for record in batch {
            if let Err(why) = Self::write_one(record) {
                return WriteResult::Retry(why);
            }
        }
        WriteResult::Ok
    }

    /// Handles one record; an error says why (logged by the broker). Default: `Ok`.
    fn write_one(record: SinkRecord) -> Result<(), String> {
        let _ = record;
        Ok(())
    }
}

impl<T: Sink> Guest for T {
    fn write(batch: Vec<SinkRecord>) -> WriteResult {
        <T as Sink>::write(batch)
    }
}
