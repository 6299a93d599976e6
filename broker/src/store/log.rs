//! A sink plugin's durable queue, batched: records are appended in memory, and the store's
//! writer takes everything appended since its last commit as one row of the `sink` table in
//! the commit it is making ([`Op::Log`]), so a thousand records cost one insert, not a
//! thousand. The record's appender gets that commit's ticket: with `sync` durability its
//! PUBACK still waits until the record is on disk.
//!
//! The reader (the sink's thread) is served from memory while it keeps up: the newest
//! records stay in memory up to [`MEM_BUDGET`] bytes (those not yet handed to the writer
//! always do), older ones are read back from the store. Records the reader consumed before
//! the writer came for them are never written. What was consumed is recorded in the same
//! commits (rows wholly consumed are deleted, and a marker row keeps the last consumed
//! sequence number, so a restart neither redelivers a partly consumed row's head nor reuses
//! a sequence number).
//!
//! Rows are keyed by (queue name, sequence number of the row's last record); a row written
//! by earlier versions holds one record under its own sequence number, and is read as such.
//! Without a store (tests, benchmarks) the records are kept in memory only.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use redb::ReadableDatabase;

use super::disk::{SINK, damaged};
use super::queue::{QueueKey, QueueOp};
use super::{Appended, Closed, Op, Store, StoreError};

/// Record bytes a log keeps in memory for its reader beyond those not yet written.
pub const MEM_BUDGET: usize = 8 * 1024 * 1024;
/// Record bytes not yet handed to the writer beyond which an appender waits for it.
const MAX_UNWRITTEN: usize = 16 * 1024 * 1024;
/// Most record bytes in one row.
const ROW_BYTES: usize = 1024 * 1024;
/// Records are copied into buffers of this size, shared by the records they hold (no
/// allocation per record; a buffer is freed with its last record).
const CHUNK: usize = 64 * 1024;
/// First byte of a row of several records.
const BATCH: u8 = 0xB7;
/// Sequence number of the marker row (records start at 1).
const MARKER: u64 = 0;

/// Where the log stands.
#[derive(Debug)]
struct State {
    /// Oldest sequence number not consumed (`next` when empty).
    first: u64,
    /// Next sequence number to assign.
    next: u64,
    /// The newest records, contiguous up to `next - 1`.
    mem: VecDeque<(u64, Bytes)>,
    /// Room for the next records.
    chunk: BytesMut,
    /// Their bytes.
    mem_bytes: usize,
    /// Records from here on have not been handed to the writer.
    unwritten_from: u64,
    /// Their bytes.
    unwritten_bytes: usize,
    /// The consumed prefix the store knows of (through this sequence number).
    stored_consumed: u64,
    /// An [`Op::Log`] of this log waits for the writer, with this ticket.
    queued: Option<Option<u64>>,
}

impl State {
    /// Sequence number of the oldest record in memory.
    fn mem_front(&self) -> u64 {
        self.mem.front().map_or(self.next, |(s, _)| *s)
    }

    /// The records in memory from sequence number `seq` on (found in constant time).
    fn mem_from(&self, seq: u64) -> std::collections::vec_deque::Iter<'_, (u64, Bytes)> {
        let skip = usize::try_from(seq.saturating_sub(self.mem_front())).unwrap_or(usize::MAX);
        self.mem.range(skip.min(self.mem.len())..)
    }

    /// Forgets records from memory that the store has (or will have) while over budget.
    fn evict(&mut self) {
        while self.mem_bytes > MEM_BUDGET {
            match self.mem.front() {
                Some((s, r)) if *s < self.unwritten_from => {
                    self.mem_bytes -= r.len();
                    self.mem.pop_front();
                }
                _ => break,
            }
        }
    }
}

