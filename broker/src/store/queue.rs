//! The store's one durable queue: rows of bytes kept in order by (owner, sequence number).
//! A persistent session's deliveries are one such queue ([`QueueKey::Session`], written by
//! its mailbox), each sink plugin's records another ([`QueueKey::Sink`], written by its
//! [`super::Fifo`]). Rows are put (or replaced: a session's entry moves to its next in-flight
//! stage in place), deleted one by one (an acknowledgement out of order) or through a
//! sequence number (a sink's delivered prefix, a full queue's oldest), and read back in
//! sequence order after a given number, committed rows only.
//!
//! The two owners keep their rows in two tables (`queue` and `sink`, the on-disk format
//! predates this type); every read and write of either goes through here.

use std::sync::Arc;

use redb::ReadableDatabase;

use super::disk::{QUEUE, SINK, damaged};
use super::{Op, Store, StoreError};
use crate::message::ClientKey;

/// Whose durable queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueKey {
    /// A persistent session's deliveries, by the session incarnation's key.
    Session(ClientKey),
    /// A named [`super::Fifo`]'s records: a sink plugin's, by the plugin's name, or a
    /// bridge's outbound queue, named `bridge/NAME` (a plugin's name is a file name, which
    /// has no `/`).
    Sink(Arc<str>),
}

impl QueueKey {
    /// What the key counts against the writer's pending bytes.
    pub(super) fn size(&self) -> usize {
        match self {
            QueueKey::Session(_) => 0,
            QueueKey::Sink(name) => name.len(),
        }
    }
}

/// The writer's open queue tables.
pub(super) struct Tables<'t> {
    /// Sessions' rows.
    pub queue: redb::Table<'t, (u64, u64), &'static [u8]>,
    /// Sinks' rows.
    pub sink: redb::Table<'t, (&'static str, u64), &'static [u8]>,
}

impl Tables<'_> {
    /// Applies one queue change inside the writer's transaction.
    pub(super) fn apply(&mut self, op: &QueueOp) -> Result<(), redb::Error> {
        match op {
            QueueOp::Put(QueueKey::Session(k), seq, v) => {
                self.queue.insert((*k, *seq), v.as_slice())?;
            }
            QueueOp::Put(QueueKey::Sink(n), seq, v) => {
                self.sink.insert((&**n, *seq), v.as_slice())?;
            }
            QueueOp::Delete(QueueKey::Session(k), seq) => {
                self.queue.remove((*k, *seq))?;
            }
            QueueOp::Delete(QueueKey::Sink(n), seq) => {
                self.sink.remove((&**n, *seq))?;
            }
            QueueOp::DeleteThrough(QueueKey::Session(k), seq) => {
                (self.queue).retain_in((*k, 0)..=(*k, *seq), |_, _| false)?;
            }
            QueueOp::DeleteThrough(QueueKey::Sink(n), seq) => {
                (self.sink).retain_in((&**n, 0)..=(&**n, *seq), |_, _| false)?;
            }
        }
        Ok(())
    }
}

/// One change to a durable queue.
#[derive(Debug)]
pub(super) enum QueueOp {
    /// Insert or replace a row.
    Put(QueueKey, u64, Vec<u8>),
    /// Remove a row.
    Delete(QueueKey, u64),
    /// Remove every row up to and including a sequence number.
    DeleteThrough(QueueKey, u64),
}

impl QueueOp {
    pub(super) fn size(&self) -> usize {
        match self {
            QueueOp::Put(k, _, v) => k.size() + v.len(),
            QueueOp::Delete(k, _) | QueueOp::DeleteThrough(k, _) => k.size(),
        }
    }
}

impl Store {
    /// Puts row `seq` of queue `q` (replacing the row of that number, if any); returns the
    /// store ticket.
    pub(super) fn queue_row_put(&self, q: QueueKey, seq: u64, bytes: Vec<u8>) -> Option<u64> {
        self.submit_one(Op::Queue(QueueOp::Put(q, seq, bytes)))
    }

