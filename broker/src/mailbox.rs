//! The per-session queue the router delivers into. A std mutex guards it: it is held for a
//! push or a batch pop, never across an await, and a session's connection task is woken
//! through a `Notify`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;

use crate::codec::QoS;
use crate::message::Delivery;
use crate::metrics::METRICS;

/// Limits of one session's queue (messages not yet in flight).
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Most queued messages.
    pub max_messages: usize,
    /// Most queued bytes (topic + payload).
    pub max_bytes: usize,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Delivery>,
    bytes: usize,
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
    queue: Mutex<Queue>,
    notify: Notify,
    online: AtomicBool,
    dropped: AtomicU64,
    limits: QueueLimits,
}

impl Mailbox {
    /// An empty, offline mailbox.
    pub fn new(limits: QueueLimits) -> Mailbox {
        Mailbox {
            queue: Mutex::new(Queue::default()),
            notify: Notify::new(),
            online: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            limits,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while holding this lock cannot leave the queue inconsistent (each
        // operation is a single push/pop), so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a delivery and wakes the connection. Overflow policy: the new message is
    /// dropped, counted and logged; QoS 0 to an offline session is not kept.
    pub fn push(&self, d: Delivery) -> Result<(), Refused> {
        if d.qos == QoS::AtMostOnce && !self.is_online() {
            return Err(Refused::Offline);
        }
        let size = d.msg.size();
        {
            let mut q = self.lock();
            if q.items.len() >= self.limits.max_messages
                || q.bytes.saturating_add(size) > self.limits.max_bytes
            {
                drop(q);
                self.count_drop(d.qos);
                return Err(Refused::Full);
            }
            q.bytes += size;
            q.items.push_back(d);
        }
        self.notify.notify_one();
        Ok(())
    }

    fn count_drop(&self, qos: QoS) {
        let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        METRICS.queue_dropped.fetch_add(1, Ordering::Relaxed);
        if n == 1 || n.is_multiple_of(1000) {
            tracing::warn!(
                dropped = n,
                qos = qos.bits(),
                "session queue full: dropping newest messages"
            );
        }
    }

    /// Moves deliveries to `out`, in order, stopping after `max` items or before a QoS 1/2
    /// delivery once `credits` (free inflight slots) are used up.
    pub fn drain(&self, out: &mut VecDeque<Delivery>, max: usize, mut credits: usize) {
        let mut q = self.lock();
        let mut taken = 0;
        while taken < max {
            let Some(front) = q.items.front() else { break };
            if front.qos != QoS::AtMostOnce {
                if credits == 0 {
                    break;
                }
                credits -= 1;
            }
            let Some(d) = q.items.pop_front() else { break };
            q.bytes = q.bytes.saturating_sub(d.msg.size());
            out.push_back(d);
            taken += 1;
        }
    }

    /// Puts deliveries back at the front, in their order (used when a session hands back
    /// what it took but did not send).
    pub fn unshift(&self, items: impl DoubleEndedIterator<Item = Delivery>) {
        let mut q = self.lock();
        for d in items.rev() {
            q.bytes += d.msg.size();
            q.items.push_front(d);
        }
    }

    /// Removes and returns the deliveries for which `take` is true.
    pub fn extract(&self, mut take: impl FnMut(&Delivery) -> bool) -> Vec<Delivery> {
        let mut q = self.lock();
        let mut out = Vec::new();
        let mut keep = VecDeque::with_capacity(q.items.len());
        let mut bytes = 0;
        for d in q.items.drain(..) {
            if take(&d) {
                out.push(d);
            } else {
                bytes += d.msg.size();
                keep.push_back(d);
            }
        }
        q.items = keep;
        q.bytes = bytes;
        out
    }

    /// Number of queued deliveries.
    pub fn len(&self) -> usize {
        self.lock().items.len()
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
            self.notify.notify_one();
        }
    }

    /// Resolves when something was queued since the last call.
    pub async fn notified(&self) {
        self.notify.notified().await;
    }
}