/// What the writer and the log's users share.
pub(super) struct Shared {
    name: Arc<str>,
    state: Mutex<State>,
    /// Signalled when the writer took the unwritten records.
    written: Condvar,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log").field("name", &self.name).finish()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Each critical section is field updates and copies: a poisoned lock is still sound.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the writer commits for this log now: the records not yet written (those not
    /// consumed meanwhile) as rows, and the consumed prefix. Called by the writer thread
    /// when it takes an [`Op::Log`] into a commit.
    pub(super) fn take(&self) -> Vec<Op> {
        let key = QueueKey::Sink(self.name.clone());
        let mut ops = Vec::new();
        // Under the lock only what the rows need (the records are shared, not copied):
        // a publisher appending meanwhile waits for the lock, not for the rows' copies.
        let (records, unwritten) = {
            let mut st = self.lock();
            st.queued = None;
            let consumed = st.first - 1;
            if consumed > st.stored_consumed {
                ops.push(Op::Queue(QueueOp::DeleteThrough(key.clone(), consumed)));
                let marker = consumed.to_be_bytes().to_vec();
                ops.push(Op::Queue(QueueOp::Put(key.clone(), MARKER, marker)));
                st.stored_consumed = consumed;
            }
            let from = st.unwritten_from.max(st.first);
            let records: Vec<(u64, Bytes)> = st.mem_from(from).cloned().collect();
            let unwritten = st.unwritten_bytes;
            st.unwritten_from = st.next;
            st.unwritten_bytes = 0;
            st.evict();
            (records, unwritten)
        };
        self.written.notify_all();
        // (sequence number of its last record, bytes)
        let mut row: Option<(u64, Vec<u8>)> = None;
        let room = unwritten.min(ROW_BYTES) + 4 * records.len();
        for (seq, rec) in &records {
            let (last, bytes) = row.get_or_insert_with(|| (*seq, row_head(*seq, room)));
            *last = *seq;
            bytes.extend_from_slice(&u32::try_from(rec.len()).unwrap_or(u32::MAX).to_be_bytes());
            bytes.extend_from_slice(rec);
            if bytes.len() >= ROW_BYTES
                && let Some(r) = row.take()
            {
                ops.push(row_op(&key, r));
            }
        }
        if let Some(r) = row.take() {
            ops.push(row_op(&key, r));
        }
        ops
    }
}

fn row_head(first: u64, room: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(9 + room.min(ROW_BYTES + 64 * 1024));
    b.push(BATCH);
    b.extend_from_slice(&first.to_be_bytes());
    b
}

fn row_op(key: &QueueKey, (last, bytes): (u64, Vec<u8>)) -> Op {
    Op::Queue(QueueOp::Put(key.clone(), last, bytes))
}

/// The records of one row: (sequence number, record), in order. A row of earlier versions
/// is one record under the row's own key.
fn split_row(key: u64, bytes: &[u8]) -> Result<Vec<(u64, &[u8])>, String> {
    if bytes.first() != Some(&BATCH) {
        return Ok(vec![(key, bytes)]);
    }
    let head: [u8; 8] = (bytes.get(1..9))
        .and_then(|b| b.try_into().ok())
        .ok_or("sink row too short")?;
    let first = u64::from_be_bytes(head);
    let mut rest = bytes.get(9..).unwrap_or_default();
    let mut out = Vec::new();
    while !rest.is_empty() {
        let len: [u8; 4] = (rest.get(..4))
            .and_then(|b| b.try_into().ok())
            .ok_or("sink row cut short")?;
        let len = u32::from_be_bytes(len) as usize;
        let rec = rest.get(4..4 + len).ok_or("sink row cut short")?;
        let seq = first
            .checked_add(out.len() as u64)
            .ok_or("sink row numbers overflow")?;
        out.push((seq, rec));
        rest = rest.get(4 + len..).unwrap_or_default();
    }
    match out.last() {
        Some((last, _)) if *last == key => Ok(out),
        Some((last, _)) => Err(format!("sink row {key} holds records up to {last}")),
        None => Err(format!("sink row {key} holds no record")),
    }
}

