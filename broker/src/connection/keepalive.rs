//! The keep-alive deadlines of idle connections, watched by one task for all of them.
//!
//! A connection in its idle wait ([`super::Conn::idle`]) keeps no timer of its own (a
//! tokio timer is over a hundred bytes in the task and as much again in the timer wheel,
//! kept by every idle client): it asks to be woken through its mailbox at its keep-alive
//! deadline, then checks whether the client has really been silent that long. Deadlines
//! are kept in buckets of [`TICK`], looked at once per tick: a client is closed at most two
//! ticks after 1.5 × its keep alive (MQTT-3.1.2-24 sets no finer bound).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::mailbox::Mailbox;

/// How finely deadlines are kept.
pub const TICK: Duration = Duration::from_millis(100);

/// The furthest ahead a wake-up is kept: a later deadline is looked at again then. A
/// connection that closes leaves its wake-up behind (its mailbox held weakly) until it
/// comes, so this bounds what closed connections leave here, whatever keep alive their
/// clients asked for (up to 65,535 s × 1.5).
pub const HORIZON: Duration = Duration::from_secs(60);

/// Mailboxes to wake, by the tick their connection's keep alive runs out in.
#[derive(Debug)]
pub struct KeepAlives {
    origin: Instant,
    due: Mutex<BTreeMap<u64, Vec<Weak<Mailbox>>>>,
}

impl Default for KeepAlives {
    fn default() -> Self {
        KeepAlives {
            origin: Instant::now(),
            due: Mutex::new(BTreeMap::new()),
        }
    }
}

impl KeepAlives {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Vec<Weak<Mailbox>>>> {
        // Each critical section moves a few pointers: a poisoned lock is still sound.
        self.due.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The tick `at` falls in, counted from the origin; a deadline rounds up (a wake-up
    /// is never early by more than nothing), `now` rounds down.
    pub fn tick_of(&self, at: Instant, round_up: bool) -> u64 {
        let since = at.saturating_duration_since(self.origin).as_nanos();
        let tick = TICK.as_nanos();
        let n = if round_up {
            since.div_ceil(tick)
        } else {
            since / tick
        };
        u64::try_from(n).unwrap_or(u64::MAX)
    }

    /// Wakes `mailbox` (its connection) in tick `tick`. A connection that is gone by then
    /// costs nothing (the mailbox is held weakly).
    pub fn watch(&self, tick: u64, mailbox: &Arc<Mailbox>) {
        self.lock()
            .entry(tick)
            .or_default()
            .push(Arc::downgrade(mailbox));
    }

    /// Wakes the mailboxes of every tick up to the one `now` is in; returns how many.
    pub fn wake_due(&self, now: Instant) -> usize {
        let now = self.tick_of(now, false);
        let due = {
            let mut m = self.lock();
            let later = m.split_off(&now.saturating_add(1));
            std::mem::replace(&mut *m, later)
        };
        let mut woken = 0;
        for mailbox in due.into_values().flatten() {
            if let Some(mb) = mailbox.upgrade() {
                mb.wake();
                woken += 1;
            }
        }
        woken
    }

    /// Runs the watch, one look per tick, until `stop` is cancelled.
    pub fn spawn(self: &Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(TICK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = every.tick() => {
                        me.wake_due(Instant::now());
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::{QueueLimits, SharedLimits};

    fn mailbox() -> Arc<Mailbox> {
        Arc::new(Mailbox::new(SharedLimits::new(QueueLimits {
            max_messages: 10,
            max_bytes: 1000,
            backpressure: false,
        })))
    }

    #[tokio::test]
    async fn a_watched_mailbox_is_woken_once_its_tick_has_come_not_before() {
        let k = KeepAlives::default();
        let mb = mailbox();
        let at = k.origin + Duration::from_millis(250);
        k.watch(k.tick_of(at, true), &mb);
        assert_eq!(k.wake_due(k.origin + Duration::from_millis(249)), 0);
        assert_eq!(k.wake_due(at + TICK), 1);
        // The wake-up left a permit: the connection's next wait returns at once.
        let woken = tokio::time::timeout(Duration::from_secs(1), mb.notified()).await;
        assert!(woken.is_ok(), "the watch left no wake-up");
        // Taken: nothing is woken twice.
        assert_eq!(k.wake_due(at + TICK * 10), 0);
    }

    #[test]
    fn a_mailbox_that_is_gone_is_skipped() {
        let k = KeepAlives::default();
        let mb = mailbox();
        k.watch(1, &mb);
        drop(mb);
        assert_eq!(k.wake_due(k.origin + TICK * 5), 0);
        assert!(k.lock().is_empty());
    }

    #[test]
    fn deadlines_round_up_and_now_rounds_down() {
        let k = KeepAlives::default();
        let t = k.origin + TICK + Duration::from_millis(1);
        assert_eq!(k.tick_of(t, true), 2);
        assert_eq!(k.tick_of(t, false), 1);
        assert_eq!(k.tick_of(k.origin + TICK * 3, true), 3);
    }
}
