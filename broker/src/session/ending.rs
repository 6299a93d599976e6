//! When a session without a connection ends, and when its will goes out, without I/O
//! (MQTT 5 §3.1.2.5, §3.1.2.11.2 and §3.1.3.2.2; MQTT 3.1.1 §3.1.2.4 and §3.1.2.5).
//!
//! A session whose Session Expiry Interval is 0 ends with its connection; one with
//! [`NEVER_EXPIRES`] never ends by itself; any other ends that many seconds after its
//! connection closed. A pending will (the connection ended without DISCONNECT 0x00) goes out
//! after its Will Delay Interval or when the session ends, whichever comes first
//! (MQTT-3.1.3-9 and §3.1.2.5). A new connection to the session before then cancels it
//! unless it starts clean, which ends the old session and so sends the will
//! ([`will_on_connect`]). MQTT 3.x has neither interval: its sessions are 0 or never, and
//! its wills go out at once.
//!
//! The registry runs the timers; the durations here are measured from now, `elapsed` after
//! the connection closed (0 when it just did; the time the broker was down after a restart),
//! so a restart keeps the schedule the disconnect set.

use std::time::Duration;

use super::NEVER_EXPIRES;

/// When a pending will goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WillAt {
    /// There is no will.
    None,
    /// Now.
    Now,
    /// After this long, unless the session is connected again first.
    After(Duration),
}

impl WillAt {
    /// How long from now (`None`: there is no will).
    pub fn in_from_now(self) -> Option<Duration> {
        match self {
            WillAt::None => None,
            WillAt::Now => Some(Duration::ZERO),
            WillAt::After(d) => Some(d),
        }
    }
}

/// What becomes of a session whose connection has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// It ends now; its will, if any, goes out now.
    EndsNow,
    /// It is kept for a later connection.
    Kept {
        /// When the will goes out.
        will: WillAt,
        /// When it ends (`None`: never).
        expires_in: Option<Duration>,
    },
}

/// The fate of a session with Session Expiry Interval `expiry` and a will with Will Delay
/// Interval `will_delay` (`None`: no will), `elapsed` after its connection closed.
pub fn after_disconnect(expiry: u32, will_delay: Option<u32>, elapsed: Duration) -> Fate {
    let expires_in = (expiry != NEVER_EXPIRES)
        .then(|| Duration::from_secs(u64::from(expiry)).saturating_sub(elapsed));
    if expires_in == Some(Duration::ZERO) {
        return Fate::EndsNow;
    }
    let will = match will_delay {
        None => WillAt::None,
        Some(delay) => {
            match Duration::from_secs(u64::from(delay.min(expiry))).saturating_sub(elapsed) {
                Duration::ZERO => WillAt::Now,
                left => WillAt::After(left),
            }
        }
    };
    Fate::Kept { will, expires_in }
}

/// Whether the will still pending for a session goes out when a new connection takes the
/// session with `clean_start`: yes if it starts clean (the old session ends, before its will
/// delay passed), no if it resumes the session (MQTT-3.1.3-9).
pub fn will_on_connect(clean_start: bool) -> bool {
    clean_start
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn table() {
        use Fate::*;
        use WillAt::{After, Now};
        let rows = [
            // expiry, will delay, elapsed → fate
            (0, None, 0, EndsNow),
            (0, Some(30), 0, EndsNow),
            (
                10,
                None,
                0,
                Kept {
                    will: WillAt::None,
                    expires_in: Some(S(10)),
                },
            ),
            (
                10,
                Some(0),
                0,
                Kept {
                    will: Now,
                    expires_in: Some(S(10)),
                },
            ),
            // The will waits its delay…
            (
                60,
                Some(5),
                0,
                Kept {
                    will: After(S(5)),
                    expires_in: Some(S(60)),
                },
            ),
            // …or the session's end, whichever is first.
            (
                5,
                Some(60),
                0,
                Kept {
                    will: After(S(5)),
                    expires_in: Some(S(5)),
                },
            ),
            (
                NEVER_EXPIRES,
                Some(60),
                0,
                Kept {
                    will: After(S(60)),
                    expires_in: None,
                },
            ),
            // After a restart, the time the broker was down counts.
            (
                60,
                Some(5),
                3,
                Kept {
                    will: After(S(2)),
                    expires_in: Some(S(57)),
                },
            ),
            (
                60,
                Some(5),
                7,
                Kept {
                    will: Now,
                    expires_in: Some(S(53)),
                },
            ),
            (60, Some(5), 60, EndsNow),
            (60, None, 3600, EndsNow),
            (
                NEVER_EXPIRES,
                None,
                u64::from(u32::MAX) * 2,
                Kept {
                    will: WillAt::None,
                    expires_in: None,
                },
            ),
        ];
        for (i, (expiry, delay, elapsed, want)) in rows.into_iter().enumerate() {
            assert_eq!(after_disconnect(expiry, delay, S(elapsed)), want, "row {i}");
        }
        assert!(will_on_connect(true));
        assert!(!will_on_connect(false));
    }

    /// When things happen, in seconds after the disconnect (`None`: never).
    fn schedule(f: Fate, at: Duration) -> (Duration, Option<Duration>, Option<Duration>) {
        match f {
            Fate::EndsNow => (at, Some(at), None),
            Fate::Kept { will, expires_in } => {
                let will = match will {
                    WillAt::None => None,
                    WillAt::Now => Some(at),
                    WillAt::After(d) => Some(at + d),
                };
                (at, expires_in.map(|d| at + d), will)
            }
        }
    }

    proptest! {
        /// Against a model in absolute time: the session ends at `expiry` (never for
        /// NEVER_EXPIRES), the will goes out at min(delay, expiry), and a restart at any
        /// moment keeps that schedule (what is due by then is due now).
        #[test]
        fn follows_the_model(
            expiry in prop_oneof![0u32..100, Just(NEVER_EXPIRES)],
            delay in prop::option::of(0u32..200),
            elapsed in 0u64..300,
        ) {
            let now = S(elapsed);
            let fate = after_disconnect(expiry, delay, now);
            let ends = (expiry != NEVER_EXPIRES).then(|| S(u64::from(expiry)));
            let due = |t: Duration| t.max(now);
            if ends.is_some_and(|e| e <= now) {
                prop_assert_eq!(fate, Fate::EndsNow);
            } else {
                let (_, end, will) = schedule(fate, now);
                prop_assert_eq!(end, ends);
                let will_model = delay.map(|d| due(S(u64::from(d.min(expiry)))));
                prop_assert_eq!(will, will_model);
                if let (Some(w), Some(e)) = (will, end) {
                    prop_assert!(w <= e, "a will never outlives its session");
                }
            }
        }
    }
}
