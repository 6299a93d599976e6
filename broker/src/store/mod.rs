//! Durable state in an embedded redb database: persistent sessions, their queued and
//! in-flight messages, inbound QoS 2 packet ids awaiting PUBREL, retained messages, and a
//! key-value area for plugins.
//!
//! Writes are operations sent to one writer thread, which applies everything that has
//! arrived in one write transaction and commits it (group commit: one fsync for many
//! connections). Each submission gets a ticket; `committed()` tells which tickets are
//! durable, and a connection holds back a PUBACK, PUBREC or SUBACK until its ticket is.
//! With `durability = "periodic"` no ticket is returned, and the writer fsyncs every
//! `fsync_interval_ms`.

pub mod record;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Deserialize;
use tokio::sync::watch;

use crate::message::ClientKey;

/// The on-disk format this build reads and writes.
pub const FORMAT_VERSION: u64 = 1;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
const QUEUE: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("queue");
const QOS2_IN: TableDefinition<(u64, u16), ()> = TableDefinition::new("qos2_in");
const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");
const KV: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("kv");
const SINK: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("sink");

/// When acknowledged messages reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// fsync before every PUBACK/PUBREC (group commit across connections).
    #[default]
    Sync,
    /// fsync every `fsync_interval_ms`; acknowledgements do not wait, so a crash can lose
    /// what was acknowledged in the last interval.
    Periodic,
}

/// Store settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Folder of the database (created if missing); relative to the configuration file
    /// (or the working directory without one).
    pub data_dir: PathBuf,
    /// `sync` or `periodic`.
    pub durability: Durability,
    /// fsync period of `periodic`, in milliseconds.
    pub fsync_interval_ms: u64,
    /// Page cache of the database, in MiB.
    pub cache_mb: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            data_dir: PathBuf::from("./data"),
            durability: Durability::Sync,
            fsync_interval_ms: 100,
            cache_mb: 64,
        }
    }
}

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The folder or file cannot be created or opened.
    #[error("cannot open the store in {path}: {reason}")]
    Open {
        /// The database file.
        path: String,
        /// What failed.
        reason: String,
    },
    /// The store was written by another format version.
    #[error(
        "the store in {path} has format version {found}, this build reads version {FORMAT_VERSION}; use a matching sandpiper or move the data folder away"
    )]
    Version {
        /// The database file.
        path: String,
        /// The version found.
        found: u64,
    },
    /// A record does not decode, or the database is damaged.
    #[error(
        "the store in {path} is damaged ({reason}); move the data folder away to start empty, or restore it from a backup"
    )]
    Damaged {
        /// The database file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// One change to durable state.
#[derive(Debug)]
pub enum Op {
    /// Insert or replace a session record.
    PutSession(Arc<str>, Vec<u8>),
    /// Remove a session with its queue and inbound QoS 2 ids.
    DeleteSession(Arc<str>, ClientKey),
    /// Insert or replace a queue entry.
    PutQueued(ClientKey, u64, Vec<u8>),
    /// Remove a queue entry.
    DeleteQueued(ClientKey, u64),
    /// Remember an inbound QoS 2 packet id awaiting PUBREL.
    PutQos2In(ClientKey, u16),
    /// Forget an inbound QoS 2 packet id.
    DeleteQos2In(ClientKey, u16),
    /// Insert or replace a retained message.
    PutRetained(Arc<str>, Vec<u8>),
    /// Remove a retained message.
    DeleteRetained(Arc<str>),
    /// Set a plugin key.
    PutKv(Arc<str>, Arc<str>, Vec<u8>),
    /// Remove a plugin key.
    DeleteKv(Arc<str>, Arc<str>),
    /// Append a record to a sink plugin's queue (plugin name, sequence number).
    PutSink(Arc<str>, u64, Vec<u8>),
    /// Remove a sink plugin's records up to and including a sequence number.
    DeleteSinkUpTo(Arc<str>, u64),
}

/// What the store holds of one session's queue at start. Queued entries stay on disk; only
/// the ones that were in flight (QoS 2 with a packet id) are read in full.
#[derive(Debug, Default)]
pub struct QueueSummary {
    /// Entries in flight: (entry id, record).
    pub inflight: Vec<(u64, Vec<u8>)>,
    /// Number of queued (not in flight) entries.
    pub queued: usize,
    /// Their total record size.
    pub bytes: usize,
    /// The id just below the first queued entry.
    pub after: u64,
    /// The highest entry id.
    pub max_id: u64,
}

/// What the store held at start.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Session records by client id.
    pub sessions: Vec<(String, Vec<u8>)>,
    /// Queue summaries by session key.
    pub queues: HashMap<ClientKey, QueueSummary>,
    /// Inbound QoS 2 packet ids by session key.
    pub qos2_in: HashMap<ClientKey, Vec<u16>>,
    /// Retained message records.
    pub retained: Vec<Vec<u8>>,
}

