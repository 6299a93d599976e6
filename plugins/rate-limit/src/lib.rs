//! `rate-limit`: a token bucket per client on published messages (the `transform` hook),
//! configured in the `[config]` table of its sidecar `rate-limit.toml`:
//!
//! ```toml
//! instances = 1              # one instance: the buckets live in its memory
//! [config]
//! rate = 10.0                # messages per second, sustained (default 10)
//! burst = 20                 # messages at once after a pause (default 20)
//! max_clients = 10000        # buckets kept at most (default 10000)
//! [config.users.telemetry]   # per user name: its own rate and/or burst
//! rate = 100.0
//! burst = 200
//! ```
//!
//! A message over the limit is refused with `reject(0x96)`, message rate too high: the
//! broker disconnects an MQTT 5 publisher with DISCONNECT 0x96 and drops the excess of
//! an MQTT 3.x publisher silently (3.x cannot refuse one message). Messages published by
//! plugins (empty client id) are not limited.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sandpiper_plugin::prelude::*;
use sandpiper_plugin::{log, metrics, reason};

mod limiter;

use limiter::{Limiter, Limits, Verdict};

/// The `[config]` table.
#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_rate")]
    rate: f64,
    #[serde(default = "default_burst")]
    burst: f64,
    #[serde(default = "default_max_clients")]
    max_clients: usize,
    #[serde(default)]
    users: BTreeMap<String, Override>,
}

/// A user's own limits; an absent one is the default's.
#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Override {
    rate: Option<f64>,
    burst: Option<f64>,
}

fn default_rate() -> f64 {
    10.0
}

fn default_burst() -> f64 {
    20.0
}

fn default_max_clients() -> usize {
    10_000
}

fn check(who: &str, l: Limits) -> Result<(), String> {
    if !(l.rate.is_finite() && l.rate > 0.0) {
        return Err(format!("invalid [config]: {who}rate must be above 0"));
    }
    if !(l.burst.is_finite() && l.burst >= 1.0) {
        return Err(format!("invalid [config]: {who}burst must be at least 1"));
    }
    Ok(())
}

impl Config {
    fn check(self) -> Result<Config, String> {
        check("", self.default_limits())?;
        for name in self.users.keys() {
            check(&format!("users.{name}: "), self.limits(Some(name)))?;
        }
        if self.max_clients == 0 {
            return Err("invalid [config]: max_clients must be at least 1".to_owned());
        }
        Ok(self)
    }

    fn default_limits(&self) -> Limits {
        Limits {
            rate: self.rate,
            burst: self.burst,
        }
    }

    /// The limits of a client with this user name.
    fn limits(&self, username: Option<&str>) -> Limits {
        let d = self.default_limits();
        match username.and_then(|u| self.users.get(u)) {
            Some(o) => Limits {
                rate: o.rate.unwrap_or(d.rate),
                burst: o.burst.unwrap_or(d.burst),
            },
            None => d,
        }
    }
}

fn config() -> &'static Result<Config, String> {
    static CONFIG: OnceLock<Result<Config, String>> = OnceLock::new();
    CONFIG.get_or_init(|| {
        sandpiper_plugin::config::<Config>()
            .map_err(|e| e.to_string())
            .and_then(Config::check)
    })
}

/// Monotonic time since the instance's first call.
fn now() -> Duration {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed()
}

thread_local! {
    /// The buckets of this instance (a component instance runs one call at a time).
    static LIMITER: RefCell<Option<Limiter>> = const { RefCell::new(None) };
    /// The bucket count last reported as the gauge `clients`.
    static REPORTED: Cell<usize> = const { Cell::new(0) };
}

struct RateLimit;

impl Init for RateLimit {
    fn init() -> Result<(), String> {
        config().as_ref().map(|_| ()).map_err(Clone::clone)
    }
}

impl Transform for RateLimit {
    fn transform(publisher: Client, messages: Vec<Message>) -> Vec<Outcome> {
        let keep_all = || messages.iter().map(|_| Outcome::Keep).collect();
        let Ok(cfg) = config() else {
            return keep_all();
        };
        if publisher.client_id.is_empty() {
            return keep_all();
        }
        let limits = cfg.limits(publisher.username.as_deref());
        let now = now();
        let mut rejected = 0u64;
        let mut first = false;
        let mut clients = 0;
        let outcomes = LIMITER.with_borrow_mut(|l| {
            let l = l.get_or_insert_with(|| Limiter::new(cfg.max_clients));
            let outcomes = messages
                .iter()
                .map(|_| match l.take(&publisher.client_id, limits, now) {
                    Verdict::Allow => Outcome::Keep,
                    v => {
                        first |= v == Verdict::RejectFirst;
                        rejected += 1;
                        Outcome::Reject(reason::MESSAGE_RATE_TOO_HIGH)
                    }
                })
                .collect();
            clients = l.len();
            outcomes
        });
        if REPORTED.replace(clients) != clients {
            metrics::gauge_set("clients", i64::try_from(clients).unwrap_or(i64::MAX));
        }
        if rejected > 0 {
            metrics::counter_add("rejected", rejected);
        }
        if first {
            let rate = limits.rate.to_string();
            log::log(
                log::Level::Info,
                "client over its message rate",
                &[("client_id", &publisher.client_id), ("rate", &rate)],
            );
        }
        outcomes
    }
}

sandpiper_plugin::export!(RateLimit with [init, transform]);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        sandpiper_plugin::config::from_str::<Config>(text)
            .map_err(|e| e.to_string())
            .and_then(Config::check)
    }

    #[test]
    fn defaults_and_overrides() {
        let c = parse("").unwrap();
        assert_eq!(
            c.limits(Some("x")),
            Limits {
                rate: 10.0,
                burst: 20.0
            }
        );
        let c = parse("rate = 5\n[users.fast]\nrate = 50\n[users.bursty]\nburst = 99\n").unwrap();
        assert_eq!(c.limits(None).rate, 5.0);
        assert_eq!(
            c.limits(Some("fast")),
            Limits {
                rate: 50.0,
                burst: 20.0
            }
        );
        assert_eq!(
            c.limits(Some("bursty")),
            Limits {
                rate: 5.0,
                burst: 99.0
            }
        );
    }

    #[test]
    fn bad_limits_are_refused() {
        assert!(parse("rate = 0\n").unwrap_err().contains("rate"));
        assert!(parse("burst = 0.5\n").unwrap_err().contains("burst"));
        assert!(
            parse("[users.u]\nrate = -1\n")
                .unwrap_err()
                .contains("users.u")
        );
        assert!(
            parse("max_clients = 0\n")
                .unwrap_err()
                .contains("max_clients")
        );
        assert!(parse("rates = 1\n").unwrap_err().contains("unknown field"));
    }

    #[test]
    fn the_example_sidecar_is_valid() {
        let c: Config =
            sandpiper_plugin::config::from_sidecar(include_str!("../rate-limit.example.toml"))
                .unwrap();
        let c = c.check().unwrap();
        assert!(c.limits(Some("telemetry")).rate > c.limits(None).rate);
    }
}
