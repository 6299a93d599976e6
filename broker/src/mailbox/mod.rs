//! The per-session queue the router delivers into. A std mutex guards it: it is held for a
//! push or a batch pop, never across an await, and a session's connection task is woken
//! through a `Notify`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use std::num::NonZeroU32;

use tokio::sync::{Notify, oneshot};

use crate::codec::{QoS, SubscriptionOptions, TopicFilter};
use crate::message::{ClientKey, Delivery};
use crate::metrics::{self, C};
use crate::store::{QueueEntry, Store};

/// Limits of one session's queue (messages not yet in flight).
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Most queued messages.
    pub max_messages: usize,
    /// Most queued bytes (topic + payload).
    pub max_bytes: usize,
    /// Whether a connected session whose queue is half full asks publishers to wait
    /// (back-pressure) instead of letting the queue overflow.
    pub backpressure: bool,
}

/// What every mailbox of a broker shares: the queue limits, so that a configuration
/// reload changes them for every session at once, and the store persistent sessions' queues
/// are written to (a mailbox keeps a pointer to these, not a copy).
#[derive(Debug)]
pub struct SharedLimits {
    max_messages: AtomicUsize,
    max_bytes: AtomicUsize,
    backpressure: AtomicBool,
    store: Option<Arc<Store>>,
}

impl SharedLimits {
    /// Limits to share, without a store.
    pub fn new(l: QueueLimits) -> Arc<SharedLimits> {
        SharedLimits::with_store(l, None)
    }

    /// Limits to share, and the store of the mailboxes' persistent sessions, if any.
    pub fn with_store(l: QueueLimits, store: Option<Arc<Store>>) -> Arc<SharedLimits> {
        Arc::new(SharedLimits {
            max_messages: AtomicUsize::new(l.max_messages),
            max_bytes: AtomicUsize::new(l.max_bytes),
            backpressure: AtomicBool::new(l.backpressure),
            store,
        })
    }

    /// Puts `l` in force for every mailbox sharing these (a queue already over a lower
    /// limit keeps what it holds and takes nothing more until it is under).
    pub fn set(&self, l: QueueLimits) {
        self.max_messages.store(l.max_messages, Ordering::Relaxed);
        self.max_bytes.store(l.max_bytes, Ordering::Relaxed);
        self.backpressure.store(l.backpressure, Ordering::Relaxed);
    }

    fn max_messages(&self) -> usize {
        self.max_messages.load(Ordering::Relaxed)
    }

    fn max_bytes(&self) -> usize {
        self.max_bytes.load(Ordering::Relaxed)
    }
}

impl From<QueueLimits> for Arc<SharedLimits> {
    fn from(l: QueueLimits) -> Arc<SharedLimits> {
        SharedLimits::new(l)
    }
}

/// A delivery that was queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pushed {
    /// The store ticket to wait for before acknowledging, for a persistent session.
    pub ticket: Option<u64>,
    /// The queue is half full: the publisher should wait for room
    /// ([`Mailbox::wait_for_room`]) before sending more.
    pub congested: bool,
}

/// Deliveries in two lanes, QoS 0 and QoS 1/2, each stamped with a sequence number so they
/// leave in arrival order. While the inflight window is full, QoS 0 messages behind queued
/// QoS 1/2 ones still go out (MQTT 5 §4.9 allows either; a full window should not delay
/// fire-and-forget traffic), and order within each QoS is always kept (MQTT-4.6.0).
///
/// Made when the session first has something to queue (or a question, or a queue on
/// disk) and kept from then on: most idle clients never get a message, and every byte of
/// a mailbox is kept by every idle client.
#[derive(Debug)]
struct Queue {
    qos0: VecDeque<(u64, Delivery)>,
    acked: VecDeque<(u64, Delivery)>,
    bytes: usize,
    next_seq: u64,
    /// Next entry id in the durable queue (persistent sessions only).
    next_store_id: u64,
    /// QoS 1/2 deliveries of a persistent session that are on disk only.
    disk: DiskTail,
    /// Questions to the connection serving the session (the admin API's), rarely any.
    asks: Vec<oneshot::Sender<Inspection>>,
    /// Messages dropped because the queue was full (for the log: the first and every
    /// 1,000th).
    dropped: u64,
}

