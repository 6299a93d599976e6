//! The store seam: what the rest of the broker asks of durable state, in its own types.
//! Each method encodes its record (`record.rs`) and submits one change to the writer; the
//! ticket it returns is durable once [`Store::committed`] has reached it (`None`: nothing
//! to wait for, with `durability = "periodic"` or when the store is closing). Nothing
//! outside this module builds an operation or a record.

use std::num::NonZeroU32;
use std::sync::Arc;

use super::record::{self, QueuedRecord, RecordError, SessionRecord, StoredSubscription};
use super::{Op, QueueKey, Recovered, Store, StoreError};
use crate::codec::{PacketId, SubscriptionOptions, TopicFilter};
use crate::message::{ClientId, ClientKey, Delivery, Message, Stage};

/// An entry read back from a session's queue: its id, and the entry or why it could not
/// be read.
pub type QueueEntry = (u64, Result<QueuedRecord, RecordError>);

impl Store {
    /// Writes the record of persistent session `id`.
    pub fn save_session(&self, id: &ClientId, rec: &SessionRecord) -> Option<u64> {
        match record::encode_session(rec) {
            Ok(bytes) => self.submit_one(Op::PutSession(id.clone(), bytes)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot store a session");
                None
            }
        }
    }

    /// Deletes session `id` of incarnation `key` with its queue, inbound QoS 2 ids and
    /// subscriptions (one transaction).
    pub fn delete_session(&self, id: &ClientId, key: ClientKey) -> Option<u64> {
        self.submit_one(Op::DeleteSession(id.clone(), key))
    }

    /// Writes one subscription of session `key`.
    pub fn save_subscription(
        &self,
        key: ClientKey,
        filter: &TopicFilter,
        options: SubscriptionOptions,
        id: Option<NonZeroU32>,
    ) -> Option<u64> {
        let bytes = record::encode_subscription(options, id);
        self.submit_one(Op::PutSubscription(key, Arc::from(filter.as_str()), bytes))
    }

    /// Deletes one subscription of session `key`.
    pub fn delete_subscription(&self, key: ClientKey, filter: &TopicFilter) -> Option<u64> {
        self.submit_one(Op::DeleteSubscription(key, Arc::from(filter.as_str())))
    }

    /// Writes entry `id` of session `key`'s queue: a delivery waiting (`inflight` `None`)
    /// or in flight with its packet id and stage. `Err` when it cannot be encoded (also
    /// logged): nothing was written.
    pub fn queue_put(
        &self,
        key: ClientKey,
        id: u64,
        d: &Delivery,
        inflight: Option<(PacketId, Stage)>,
    ) -> Result<Option<u64>, RecordError> {
        match record::encode_queued(d, inflight) {
            Ok(bytes) => Ok(self.queue_row_put(QueueKey::Session(key), id, bytes)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot store a queued message");
                Err(e)
            }
        }
    }

    /// Deletes entry `id` of session `key`'s queue (acknowledged or dropped).
    pub fn queue_delete(&self, key: ClientKey, id: u64) -> Option<u64> {
        self.queue_row_delete(QueueKey::Session(key), id)
    }

    /// Records that session `key` received the QoS 2 message `id` (until PUBREL).
    pub fn qos2_received(&self, key: ClientKey, id: PacketId) -> Option<u64> {
        self.submit_one(Op::PutQos2In(key, id.get()))
    }

    /// Forgets the QoS 2 message `id` of session `key` (PUBREL).
    pub fn qos2_released(&self, key: ClientKey, id: PacketId) -> Option<u64> {
        self.submit_one(Op::DeleteQos2In(key, id.get()))
    }

    /// Keeps `msg` as the retained message of its topic.
    pub fn save_retained(&self, msg: &Message) -> Option<u64> {
        let topic: Arc<str> = Arc::from(msg.topic.as_str());
        match record::encode_retained(msg) {
            Ok(bytes) => self.submit_one(Op::PutRetained(topic, bytes)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot store a retained message");
                None
            }
        }
    }

    /// Clears the retained message of `topic`.
    pub fn delete_retained(&self, topic: &str) -> Option<u64> {
        self.submit_one(Op::DeleteRetained(Arc::from(topic)))
    }

    /// Sets `key` in plugin `plugin`'s key-value area.
    pub fn kv_set(&self, plugin: &Arc<str>, key: &str, value: Vec<u8>) -> Option<u64> {
        self.submit_one(Op::PutKv(plugin.clone(), Arc::from(key), value))
    }

