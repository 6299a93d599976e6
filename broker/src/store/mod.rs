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
//! and the failure is logged once every 10 s. Nothing is acknowledged that is
//! not committed: the tickets of the waiting changes are released when they are.
//!
//! Every row of a session carries its incarnation ([`ClientKey`]): queue entries, inbound
//! QoS 2 ids and subscriptions are keyed by it, and a session row is replaced only by the
//! same or a newer incarnation and deleted only by its own, so a late operation of an
//! incarnation that was taken over cannot touch its successor.

mod api;
mod disk;
mod fifo;
mod log;
mod queue;
pub mod record;
#[cfg(test)]
mod tests;
mod writer;

pub use api::{QueueEntry, RecoveredQueue};
pub use fifo::{Appended, Fifo};
pub use log::Log;
pub use queue::QueueKey;
use queue::QueueOp;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;

use crate::message::{ClientId, ClientKey};
use disk::open_database;
use writer::{Handle, Job, Pending, Queue, Writer};

/// The on-disk format this build reads and writes. Format 1 (subscriptions inside the
/// session row) is migrated at open.
pub const FORMAT_VERSION: u64 = 2;

/// Most bytes of changes waiting for the writer; a submitter beyond waits for room.
pub const MAX_PENDING_BYTES: usize = 64 * 1024 * 1024;
/// What one change counts beyond its value's bytes.
const OP_OVERHEAD: usize = 64;

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
enum Op {
    /// Insert or replace a session record (of the incarnation the record names; an older
    /// incarnation never replaces a newer one).
    PutSession(ClientId, Vec<u8>),
    /// Remove a session incarnation with its queue, inbound QoS 2 ids and subscriptions
    /// (the session row only while it is this incarnation's).
    DeleteSession(ClientId, ClientKey),
    /// Insert or replace one subscription of a session incarnation.
    PutSubscription(ClientKey, Arc<str>, Vec<u8>),
    /// Remove one subscription.
    DeleteSubscription(ClientKey, Arc<str>),
    /// A change to a durable queue (a session's or a sink's).
    Queue(QueueOp),
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
    /// What a [`Log`] has for the store when the writer takes this: replaced by the writer
    /// with that log's rows and deletions ([`log::Shared::take`]) before it applies them.
    Log(Arc<log::Shared>),
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
                Op::Queue(q) => q.size(),
                Op::PutRetained(t, v) => t.len() + v.len(),
                Op::DeleteRetained(t) => t.len(),
                Op::PutKv(ns, k, v) => ns.len() + k.len() + v.len(),
                Op::DeleteKv(ns, k) => ns.len() + k.len(),
                // Bounded by the log itself (it waits for the writer beyond a limit).
                Op::Log(_) => 0,
                Op::PutQos2In(..) | Op::DeleteQos2In(..) => 0,
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
                flushes: 0,
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

    /// Queues changes for the next commit. Returns the ticket to wait for before
    /// acknowledging, or `None` when acknowledgements need not wait (periodic durability,
    /// or a store that is closing). Waits while [`MAX_PENDING_BYTES`] of changes wait for
    /// the writer.
    fn submit(&self, ops: Vec<Op>) -> Option<u64> {
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
        self.enqueue(p, ops, size).ok().flatten()
    }

    /// Queues `ops` (of `size` bytes) as the next job, waking the writer: its ticket if
    /// acknowledgements wait for it, `Closed` if the store takes no more changes.
    fn enqueue(
        &self,
        mut p: std::sync::MutexGuard<'_, Pending>,
        ops: Vec<Op>,
        size: usize,
    ) -> Result<Option<u64>, Closed> {
        if p.closed {
            return Err(Closed);
        }
        let ticket = p.next;
        p.next += 1;
        p.bytes += size;
        p.jobs.push_back(Job::Ops(ticket, ops));
        drop(p);
        self.queue.work.notify_one();
        Ok((self.durability == Durability::Sync).then_some(ticket))
    }

    /// Queues `op` without waiting for room: for an [`Op::Log`], whose records are bounded
    /// by the log, and which its submitter queues while holding the log's lock (the writer
    /// needs that lock to make room).
    fn submit_now(&self, op: Op) -> Result<Option<u64>, Closed> {
        let size = op.size();
        self.enqueue(self.queue.lock(), vec![op], size)
    }

    /// Whether a submitter may wait for the writer now: not while a group is open (the
    /// writer takes nothing past its start until it ends) nor once the store is closing.
    fn may_wait(&self) -> bool {
        let p = self.queue.lock();
        !p.closed && p.groups.is_empty()
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
    fn submit_one(&self, op: Op) -> Option<u64> {
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
            p.flushes += 1;
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

/// The store is closing: it takes no more changes.
#[derive(Debug, Clone, Copy)]
struct Closed;

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

/// A store in a folder of its own, closed and deleted when dropped (tests).
#[cfg(test)]
pub(crate) struct Scratch {
    /// The open store.
    pub store: Arc<Store>,
    dir: PathBuf,
}

#[cfg(test)]
impl Scratch {
    /// A fresh store; `name` tells the folders of concurrent tests apart.
    #[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
    pub(crate) fn open(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "sandpiper-{name}-{}-{}",
            std::process::id(),
            record::unix_ms_now()
        ));
        let (store, _) = Store::open(&StoreConfig {
            data_dir: dir.clone(),
            ..StoreConfig::default()
        })
        .unwrap();
        Scratch {
            store: Arc::new(store),
            dir,
        }
    }
}

#[cfg(test)]
impl Drop for Scratch {
    fn drop(&mut self) {
        self.store.close();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
