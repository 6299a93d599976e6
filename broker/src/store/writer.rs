//! The writer thread: takes what submitters queued (respecting open groups), applies it
//! in one write transaction, commits, and publishes the committed ticket; retries and
//! reopens the database after a failed commit.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, ReadableTable};
use tokio::sync::watch;

use super::disk::{KV, QOS2_IN, QUEUE, RETAINED, SESSIONS, SINK, SUBS, open_database};
use super::queue::Tables;
use super::{Durability, Op, record};
use crate::message::ClientKey;

/// How often a failing commit is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// How often a failure that lasts is logged again.
const FAILURE_LOG: Duration = Duration::from_secs(10);

pub(super) enum Job {
    Ops(u64, Vec<Op>),
    /// A flush, with the ticket the next submission was to get when it was asked for.
    Flush(std::sync::mpsc::Sender<()>, u64),
}

/// Changes waiting for the writer.
pub(super) struct Pending {
    pub(super) jobs: VecDeque<Job>,
    /// Their size ([`Op::size`]).
    pub(super) bytes: usize,
    /// The next ticket.
    pub(super) next: u64,
    /// No more submissions are taken (the store is closing).
    pub(super) closed: bool,
    /// The first tickets of the open [`Group`]s: no job from there on is taken until the
    /// group ends.
    pub(super) groups: Vec<u64>,
    /// Flushes among the jobs (someone waits for them).
    pub(super) flushes: usize,
}

impl Pending {
    /// Whether the writer may take the first job: not one an open group may still add to
    /// the same commit.
    pub(super) fn takeable(&self) -> bool {
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
pub(super) struct Queue {
    pub(super) pending: Mutex<Pending>,
    /// Signalled when a job arrives (the writer waits on it).
    pub(super) work: Condvar,
    /// Signalled when the writer took jobs (submitters waiting for room wait on it).
    pub(super) room: Condvar,
    /// The last commit failed and is being retried.
    pub(super) failing: AtomicBool,
}

impl Queue {
    pub(super) fn lock(&self) -> MutexGuard<'_, Pending> {
        // Every critical section is a few field updates without panicking points.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The database, swapped for a fresh handle when an I/O error made redb refuse every later
/// operation (`None` while it is reopened).
pub(super) type Handle = Arc<RwLock<Option<Arc<Database>>>>;

/// Most operations applied in one transaction.
const MAX_BATCH: usize = 16 * 1024;

/// With `periodic` durability nobody's acknowledgement waits for a commit, so the writer
/// commits at most this often (a commit costs the same for ten changes as for ten thousand),
/// sooner when a flush is asked for or [`HURRY_BYTES`] wait.
const PERIODIC_GAP: Duration = Duration::from_millis(2);
/// See [`PERIODIC_GAP`].
const HURRY_BYTES: usize = 8 * 1024 * 1024;

/// The writer thread: takes what was submitted, applies it in one transaction, commits.
pub(super) struct Writer {
    pub(super) db: Handle,
    pub(super) queue: Arc<Queue>,
    pub(super) committed: watch::Sender<u64>,
    pub(super) durability: Durability,
    pub(super) interval: Duration,
    pub(super) path: PathBuf,
    pub(super) cache_mb: usize,
}

impl Writer {
    pub(super) fn run(self) {
        let mut last_sync = Instant::now();
        let mut last_commit = Instant::now();
        let mut dirty = false;
        loop {
            let Some(jobs) = self.next_jobs(last_sync, last_commit, &mut dirty) else {
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
                        for op in ops {
                            match op {
                                Op::Log(log) => batch.extend(log.take()),
                                op => batch.push(op),
                            }
                        }
                    }
                    Job::Flush(tx, _) => flushes.push(tx),
                }
            }
            let immediate = self.durability == Durability::Sync
                || !flushes.is_empty()
                || last_sync.elapsed() >= self.interval;
            let committed = self.commit(&batch, immediate);
            last_commit = Instant::now();
            if committed {
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
    fn next_jobs(
        &self,
        last_sync: Instant,
        last_commit: Instant,
        dirty: &mut bool,
    ) -> Option<Vec<Job>> {
        let mut p = self.queue.lock();
        loop {
            if p.takeable() {
                let gap = PERIODIC_GAP.saturating_sub(last_commit.elapsed());
                let hurry = p.flushes > 0 || p.bytes >= HURRY_BYTES || p.closed;
                if self.durability == Durability::Sync || hurry || gap.is_zero() {
                    break;
                }
                p = (self.queue.work)
                    .wait_timeout(p, gap)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
                continue;
            }
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
            match &j {
                Job::Ops(_, ops) => {
                    count += ops.len();
                    p.bytes = p.bytes.saturating_sub(ops.iter().map(Op::size).sum());
                }
                Job::Flush(..) => p.flushes = p.flushes.saturating_sub(1),
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
            let started = Instant::now();
            let result = match self.db.read().unwrap_or_else(|e| e.into_inner()).clone() {
                Some(db) => apply(&db, ops, immediate),
                None => Err(redb::Error::PreviousIo),
            };
            let e = match result {
                Ok(()) => {
                    crate::metrics::STORE_COMMIT.observe(started.elapsed());
                    crate::metrics::inc(crate::metrics::C::StoreCommits);
                    crate::metrics::add(crate::metrics::C::StoreRecords, ops.len() as u64);
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
            crate::metrics::inc(crate::metrics::C::StoreWriteErrors);
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
pub(super) fn row_key(bytes: &[u8]) -> Option<ClientKey> {
    record::session_key(bytes)
}

pub(super) fn apply(db: &Database, ops: &[Op], immediate: bool) -> Result<(), redb::Error> {
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
        let mut queues = Tables {
            queue: txn.open_table(QUEUE)?,
            sink: txn.open_table(SINK)?,
        };
        let mut q2 = txn.open_table(QOS2_IN)?;
        let mut retained = txn.open_table(RETAINED)?;
        let mut kv = txn.open_table(KV)?;
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
                    (queues.queue).retain_in((*key, 0)..=(*key, u64::MAX), |_, _| false)?;
                    q2.retain_in((*key, 0)..=(*key, u16::MAX), |_, _| false)?;
                    subs.retain_in((*key, "")..(key.saturating_add(1), ""), |_, _| false)?;
                }
                Op::PutSubscription(key, filter, v) => {
                    subs.insert((*key, &**filter), v.as_slice())?;
                }
                Op::DeleteSubscription(key, filter) => {
                    subs.remove((*key, &**filter))?;
                }
                Op::Queue(q) => queues.apply(q)?,
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
                // Replaced by its rows when the writer took it (`Writer::run`).
                Op::Log(_) => {}
            }
        }
    }
    txn.commit()?;
    Ok(())
}
