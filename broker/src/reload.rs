//! Live configuration: `SIGHUP` and `POST /api/v1/config/reload` read the configuration
//! file again. A file that does not load or validate changes nothing. Otherwise the new
//! configuration is put in force ([`Broker::current`]) and every key that changed is named,
//! in the log and in the answer, as applied or as waiting for a restart:
//!
//! - applied at once: `[log] level` (unless `RUST_LOG` overrides it) and `format`,
//!   `[sys] interval`,
//!   `[http]` tokens and `metrics_auth`, the queue and retained-store limits (for every
//!   session and the whole store at once), and the `[mqtt]` keys a connection reads, which
//!   apply to every connection made from now on (a connection keeps what its CONNACK
//!   announced: Maximum Packet Size, Receive Maximum, Topic Alias Maximum and Server Keep
//!   Alive cannot change under a client);
//! - listeners: one that is new is bound, one that went is closed with its connections
//!   (MQTT 5 clients get DISCONNECT 0x8B), one that changed is closed and bound again;
//!   each is named (`listener.NAME opened` / `closed`), and one that cannot be bound is
//!   named with the reason among what was not applied;
//! - at the next restart: `[store]`, `[runtime]`, `[plugins]` (each plugin's
//!   own settings, its sidecar, reload live anyway), `[http]` address and TLS files (the
//!   files' contents are read again on `SIGHUP`), `[cluster]`, `[[bridge]]` (a bridge's TLS and
//!   password files are read again at each of its connections), and `max_connections`
//!   (the open-files limit is sized for it at start).

use std::fmt::Debug;

use crate::broker::Broker;
use crate::config::Config;

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Keys that changed and are in force now.
    pub applied: Vec<String>,
    /// Keys that changed and wait for a restart.
    pub not_applied: Vec<String>,
}

/// `[mqtt]` keys the broker reads once, at start: the open-files limit and the
/// descriptor table are sized for `max_connections` before the runtime starts.
const MQTT_AT_START: &[&str] = &["max_connections"];

/// Reads the configuration file again and puts it in force; `Err` (nothing changed) when
/// there is no file or it does not load, validate or set the log level.
pub async fn reload(broker: &Broker) -> Result<Reloaded, String> {
    let Some(path) = broker.source.get() else {
        return Err("the broker was started without a configuration file".into());
    };
    let mut new = Config::load(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // `--data-dir` on the command line wins, as at start.
    new.store.data_dir = broker.config.store.data_dir.clone();
    let old = broker.current();
    let mut r = changes(&old, &new);
    if r.applied.iter().any(|k| k.starts_with("log."))
        && let Some(hook) = broker.log_hook.get()
    {
        (hook.0)(&new.log).map_err(|e| format!("log.level: {e}"))?;
    }
    let m = &new.mqtt;
    broker
        .sessions
        .set_queue_limits(crate::mailbox::QueueLimits {
            max_messages: m.max_queued_messages,
            max_bytes: m.max_queued_bytes,
            backpressure: m.backpressure_timeout_ms > 0,
        });
    broker
        .router
        .set_retain_limits(crate::router::RetainLimits {
            max_messages: m.max_retained_messages,
            max_bytes: m.max_retained_bytes,
        });
    if r.applied.iter().any(|k| k == "listener")
        && let Some(tx) = broker.listener_updates.get()
    {
        let (done, answer) = tokio::sync::oneshot::channel();
        let update = crate::broker::ListenerUpdate {
            listeners: new.listeners.clone(),
            done,
        };
        if tx.send(update).await.is_ok()
            && let Ok(c) = answer.await
        {
            r.applied.retain(|k| k != "listener");
            r.applied
                .extend(c.opened.iter().map(|n| format!("listener.{n} opened")));
            r.applied
                .extend(c.closed.iter().map(|n| format!("listener.{n} closed")));
            r.not_applied
                .extend(c.failed.iter().map(|f| format!("listener.{f}")));
        }
    }
    broker.replace_config(new);
    if r.applied.is_empty() && r.not_applied.is_empty() {
        tracing::info!(path = %path.display(), "configuration reloaded: nothing changed");
    } else {
        tracing::info!(path = %path.display(), applied = ?r.applied, needs_restart = ?r.not_applied,
            "configuration reloaded");
    }
    Ok(r)
}

fn differs<T: Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") != format!("{b:?}")
}

