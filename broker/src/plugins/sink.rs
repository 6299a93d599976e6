//! The `sink` hook: every sink plugin has its own durable queue (a [`Log`]: rows of the
//! store's table `sink`, keyed by plugin name and sequence number, written in batches and
//! served from memory while the sink keeps up), fed with the messages its `topics` select
//! as they are routed, and drained by a thread of its own in batches (`[sink] batch`,
//! `linger_ms`). A batch is deleted only once the plugin answers `ok`; on `retry`,
//! a trap or a timeout the same batch is offered again after an exponential back-off
//! (`retry_min_ms` .. `retry_max_ms`), so delivery is at least once and in order. A full
//! queue (`max_queue`) drops its oldest records, counted and logged. The queue belongs to
//! the plugin's name: a reload, a restart or a removal keeps it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use super::bindings::hooks::sink as wit;
use super::flow::message_to_wit;
use super::{Hooks, Plugin, Plugins};
use crate::message::Message;
use crate::store::{Log, Store};

thread_local! {
    /// Where a message's sink record is encoded before its queues copy it.
    static RECORD: std::cell::RefCell<bytes::BytesMut> = std::cell::RefCell::new(bytes::BytesMut::new());
}

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

/// One sink plugin's queue: a durable log, its counters, and the wake-up of its thread.
pub struct SinkQueue {
    log: Log,
    name: Arc<str>,
    /// Guards nothing but the wait for a record ([`SinkQueue::wait`]).
    idle: Mutex<()>,
    cv: Condvar,
    /// Its counters.
    pub stats: SinkStats,
    /// When the waiting records were queued: (Unix second, records), oldest first; one
    /// entry per second that queued any.
    ages: Mutex<VecDeque<(u64, u64)>>,
}

impl SinkQueue {
    /// Appends a record received in Unix second `now`; returns the store ticket that
    /// makes it durable.
    fn push(&self, bytes: &[u8], max_queue: u64, now: u64) -> Option<u64> {
        let a = self.log.push(bytes, max_queue);
        {
            let mut ages = self.ages.lock().unwrap_or_else(|p| p.into_inner());
            if a.dropped_oldest {
                take_oldest(&mut ages, 1);
            }
            match ages.back_mut() {
                Some((s, n)) if *s == now => *n += 1,
                _ => ages.push_back((now, 1)),
            }
        }
        if a.dropped_oldest {
            let n = self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(plugin = %self.name, dropped = n + 1, max_queue,
                    "sink queue full: oldest records dropped");
            }
        }
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        self.stats.depth.store(a.waiting, Ordering::Relaxed);
        // The thread waits only on an empty queue ([`SinkQueue::wait`]): the record that
        // ends the emptiness wakes it (under the lock it checks emptiness with).
        if a.waiting == 1 {
            let _idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            self.cv.notify_one();
        }
        a.ticket
    }

    /// Up to `limit` records from the oldest undelivered one.
    fn read(&self, limit: usize) -> Vec<(u64, bytes::Bytes)> {
        match self.log.read(limit) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(plugin = %self.name, error = %e, "sink queue unreadable");
                Vec::new()
            }
        }
    }

    /// Forgets everything up to and including `last` (delivered).
    fn done(&self, last: u64, delivered: usize) {
        self.log.consume_through(last);
        take_oldest(
            &mut self.ages.lock().unwrap_or_else(|p| p.into_inner()),
            delivered as u64,
        );
        self.stats.depth.store(self.log.len(), Ordering::Relaxed);
        self.stats
            .delivered
            .fetch_add(delivered as u64, Ordering::Relaxed);
    }

    /// The sink plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn waiting(&self) -> u64 {
        self.log.len()
    }

    /// How long the oldest waiting record has waited (whole seconds; records recovered at
    /// start count from then).
    pub fn oldest_age(&self) -> Duration {
        let ages = self.ages.lock().unwrap_or_else(|p| p.into_inner());
        match ages.front() {
            Some((s, _)) => Duration::from_secs(unix_s_now().saturating_sub(*s)),
            None => Duration::ZERO,
        }
    }

    /// Waits for a record to arrive, at most `d`.
    fn wait(&self, d: Duration) {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if self.log.is_empty() {
            let _ = self.cv.wait_timeout(idle, d);
        }
    }
}

/// The wall clock in whole seconds since the Unix epoch.
fn unix_s_now() -> u64 {
    crate::store::record::unix_ms_now() / 1000
}

/// Forgets the queue times of the `n` oldest records.
fn take_oldest(ages: &mut VecDeque<(u64, u64)>, mut n: u64) {
    while n > 0 {
        let Some(front) = ages.front_mut() else {
            return;
        };
        if front.1 > n {
            front.1 -= n;
            return;
        }
        n -= front.1;
        ages.pop_front();
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
        RECORD.with_borrow_mut(|record| {
            // One clock reading per message: its record's time and its queue's age.
            let mut received_ms = None;
            let mut ticket = None;
            for p in &chain.plugins {
                if !p.hooks.has(Hooks::SINK) || !p.sidecar.selects(msg.topic.as_str()) {
                    continue;
                }
                let q = match p.sink.get() {
                    Some(q) => q,
                    None => match self.sink_queue(&p.name) {
                        Some(q) => p.sink.get_or_init(|| q),
                        None => continue,
                    },
                };
                let at_ms = match received_ms {
                    Some(ms) => ms,
                    None => {
                        let ms = crate::store::record::unix_ms_now();
                        if !Store::sink_record_at(record, publisher, ms, msg) {
                            return None;
                        }
                        received_ms = Some(ms);
                        ms
                    }
                };
                ticket = ticket.max(q.push(record, p.sidecar.sink.max_queue, at_ms / 1000));
            }
            // A large message's room is not kept for the next ones.
            if record.capacity() > 1024 * 1024 {
                *record = bytes::BytesMut::new();
            }
            ticket
        })
    }

    /// Whether a sink plugin selects `topic` (its message would be queued in the store).
    pub fn sink_selects(&self, topic: &str) -> bool {
        self.hooks() & Hooks::SINK != 0
            && (self.chain().plugins.iter())
                .any(|p| p.hooks.has(Hooks::SINK) && p.sidecar.selects(topic))
    }

    /// Every sink queue made so far, sorted by plugin name.
    pub fn sink_queues(&self) -> Vec<Arc<SinkQueue>> {
        let queues = self.sinks.queues.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<_> = queues.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
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
        let log = match Log::open(self.store.clone(), name.clone()) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(plugin = %name, error = %e, "sink queue unreadable");
                return None;
            }
        };
        let waiting = log.len();
        if waiting > 0 {
            tracing::info!(plugin = %name, waiting, "sink queue recovered");
        }
        let q = Arc::new(SinkQueue {
            log,
            name: name.clone(),
            idle: Mutex::new(()),
            cv: Condvar::new(),
            stats: SinkStats::default(),
            ages: Mutex::new(if waiting > 0 {
                VecDeque::from([(unix_s_now(), waiting)])
            } else {
                VecDeque::new()
            }),
        });
        q.stats.depth.store(waiting, Ordering::Relaxed);
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
        // A full batch is queued but part of it (read back from the store) is not committed
        // yet: within the linger time, wait for the commit rather than send a short batch.
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
            .filter_map(|(seq, bytes)| match Store::open_sink_record(bytes) {
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