/// One named, batched durable queue of records (see the module's documentation).
#[derive(Debug)]
pub struct Log {
    shared: Arc<Shared>,
    store: Option<Arc<Store>>,
}

impl Log {
    /// The log `name` as the store holds it (records left from before a restart stay).
    pub fn open(store: Option<Arc<Store>>, name: Arc<str>) -> Result<Log, StoreError> {
        let (first, next) = match &store {
            Some(s) => s.log_bounds(&name)?,
            None => (1, 1),
        };
        Ok(Log {
            shared: Arc::new(Shared {
                name,
                state: Mutex::new(State {
                    first,
                    next,
                    mem: VecDeque::new(),
                    chunk: BytesMut::new(),
                    mem_bytes: 0,
                    unwritten_from: next,
                    unwritten_bytes: 0,
                    stored_consumed: first - 1,
                    queued: None,
                }),
                written: Condvar::new(),
            }),
            store,
        })
    }

    /// Records waiting.
    pub fn len(&self) -> u64 {
        let st = self.shared.lock();
        st.next - st.first
    }

    /// Whether no record waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes sure the writer will come for this log; returns the ticket of that commit.
    fn queue_for_writer(&self, st: &mut State) -> Option<u64> {
        let store = self.store.as_ref()?;
        match st.queued {
            Some(ticket) => ticket,
            None => match store.submit_now(Op::Log(self.shared.clone())) {
                Ok(ticket) => {
                    st.queued = Some(ticket);
                    ticket
                }
                Err(Closed) => {
                    // The store is closing (the broker stops): nothing more is written,
                    // so memory is all these records have, within its budget.
                    st.unwritten_from = st.next;
                    st.unwritten_bytes = 0;
                    st.evict();
                    None
                }
            },
        }
    }

