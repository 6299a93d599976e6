//! The `sink` hook: every sink plugin has its own queue in the durable store (table
//! `sink`, keyed by plugin name and sequence number), fed with the messages its `topics`
//! select as they are routed, and drained by a thread of its own in batches (`[sink]
//! batch`, `linger_ms`). A batch is deleted only once the plugin answers `ok`; on `retry`,
//! a trap or a timeout the same batch is offered again after an exponential back-off
//! (`retry_min_ms` .. `retry_max_ms`), so delivery is at least once and in order. A full
//! queue (`max_queue`) drops its oldest records, counted and logged. The queue belongs to
//! the plugin's name: a reload, a restart or a removal keeps it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::bindings::hooks::sink as wit;
use super::flow::message_to_wit;
use super::{Hooks, Plugin, Plugins};
use crate::message::Message;
use crate::store::{Op, Store, record};

/// Counters of one sink queue.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Records queued since start.
    pub queued: AtomicU64,
    /// Records the plugin accepted.
    pub delivered: AtomicU64,
    /// Batches offered again after a failure.
    pub retried: AtomicU64,
    /// Calls that failed (retry answers, traps, timeouts).
    pub failed: AtomicU64,
    /// Records dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Records waiting now.
    pub depth: AtomicU64,
}

struct QState {
    /// Oldest sequence number not yet delivered (== `next` when empty).
    first: u64,
    /// Next sequence number to assign.
    next: u64,
    /// Records of a broker without a store (tests, benchmarks): kept here instead.
    mem: VecDeque<(u64, Vec<u8>)>,
}

/// One sink plugin's queue.
pub struct SinkQueue {
    name: Arc<str>,
    store: Option<Arc<Store>>,
    st: Mutex<QState>,
    cv: Condvar,
    /// Its counters.
    pub stats: SinkStats,
}

impl SinkQueue {
    fn lock(&self) -> MutexGuard<'_, QState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a record; returns the store ticket that makes it durable.
    fn push(&self, bytes: Vec<u8>, max_queue: u64) -> Option<u64> {
        let mut st = self.lock();
        let seq = st.next;
        st.next += 1;
        let mut ops = Vec::with_capacity(2);
        if st.next - st.first > max_queue {
            // Full: the oldest record goes.
            let oldest = st.first;
            st.first += 1;
            st.mem.pop_front();
            ops.push(Op::DeleteSinkUpTo(self.name.clone(), oldest));
            let n = self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(plugin = %self.name, dropped = n + 1, max_queue,
                    "sink queue full: oldest records dropped");
            }
        }
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        self.stats
            .depth
            .store(st.next - st.first, Ordering::Relaxed);
        // Submitted under the lock: commits follow submission order, so what a reader
        // sees committed is always a prefix of the sequence.
        let ticket = match &self.store {
            Some(store) => {
                ops.push(Op::PutSink(self.name.clone(), seq, bytes));
                store.submit(ops)
            }
            None => {
                st.mem.push_back((seq, bytes));
                None
            }
        };
        drop(st);
        self.cv.notify_one();
        ticket
    }

    /// Up to `limit` records from the oldest undelivered one (only committed ones).
    fn read(&self, limit: usize) -> Vec<(u64, Vec<u8>)> {
        let first = self.lock().first;
        match &self.store {
            Some(store) => match store.read_sink(&self.name, first.saturating_sub(1), limit) {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(plugin = %self.name, error = %e, "sink queue unreadable");
                    Vec::new()
                }
            },
            None => self.lock().mem.iter().take(limit).cloned().collect(),
        }
    }

    /// Forgets everything up to and including `last` (delivered).
    fn done(&self, last: u64, delivered: usize) {
        let mut st = self.lock();
        if st.first <= last {
            st.first = last + 1;
        }
        while st.mem.front().is_some_and(|(s, _)| *s <= last) {
            st.mem.pop_front();
        }
        self.stats
            .depth
            .store(st.next - st.first, Ordering::Relaxed);
        if let Some(store) = &self.store {
            store.submit_one(Op::DeleteSinkUpTo(self.name.clone(), last));
        }
        self.stats
            .delivered
            .fetch_add(delivered as u64, Ordering::Relaxed);
    }

    fn waiting(&self) -> u64 {
        let st = self.lock();
        st.next - st.first
    }

    /// Waits for a record to arrive, at most `d`.
    fn wait(&self, d: Duration) {
        let st = self.lock();
        if st.next == st.first {
            let _ = self.cv.wait_timeout(st, d);
        }
    }
}