    /// Deletes row `seq` of queue `q`.
    pub(super) fn queue_row_delete(&self, q: QueueKey, seq: u64) -> Option<u64> {
        self.submit_one(Op::Queue(QueueOp::Delete(q, seq)))
    }

    /// Appends row `seq` to queue `q`, first deleting every row up to `drop_through` (the
    /// queue was full), in one commit.
    pub(super) fn queue_append(
        &self,
        q: QueueKey,
        seq: u64,
        bytes: Vec<u8>,
        drop_through: Option<u64>,
    ) -> Option<u64> {
        let mut ops = Vec::with_capacity(2);
        if let Some(last) = drop_through {
            ops.push(Op::Queue(QueueOp::DeleteThrough(q.clone(), last)));
        }
        ops.push(Op::Queue(QueueOp::Put(q, seq, bytes)));
        self.submit(ops)
    }

    /// Deletes every row of queue `q` up to and including `seq`.
    pub(super) fn queue_delete_through(&self, q: QueueKey, seq: u64) -> Option<u64> {
        self.submit_one(Op::Queue(QueueOp::DeleteThrough(q, seq)))
    }

    /// Up to `limit` committed rows of queue `q` with sequence numbers above `after`, in
    /// order: (sequence number, bytes).
    pub fn queue_read(
        &self,
        q: &QueueKey,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let bad = |e: redb::Error| damaged(&self.path, e);
        let read = self.database()?.begin_read().map_err(|e| bad(e.into()))?;
        let from = after.saturating_add(1);
        let mut out = Vec::new();
        match q {
            QueueKey::Session(k) => {
                let t = read.open_table(QUEUE).map_err(|e| bad(e.into()))?;
                let rows = t.range((*k, from)..=(*k, u64::MAX));
                for row in rows.map_err(|e| bad(e.into()))?.take(limit) {
                    let (k, v) = row.map_err(|e| bad(e.into()))?;
                    out.push((k.value().1, v.value().to_vec()));
                }
            }
            QueueKey::Sink(n) => {
                let t = read.open_table(SINK).map_err(|e| bad(e.into()))?;
                let rows = t.range((&**n, from)..=(&**n, u64::MAX));
                for row in rows.map_err(|e| bad(e.into()))?.take(limit) {
                    let (k, v) = row.map_err(|e| bad(e.into()))?;
                    out.push((k.value().1, v.value().to_vec()));
                }
            }
        }
        Ok(out)
    }

    /// The first and last sequence numbers of queue `q`'s committed rows, if it has any.
    pub(super) fn queue_bounds(&self, q: &QueueKey) -> Result<Option<(u64, u64)>, StoreError> {
        let bad = |e: redb::Error| damaged(&self.path, e);
        let read = self.database()?.begin_read().map_err(|e| bad(e.into()))?;
        let seq = |row: Option<Result<u64, redb::StorageError>>| row.transpose();
        let (first, last) = match q {
            QueueKey::Session(k) => {
                let t = read.open_table(QUEUE).map_err(|e| bad(e.into()))?;
                let mut r = t
                    .range((*k, 0)..=(*k, u64::MAX))
                    .map_err(|e| bad(e.into()))?;
                let first = seq(r.next().map(|x| x.map(|(k, _)| k.value().1)));
                let last = seq(r.next_back().map(|x| x.map(|(k, _)| k.value().1)));
                (first, last)
            }
            QueueKey::Sink(n) => {
                let t = read.open_table(SINK).map_err(|e| bad(e.into()))?;
                let mut r = (t.range((&**n, 0)..=(&**n, u64::MAX))).map_err(|e| bad(e.into()))?;
                let first = seq(r.next().map(|x| x.map(|(k, _)| k.value().1)));
                let last = seq(r.next_back().map(|x| x.map(|(k, _)| k.value().1)));
                (first, last)
            }
        };
        let first = first.map_err(|e| bad(e.into()))?;
        let last = last.map_err(|e| bad(e.into()))?;
        Ok(first.map(|f| (f, last.unwrap_or(f))))
    }
}
