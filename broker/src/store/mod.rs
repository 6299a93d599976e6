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
//!
//! What waits for the writer is bounded ([`MAX_PENDING_BYTES`]): a submitter waits for
//! room rather than growing the heap. A commit that fails (a full disk, an I/O error) is
//! retried every second, reopening the database when redb asks for it, until it succeeds;
//! meanwhile [`Store::is_failing`] is true, so connections refuse what needs the store,
//! and the failure is logged once every [`FAILURE_LOG`]. Nothing is acknowledged that is
//! not committed: the tickets of the waiting changes are released when they are.
//!
//! Every row of a session carries its incarnation ([`ClientKey`]): queue entries, inbound
//! QoS 2 ids and subscriptions are keyed by it, and a session row is replaced only by the
//! same or a newer incarnation and deleted only by its own, so a late operation of an
//! incarnation that was taken over cannot touch its successor.

pub mod record;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Deserialize;
use tokio::sync::watch;

use crate::message::ClientKey;

/// The on-disk format this build reads and writes. Format 1 (subscriptions inside the
/// session row) is migrated at open.
pub const FORMAT_VERSION: u64 = 2;

/// Most bytes of changes waiting for the writer; a submitter beyond waits for room.
pub const MAX_PENDING_BYTES: usize = 64 * 1024 * 1024;
/// What one change counts beyond its value's bytes.
const OP_OVERHEAD: usize = 64;
/// How often a failing commit is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// How often a failure that lasts is logged again.
const FAILURE_LOG: Duration = Duration::from_secs(10);

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
const QUEUE: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("queue");
const QOS2_IN: TableDefinition<(u64, u16), ()> = TableDefinition::new("qos2_in");
const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");
const KV: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("kv");
const SINK: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("sink");
const SUBS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("subscriptions");

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
    /// The database is being reopened after a failure: try again shortly.
    #[error("the store in {path} is being reopened after a write failure")]
    Reopening {
        /// The database file.
        path: String,
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
    /// Insert or replace a session record (of the incarnation the record names; an older
    /// incarnation never replaces a newer one).
    PutSession(Arc<str>, Vec<u8>),
    /// Remove a session incarnation with its queue, inbound QoS 2 ids and subscriptions
    /// (the session row only while it is this incarnation's).
    DeleteSession(Arc<str>, ClientKey),
    /// Insert or replace one subscription of a session incarnation.
    PutSubscription(ClientKey, Arc<str>, Vec<u8>),
    /// Remove one subscription.
    DeleteSubscription(ClientKey, Arc<str>),
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

impl Op {
    /// What the change counts against [`MAX_PENDING_BYTES`].
    fn size(&self) -> usize {
        OP_OVERHEAD
            + match self {
                Op::PutSession(id, v) => id.len() + v.len(),
                Op::DeleteSession(id, _) => id.len(),
                Op::PutSubscription(_, f, v) => f.len() + v.len(),
                Op::DeleteSubscription(_, f) => f.len(),
                Op::PutQueued(_, _, v) | Op::PutSink(_, _, v) => v.len(),
                Op::PutRetained(t, v) => t.len() + v.len(),
                Op::DeleteRetained(t) | Op::DeleteSinkUpTo(t, _) => t.len(),
                Op::PutKv(ns, k, v) => ns.len() + k.len() + v.len(),
                Op::DeleteKv(ns, k) => ns.len() + k.len(),
                Op::DeleteQueued(..) | Op::PutQos2In(..) | Op::DeleteQos2In(..) => 0,
            }
    }
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
    /// Subscriptions by session key: (filter, record).
    pub subscriptions: HashMap<ClientKey, Vec<(String, Vec<u8>)>>,
    /// Retained message records.
    pub retained: Vec<Vec<u8>>,
}

enum Job {
    Ops(u64, Vec<Op>),
    /// A flush, with the ticket the next submission was to get when it was asked for.
    Flush(std::sync::mpsc::Sender<()>, u64),
}

/// Changes waiting for the writer.
struct Pending {
    jobs: VecDeque<Job>,
    /// Their size ([`Op::size`]).
    bytes: usize,
    /// The next ticket.
    next: u64,
    /// No more submissions are taken (the store is closing).
    closed: bool,
    /// The first tickets of the open [`Group`]s: no job from there on is taken until the
    /// group ends.
    groups: Vec<u64>,
}

impl Pending {
    /// Whether the writer may take the first job: not one an open group may still add to
    /// the same commit.
    fn takeable(&self) -> bool {
        let Some(job) = self.jobs.front() else {
            return false;
        };
        match self.groups.iter().min() {
            Some(&begin) if !self.closed => match job {
                Job::Ops(t, _) => *t < begin,
                Job::Flush(_, t) => *t <= begin,
            },
            _ => true,
        }
    }
}

/// What submitters and the writer share.
struct Queue {
    pending: Mutex<Pending>,
    /// Signalled when a job arrives (the writer waits on it).
    work: Condvar,
    /// Signalled when the writer took jobs (submitters waiting for room wait on it).
    room: Condvar,
    /// The last commit failed and is being retried.
    failing: AtomicBool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // Every critical section is a few field updates without panicking points.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The database, swapped for a fresh handle when an I/O error made redb refuse every later
/// operation (`None` while it is reopened).
type Handle = Arc<RwLock<Option<Arc<Database>>>>;

/// The durable store of one broker.
pub struct Store {
    db: Handle,
    queue: Arc<Queue>,
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

fn open_database(path: &Path, cache_mb: usize) -> Result<Database, StoreError> {
    // redb's page cache is the store's main memory cost: it bounds what a large backlog
    // costs in memory.
    match Database::builder()
        .set_cache_size(cache_mb.saturating_mul(1024 * 1024))
        .create(path)
    {
        Ok(db) => Ok(db),
        Err(redb::DatabaseError::Storage(e)) => Err(damaged(path, e)),
        Err(e) => Err(StoreError::Open {
            path: path.display().to_string(),
            reason: e.to_string(),
        }),
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
        let db = open_database(&path, config.cache_mb)?;
        let recovered = Self::check_and_load(&db, &path)?;
        let db: Handle = Arc::new(RwLock::new(Some(Arc::new(db))));
        let (committed_tx, committed) = watch::channel(0);
        let queue = Arc::new(Queue {
            pending: Mutex::new(Pending {
                jobs: VecDeque::new(),
                bytes: 0,
                next: 1,
                closed: false,
                groups: Vec::new(),
            }),
            work: Condvar::new(),
            room: Condvar::new(),
            failing: AtomicBool::new(false),
        });
        let writer = {
            let w = Writer {
                db: db.clone(),
                queue: queue.clone(),
                committed: committed_tx,
                durability: config.durability,
                interval: Duration::from_millis(config.fsync_interval_ms.max(1)),
                path: path.clone(),
                cache_mb: config.cache_mb,
            };
            std::thread::Builder::new()
                .name("sandpiper-store".into())
                .spawn(move || w.run())
                .map_err(|e| open_err(e.to_string()))?
        };
        Ok((
            Store {
                db,
                queue,
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
            // Create every table so readers never meet a missing one.
            txn.open_table(SESSIONS).map_err(|e| damaged(path, e))?;
            txn.open_table(QUEUE).map_err(|e| damaged(path, e))?;
            txn.open_table(QOS2_IN).map_err(|e| damaged(path, e))?;
            txn.open_table(RETAINED).map_err(|e| damaged(path, e))?;
            txn.open_table(KV).map_err(|e| damaged(path, e))?;
            txn.open_table(SINK).map_err(|e| damaged(path, e))?;
            txn.open_table(SUBS).map_err(|e| damaged(path, e))?;
            match found {
                None => {}
                Some(v) if v == FORMAT_VERSION => {}
                Some(1) => {
                    let n = migrate_subscriptions(&txn).map_err(|e| damaged(path, e))?;
                    tracing::info!(
                        sessions = n,
                        "store migrated from format 1 to 2 (one row per subscription)"
                    );
                }
                Some(found) => {
                    return Err(StoreError::Version {
                        path: path.display().to_string(),
                        found,
                    });
                }
            }
            meta.insert("format", FORMAT_VERSION)
                .map_err(|e| damaged(path, e))?;
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
        let subs = read.open_table(SUBS).map_err(|e| damaged(path, e))?;
        for row in subs.iter().map_err(|e| damaged(path, e))? {
            let (k, v) = row.map_err(|e| damaged(path, e))?;
            let (key, filter) = k.value();
            rec.subscriptions
                .entry(key)
                .or_default()
                .push((filter.to_owned(), v.value().to_vec()));
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
    /// or a store that is closing). Waits while [`MAX_PENDING_BYTES`] of changes wait for
    /// the writer.
    pub fn submit(&self, ops: Vec<Op>) -> Option<u64> {
        if ops.is_empty() {
            return None;
        }
        let size: usize = ops.iter().map(Op::size).sum();
        let mut p = self.queue.lock();
        // Not while a group is open: the writer may be unable to make room until it ends,
        // and the group's own submissions (or ones it waits for) must go through.
        while !p.closed
            && p.groups.is_empty()
            && p.bytes > 0
            && p.bytes.saturating_add(size) > MAX_PENDING_BYTES
        {
            p = self.queue.room.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        if p.closed {
            return None;
        }
        let ticket = p.next;
        p.next += 1;
        p.bytes += size;
        p.jobs.push_back(Job::Ops(ticket, ops));
        drop(p);
        self.queue.work.notify_one();
        (self.durability == Durability::Sync).then_some(ticket)
    }

    /// Opens a group: everything submitted (from any thread) until the returned guard is
    /// dropped is committed in one transaction, so a crash keeps all of it or none. For
    /// changes that must not be torn apart, such as a QoS 2 message's queue entries and
    /// the inbound packet id that marks it received. Keep a group short: commits wait for
    /// it to end.
    pub fn group(self: &Arc<Self>) -> Group {
        let begin = {
            let mut p = self.queue.lock();
            let begin = p.next;
            p.groups.push(begin);
            begin
        };
        // Submitters waiting for room stop waiting while a group is open.
        self.queue.room.notify_all();
        Group {
            store: self.clone(),
            begin,
        }
    }

    /// Queues one change; see [`Store::submit`].
    pub fn submit_one(&self, op: Op) -> Option<u64> {
        self.submit(vec![op])
    }

    /// The highest ticket that is durable.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    /// Whether the last commit failed (it is being retried): what needs the store should be
    /// refused rather than queued.
    pub fn is_failing(&self) -> bool {
        self.queue.failing.load(Ordering::Acquire)
    }

    /// The database for a read.
    fn database(&self) -> Result<Arc<Database>, StoreError> {
        let db = self.db.read().unwrap_or_else(|e| e.into_inner());
        db.clone().ok_or_else(|| StoreError::Reopening {
            path: self.path.display().to_string(),
        })
    }

    /// Reads up to `limit` committed queue entries of session `key` with ids above `after`.
    pub fn read_queue(
        &self,
        key: ClientKey,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let read = self
            .database()?
            .begin_read()
            .map_err(|e| damaged(&self.path, e))?;
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
        let read = self
            .database()?
            .begin_read()
            .map_err(|e| damaged(&self.path, e))?;
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
        let read = self
            .database()?
            .begin_read()
            .map_err(|e| damaged(&self.path, e))?;
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
        let read = self
            .database()?
            .begin_read()
            .map_err(|e| damaged(&self.path, e))?;
        let t = read.open_table(KV).map_err(|e| damaged(&self.path, e))?;
        let v = t
            .get((namespace, key))
            .map_err(|e| damaged(&self.path, e))?;
        Ok(v.map(|v| v.value().to_vec()))
    }

    /// Waits until everything submitted so far is on disk (at most 30 s).
    pub fn flush(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let mut p = self.queue.lock();
            if p.closed {
                return;
            }
            let t = p.next;
            p.jobs.push_back(Job::Flush(tx, t));
        }
        self.queue.work.notify_one();
        let _ = rx.recv_timeout(Duration::from_secs(30));
    }

    /// Writes what is pending, fsyncs, and stops the writer. Later submissions are ignored.
    pub fn close(&self) {
        self.flush();
        self.queue.lock().closed = true;
        self.queue.work.notify_all();
        self.queue.room.notify_all();
        if let Some(w) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = w.join();
        }
    }
}

/// An open group of changes ([`Store::group`]); dropping it ends the group.
pub struct Group {
    store: Arc<Store>,
    begin: u64,
}

impl Drop for Group {
    fn drop(&mut self) {
        let mut p = self.store.queue.lock();
        if let Some(i) = p.groups.iter().position(|&b| b == self.begin) {
            p.groups.swap_remove(i);
        }
        // The jobs submitted since the group began are still queued (none of them could be
        // taken): make them one job, which the writer never splits over two commits.
        // Flushes among them follow it.
        let start = p
            .jobs
            .iter()
            .position(|j| matches!(j, Job::Ops(t, _) if *t >= self.begin));
        if let Some(start) = start {
            let tail: Vec<Job> = p.jobs.drain(start..).collect();
            let (mut top, mut ops, mut flushes) = (0, Vec::new(), Vec::new());
            for j in tail {
                match j {
                    Job::Ops(t, o) => {
                        top = top.max(t);
                        ops.extend(o);
                    }
                    flush @ Job::Flush(..) => flushes.push(flush),
                }
            }
            p.jobs.push_back(Job::Ops(top, ops));
            p.jobs.extend(flushes);
        }
        drop(p);
        self.store.queue.work.notify_one();
    }
}

/// Moves the subscriptions of format-1 session rows into rows of their own.
fn migrate_subscriptions(txn: &redb::WriteTransaction) -> Result<usize, redb::Error> {
    let mut sessions = txn.open_table(SESSIONS)?;
    let mut subs = txn.open_table(SUBS)?;
    let mut rewritten = Vec::new();
    for row in sessions.iter()? {
        let (k, v) = row?;
        let Ok((rec, old)) = record::decode_session(v.value()) else {
            continue;
        };
        for (filter, options, id) in old {
            subs.insert(
                (rec.key, filter.as_str()),
                record::encode_subscription(options, id).as_slice(),
            )?;
        }
        if let Ok(bytes) = record::encode_session(&rec) {
            rewritten.push((k.value().to_owned(), bytes));
        }
    }
    let n = rewritten.len();
    for (id, bytes) in rewritten {
        sessions.insert(id.as_str(), bytes.as_slice())?;
    }
    Ok(n)
}

/// Most operations applied in one transaction.
const MAX_BATCH: usize = 16 * 1024;

/// The writer thread: takes what was submitted, applies it in one transaction, commits.
struct Writer {
    db: Handle,
    queue: Arc<Queue>,
    committed: watch::Sender<u64>,
    durability: Durability,
    interval: Duration,
    path: PathBuf,
    cache_mb: usize,
}

impl Writer {
    fn run(self) {
        let mut last_sync = Instant::now();
        let mut dirty = false;
        loop {
            let Some(jobs) = self.next_jobs(last_sync, &mut dirty) else {
                break;
            };
            if jobs.is_empty() {
                // The periodic fsync came due with nothing new.
                last_sync = Instant::now();
                continue;
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
                    Job::Flush(tx, _) => flushes.push(tx),
                }
            }
            let immediate = self.durability == Durability::Sync
                || !flushes.is_empty()
                || last_sync.elapsed() >= self.interval;
            if self.commit(&batch, immediate) {
                if immediate {
                    last_sync = Instant::now();
                    dirty = false;
                } else {
                    dirty = true;
                }
                if top > 0 {
                    self.committed.send_replace(top);
                }
            }
            for f in flushes {
                let _ = f.send(());
            }
        }
        if dirty {
            let _ = self.commit(&[], true);
        }
    }

    /// The next jobs (up to [`MAX_BATCH`] operations); empty when a periodic fsync is due
    /// (done here), `None` once the store is closed and everything was taken.
    fn next_jobs(&self, last_sync: Instant, dirty: &mut bool) -> Option<Vec<Job>> {
        let mut p = self.queue.lock();
        while !p.takeable() {
            if p.closed && p.jobs.is_empty() {
                return None;
            }
            match self.durability {
                Durability::Sync => {
                    p = self.queue.work.wait(p).unwrap_or_else(|e| e.into_inner());
                }
                Durability::Periodic => {
                    let wait = self.interval.saturating_sub(last_sync.elapsed());
                    if wait.is_zero() {
                        drop(p);
                        if *dirty && self.commit(&[], true) {
                            *dirty = false;
                        }
                        return Some(Vec::new());
                    }
                    p = self
                        .queue
                        .work
                        .wait_timeout(p, wait)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
            }
        }
        let mut jobs = Vec::new();
        let mut count = 0;
        while count < MAX_BATCH && p.takeable() {
            let Some(j) = p.jobs.pop_front() else { break };
            if let Job::Ops(_, ops) = &j {
                count += ops.len();
                p.bytes = p.bytes.saturating_sub(ops.iter().map(Op::size).sum());
            }
            jobs.push(j);
        }
        drop(p);
        self.queue.room.notify_all();
        Some(jobs)
    }

    /// Applies `ops` in one transaction and commits it, trying again every [`RETRY`]
    /// while it fails (reopening the database when redb needs it) until it succeeds or the
    /// store closes (then false: the changes are lost, and logged as such).
    fn commit(&self, ops: &[Op], immediate: bool) -> bool {
        let mut since: Option<Instant> = None;
        let mut logged = Instant::now();
        loop {
            let result = match self.db.read().unwrap_or_else(|e| e.into_inner()).clone() {
                Some(db) => apply(&db, ops, immediate),
                None => Err(redb::Error::PreviousIo),
            };
            let e = match result {
                Ok(()) => {
                    if let Some(t) = since {
                        self.queue.failing.store(false, Ordering::Release);
                        tracing::warn!(
                            after_s = t.elapsed().as_secs(),
                            "store writes again: the changes that waited are committed"
                        );
                    }
                    return true;
                }
                Err(e) => e,
            };
            if since.is_none() {
                since = Some(Instant::now());
                self.queue.failing.store(true, Ordering::Release);
                tracing::error!(error = %e, "store commit failed: QoS 1/2 messages that need the store are refused until it writes again; retrying every second");
            } else if logged.elapsed() >= FAILURE_LOG {
                logged = Instant::now();
                tracing::error!(error = %e, waiting_ops = ops.len(), "store still cannot write");
            }
            if self.queue.lock().closed {
                tracing::error!(
                    lost_ops = ops.len(),
                    "store closing while it cannot write: these changes are lost"
                );
                return false;
            }
            std::thread::sleep(RETRY);
            if matches!(
                e,
                redb::Error::PreviousIo | redb::Error::Io(_) | redb::Error::Corrupted(_)
            ) {
                self.reopen();
            }
        }
    }

    /// Drops the database handle (once no reader holds it) and opens the file again: after
    /// an I/O error redb refuses every later operation of that handle.
    fn reopen(&self) {
        let old = self.db.write().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut db) = old {
            // Readers hold a handle for one read at a time.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match Arc::try_unwrap(db) {
                    Ok(d) => {
                        drop(d);
                        break;
                    }
                    Err(back) if Instant::now() < deadline => {
                        db = back;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(back) => {
                        *self.db.write().unwrap_or_else(|e| e.into_inner()) = Some(back);
                        return;
                    }
                }
            }
        }
        match open_database(&self.path, self.cache_mb) {
            Ok(db) => {
                *self.db.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(db));
                tracing::debug!("store reopened after a write failure");
            }
            Err(e) => tracing::debug!(error = %e, "store cannot be reopened yet"),
        }
    }
}

/// The incarnation a session row belongs to (its key), if it reads as one.
fn row_key(bytes: &[u8]) -> Option<ClientKey> {
    record::session_key(bytes)
}

fn apply(db: &Database, ops: &[Op], immediate: bool) -> Result<(), redb::Error> {
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
        let mut subs = txn.open_table(SUBS)?;
        let mut queue = txn.open_table(QUEUE)?;
        let mut q2 = txn.open_table(QOS2_IN)?;
        let mut retained = txn.open_table(RETAINED)?;
        let mut kv = txn.open_table(KV)?;
        let mut sink = txn.open_table(SINK)?;
        for op in ops {
            match op {
                Op::PutSession(id, v) => {
                    let current = sessions.get(&**id)?.and_then(|r| row_key(r.value()));
                    // An older incarnation never replaces a newer one.
                    if current.is_none_or(|c| Some(c) <= row_key(v)) {
                        sessions.insert(&**id, v.as_slice())?;
                    }
                }
                Op::DeleteSession(id, key) => {
                    let current = sessions.get(&**id)?.and_then(|r| row_key(r.value()));
                    if current == Some(*key) {
                        sessions.remove(&**id)?;
                    }
                    queue.retain_in((*key, 0)..=(*key, u64::MAX), |_, _| false)?;
                    q2.retain_in((*key, 0)..=(*key, u16::MAX), |_, _| false)?;
                    subs.retain_in((*key, "")..(key.saturating_add(1), ""), |_, _| false)?;
                }
                Op::PutSubscription(key, filter, v) => {
                    subs.insert((*key, &**filter), v.as_slice())?;
                }
                Op::DeleteSubscription(key, filter) => {
                    subs.remove((*key, &**filter))?;
                }
                Op::PutQueued(key, id, v) => {
                    queue.insert((*key, *id), v.as_slice())?;
                }
                Op::DeleteQueued(key, id) => {
                    queue.remove((*key, *id))?;
                }
                Op::PutQos2In(key, id) => {
                    q2.insert((*key, *id), ())?;
                }
                Op::DeleteQos2In(key, id) => {
                    q2.remove((*key, *id))?;
                }
                Op::PutRetained(topic, v) => {
                    retained.insert(&**topic, v.as_slice())?;
                }
                Op::DeleteRetained(topic) => {
                    retained.remove(&**topic)?;
                }
                Op::PutKv(ns, k, v) => {
                    kv.insert((&**ns, &**k), v.as_slice())?;
                }
                Op::DeleteKv(ns, k) => {
                    kv.remove((&**ns, &**k))?;
                }
                Op::PutSink(name, seq, v) => {
                    sink.insert((&**name, *seq), v.as_slice())?;
                }
                Op::DeleteSinkUpTo(name, seq) => {
                    sink.retain_in((&**name, 0)..=(&**name, *seq), |_, _| false)?;
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

    fn session(key: ClientKey) -> Vec<u8> {
        record::encode_session(&record::SessionRecord {
            key,
            expiry: 60,
            disconnected_at: 0,
            next_id: 1,
            will: None,
            principal: None,
        })
        .unwrap()
    }

    #[test]
    fn writes_survive_reopen_and_delete_session_purges_its_queue() {
        let dir = tmp("reopen");
        {
            let (store, rec) = Store::open(&config(&dir)).unwrap();
            assert!(rec.sessions.is_empty());
            let t = store
                .submit(vec![
                    Op::PutSession(Arc::from("a"), session(1)),
                    Op::PutSession(Arc::from("b"), session(2)),
                    Op::PutSubscription(1, Arc::from("x/#"), vec![1, 0, 0, 0, 0]),
                    Op::PutSubscription(2, Arc::from("y"), vec![0, 0, 0, 0, 0]),
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
        assert_eq!(rec.sessions, vec![("b".to_owned(), session(2))]);
        assert_eq!(
            rec.subscriptions,
            HashMap::from([(2, vec![("y".to_owned(), vec![0, 0, 0, 0, 0])])])
        );
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

    /// Changes submitted while a group is open commit together: none of them while it is
    /// open (changes submitted before it are not held back), all of them once it ends.
    #[test]
    fn a_group_commits_as_one() {
        let dir = tmp("group");
        let store = Arc::new(Store::open(&config(&dir)).unwrap().0);
        let wait_for = |t: u64| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while *store.committed().borrow() < t && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            *store.committed().borrow() >= t
        };
        let before = store
            .submit_one(Op::PutRetained(Arc::from("r"), vec![1]))
            .unwrap();
        let group = store.group();
        let first = store.submit_one(Op::PutQos2In(1, 1)).unwrap();
        assert!(wait_for(before));
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            *store.committed().borrow() < first,
            "nothing of an open group is committed"
        );
        let second = store.submit_one(Op::PutQos2In(1, 2)).unwrap();
        drop(group);
        assert!(wait_for(second));
        store.close();
        drop(store);
        let (store, rec) = Store::open(&config(&dir)).unwrap();
        let mut ids = rec.qos2_in[&1].clone();
        ids.sort_unstable();
        assert_eq!(ids, vec![1, 2]);
        store.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A session row belongs to its incarnation: an older one never replaces a newer one,
    /// and only its own incarnation deletes it (a late delete of an incarnation that was
    /// taken over leaves its successor alone, but still purges its own rows).
    #[test]
    fn session_rows_check_their_incarnation() {
        let dir = tmp("incarnation");
        let (store, _) = Store::open(&config(&dir)).unwrap();
        store.submit(vec![
            Op::PutSession(Arc::from("c"), session(5)),
            Op::PutSession(Arc::from("c"), session(4)),
            Op::PutQueued(4, 1, vec![1, 1, 0, 0, 10]),
            Op::DeleteSession(Arc::from("c"), 4),
            Op::PutSession(Arc::from("d"), session(1)),
            Op::PutSession(Arc::from("d"), session(2)),
        ]);
        store.close();
        drop(store);
        let (store, rec) = Store::open(&config(&dir)).unwrap();
        let mut sessions = rec.sessions.clone();
        sessions.sort();
        assert_eq!(
            sessions,
            vec![("c".to_owned(), session(5)), ("d".to_owned(), session(2))]
        );
        assert!(rec.queues.is_empty(), "the old incarnation's queue went");
        store.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A store of format 1 (subscriptions inside the session rows) is migrated at open.
    #[test]
    fn format_1_is_migrated() {
        let dir = tmp("migrate");
        std::fs::create_dir_all(&dir).unwrap();
        {
            let db = Database::create(dir.join("sandpiper.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert("format", 1).unwrap();
            let mut v1 = vec![1];
            v1.extend_from_slice(&7u64.to_be_bytes());
            v1.extend_from_slice(&60u32.to_be_bytes());
            v1.extend_from_slice(&0u64.to_be_bytes());
            v1.extend_from_slice(&3u16.to_be_bytes());
            v1.extend_from_slice(&1u32.to_be_bytes());
            v1.extend_from_slice(&[0, 3, b'a', b'/', b'b', 1, 0, 0, 0, 9, 0]);
            txn.open_table(SESSIONS)
                .unwrap()
                .insert("old", v1.as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let (store, rec) = Store::open(&config(&dir)).unwrap();
        assert_eq!(rec.sessions.len(), 1);
        let (s, subs) = record::decode_session(&rec.sessions[0].1).unwrap();
        assert_eq!((s.key, s.expiry), (7, 60));
        assert!(subs.is_empty(), "rewritten as format 2");
        assert_eq!(
            rec.subscriptions,
            HashMap::from([(7, vec![("a/b".to_owned(), vec![1, 0, 0, 0, 9])])])
        );
        store.close();
        drop(store);
        let (store, _) = Store::open(&config(&dir)).unwrap();
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