/// A mailbox's queue, `None` until it is first needed.
type Lazy = Option<Box<Queue>>;

/// The length and bytes of a queue that may not be made yet.
fn size_of_queue(q: &Lazy) -> (usize, usize) {
    q.as_ref().map_or((0, 0), |q| (q.len(), q.bytes))
}

/// The part of a persistent session's queue that lives only in the store: the entries with
/// ids above `after`, `count` of them. They are read back in batches as the connection
/// drains the queue, so an offline session's backlog costs no memory.
#[derive(Debug, Default, Clone, Copy)]
struct DiskTail {
    count: usize,
    after: u64,
}

impl Queue {
    fn new() -> Queue {
        Queue {
            qos0: VecDeque::new(),
            acked: VecDeque::new(),
            bytes: 0,
            // Room below for deliveries put back at the front.
            next_seq: u64::MAX / 2,
            next_store_id: 1,
            disk: DiskTail::default(),
            dropped: 0,
            asks: Vec::new(),
        }
    }

    fn len(&self) -> usize {
        self.qos0.len() + self.acked.len() + self.disk.count
    }

    fn lane(&mut self, qos: QoS) -> &mut VecDeque<(u64, Delivery)> {
        if qos == QoS::AtMostOnce {
            &mut self.qos0
        } else {
            &mut self.acked
        }
    }

    fn first_seq(&self) -> u64 {
        let a = self.qos0.front().map_or(self.next_seq, |f| f.0);
        let b = self.acked.front().map_or(self.next_seq, |f| f.0);
        a.min(b)
    }
}

/// Most QoS 1/2 deliveries of a persistent session kept in memory; more wait on disk.
const RAM_QUEUE: usize = 1024;
/// Most entries read from disk at once.
const LOAD_BATCH: usize = 256;

/// A queue behind which a publisher waits before it reads more: a subscriber's mailbox
/// half full, or a bridge's outbound queue behind (`bridge::Bridge`). The publisher's
/// connection stops reading until [`Room::wait_for_room`] resolves, at most
/// `backpressure_timeout_ms`; then it calls [`Room::mark_stalled`], and that queue holds
/// no publisher back until it has caught up (its messages overflow instead).
pub trait Room: Send + Sync + std::fmt::Debug {
    /// Resolves once the queue has room again, or no longer holds publishers back.
    fn wait_for_room(&self)
    -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>;
    /// The queue did not make room in time: stop holding publishers back for it.
    fn mark_stalled(&self);
}

/// Resolves once `congested` says no, checked again each time `room` wakes its waiters:
/// the wait of a [`Room`] whose queue wakes `room` when it drains.
pub async fn until_room(room: &tokio::sync::Notify, congested: impl Fn() -> bool) {
    loop {
        let woken = room.notified();
        tokio::pin!(woken);
        // Registered before the check: a wake-up between the two is not lost.
        woken.as_mut().enable();
        if !congested() {
            return;
        }
        woken.await;
    }
}

impl Room for Mailbox {
    fn wait_for_room(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(Mailbox::wait_for_room(self))
    }

    fn mark_stalled(&self) {
        Mailbox::mark_stalled(self);
    }
}

/// Why a delivery was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// QoS 0 to a session without a connection: not kept, by design.
    Offline,
    /// The queue is at its message or byte limit: the newest message is dropped.
    Full,
}

/// A session's queue of deliveries waiting to be sent.
#[derive(Debug)]
pub struct Mailbox {
    queue: Mutex<Lazy>,
    notify: Notify,
    online: AtomicBool,
    /// The limits, and the store (if the broker has one).
    limits: Arc<SharedLimits>,
    /// The session's key, under which a persistent session's queue is written.
    key: ClientKey,
    /// QoS 1/2 deliveries are written to the store (a session with expiry 0 costs no disk
    /// writes).
    persistent: AtomicBool,
    /// Publishers waiting for room are woken through this (made by the first one: most
    /// sessions never hold a publisher back).
    room: std::sync::OnceLock<Box<Notify>>,
    /// Someone waits on `room`.
    waiting: AtomicBool,
    /// The session did not make room within the back-pressure timeout: it no longer holds
    /// publishers back (its messages overflow instead) until it has caught up.
    stalled: AtomicBool,
    /// Someone asked the connection for an [`Inspection`].
    asked: AtomicBool,
    /// The park's name for the idle connection serving this session (its slot and the
    /// slot's generation); 0: none parked (see `connection::park`).
    parked: AtomicU64,
    /// Why the registry asked the connection serving this session to close (a [`Kick`]
    /// as `Kick::code`), 0: it did not.
    kick: AtomicU8,
}