    /// Deletes `key` from plugin `plugin`'s key-value area.
    pub fn kv_delete(&self, plugin: &Arc<str>, key: &str) -> Option<u64> {
        self.submit_one(Op::DeleteKv(plugin.clone(), Arc::from(key)))
    }

    /// Reads up to `limit` committed entries of session `key`'s queue with ids above
    /// `after`, decoded: (id, the entry, or why it could not be read).
    pub fn read_queued(
        &self,
        key: ClientKey,
        after: u64,
        limit: usize,
    ) -> Result<Vec<QueueEntry>, StoreError> {
        let rows = self.queue_read(&QueueKey::Session(key), after, limit)?;
        Ok((rows.into_iter())
            .map(|(id, bytes)| (id, record::decode_queued(&bytes, id)))
            .collect())
    }

    /// The record a sink queue keeps for `msg` from `publisher` (its client id, empty for
    /// a plugin's message), received now; one record serves every sink that selects it.
    /// `None` when it cannot be encoded (logged).
    pub fn sink_record(publisher: &str, msg: &Message) -> Option<Vec<u8>> {
        let mut out = bytes::BytesMut::new();
        Store::sink_record_at(&mut out, publisher, record::unix_ms_now(), msg).then(|| out.to_vec())
    }

    /// [`Store::sink_record`] for a message received at `at_ms` (Unix ms), written into
    /// `out` (cleared first); false (logged) when the message cannot be encoded.
    pub fn sink_record_at(
        out: &mut bytes::BytesMut,
        publisher: &str,
        at_ms: u64,
        msg: &Message,
    ) -> bool {
        out.clear();
        match record::encode_sink(out, publisher, at_ms, msg) {
            Ok(()) => true,
            Err(e) => {
                out.clear();
                tracing::warn!(error = %e, "message cannot be queued for sinks");
                false
            }
        }
    }

    /// What a sink record holds: (publisher, received at in Unix ms, the message).
    pub fn open_sink_record(bytes: &[u8]) -> Result<(String, u64, Message), RecordError> {
        record::decode_sink(bytes)
    }
}

/// What a restored session's queue holds: the entries that were in flight (decoded), and
/// the queued ones that stay on disk (counted).
#[derive(Debug, Default)]
pub struct RecoveredQueue {
    /// Entries that were in flight, with their packet id and stage.
    pub inflight: Vec<QueuedRecord>,
    /// Number of queued (not in flight) entries on disk.
    pub queued: usize,
    /// Their total record size.
    pub bytes: usize,
    /// The id just below the first queued entry.
    pub after: u64,
    /// The next entry id to use.
    pub next_id: u64,
}

impl Recovered {
    /// Takes the session records: (client id, record).
    pub fn take_sessions(&mut self) -> Result<Vec<(ClientId, SessionRecord)>, RecordError> {
        (std::mem::take(&mut self.sessions).into_iter())
            .map(|(id, bytes)| Ok((ClientId::from(id), record::decode_session(&bytes)?.0)))
            .collect()
    }

    /// Takes the subscriptions of session `key`.
    pub fn take_subscriptions(
        &mut self,
        key: ClientKey,
    ) -> Result<Vec<StoredSubscription>, RecordError> {
        (self
            .subscriptions
            .remove(&key)
            .unwrap_or_default()
            .into_iter())
        .map(|(filter, bytes)| record::decode_subscription(&filter, &bytes))
        .collect()
    }

    /// Takes what the queue of session `key` holds.
    pub fn take_queue(&mut self, key: ClientKey) -> Result<RecoveredQueue, RecordError> {
        let summary = self.queues.remove(&key).unwrap_or_default();
        let inflight = (summary.inflight.into_iter())
            .map(|(id, bytes)| record::decode_queued(&bytes, id))
            .collect::<Result<_, _>>()?;
        Ok(RecoveredQueue {
            inflight,
            queued: summary.queued,
            bytes: summary.bytes,
            after: summary.after,
            next_id: summary.max_id + 1,
        })
    }

    /// Takes the inbound QoS 2 packet ids of session `key` awaiting PUBREL.
    pub fn take_qos2_received(&mut self, key: ClientKey) -> Vec<PacketId> {
        (self.qos2_in.remove(&key).unwrap_or_default().into_iter())
            .filter_map(PacketId::new)
            .collect()
    }

    /// Takes the retained messages.
    pub fn take_retained(&mut self) -> Result<Vec<Message>, RecordError> {
        (std::mem::take(&mut self.retained).into_iter())
            .map(|bytes| record::decode_retained(&bytes))
            .collect()
    }
}