enum Job {
    Ops(u64, Vec<Op>),
    Flush(std::sync::mpsc::Sender<()>),
}

struct Submitter {
    next: u64,
    tx: mpsc::Sender<Job>,
}

/// The durable store of one broker.
pub struct Store {
    db: Arc<Database>,
    submit: Mutex<Option<Submitter>>,
    committed: watch::Receiver<u64>,
    durability: Durability,
    writer: Mutex<Option<JoinHandle<()>>>,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("durability", &self.durability)
            .finish()
    }
}

fn damaged(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Damaged {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

impl Store {
    /// Opens (or creates) the store and reads everything it holds.
    pub fn open(config: &StoreConfig) -> Result<(Store, Recovered), StoreError> {
        let path = config.data_dir.join("sandpiper.redb");
        let open_err = |reason: String| StoreError::Open {
            path: path.display().to_string(),
            reason,
        };
        std::fs::create_dir_all(&config.data_dir).map_err(|e| open_err(e.to_string()))?;
        // redb's page cache is the store's main memory cost: it bounds what a large backlog
        // costs in memory.
        let db = match Database::builder()
            .set_cache_size(config.cache_mb.saturating_mul(1024 * 1024))
            .create(&path)
        {
            Ok(db) => db,
            Err(redb::DatabaseError::Storage(e)) => return Err(damaged(&path, e)),
            Err(e) => return Err(open_err(e.to_string())),
        };
        let recovered = Self::check_and_load(&db, &path)?;
        let db = Arc::new(db);
        let (committed_tx, committed) = watch::channel(0);
        let (tx, rx) = mpsc::channel();
        let writer = {
            let db = db.clone();
            let durability = config.durability;
            let interval = Duration::from_millis(config.fsync_interval_ms.max(1));
            std::thread::Builder::new()
                .name("sandpiper-store".into())
                .spawn(move || write_loop(&db, &rx, &committed_tx, durability, interval))
                .map_err(|e| open_err(e.to_string()))?
        };
        Ok((
            Store {
                db,
                submit: Mutex::new(Some(Submitter { next: 1, tx })),
                committed,
                durability: config.durability,
                writer: Mutex::new(Some(writer)),
                path,
            },
            recovered,
        ))
    }

    fn check_and_load(db: &Database, path: &Path) -> Result<Recovered, StoreError> {
        let txn = db.begin_write().map_err(|e| damaged(path, e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| damaged(path, e))?;
            let found = meta
                .get("format")
                .map_err(|e| damaged(path, e))?
                .map(|v| v.value());
            match found {
                None => {
                    meta.insert("format", FORMAT_VERSION)
                        .map_err(|e| damaged(path, e))?;
                }
                Some(v) if v == FORMAT_VERSION => {}
                Some(found) => {
                    return Err(StoreError::Version {
                        path: path.display().to_string(),
                        found,
                    });
                }
            }
            // Create every table so readers never meet a missing one.
            txn.open_table(SESSIONS).map_err(|e| damaged(path, e))?;
            txn.open_table(QUEUE).map_err(|e| damaged(path, e))?;
            txn.open_table(QOS2_IN).map_err(|e| damaged(path, e))?;
            txn.open_table(RETAINED).map_err(|e| damaged(path, e))?;
            txn.open_table(KV).map_err(|e| damaged(path, e))?;
            txn.open_table(SINK).map_err(|e| damaged(path, e))?;
        }
        txn.commit().map_err(|e| damaged(path, e))?;

        let read = db.begin_read().map_err(|e| damaged(path, e))?;
        let mut rec = Recovered::default();
        let sessions = read.open_table(SESSIONS).map_err(|e| damaged(path, e))?;
        for row in sessions.iter().map_err(|e| damaged(path, e))? {
            let (k, v) = row.map_err(|e| damaged(path, e))?;
            rec.sessions
                .push((k.value().to_owned(), v.value().to_vec()));
        }
        let queue = read.open_table(QUEUE).map_err(|e| damaged(path, e))?;
        for row in queue.iter().map_err(|e| damaged(path, e))? {
            let (k, v) = row.map_err(|e| damaged(path, e))?;
            let (key, id) = k.value();
            let bytes = v.value();
            let q = rec.queues.entry(key).or_default();
            q.max_id = q.max_id.max(id);
            if record::queued_in_flight(bytes).map_err(|e| damaged(path, e))? {
                q.inflight.push((id, bytes.to_vec()));
            } else {
                if q.queued == 0 {
                    q.after = id - 1;
                }
                q.queued += 1;
                q.bytes += bytes.len();
            }
        }
        let q2 = read.open_table(QOS2_IN).map_err(|e| damaged(path, e))?;
        for row in q2.iter().map_err(|e| damaged(path, e))? {
            let (k, _) = row.map_err(|e| damaged(path, e))?;
            let (key, id) = k.value();
            rec.qos2_in.entry(key).or_default().push(id);
        }
        let retained = read.open_table(RETAINED).map_err(|e| damaged(path, e))?;
        for row in retained.iter().map_err(|e| damaged(path, e))? {
            let (_, v) = row.map_err(|e| damaged(path, e))?;
            rec.retained.push(v.value().to_vec());
        }
        Ok(rec)
    }

    /// Queues changes for the next commit. Returns the ticket to wait for before
    /// acknowledging, or `None` when acknowledgements need not wait (periodic durability,
    /// or a store that is closing).
    pub fn submit(&self, ops: Vec<Op>) -> Option<u64> {
        if ops.is_empty() {
            return None;
        }
        let mut guard = self.submit.lock().unwrap_or_else(|e| e.into_inner());
        let s = guard.as_mut()?;
        let ticket = s.next;
        s.next += 1;
        if s.tx.send(Job::Ops(ticket, ops)).is_err() {
            return None;
        }
        (self.durability == Durability::Sync).then_some(ticket)
    }

    /// Queues one change; see [`Store::submit`].
    pub fn submit_one(&self, op: Op) -> Option<u64> {
        self.submit(vec![op])
    }

    /// The highest ticket that is durable.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    /// Reads up to `limit` committed queue entries of session `key` with ids above `after`.
    pub fn read_queue(
        &self,
        key: ClientKey,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let read = self.db.begin_read().map_err(|e| damaged(&self.path, e))?;
        let t = read.open_table(QUEUE).map_err(|e| damaged(&self.path, e))?;
        let mut out = Vec::new();
        let start = after.saturating_add(1);
        for row in t
            .range((key, start)..=(key, u64::MAX))
            .map_err(|e| damaged(&self.path, e))?
            .take(limit)
        {
            let (k, v) = row.map_err(|e| damaged(&self.path, e))?;
            out.push((k.value().1, v.value().to_vec()));
        }
        Ok(out)
    }

    /// The first and last sequence numbers in sink `name`'s queue, if it holds any.
    pub fn sink_bounds(&self, name: &str) -> Result<Option<(u64, u64)>, StoreError> {
        let read = self.db.begin_read().map_err(|e| damaged(&self.path, e))?;
        let t = read.open_table(SINK).map_err(|e| damaged(&self.path, e))?;
        let mut range = t
            .range((name, 0)..=(name, u64::MAX))
            .map_err(|e| damaged(&self.path, e))?;
        let first = match range.next() {
            Some(row) => row.map_err(|e| damaged(&self.path, e))?.0.value().1,
            None => return Ok(None),
        };
        let last = match range.next_back() {
            Some(row) => row.map_err(|e| damaged(&self.path, e))?.0.value().1,
            None => first,
        };
        Ok(Some((first, last)))
    }

    /// Reads up to `limit` committed records of sink `name` with sequence numbers above
    /// `after`.
    pub fn read_sink(
        &self,
        name: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let read = self.db.begin_read().map_err(|e| damaged(&self.path, e))?;
        let t = read.open_table(SINK).map_err(|e| damaged(&self.path, e))?;
        let mut out = Vec::new();
        for row in t
            .range((name, after.saturating_add(1))..=(name, u64::MAX))
            .map_err(|e| damaged(&self.path, e))?
            .take(limit)
        {
            let (k, v) = row.map_err(|e| damaged(&self.path, e))?;
            out.push((k.value().1, v.value().to_vec()));
        }
        Ok(out)
    }

    /// Reads a plugin key.
    pub fn kv_get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let read = self.db.begin_read().map_err(|e| damaged(&self.path, e))?;
        let t = read.open_table(KV).map_err(|e| damaged(&self.path, e))?;
        let v = t
            .get((namespace, key))
            .map_err(|e| damaged(&self.path, e))?;
        Ok(v.map(|v| v.value().to_vec()))
    }

    /// Waits until everything submitted so far is on disk.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        {
            let guard = self.submit.lock().unwrap_or_else(|e| e.into_inner());
            let Some(s) = guard.as_ref() else { return };
            if s.tx.send(Job::Flush(tx)).is_err() {
                return;
            }
        }
        let _ = rx.recv_timeout(Duration::from_secs(30));
    }

    /// Writes what is pending, fsyncs, and stops the writer. Later submissions are ignored.
    pub fn close(&self) {
        self.flush();
        self.submit.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = w.join();
        }
    }
}