/// The sink queues of one broker, by plugin name.
#[derive(Default)]
pub(super) struct Sinks {
    queues: Mutex<HashMap<Arc<str>, Arc<SinkQueue>>>,
}

impl Sinks {
    fn get(&self, name: &str) -> Option<Arc<SinkQueue>> {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }
}

impl Plugins {
    /// Queues a routed message for every sink plugin whose `topics` select it; returns the
    /// store ticket to wait for before acknowledging the publisher.
    pub fn sink_offer(&self, publisher: &str, msg: &Message) -> Option<u64> {
        if self.hooks() & Hooks::SINK == 0 {
            return None;
        }
        let chain = self.chain();
        let mut bytes = None;
        let mut ticket = None;
        for p in &chain.plugins {
            if !p.hooks.has(Hooks::SINK) || !p.sidecar.selects(msg.topic.as_str()) {
                continue;
            }
            let Some(q) = self.sink_queue(&p.name) else {
                continue;
            };
            let b = match &bytes {
                Some(b) => b,
                None => match record::encode_sink(publisher, record::unix_ms_now(), msg) {
                    Ok(b) => bytes.insert(b),
                    Err(e) => {
                        tracing::warn!(error = %e, "message cannot be queued for sinks");
                        return None;
                    }
                },
            };
            ticket = ticket.max(q.push(b.clone(), p.sidecar.sink.max_queue));
        }
        ticket
    }

    /// Whether a sink plugin selects `topic` (its message would be queued in the store).
    pub fn sink_selects(&self, topic: &str) -> bool {
        self.hooks() & Hooks::SINK != 0
            && (self.chain().plugins.iter())
                .any(|p| p.hooks.has(Hooks::SINK) && p.sidecar.selects(topic))
    }

    /// The counters of sink `name`'s queue, if it has one.
    pub fn sink_stats(&self, name: &str) -> Option<Arc<SinkQueue>> {
        self.sinks.get(name)
    }

    /// The queue of sink plugin `name`, made (with its thread) on first use.
    pub(super) fn sink_queue(&self, name: &Arc<str>) -> Option<Arc<SinkQueue>> {
        if let Some(q) = self.sinks.get(name) {
            return Some(q);
        }
        let me = self.me.get()?.clone();
        let shutdown = self.shutdown.get()?.clone();
        let mut queues = self.sinks.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(q) = queues.get(name) {
            return Some(q.clone());
        }
        let (first, next) = match &self.store {
            Some(store) => match store.sink_bounds(name) {
                Ok(Some((first, last))) => (first, last + 1),
                Ok(None) => (1, 1),
                Err(e) => {
                    tracing::error!(plugin = %name, error = %e, "sink queue unreadable");
                    return None;
                }
            },
            None => (1, 1),
        };
        if next > first {
            tracing::info!(plugin = %name, waiting = next - first, "sink queue recovered");
        }
        let q = Arc::new(SinkQueue {
            name: name.clone(),
            store: self.store.clone(),
            st: Mutex::new(QState {
                first,
                next,
                mem: VecDeque::new(),
            }),
            cv: Condvar::new(),
            stats: SinkStats::default(),
        });
        q.stats.depth.store(next - first, Ordering::Relaxed);
        queues.insert(name.clone(), q.clone());
        let runner = q.clone();
        let r = std::thread::Builder::new()
            .name(format!("sink-{name}"))
            .spawn(move || run(&me, &runner, &shutdown));
        if let Err(e) = r {
            tracing::error!(plugin = %name, error = %e, "sink thread failed to start");
        }
        Some(q)
    }
}

/// The current version of sink plugin `name`, if loaded.
fn current(plugins: &Weak<Plugins>, name: &str) -> Option<Arc<Plugin>> {
    let p = plugins.upgrade()?;
    let chain = p.chain();
    chain
        .plugins
        .iter()
        .find(|p| &*p.name == name && p.hooks.has(Hooks::SINK))
        .cloned()
}