    /// Appends `record`, dropping the oldest one first when `max` are waiting. Waits (for
    /// the writer) while more than [`MAX_UNWRITTEN`] bytes of records are not written yet.
    pub fn push(&self, record: &[u8], max: u64) -> Appended {
        let mut st = self.shared.lock();
        let seq = st.next;
        st.next += 1;
        let mut dropped_oldest = false;
        if st.next - st.first > max {
            dropped_oldest = true;
            if st.mem_front() == st.first
                && let Some((s, r)) = st.mem.pop_front()
            {
                st.mem_bytes -= r.len();
                if s >= st.unwritten_from {
                    st.unwritten_bytes -= r.len();
                }
            }
            st.first += 1;
        }
        let len = record.len();
        if st.chunk.capacity() < len {
            st.chunk = BytesMut::with_capacity(len.max(CHUNK));
        }
        st.chunk.extend_from_slice(record);
        let record = st.chunk.split().freeze();
        st.mem.push_back((seq, record));
        st.mem_bytes += len;
        if self.store.is_some() {
            st.unwritten_bytes += len;
            st.evict();
        } else {
            // Nothing is ever written: memory is all there is.
            st.unwritten_from = st.next;
        }
        let ticket = self.queue_for_writer(&mut st);
        let waiting = st.next - st.first;
        if let Some(store) = &self.store {
            while st.unwritten_bytes > MAX_UNWRITTEN && store.may_wait() {
                st = (self.shared.written)
                    .wait_timeout(st, Duration::from_millis(100))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
        }
        Appended {
            ticket,
            dropped_oldest,
            waiting,
        }
    }

    /// Up to `limit` records from the oldest one not consumed: (sequence number, record).
    /// Records the store holds but has not committed yet are not returned until it has.
    pub fn read(&self, limit: usize) -> Result<Vec<(u64, Bytes)>, StoreError> {
        let st = self.shared.lock();
        let front = st.mem_front();
        if st.first >= front {
            return Ok(st.mem_from(st.first).take(limit).cloned().collect());
        }
        let first = st.first;
        drop(st);
        let Some(store) = &self.store else {
            return Ok(Vec::new());
        };
        let mut out = match store.log_read(&self.shared.name, first, front, limit)? {
            Stored::Records(out) => out,
            Stored::Damaged(through, why) => {
                // Skipped, as a damaged record always was: the records after it still go.
                tracing::error!(queue = %self.shared.name, through, error = %why,
                    "damaged sink row skipped");
                self.consume_through(through);
                return Ok(Vec::new());
            }
        };
        // Read on from memory where the store's part ends.
        let want = out.last().map_or(first, |(s, _)| s + 1);
        let st = self.shared.lock();
        if out.len() < limit && want >= st.mem_front() {
            let more = limit - out.len();
            out.extend(st.mem_from(want).take(more).cloned());
        }
        Ok(out)
    }

    /// Consumes every record up to and including `last`.
    pub fn consume_through(&self, last: u64) {
        let mut st = self.shared.lock();
        if st.first > last {
            return;
        }
        st.first = (last + 1).min(st.next);
        while let Some((s, r)) = st.mem.front() {
            if *s > last {
                break;
            }
            let len = r.len();
            if *s >= st.unwritten_from {
                st.unwritten_bytes -= len;
            }
            st.mem_bytes -= len;
            st.mem.pop_front();
        }
        self.queue_for_writer(&mut st);
    }
}

/// What [`Store::log_read`] found.
enum Stored {
    /// Records, in order.
    Records(Vec<(u64, Bytes)>),
    /// The first row is damaged: through which sequence number, and why.
    Damaged(u64, String),
}

impl Store {
    /// The first sequence number not consumed and the next one to assign of log `name`.
    fn log_bounds(&self, name: &str) -> Result<(u64, u64), StoreError> {
        let bad = |e: redb::Error| damaged(&self.path, e);
        let read = self.database()?.begin_read().map_err(|e| bad(e.into()))?;
        let t = read.open_table(SINK).map_err(|e| bad(e.into()))?;
        let consumed = match t.get((name, MARKER)).map_err(|e| bad(e.into()))? {
            Some(v) => {
                let b: [u8; 8] = (v.value().try_into())
                    .map_err(|_| damaged(&self.path, format!("sink marker of {name}")))?;
                u64::from_be_bytes(b)
            }
            None => 0,
        };
        let mut rows = (t.range((name, 1)..=(name, u64::MAX))).map_err(|e| bad(e.into()))?;
        let first_row = rows.next().transpose().map_err(|e| bad(e.into()))?;
        let last_row = rows.next_back().transpose().map_err(|e| bad(e.into()))?;
        let Some((k, v)) = first_row else {
            return Ok((consumed + 1, consumed + 1));
        };
        // A damaged first row is skipped by the reader; it cannot say where it begins.
        let row_first = split_row(k.value().1, v.value())
            .ok()
            .and_then(|r| r.first().map(|(s, _)| *s))
            .unwrap_or(consumed + 1);
        let last = last_row.map_or(k.value().1, |(k, _)| k.value().1);
        Ok((row_first.max(consumed + 1), last.max(consumed) + 1))
    }