/// Most operations applied in one transaction.
const MAX_BATCH: usize = 16 * 1024;

fn write_loop(
    db: &Database,
    rx: &mpsc::Receiver<Job>,
    committed: &watch::Sender<u64>,
    durability: Durability,
    interval: Duration,
) {
    let mut last_sync = Instant::now();
    let mut dirty = false;
    loop {
        let first = match durability {
            Durability::Sync => rx.recv().ok(),
            Durability::Periodic => {
                let wait = interval.saturating_sub(last_sync.elapsed());
                match rx.recv_timeout(wait) {
                    Ok(j) => Some(j),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if dirty {
                            sync_now(db);
                            dirty = false;
                        }
                        last_sync = Instant::now();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => None,
                }
            }
        };
        let Some(first) = first else { break };
        let mut jobs = vec![first];
        let mut count = 0;
        while count < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => {
                    if let Job::Ops(_, ops) = &j {
                        count += ops.len();
                    }
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        let mut top = 0;
        let mut flushes = Vec::new();
        let mut batch = Vec::new();
        for j in jobs {
            match j {
                Job::Ops(t, ops) => {
                    top = top.max(t);
                    batch.extend(ops);
                }
                Job::Flush(tx) => flushes.push(tx),
            }
        }
        let immediate = durability == Durability::Sync
            || !flushes.is_empty()
            || last_sync.elapsed() >= interval;
        match apply(db, batch, immediate) {
            Ok(()) => {
                if immediate {
                    last_sync = Instant::now();
                    dirty = false;
                } else {
                    dirty = true;
                }
                if top > 0 {
                    committed.send_replace(top);
                }
            }
            Err(e) => {
                // Nothing is acknowledged that is not durable: the tickets of this batch
                // are never released, so their PUBACKs are never sent.
                tracing::error!(error = %e, "store commit failed");
            }
        }
        for f in flushes {
            let _ = f.send(());
        }
    }
    if dirty {
        sync_now(db);
    }
}

fn sync_now(db: &Database) {
    if let Err(e) = apply(db, Vec::new(), true) {
        tracing::error!(error = %e, "store fsync failed");
    }
}

fn apply(db: &Database, ops: Vec<Op>, immediate: bool) -> Result<(), redb::Error> {
    let mut txn = db.begin_write()?;
    let durability = if immediate {
        redb::Durability::Immediate
    } else {
        redb::Durability::None
    };
    // Setting durability on a fresh transaction cannot fail but for misuse; fall back to
    // the default (immediate) if it does.
    let _ = txn.set_durability(durability);
    {
        let mut sessions = txn.open_table(SESSIONS)?;
        let mut queue = txn.open_table(QUEUE)?;
        let mut q2 = txn.open_table(QOS2_IN)?;
        let mut retained = txn.open_table(RETAINED)?;
        let mut kv = txn.open_table(KV)?;
        let mut sink = txn.open_table(SINK)?;
        for op in ops {
            match op {
                Op::PutSession(id, v) => {
                    sessions.insert(&*id, v.as_slice())?;
                }
                Op::DeleteSession(id, key) => {
                    sessions.remove(&*id)?;
                    queue.retain_in((key, 0)..=(key, u64::MAX), |_, _| false)?;
                    q2.retain_in((key, 0)..=(key, u16::MAX), |_, _| false)?;
                }
                Op::PutQueued(key, id, v) => {
                    queue.insert((key, id), v.as_slice())?;
                }
                Op::DeleteQueued(key, id) => {
                    queue.remove((key, id))?;
                }
                Op::PutQos2In(key, id) => {
                    q2.insert((key, id), ())?;
                }
                Op::DeleteQos2In(key, id) => {
                    q2.remove((key, id))?;
                }
                Op::PutRetained(topic, v) => {
                    retained.insert(&*topic, v.as_slice())?;
                }
                Op::DeleteRetained(topic) => {
                    retained.remove(&*topic)?;
                }
                Op::PutKv(ns, k, v) => {
                    kv.insert((&*ns, &*k), v.as_slice())?;
                }
                Op::DeleteKv(ns, k) => {
                    kv.remove((&*ns, &*k))?;
                }
                Op::PutSink(name, seq, v) => {
                    sink.insert((&*name, seq), v.as_slice())?;
                }
                Op::DeleteSinkUpTo(name, seq) => {
                    sink.retain_in((&*name, 0)..=(&*name, seq), |_, _| false)?;
                }
            }
        }
    }
    txn.commit()?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "sandpiper-store-{name}-{}-{}",
            std::process::id(),
            record::unix_ms_now()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn config(dir: &Path) -> StoreConfig {
        StoreConfig {
            data_dir: dir.to_owned(),
            ..StoreConfig::default()
        }
    }

    #[test]
    fn writes_survive_reopen_and_delete_session_purges_its_queue() {
        let dir = tmp("reopen");
        {
            let (store, rec) = Store::open(&config(&dir)).unwrap();
            assert!(rec.sessions.is_empty());
            let t = store
                .submit(vec![
                    Op::PutSession(Arc::from("a"), vec![1]),
                    Op::PutSession(Arc::from("b"), vec![2]),
                    Op::PutQueued(1, 1, vec![1, 1, 0, 0, 10]),
                    Op::PutQueued(1, 2, vec![1, 1, 0, 0, 11]),
                    Op::PutQueued(2, 1, vec![1, 1, 0, 0, 20]),
                    Op::PutQos2In(1, 5),
                    Op::PutRetained(Arc::from("r"), vec![3]),
                ])
                .unwrap();
            store.submit_one(Op::DeleteSession(Arc::from("a"), 1));
            store.close();
            assert!(*store.committed().borrow() >= t);
        }
        let (store, rec) = Store::open(&config(&dir)).unwrap();
        assert_eq!(rec.sessions, vec![("b".to_owned(), vec![2])]);
        assert_eq!(rec.queues.len(), 1);
        let q = &rec.queues[&2];
        assert_eq!((q.queued, q.after, q.max_id), (1, 0, 1));
        assert!(q.inflight.is_empty());
        assert_eq!(
            store.read_queue(2, 0, 10).unwrap(),
            vec![(1, vec![1, 1, 0, 0, 20])]
        );
        assert!(rec.qos2_in.is_empty());
        assert_eq!(rec.retained, vec![vec![3]]);
        store.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unknown_format_version_is_refused() {
        let dir = tmp("version");
        {
            let (store, _) = Store::open(&config(&dir)).unwrap();
            store.close();
        }
        {
            let db = Database::create(dir.join("sandpiper.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert("format", 99).unwrap();
            txn.commit().unwrap();
        }
        let err = Store::open(&config(&dir)).unwrap_err();
        assert!(
            matches!(err, StoreError::Version { found: 99, .. }),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn garbage_file_is_a_clear_error() {
        let dir = tmp("garbage");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("sandpiper.redb"), vec![0x5a; 10_000]).unwrap();
        let err = Store::open(&config(&dir)).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("sandpiper.redb"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
