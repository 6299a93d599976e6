//! Hook calls from connection tasks: in place while the chain is fast, handed to another
//! thread (`block_in_place`) for a while after a slow call.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Plugins;

/// A hook call slower than this marks the chain slow.
const SLOW_CALL: Duration = Duration::from_millis(2);
/// How long a first slow call keeps the chain marked slow.
const SLOW_FOR: Duration = Duration::from_secs(10);
/// Each later slow call made in place doubles that, up to 2^8 times (about 43 minutes).
const SLOW_DOUBLINGS: u32 = 8;

/// How long the chain stays marked slow after its `strikes`-th slow call made in place.
fn slow_period(strikes: u32) -> Duration {
    SLOW_FOR * 2u32.pow(strikes.saturating_sub(1).min(SLOW_DOUBLINGS))
}

impl Plugins {
    /// Runs a synchronous plugin call from a connection task. Hook calls normally take a
    /// microsecond or two and run in place; handing the worker's other tasks over to
    /// another thread (`block_in_place`) costs more than that. Once a call has taken more
    /// than 2 ms (a slow or hostile plugin, which may use its whole time budget), calls
    /// hand the worker over for the next 10 s, so other clients keep being served. A call
    /// made in place that is slow again after that doubles the period, up to about 43
    /// minutes: on a runtime with one worker each such call stops every other client, so a
    /// plugin that stays slow costs ever rarer stalls. A chain change starts over.
    pub(super) fn blocking<R>(&self, run: impl FnOnce() -> R) -> R {
        let now = self.epoch.elapsed();
        let slow = now.as_millis() < u128::from(self.slow_until.load(Ordering::Relaxed));
        let start = Instant::now();
        let r = match tokio::runtime::Handle::try_current() {
            Ok(h) if slow && h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(run)
            }
            _ => run(),
        };
        if start.elapsed() > SLOW_CALL {
            let strikes = if slow {
                // Handed over: it stopped no one; the mark is only extended.
                self.slow_strikes.load(Ordering::Relaxed)
            } else {
                self.slow_strikes
                    .fetch_add(1, Ordering::Relaxed)
                    .saturating_add(1)
            };
            let until = (now + start.elapsed() + slow_period(strikes)).as_millis();
            self.slow_until
                .store(u64::try_from(until).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_period_doubles_per_strike_up_to_a_cap() {
        assert_eq!(slow_period(0), SLOW_FOR);
        assert_eq!(slow_period(1), SLOW_FOR);
        assert_eq!(slow_period(2), SLOW_FOR * 2);
        assert_eq!(slow_period(4), SLOW_FOR * 8);
        assert_eq!(slow_period(9), SLOW_FOR * 256);
        assert_eq!(slow_period(u32::MAX), SLOW_FOR * 256);
    }

    #[test]
    fn slow_calls_in_place_escalate_and_handed_over_ones_do_not() {
        let plugins = Plugins::disabled();
        let slow = || std::thread::sleep(SLOW_CALL * 2);
        // Not on a runtime: every call runs in place.
        plugins.blocking(slow);
        assert_eq!(plugins.slow_strikes.load(Ordering::Relaxed), 1);
        let first = plugins.slow_until.load(Ordering::Relaxed);
        assert!(first >= u64::try_from(SLOW_FOR.as_millis()).unwrap_or(u64::MAX));
        // Marked slow: a slow call now only extends the mark.
        plugins.blocking(slow);
        assert_eq!(plugins.slow_strikes.load(Ordering::Relaxed), 1);
        // Once the mark has passed, a slow call in place is a second strike: 20 s.
        plugins.slow_until.store(0, Ordering::Relaxed);
        plugins.blocking(slow);
        assert_eq!(plugins.slow_strikes.load(Ordering::Relaxed), 2);
        let second = plugins.slow_until.load(Ordering::Relaxed);
        let now = u64::try_from(plugins.epoch.elapsed().as_millis()).unwrap_or(0);
        assert!(second >= now + 19_000, "{second} vs now {now}");
        // A fast call changes nothing.
        plugins.blocking(|| ());
        assert_eq!(plugins.slow_strikes.load(Ordering::Relaxed), 2);
    }
}