/// Why the registry asks a connection to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// Another connection with the same client identifier arrived (MQTT 5 reason 0x8E).
    TakenOver = 1,
    /// An operator asked (the admin API; MQTT 5 reason 0x98).
    Admin = 2,
}

/// What the connection serving a session answers the admin API: the state only it holds.
#[derive(Debug, Clone, Default)]
pub struct Inspection {
    /// The session's subscriptions: filter (as sent), options, subscription identifier.
    pub subscriptions: Vec<(TopicFilter, SubscriptionOptions, Option<NonZeroU32>)>,
    /// Outbound QoS 1/2 messages in flight.
    pub inflight: usize,
}

/// The queue, locked and made; what changed in its size while locked goes to the
/// broker-wide gauges of queued messages and bytes when it is unlocked.
struct Locked<'a> {
    q: std::sync::MutexGuard<'a, Lazy>,
    before: (usize, usize),
}

impl std::ops::Deref for Locked<'_> {
    type Target = Queue;
    fn deref(&self) -> &Queue {
        match &*self.q {
            Some(q) => q,
            // `Mailbox::lock` made it.
            None => unreachable!("a locked queue is made"),
        }
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Queue {
        self.q.get_or_insert_with(|| Box::new(Queue::new()))
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let after = size_of_queue(&self.q);
        if after != self.before {
            // Wrapping: the gauges are sums of signed changes.
            metrics::add(
                C::QueuedMessages,
                (after.0 as u64).wrapping_sub(self.before.0 as u64),
            );
            metrics::add(
                C::QueuedBytes,
                (after.1 as u64).wrapping_sub(self.before.1 as u64),
            );
        }
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        // What it still holds leaves the broker-wide gauges with it.
        let q = self.queue.get_mut().unwrap_or_else(|e| e.into_inner());
        let (len, bytes) = size_of_queue(q);
        metrics::add(C::QueuedMessages, (len as u64).wrapping_neg());
        metrics::add(C::QueuedBytes, (bytes as u64).wrapping_neg());
    }
}

impl Mailbox {
    /// An empty, offline mailbox (of key 0: not for a broker with a store).
    pub fn new(limits: impl Into<Arc<SharedLimits>>) -> Mailbox {
        Mailbox::with_key(limits, 0)
    }

    /// An empty, offline mailbox of the session `key`: with a store in `limits`, its QoS
    /// 1/2 deliveries are written there under `key` while [`Mailbox::set_persistent`] is
    /// on.
    pub fn with_key(limits: impl Into<Arc<SharedLimits>>, key: ClientKey) -> Mailbox {
        Mailbox {
            queue: Mutex::new(None),
            notify: Notify::new(),
            online: AtomicBool::new(false),
            limits: limits.into(),
            key,
            persistent: AtomicBool::new(false),
            room: std::sync::OnceLock::new(),
            waiting: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            asked: AtomicBool::new(false),
            parked: AtomicU64::new(0),
            kick: AtomicU8::new(0),
        }
    }

    /// An empty, offline mailbox (limits of its own) whose QoS 1/2 deliveries are written
    /// to `store` under the session `key` while [`Mailbox::set_persistent`] is on.
    pub fn with_store(limits: QueueLimits, store: Arc<Store>, key: ClientKey) -> Mailbox {
        Mailbox::with_key(SharedLimits::with_store(limits, Some(store)), key)
    }

    /// Turns writing to the store on or off (a session with expiry 0 costs no disk writes).
    pub fn set_persistent(&self, on: bool) {
        if self.limits.store.is_some() {
            self.persistent.store(on, Ordering::Release);
        }
    }

