//! Running a broker: loads the plugins present at start, binds every listener, serves
//! until shutdown, then closes the connections and the store.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::broker::{Broker, ListenerChanges, ListenerUpdate};
use crate::config::ListenerConfig;
use crate::listener;
use crate::pipeline::Origin;

/// Binds every listener and serves until `shutdown` is cancelled, then closes every
/// connection (MQTT 5 clients get DISCONNECT 0x8B) and waits for them, at most `grace`.
pub async fn run(broker: Arc<Broker>, grace: Duration) -> std::io::Result<Vec<SocketAddr>> {
    let mut bound = Vec::new();
    let mut accept_loops = Vec::new();
    // Open connections over all listeners, for `max_connections`.
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    crate::metrics::uptime();
    // Health and metrics answer while plugins load (not ready until the listeners are).
    crate::http::start(broker.clone()).await?;
    // Plugins present at start are loaded before the first client is accepted.
    let plugins = broker.plugins.clone();
    let stop = broker.shutdown.clone();
    let missing = tokio::task::spawn_blocking(move || plugins.start(stop))
        .await
        .unwrap_or_default();
    if !missing.is_empty() {
        // No listener opens without the plugins the operator requires.
        return Err(std::io::Error::other(format!(
            "required plugin{} not loaded: {} (see the plugin errors above)",
            if missing.len() > 1 { "s" } else { "" },
            missing.join(", ")
        )));
    }
    if let Some(rx) = broker.plugins.take_published() {
        let me = Arc::downgrade(&broker);
        let r = std::thread::Builder::new()
            .name("plugin-publish".into())
            .spawn(move || route_published(me, rx));
        if let Err(e) = r {
            tracing::error!(error = %e, "plugin publish thread failed to start");
        }
    }
    // Bridged messages pass the plugins loaded above, like any message.
    broker.bridges.start(
        &broker.pipeline,
        &broker.store,
        broker.config.mqtt.max_packet_size,
        &broker.shutdown,
        &broker.tasks,
    );
    if let Some(c) = &broker.cluster {
        let backpressure = broker.config.mqtt.backpressure_timeout_ms;
        c.start(
            broker.pipeline.clone(),
            broker.sessions.clone(),
            broker.store.committed(),
            (backpressure > 0).then(|| std::time::Duration::from_millis(backpressure)),
            &broker.tasks,
            broker.shutdown.clone(),
        );
    }
    for l in &broker.config.listeners {
        let running = listener::start(broker.clone(), l.clone(), open.clone()).await?;
        bound.push(running.addr);
        accept_loops.push((listener_key(l), l.clone(), running));
    }
    let accept_loops = Arc::new(tokio::sync::Mutex::new(accept_loops));
    spawn_listener_updates(&broker, accept_loops.clone(), open.clone());
    broker
        .listening
        .store(true, std::sync::atomic::Ordering::Release);
    crate::sys::spawn(broker.clone());
    broker.keep_alives.spawn(broker.shutdown.clone());
    spawn_policy_changes(&broker);
    // Every listener bound, every required plugin loaded: a `Type=notify` unit is started.
    crate::notify::notify("READY=1\nSTATUS=serving MQTT");
    crate::notify::spawn_watchdog(broker.shutdown.clone());
    broker.shutdown.cancelled().await;
    crate::notify::notify("STOPPING=1");
    for (_, _, running) in accept_loops.lock().await.drain(..) {
        let _ = running.task.await;
    }
    broker.tasks.close();
    if tokio::time::timeout(grace, broker.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = broker.tasks.len(),
            "connections still open after the shutdown grace period"
        );
    }
    broker.store.close();
    tracing::info!("broker stopped");
    Ok(bound)
}

/// The listeners serving: (name or address, configuration, the running listener).
type Serving = Vec<(String, ListenerConfig, listener::Running)>;

/// A listener's key across reloads: its name, or its address when it has none.
fn listener_key(l: &ListenerConfig) -> String {
    l.name.clone().unwrap_or_else(|| l.bind.to_string())
}

/// Serves the reloads' [`ListenerUpdate`]s: closes the listeners that went or changed
/// (their connections get DISCONNECT 0x8B), then binds the new and changed ones.
fn spawn_listener_updates(
    broker: &Arc<Broker>,
    serving: Arc<tokio::sync::Mutex<Serving>>,
    open: Arc<std::sync::atomic::AtomicUsize>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<ListenerUpdate>(4);
    let _ = broker.listener_updates.set(tx);
    let me = Arc::downgrade(broker);
    let stop = broker.shutdown.clone();
    tokio::spawn(async move {
        loop {
            let update = tokio::select! {
                _ = stop.cancelled() => return,
                u = rx.recv() => match u { Some(u) => u, None => return },
            };
            let Some(broker) = me.upgrade() else { return };
            let mut changes = ListenerChanges::default();
            let mut serving = serving.lock().await;
            let same =
                |a: &ListenerConfig, b: &ListenerConfig| format!("{a:?}") == format!("{b:?}");
            let mut kept: Serving = Vec::new();
            for (key, cfg, running) in serving.drain(..) {
                let wanted = update.listeners.iter().find(|l| listener_key(l) == key);
                if wanted.is_some_and(|w| same(w, &cfg)) {
                    kept.push((key, cfg, running));
                    continue;
                }
                running.stop.cancel();
                let _ = running.task.await;
                tracing::info!(listener = %key, "listener closed by a configuration reload");
                changes.closed.push(key);
            }
            for l in &update.listeners {
                let key = listener_key(l);
                if kept.iter().any(|(k, _, _)| *k == key) {
                    continue;
                }
                match listener::start(broker.clone(), l.clone(), open.clone()).await {
                    Ok(running) => {
                        changes.opened.push(key.clone());
                        kept.push((key, l.clone(), running));
                    }
                    Err(e) => {
                        tracing::error!(listener = %key, error = %e, "listener not opened");
                        changes.failed.push(format!("{key}: {e}"));
                    }
                }
            }
            *serving = kept;
            let _ = update.done.send(changes);
        }
    });
}

/// Wakes every subscriber's connection when the plugin chain changes, so that each
/// authorizes its subscriptions again at once, idle or not (a connection checks the chain's
/// generation whenever it wakes; one woken with nothing to deliver does only that).
fn spawn_policy_changes(broker: &Arc<Broker>) {
    let me = Arc::downgrade(broker);
    let stop = broker.shutdown.clone();
    let plugins = broker.plugins.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = plugins.changed() => {}
            }
            let Some(broker) = me.upgrade() else { return };
            broker.router.wake_subscribers();
        }
    });
}

/// Publishes the messages plugins publish, in order, through the pipeline, until the
/// broker is gone or shutting down.
fn route_published(
    broker: std::sync::Weak<Broker>,
    rx: std::sync::mpsc::Receiver<crate::plugins::host::Published>,
) {
    use std::sync::mpsc::RecvTimeoutError;
    loop {
        let p = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(p) => p,
            Err(RecvTimeoutError::Timeout) => match broker.upgrade() {
                Some(b) if !b.shutdown.is_cancelled() => continue,
                _ => return,
            },
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let Some(b) = broker.upgrade() else { return };
        let from = Origin::Plugin { name: &p.plugin };
        b.pipeline.publish(&from, p.draft);
    }
}