    /// Up to `limit` committed records of log `name` from `first`, before `until`; they end
    /// before a damaged row, which is answered alone when it comes first.
    fn log_read(
        &self,
        name: &str,
        first: u64,
        until: u64,
        limit: usize,
    ) -> Result<Stored, StoreError> {
        let bad = |e: redb::Error| damaged(&self.path, e);
        let read = self.database()?.begin_read().map_err(|e| bad(e.into()))?;
        let t = read.open_table(SINK).map_err(|e| bad(e.into()))?;
        let mut out = Vec::new();
        let rows = (t.range((name, first.max(1))..=(name, u64::MAX))).map_err(|e| bad(e.into()))?;
        for row in rows {
            let (k, v) = row.map_err(|e| bad(e.into()))?;
            let key = k.value().1;
            let records = match split_row(key, v.value()) {
                Ok(r) => r,
                Err(_) if !out.is_empty() => return Ok(Stored::Records(out)),
                Err(why) => return Ok(Stored::Damaged(key, why)),
            };
            for (seq, rec) in records {
                if seq >= until || out.len() >= limit {
                    return Ok(Stored::Records(out));
                }
                if seq >= first {
                    out.push((seq, Bytes::copy_from_slice(rec)));
                }
            }
        }
        Ok(Stored::Records(out))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use crate::store::{Durability, StoreConfig};

    /// A fresh folder, removed at the end of the test.
    struct Dir(std::path::PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let d = std::env::temp_dir().join(format!(
                "sandpiper-log-{name}-{}-{}",
                std::process::id(),
                crate::store::record::unix_ms_now()
            ));
            let _ = std::fs::remove_dir_all(&d);
            Dir(d)
        }

        fn path(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn open_store(dir: &std::path::Path) -> Arc<Store> {
        let config = StoreConfig {
            data_dir: dir.to_path_buf(),
            durability: Durability::Sync,
            ..StoreConfig::default()
        };
        Arc::new(Store::open(&config).unwrap().0)
    }

    fn rec(n: u64) -> Vec<u8> {
        let mut v = vec![1u8];
        v.extend_from_slice(&n.to_be_bytes());
        v
    }

    fn seqs(rows: &[(u64, Bytes)]) -> Vec<u64> {
        rows.iter().map(|(s, _)| *s).collect()
    }

    #[test]
    fn batches_rows_resumes_after_a_reopen_and_never_reuses_a_number() {
        let dir = Dir::new("reopen");
        {
            let store = open_store(dir.path());
            let log = Log::open(Some(store.clone()), "s".into()).unwrap();
            for n in 1..=10 {
                log.push(&rec(n), 100);
            }
            assert_eq!(seqs(&log.read(4).unwrap()), vec![1, 2, 3, 4]);
            log.consume_through(3);
            for n in 11..=12 {
                log.push(&rec(n), 100);
            }
            store.flush();
            assert_eq!(log.len(), 9);
            store.close();
        }
        let store = open_store(dir.path());
        let log = Log::open(Some(store.clone()), "s".into()).unwrap();
        assert_eq!(log.len(), 9);
        let rows = log.read(100).unwrap();
        assert_eq!(seqs(&rows), (4..=12).collect::<Vec<_>>());
        assert_eq!(rows[0].1, rec(4)[..]);
        log.consume_through(12);
        store.flush();
        store.close();
        drop((log, store));
        let store = open_store(dir.path());
        let log = Log::open(Some(store), "s".into()).unwrap();
        assert!(log.is_empty());
        assert_eq!(log.push(&rec(13), 100).waiting, 1);
        assert_eq!(seqs(&log.read(10).unwrap()), vec![13]);
    }

    #[test]
    fn records_consumed_before_the_writer_came_are_never_written() {
        let dir = Dir::new("unwritten");
        let store = open_store(dir.path());
        let log = Log::open(Some(store.clone()), "s".into()).unwrap();
        {
            // Hold the log so that the writer cannot take it before the consumption.
            let mut st = log.shared.lock();
            st.queued = Some(None);
        }
        for n in 1..=5 {
            log.push(&rec(n), 100);
        }
        log.consume_through(5);
        log.shared.lock().queued = None;
        log.consume_through(5);
        log.push(&rec(6), 100);
        store.flush();
        let Stored::Records(stored) = store.log_read("s", 1, u64::MAX, 100).unwrap() else {
            panic!("damaged")
        };
        assert_eq!(seqs(&stored), vec![6]);
    }

    #[test]
    fn a_full_log_drops_its_oldest_and_reads_back_what_memory_no_longer_holds() {
        let dir = Dir::new("full");
        let store = open_store(dir.path());
        let log = Log::open(Some(store.clone()), "s".into()).unwrap();
        for n in 1..=10 {
            let a = log.push(&rec(n), 8);
            assert_eq!(a.dropped_oldest, n > 8);
        }
        assert_eq!(seqs(&log.read(3).unwrap()), vec![3, 4, 5]);
        store.flush();
        // Forget the memory: the reader is served from the store.
        {
            let mut st = log.shared.lock();
            st.mem.clear();
            st.mem_bytes = 0;
        }
        assert_eq!(seqs(&log.read(3).unwrap()), vec![3, 4, 5]);
        assert_eq!(log.read(100).unwrap().len(), 8);
        // Read on from memory where the store's part ends.
        log.push(&rec(11), 8);
        log.push(&rec(12), 8);
        assert_eq!(seqs(&log.read(100).unwrap()), (5..=12).collect::<Vec<_>>());
    }

    #[test]
    fn rows_of_one_record_from_earlier_versions_are_read() {
        let dir = Dir::new("legacy");
        let store = open_store(dir.path());
        let key = QueueKey::Sink("old".into());
        for n in 5..=7 {
            store.queue_row_put(key.clone(), n, rec(n));
        }
        store.flush();
        let log = Log::open(Some(store.clone()), "old".into()).unwrap();
        assert_eq!(log.len(), 3);
        let rows = log.read(10).unwrap();
        assert_eq!(seqs(&rows), vec![5, 6, 7]);
        assert_eq!(rows[1].1, rec(6)[..]);
        log.consume_through(6);
        assert_eq!(log.push(&rec(8), 100).waiting, 2);
        store.flush();
        drop(log);
        let log = Log::open(Some(store), "old".into()).unwrap();
        assert_eq!(seqs(&log.read(10).unwrap()), vec![7, 8]);
    }

    #[test]
    fn a_damaged_row_is_skipped_and_the_rest_delivered() {
        let dir = Dir::new("damaged");
        let store = open_store(dir.path());
        let key = QueueKey::Sink("d".into());
        store.queue_row_put(key.clone(), 1, rec(1));
        store.queue_row_put(key.clone(), 3, vec![BATCH, 0, 0]);
        store.queue_row_put(key.clone(), 4, rec(4));
        store.flush();
        let log = Log::open(Some(store.clone()), "d".into()).unwrap();
        assert_eq!(seqs(&log.read(10).unwrap()), vec![1]);
        log.consume_through(1);
        // The damaged row alone: skipped (consumed), nothing returned this time.
        assert!(log.read(10).unwrap().is_empty());
        assert_eq!(seqs(&log.read(10).unwrap()), vec![4]);
    }

    #[test]
    fn damaged_rows_are_errors_not_panics() {
        assert!(split_row(3, &[BATCH, 0, 0]).is_err());
        let mut empty = row_head(0, 0);
        assert!(split_row(0, &empty).is_err());
        empty.extend_from_slice(&1u32.to_be_bytes());
        empty.push(1);
        empty.extend_from_slice(&1u32.to_be_bytes());
        empty.push(2);
        empty[1..9].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(split_row(u64::MAX, &empty).is_err());
        let mut b = row_head(1, 0);
        b.extend_from_slice(&100u32.to_be_bytes());
        b.push(1);
        assert!(split_row(1, &b).is_err());
        let mut b = row_head(1, 0);
        b.extend_from_slice(&1u32.to_be_bytes());
        b.push(9);
        assert!(split_row(2, &b).is_err());
        assert_eq!(split_row(1, &b).unwrap(), vec![(1, &[9u8][..])]);
    }

    #[test]
    fn without_a_store_it_lives_in_memory() {
        let log = Log::open(None, "m".into()).unwrap();
        for n in 1..=3 {
            assert_eq!(log.push(&rec(n), 2).ticket, None);
        }
        assert_eq!(seqs(&log.read(10).unwrap()), vec![2, 3]);
        log.consume_through(2);
        assert_eq!(seqs(&log.read(10).unwrap()), vec![3]);
    }
}