    /// Whether deliveries are written to the store.
    pub fn is_persistent(&self) -> bool {
        self.limits.store.is_some() && self.persistent.load(Ordering::Acquire)
    }

    /// The store and session key, when persistent.
    pub fn store(&self) -> Option<(&Arc<Store>, ClientKey)> {
        if !self.persistent.load(Ordering::Acquire) {
            return None;
        }
        self.limits.store.as_ref().map(|store| (store, self.key))
    }

    /// Deletes the durable copy of a delivery that was acknowledged or dropped.
    pub fn forget(&self, d: &Delivery) {
        if let (Some(id), Some((store, key))) = (d.store_id, self.store()) {
            store.queue_delete(key, id);
        }
    }

    /// Sets up, at start, the queue read from the store: `count` entries with ids above
    /// `after` are on disk (read back as the queue drains), `bytes` their size.
    pub fn restore_disk(&self, count: usize, after: u64, bytes: usize, next_store_id: u64) {
        let mut q = self.lock();
        q.next_store_id = q.next_store_id.max(next_store_id);
        q.disk = DiskTail { count, after };
        q.bytes += bytes;
    }

    /// The queue, locked, made if it was not.
    fn lock(&self) -> Locked<'_> {
        let mut q = self.peek();
        let before = size_of_queue(&q);
        q.get_or_insert_with(|| Box::new(Queue::new()));
        Locked { q, before }
    }

    /// The queue, locked, if it was made (one lock: `drain` runs at every wake-up).
    fn lock_made(&self) -> Option<Locked<'_>> {
        let q = self.peek();
        let before = size_of_queue(&q);
        q.is_some().then_some(Locked { q, before })
    }

    /// The queue, locked as it is (`None`: nothing was ever queued), to read.
    fn peek(&self) -> std::sync::MutexGuard<'_, Lazy> {
        // A panic while holding this lock cannot leave the queue inconsistent (each
        // operation is a single push/pop), so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The queue's length and bytes.
    fn size(&self) -> (usize, usize) {
        size_of_queue(&self.peek())
    }

    /// Publishers waiting for room wait on this.
    fn room(&self) -> &Notify {
        self.room.get_or_init(|| Box::new(Notify::new()))
    }

    /// Wakes the publishers waiting for room, if any wait.
    fn wake_waiters(&self) {
        if self.waiting.swap(false, Ordering::AcqRel)
            && let Some(room) = self.room.get()
        {
            room.notify_waiters();
        }
    }

    /// Queues a delivery and wakes the connection. Overflow policy: the new message is
    /// dropped, counted and logged; QoS 0 to an offline session is not kept. For a
    /// persistent session a QoS 1/2 delivery is also written to the store: the returned
    /// ticket is durable once the store has committed it.
    pub fn push(&self, mut d: Delivery) -> Result<Pushed, Refused> {
        if d.qos == QoS::AtMostOnce && !self.is_online() {
            return Err(Refused::Offline);
        }
        let size = d.msg.size();
        let mut ticket = None;
        let congested;
        {
            let mut q = self.lock();
            if q.len() >= self.limits.max_messages()
                || q.bytes.saturating_add(size) > self.limits.max_bytes()
            {
                q.dropped += 1;
                let n = q.dropped;
                drop(q);
                count_drop(n, d.qos);
                return Err(Refused::Full);
            }
            if d.qos != QoS::AtMostOnce
                && let Some((store, key)) = self.store()
            {
                // Written under the queue lock so the entry is submitted before anyone can
                // take, send and acknowledge it (a delete must never overtake its insert).
                let id = q.next_store_id;
                q.next_store_id += 1;
                d.store_id = Some(id);
                if let Ok(t) = store.queue_put(key, id, &d, None) {
                    ticket = t;
                    // Offline, or behind a backlog: the message stays on disk only.
                    if q.disk.count > 0 || !self.is_online() || q.acked.len() >= RAM_QUEUE {
                        if q.disk.count == 0 {
                            q.disk.after = id - 1;
                        }
                        q.disk.count += 1;
                        q.bytes += size;
                        let congested = self.congested(q.len(), q.bytes);
                        drop(q);
                        self.signal();
                        return Ok(Pushed { ticket, congested });
                    }
                }
            }
            q.bytes += size;
            let seq = q.next_seq;
            q.next_seq += 1;
            q.lane(d.qos).push_back((seq, d));
            congested = self.congested(q.len(), q.bytes);
        }
        self.signal();
        Ok(Pushed { ticket, congested })
    }
}