fn run(plugins: &Weak<Plugins>, q: &SinkQueue, shutdown: &tokio_util::sync::CancellationToken) {
    let mut backoff: Option<Duration> = None;
    let mut last_report = Instant::now();
    let mut reported = (0, 0, 0);
    let mut filling_since: Option<Instant> = None;
    while !shutdown.is_cancelled() {
        report(q, &mut last_report, &mut reported);
        if plugins.strong_count() == 0 {
            return;
        }
        let Some(plugin) = current(plugins, &q.name) else {
            std::thread::sleep(Duration::from_millis(250));
            continue;
        };
        let settings = plugin.sidecar.sink;
        let waiting = q.waiting();
        if waiting == 0 {
            filling_since = None;
            q.wait(Duration::from_millis(200));
            continue;
        }
        // Linger: a batch that is not full waits up to linger_ms for more.
        let since = *filling_since.get_or_insert_with(Instant::now);
        let linger = Duration::from_millis(u64::from(settings.linger_ms));
        if waiting < u64::from(settings.batch) && since.elapsed() < linger {
            std::thread::sleep((linger - since.elapsed()).min(Duration::from_millis(10)));
            continue;
        }
        let rows = q.read(settings.batch as usize);
        // A full batch is queued but part of it is not committed yet: within the linger
        // time, wait for the commit rather than send a short batch.
        let queued = usize::try_from(waiting.min(u64::from(settings.batch))).unwrap_or(usize::MAX);
        if rows.len() < queued && since.elapsed() < linger {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        let Some(&(last, _)) = rows.last() else {
            // Queued but not committed yet.
            std::thread::sleep(Duration::from_millis(2));
            continue;
        };
        filling_since = None;
        let batch: Vec<wit::SinkRecord> = rows
            .iter()
            .filter_map(|(seq, bytes)| match record::decode_sink(bytes) {
                Ok((publisher, received_at, m)) => Some(wit::SinkRecord {
                    publisher,
                    received_at,
                    message: message_to_wit(&m, m.qos, m.retain),
                }),
                Err(e) => {
                    tracing::error!(plugin = %q.name, seq, error = %e, "damaged sink record skipped");
                    None
                }
            })
            .collect();
        // Offer this batch until the plugin takes it (or the broker stops).
        let mut plugin = plugin;
        loop {
            let r = plugin.call("sink", |s| match &s.guests.sink {
                Some(g) => g.call_write(&mut s.store, &batch),
                None => Ok(wit::WriteResult::Ok),
            });
            let why = match r {
                Ok(wit::WriteResult::Ok) => {
                    q.done(last, rows.len());
                    backoff = None;
                    break;
                }
                Ok(wit::WriteResult::Retry(why)) => why,
                Err(e) => e.to_string(),
            };
            q.stats.failed.fetch_add(1, Ordering::Relaxed);
            q.stats.retried.fetch_add(1, Ordering::Relaxed);
            let min = Duration::from_millis(u64::from(plugin.sidecar.sink.retry_min_ms));
            let max = Duration::from_millis(u64::from(plugin.sidecar.sink.retry_max_ms));
            let wait = backoff.map_or(min, |b| (b * 2).min(max)).max(min);
            backoff = Some(wait);
            tracing::warn!(plugin = %q.name, records = batch.len(), retry_in_ms = wait.as_millis() as u64,
                "sink batch not delivered: {why}");
            let until = Instant::now() + wait;
            while Instant::now() < until {
                if shutdown.is_cancelled() {
                    return;
                }
                std::thread::sleep((until - Instant::now()).min(Duration::from_millis(100)));
            }
            report(q, &mut last_report, &mut reported);
            // A reload meanwhile: the new version gets the batch.
            match current(plugins, &q.name) {
                Some(p) => plugin = p,
                None => break,
            }
        }
    }
}

/// Logs the queue's counters every 10 s while they move.
fn report(q: &SinkQueue, last: &mut Instant, reported: &mut (u64, u64, u64)) {
    if last.elapsed() < Duration::from_secs(10) {
        return;
    }
    *last = Instant::now();
    let s = &q.stats;
    let now = (
        s.queued.load(Ordering::Relaxed),
        s.delivered.load(Ordering::Relaxed),
        s.failed.load(Ordering::Relaxed),
    );
    if now == *reported {
        return;
    }
    *reported = now;
    tracing::info!(
        plugin = %q.name,
        queued = now.0,
        delivered = now.1,
        retried = s.retried.load(Ordering::Relaxed),
        failed = now.2,
        dropped = s.dropped.load(Ordering::Relaxed),
        depth = s.depth.load(Ordering::Relaxed),
        "sink"
    );
}