/// The keys that differ between `old` and `new`, sorted into applied and not.
pub fn changes(old: &Config, new: &Config) -> Reloaded {
    let mut r = Reloaded::default();
    let mut note = |key: &str, changed: bool, live: bool| {
        if changed {
            let list = if live {
                &mut r.applied
            } else {
                &mut r.not_applied
            };
            list.push(key.to_owned());
        }
    };
    let env_level = std::env::var_os("RUST_LOG").is_some();
    note("log.level", old.log.level != new.log.level, !env_level);
    note("log.format", old.log.format != new.log.format, true);
    note("sys.interval", old.sys.interval != new.sys.interval, true);
    note(
        "http.token",
        differs(&old.http.token, &new.http.token),
        true,
    );
    note(
        "http.metrics_auth",
        old.http.metrics_auth != new.http.metrics_auth,
        true,
    );
    note("http.bind", old.http.bind != new.http.bind, false);
    let tls = |c: &Config| {
        (
            c.http.cert.clone(),
            c.http.key.clone(),
            c.http.client_ca.clone(),
        )
    };
    note("http.cert/key/client_ca", tls(old) != tls(new), false);
    note("listener", differs(&old.listeners, &new.listeners), true);
    note("store", differs(&old.store, &new.store), false);
    note("runtime", differs(&old.runtime, &new.runtime), false);
    note("plugins", differs(&old.plugins, &new.plugins), false);
    note("bridge", old.bridges != new.bridges, false);
    note("cluster", old.cluster != new.cluster, false);
    for (key, a, b) in mqtt_fields(old, new) {
        note(
            &format!("mqtt.{key}"),
            a != b,
            !MQTT_AT_START.contains(&key),
        );
    }
    r
}

/// Every `[mqtt]` key with its value in each configuration (as text).
fn mqtt_fields(old: &Config, new: &Config) -> Vec<(&'static str, String, String)> {
    macro_rules! fields {
        ($($f:ident),* $(,)?) => {
            vec![$((stringify!($f), format!("{:?}", old.mqtt.$f), format!("{:?}", new.mqtt.$f))),*]
        };
    }
    fields!(
        max_packet_size,
        connect_timeout,
        max_keep_alive,
        receive_maximum,
        max_inflight,
        max_queued_messages,
        max_queued_bytes,
        backpressure_timeout_ms,
        topic_alias_maximum,
        max_session_expiry,
        retain_available,
        allow_empty_client_id,
        max_connections,
        packet_timeout,
        max_subscriptions,
        max_topic_length,
        max_topic_levels,
        max_filters_per_packet,
        max_user_properties,
        max_user_property_bytes,
        max_connect_packet_size,
        max_retained_messages,
        max_retained_bytes,
        session_principal,
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]

    use super::*;

    /// A scratch folder, removed when dropped (a failing test included).
    struct Scratch(std::path::PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// `text` loaded as the file `c.toml` of `dir` (relative paths resolve alike).
    fn parse(dir: &Scratch, text: &str) -> Config {
        std::fs::create_dir_all(&dir.0).unwrap();
        let path = dir.0.join("c.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path).unwrap()
    }

    const BASE: &str = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1883\"\n";

    #[test]
    fn each_key_is_sorted_into_live_or_restart() {
        let dir =
            Scratch(std::env::temp_dir().join(format!("sandpiper-reload-{}", std::process::id())));
        let old = parse(&dir, BASE);
        assert_eq!(changes(&old, &old), Reloaded::default());
        let new = parse(
            &dir,
            &format!(
                "{BASE}[mqtt]\nmax_inflight = 7\nmax_connections = 9\n[sys]\ninterval = 3\n\
             [log]\nformat = \"json\"\n[[listener]]\nname = \"b\"\nbind = \"127.0.0.1:1884\"\n"
            ),
        );
        let r = changes(&old, &new);
        assert_eq!(
            r.applied,
            [
                "log.format",
                "sys.interval",
                "listener",
                "mqtt.max_inflight"
            ]
        );
        assert_eq!(r.not_applied, ["mqtt.max_connections"]);
    }
}