/// Counts the `n`th message a full queue dropped, and logs the first and every 1,000th.
fn count_drop(n: u64, qos: QoS) {
    metrics::inc(C::DroppedQueueFull);
    if n == 1 || n.is_multiple_of(1000) {
        tracing::warn!(
            dropped = n,
            qos = qos.bits(),
            "session queue full: dropping newest messages"
        );
    }
}

impl Mailbox {
    /// A new id in the session's queue table, for a delivery that goes in flight without
    /// being queued here (a session moved from another node); `None` for a session that is
    /// not persistent.
    pub fn take_store_id(&self) -> Option<u64> {
        self.store()?;
        let mut q = self.lock();
        let id = q.next_store_id;
        q.next_store_id += 1;
        Some(id)
    }

    /// Moves deliveries to `out` in arrival order, at most `max` of them, taking QoS 1/2
    /// deliveries only while `credits` (free inflight slots) last; QoS 0 deliveries behind
    /// a blocked QoS 1/2 one still move. Entries on disk are read back as needed. Returns
    /// false when entries are on disk but not yet readable (their commit is under way): the
    /// caller tries again once the store has committed more.
    ///
    /// The store is read without the queue's lock, so publishers pushing to this session
    /// never wait for a database read.
    pub fn drain(&self, out: &mut VecDeque<Delivery>, max: usize, mut credits: usize) -> bool {
        let mut q = match self.lock_made() {
            Some(q) => q,
            // Nothing was ever queued: nothing to move, nobody waiting for room.
            None => return true,
        };
        let start = out.len();
        let mut stalled = false;
        while out.len() < max {
            if q.acked.is_empty() && q.disk.count > 0 && credits > 0 {
                let want = credits.min(max - out.len()).min(LOAD_BATCH);
                let after = q.disk.after;
                drop(q);
                let rows = self.read_disk(after, want);
                q = self.lock();
                if !q.acked.is_empty() || q.disk.after != after {
                    // The tail moved while unlocked (spilled, or drained by another
                    // caller): what was read may not follow on; look again.
                    continue;
                }
                if !Self::load(&mut q, rows) {
                    break;
                }
            }
            let s0 = q.qos0.front().map(|f| f.0);
            let s1 = q.acked.front().map(|f| f.0).filter(|_| credits > 0);
            let from_acked = match (s0, s1) {
                (None, None) => break,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some(a), Some(b)) => b < a,
            };
            let item = if from_acked {
                credits -= 1;
                q.acked.pop_front()
            } else {
                q.qos0.pop_front()
            };
            let Some((_, d)) = item else { break };
            q.bytes = q.bytes.saturating_sub(d.msg.size());
            out.push_back(d);
        }
        stalled |= out.len() == start && q.acked.is_empty() && q.disk.count > 0 && credits > 0;
        if q.len() == 0 {
            // Sizes of entries read at start were estimates: an empty queue holds 0 bytes.
            q.bytes = 0;
        }
        let (len, bytes) = (q.len(), q.bytes);
        drop(q);
        if !self.pressed(len, bytes, 1) {
            self.wake_waiters();
            if !self.pressed(len, bytes, 2) && self.stalled.swap(false, Ordering::AcqRel) {
                tracing::info!("subscriber caught up: back-pressure resumes");
            }
        }
        !stalled
    }

    /// Reads (and decodes) up to `want` committed entries of the disk tail with ids above
    /// `after`; `None` when the session is no longer persistent (its tail is gone).
    fn read_disk(&self, after: u64, want: usize) -> Option<Vec<QueueEntry>> {
        let (store, key) = self.store()?;
        match store.read_queued(key, after, want) {
            Ok(rows) => Some(rows),
            Err(e) => {
                tracing::error!(error = %e, "cannot read a queue from the store");
                Some(Vec::new())
            }
        }
    }

    /// Moves what [`Mailbox::read_disk`] read from the disk tail into the QoS 1/2 lane.
    /// False when nothing could be moved.
    fn load(q: &mut Queue, rows: Option<Vec<QueueEntry>>) -> bool {
        let Some(rows) = rows else {
            q.disk = DiskTail::default();
            return false;
        };
        let mut loaded = false;
        for (id, rec) in rows {
            q.disk.after = id;
            match rec {
                // Entries in flight at a restart were restored with the session.
                Ok(rec) if rec.inflight.is_some() => {}
                Ok(rec) => {
                    let seq = q.next_seq;
                    q.next_seq += 1;
                    q.acked.push_back((seq, rec.delivery));
                    q.disk.count = q.disk.count.saturating_sub(1);
                    loaded = true;
                }
                Err(e) => {
                    tracing::error!(error = %e, id, "damaged queue entry skipped");
                    q.disk.count = q.disk.count.saturating_sub(1);
                }
            }
        }
        loaded
    }

    /// Puts deliveries back at the front, before everything queued, in their order (used
    /// when a connection hands back what it took but did not send).
    pub fn unshift(&self, items: impl DoubleEndedIterator<Item = Delivery>) {
        let mut items = items.peekable();
        if items.peek().is_none() {
            return;
        }
        let mut q = self.lock();
        let mut seq = q.first_seq();
        for d in items.rev() {
            seq = seq.saturating_sub(1);
            q.bytes += d.msg.size();
            let qos = d.qos;
            q.lane(qos).push_front((seq, d));
        }
    }

    /// Removes and returns the deliveries for which `take` is true, in order.
    pub fn extract(&self, mut take: impl FnMut(&Delivery) -> bool) -> Vec<Delivery> {
        let Some(mut guard) = self.lock_made() else {
            return Vec::new();
        };
        let q = &mut *guard;
        let mut out: Vec<(u64, Delivery)> = Vec::new();
        let mut bytes = 0;
        for lane in [&mut q.qos0, &mut q.acked] {
            let mut keep = VecDeque::with_capacity(lane.len());
            for (seq, d) in lane.drain(..) {
                if take(&d) {
                    out.push((seq, d));
                } else {
                    bytes += d.msg.size();
                    keep.push_back((seq, d));
                }
            }
            *lane = keep;
        }
        q.bytes = bytes;
        out.sort_by_key(|(seq, _)| *seq);
        out.into_iter().map(|(_, d)| d).collect()
    }

    /// How many more messages, and how many more bytes, the queue takes before it is full.
    pub fn room_left(&self) -> (usize, usize) {
        let (len, bytes) = self.size();
        (
            self.limits.max_messages().saturating_sub(len),
            self.limits.max_bytes().saturating_sub(bytes),
        )
    }

    /// Number of queued deliveries.
    pub fn len(&self) -> usize {
        self.size().0
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a connection is attached to the session.
    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Acquire)
    }

    /// Marks the session online (a connection drains it) or offline (QoS 0 is refused).
    pub fn set_online(&self, online: bool) {
        self.online.store(online, Ordering::Release);
        if online {
            self.signal();
        } else {
            self.wake_waiters();
        }
    }

    /// The queue length from which publishers are asked to wait.
    /// Whether a queue of `len` messages and `bytes` bytes is half full (by either limit;
    /// `shift` 1), or a quarter full (`shift` 2).
    fn pressed(&self, len: usize, bytes: usize, shift: u32) -> bool {
        len >= (self.limits.max_messages() >> shift).max(1)
            || bytes >= (self.limits.max_bytes() >> shift).max(1)
    }

    fn congested(&self, len: usize, bytes: usize) -> bool {
        self.limits.backpressure.load(Ordering::Relaxed)
            && self.pressed(len, bytes, 1)
            && self.is_online()
            && !self.stalled.load(Ordering::Acquire)
    }

    /// Resolves once the queue has room again (below half its limit), the session went
    /// offline, or it was marked stalled.
    pub async fn wait_for_room(&self) {
        loop {
            let notified = self.room().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.waiting.store(true, Ordering::Release);
            let (len, bytes) = self.size();
            if !self.congested(len, bytes) {
                return;
            }
            notified.await;
        }
    }

    /// The session did not make room in time: stop holding publishers back for it.
    pub fn mark_stalled(&self) {
        if !self.stalled.swap(true, Ordering::AcqRel) {
            metrics::inc(C::SlowSubscribers);
            tracing::warn!(
                queued = self.len(),
                "subscriber is not keeping up: its messages overflow instead of holding publishers back"
            );
        }
        self.wake_waiters();
    }

    /// Drops the in-memory copy of a persistent session's QoS 1/2 queue: an offline session
    /// keeps it on disk only, and reads it back when a connection drains it.
    pub fn spill(&self) {
        if self.is_persistent()
            && let Some(mut q) = self.lock_made()
        {
            let all_stored = q.acked.iter().all(|(_, d)| d.store_id.is_some());
            // The lowest id, not the front's: deliveries put back at the front (shared
            // ones no other member took) may have higher ids than those behind them.
            let lowest = q.acked.iter().filter_map(|(_, d)| d.store_id).min();
            if all_stored && let Some(lowest) = lowest {
                let n = q.acked.len();
                q.acked.clear();
                q.disk.after = match q.disk.count {
                    0 => lowest - 1,
                    _ => q.disk.after.min(lowest - 1),
                };
                q.disk.count += n;
            }
        }
    }

    /// Resolves when something was queued since the last call (or [`Mailbox::wake`]).
    pub async fn notified(&self) {
        self.notify.notified().await;
    }

    /// Asks the connection serving the session for an [`Inspection`] (answered on `tx`
    /// when it next wakes, which this makes happen; dropped unanswered if none serves it).
    pub fn ask(&self, tx: oneshot::Sender<Inspection>) {
        self.lock().asks.push(tx);
        self.asked.store(true, Ordering::Release);
        self.wake();
    }

    /// The questions waiting for the connection, if any (cheap when there are none).
    pub fn questions(&self) -> Vec<oneshot::Sender<Inspection>> {
        // A plain load on every wake; the locked swap only when something was asked.
        if !self.asked.load(Ordering::Relaxed) || !self.asked.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut self.lock().asks)
    }

    /// Wakes the connection that serves the mailbox (if any) as a delivery would, with
    /// nothing new queued: it then checks what changed around it, such as the policy that
    /// granted its subscriptions.
    pub fn wake(&self) {
        self.signal();
    }

    /// Wakes the connection: its task if it waits in one, the park if it is parked there.
    fn signal(&self) {
        self.notify.notify_one();
        // After the wake-up is stored: a connection parking stores its slot, then looks
        // for a wake-up (`take_wake`), so one of the two sees the other.
        let parked = self.parked.load(Ordering::SeqCst);
        if parked != 0 {
            crate::connection::park::wake(parked);
        }
    }

    /// Asks the connection serving this session to close, and wakes it (the first reason
    /// given stands until a new connection attaches).
    pub fn kick(&self, why: Kick) {
        let _ = self
            .kick
            .compare_exchange(0, why as u8, Ordering::AcqRel, Ordering::Acquire);
        self.wake();
    }

    /// Why the connection was asked to close, if it was.
    pub fn kicked(&self) -> Option<Kick> {
        match self.kick.load(Ordering::Acquire) {
            1 => Some(Kick::TakenOver),
            2 => Some(Kick::Admin),
            _ => None,
        }
    }

    /// Forgets a kick meant for the connection that served the session before (a new one
    /// attaches).
    pub fn clear_kick(&self) {
        self.kick.store(0, Ordering::Release);
    }

    /// Names the parked idle connection serving this session, whom a delivery, a question
    /// or a wake-up then makes a task for; 0 when it has one again.
    pub fn set_parked(&self, name: u64) {
        self.parked.store(name, Ordering::SeqCst);
    }

    /// Takes a wake-up nobody waited for (a delivery, question or wake-up since the
    /// connection last looked): true if there was one.
    pub fn take_wake(&self) -> bool {
        use futures_util::FutureExt;
        self.notify.notified().now_or_never().is_some()
    }
}

#[cfg(test)]
mod tests;
