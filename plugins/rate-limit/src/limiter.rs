//! Token buckets per client id, with a bounded number of buckets. Pure logic (time is a
//! parameter), tested on the host.

use std::collections::BTreeMap;
use std::time::Duration;

/// A bucket's shape: it refills at `rate` tokens per second up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Tokens (messages) per second.
    pub rate: f64,
    /// Bucket size: messages that may be sent at once after a pause.
    pub burst: f64,
}

/// One client's bucket.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    /// When `tokens` was computed.
    at: Duration,
    /// When the bucket is full again if nothing is taken: from then on it behaves as a
    /// fresh bucket, so forgetting it changes nothing.
    full_at: Duration,
    /// The last message was refused (so only the start of an episode is reported).
    limited: bool,
}

/// What [`Limiter::take`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limit.
    Allow,
    /// Over the limit; the first refusal after an allowed message.
    RejectFirst,
    /// Over the limit again.
    Reject,
}

/// Buckets by client id.
#[derive(Debug)]
pub struct Limiter {
    buckets: BTreeMap<String, Bucket>,
    max_clients: usize,
    calls: u32,
}

/// Calls between two sweeps of full buckets.
const SWEEP_EVERY: u32 = 1024;

impl Limiter {
    /// No buckets; at most `max_clients` (at least 1) kept.
    pub fn new(max_clients: usize) -> Limiter {
        Limiter {
            buckets: BTreeMap::new(),
            max_clients: max_clients.max(1),
            calls: 0,
        }
    }

    /// Buckets kept.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Takes one token from `client`'s bucket at time `now` (monotonic).
    pub fn take(&mut self, client: &str, limits: Limits, now: Duration) -> Verdict {
        self.calls = self.calls.wrapping_add(1);
        if self.calls.is_multiple_of(SWEEP_EVERY) {
            self.sweep(now);
        }
        if !self.buckets.contains_key(client) {
            self.make_room(now);
        }
        let bucket = self
            .buckets
            .entry(client.to_owned())
            .or_insert_with(|| Bucket {
                tokens: limits.burst,
                at: now,
                full_at: now,
                limited: false,
            });
        let elapsed = now.saturating_sub(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * limits.rate).min(limits.burst);
        bucket.at = now;
        let verdict = if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            bucket.limited = false;
            Verdict::Allow
        } else if bucket.limited {
            Verdict::Reject
        } else {
            bucket.limited = true;
            Verdict::RejectFirst
        };
        let to_full = (limits.burst - bucket.tokens).max(0.0) / limits.rate;
        bucket.full_at = now + Duration::try_from_secs_f64(to_full).unwrap_or(Duration::MAX);
        verdict
    }

    /// Forgets the buckets that are full again (clients idle long enough).
    pub fn sweep(&mut self, now: Duration) {
        self.buckets.retain(|_, b| b.full_at > now);
    }

    /// Before adding a bucket at the bound: forget the full ones, and if that is not
    /// enough, the eighth closest to full (those clients get a fresh burst early: the
    /// price of a bounded map).
    fn make_room(&mut self, now: Duration) {
        if self.buckets.len() < self.max_clients {
            return;
        }
        self.sweep(now);
        if self.buckets.len() < self.max_clients {
            return;
        }
        let mut full_at: Vec<Duration> = self.buckets.values().map(|b| b.full_at).collect();
        let k = full_at.len() / 8;
        let (_, threshold, _) = full_at.select_nth_unstable(k);
        let threshold = *threshold;
        self.buckets.retain(|_, b| b.full_at > threshold);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        rate: 2.0,
        burst: 3.0,
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn burst_then_rate() {
        let mut l = Limiter::new(10);
        let t = ms(1000);
        for _ in 0..3 {
            assert_eq!(l.take("c", L, t), Verdict::Allow);
        }
        assert_eq!(l.take("c", L, t), Verdict::RejectFirst);
        assert_eq!(l.take("c", L, t), Verdict::Reject);
        // 2 per second: one token after 500 ms (refused attempts take nothing).
        assert_eq!(l.take("c", L, t + ms(499)), Verdict::Reject);
        assert_eq!(l.take("c", L, t + ms(500)), Verdict::Allow);
        assert_eq!(l.take("c", L, t + ms(500)), Verdict::RejectFirst);
        assert_eq!(l.take("c", L, t + ms(1500)), Verdict::Allow);
        assert_eq!(l.take("c", L, t + ms(1500)), Verdict::Allow);
        assert_eq!(l.take("c", L, t + ms(1500)), Verdict::RejectFirst);
        // A long pause refills to the burst, not beyond.
        let later = t + ms(60_000);
        for _ in 0..3 {
            assert_eq!(l.take("c", L, later), Verdict::Allow);
        }
        assert_eq!(l.take("c", L, later), Verdict::RejectFirst);
    }

    #[test]
    fn clients_and_limits_are_independent() {
        let mut l = Limiter::new(10);
        let big = Limits {
            rate: 100.0,
            burst: 10.0,
        };
        for _ in 0..3 {
            assert_eq!(l.take("a", L, ms(0)), Verdict::Allow);
        }
        assert_eq!(l.take("a", L, ms(0)), Verdict::RejectFirst);
        for _ in 0..10 {
            assert_eq!(l.take("b", big, ms(0)), Verdict::Allow);
        }
        assert_eq!(l.take("b", big, ms(0)), Verdict::RejectFirst);
        assert_eq!(l.take("b", big, ms(10)), Verdict::Allow);
    }

    #[test]
    fn idle_clients_are_forgotten() {
        let mut l = Limiter::new(100);
        for i in 0..50 {
            l.take(&format!("c{i}"), L, ms(0));
        }
        assert_eq!(l.len(), 50);
        // One token taken, refilled after 500 ms: only recent clients stay.
        l.take("recent", L, ms(400));
        l.sweep(ms(600));
        assert_eq!(l.len(), 1);
        l.sweep(ms(900));
        assert_eq!(l.len(), 0);
    }

    #[test]
    fn the_map_is_bounded_even_when_every_client_is_busy() {
        let mut l = Limiter::new(64);
        for i in 0..10_000u64 {
            l.take(&format!("c{i}"), L, ms(i / 100));
            assert!(l.len() <= 64, "{} buckets", l.len());
        }
        // A client kept busy is still limited.
        let mut l = Limiter::new(8);
        for _ in 0..3 {
            assert_eq!(l.take("busy", L, ms(0)), Verdict::Allow);
        }
        for i in 0..7 {
            l.take(&format!("o{i}"), L, ms(0));
        }
        assert_eq!(l.take("busy", L, ms(0)), Verdict::RejectFirst);
    }

    #[test]
    fn periodic_sweep_bounds_memory_of_departed_clients() {
        let mut l = Limiter::new(1_000_000);
        for i in 0..5000u64 {
            // One new client per 10 ms, each refilled 500 ms after its one message.
            l.take(&format!("c{i}"), L, ms(i * 10));
        }
        assert!(l.len() < 1100, "{} buckets", l.len());
    }
}
