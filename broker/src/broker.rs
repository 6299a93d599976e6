//! The broker: shared state of one running instance and its start/stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::listener;
use crate::mailbox::QueueLimits;
use crate::plugins::Plugins;
use crate::router::{RetainLimits, Router};
use crate::session::Sessions;
use crate::store::{Store, StoreError, record};

/// What every connection of one broker shares.
#[derive(Debug)]
pub struct Broker {
    /// The configuration it started with.
    pub config: Config,
    /// Subscriptions, retained messages, fan-out.
    pub router: Arc<Router>,
    /// Sessions by client identifier.
    pub sessions: Arc<Sessions>,
    /// Cancelled to shut everything down.
    pub shutdown: CancellationToken,
    /// Tracks connection tasks so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Durable state.
    pub store: Arc<Store>,
    /// Bumped to make TLS listeners re-read their certificates (SIGHUP).
    pub reload: tokio::sync::watch::Sender<u64>,
    /// The plugin chain and its watcher.
    pub plugins: Arc<Plugins>,
}

impl Broker {
    /// Opens the store and rebuilds the state it holds: retained messages, persistent
    /// sessions with their subscriptions and queues. Must run inside the tokio runtime
    /// (restored sessions get their expiry timers).
    pub fn new(config: Config) -> Result<Arc<Broker>, StoreError> {
        let (store, mut recovered) = Store::open(&config.store)?;
        let store = Arc::new(store);
        let path = config.store.data_dir.display().to_string();
        let damaged = |e: record::RecordError| StoreError::Damaged {
            path: path.clone(),
            reason: e.to_string(),
        };
        let m = &config.mqtt;
        let router = Arc::new(Router::with_store(
            store.clone(),
            RetainLimits {
                max_messages: m.max_retained_messages,
                max_bytes: m.max_retained_bytes,
            },
        ));
        let now = Instant::now();
        let topics = m.topic_limits();
        let (mut retained, mut over_topic, mut over_store) = (0, 0, 0);
        for bytes in std::mem::take(&mut recovered.retained) {
            let msg = record::decode_retained(&bytes).map_err(damaged)?;
            if msg.is_expired(now) {
                continue;
            }
            // Records written under other limits (or before a limit applied to them, as
            // wills once did) are skipped, never served: they stay on disk untouched.
            if !topics.fits(msg.topic.as_str()) {
                over_topic += 1;
                continue;
            }
            match router.retain_in_memory(&Arc::new(msg)) {
                Ok(()) => retained += 1,
                Err(_) => over_store += 1,
            }
        }
        if over_topic > 0 {
            tracing::warn!(
                skipped = over_topic,
                "retained messages whose topics break max_topic_length or max_topic_levels were not loaded"
            );
        }
        if over_store > 0 {
            tracing::warn!(
                skipped = over_store,
                "retained messages beyond max_retained_messages or max_retained_bytes were not loaded"
            );
        }
        let limits = QueueLimits {
            max_messages: config.mqtt.max_queued_messages,
            max_bytes: config.mqtt.max_queued_bytes,
            backpressure: config.mqtt.backpressure_timeout_ms > 0,
        };
        let sessions = Arc::new(Sessions::new(
            router.clone(),
            limits,
            Some(store.clone()),
            topics,
        ));
        let restored = sessions.restore(&mut recovered).map_err(damaged)?;
        tracing::info!(
            data_dir = %path,
            durability = ?config.store.durability,
            sessions = restored,
            retained,
            "store opened"
        );
        let plugins = match config.plugins.enabled {
            true => Arc::new(
                Plugins::new(
                    Some(config.plugins.dir.clone()),
                    config.store.data_dir.join("plugin-cache"),
                    Some(store.clone()),
                    usize::try_from(config.mqtt.max_packet_size).unwrap_or(usize::MAX),
                )
                .with_topic_limits(topics)
                .with_required(config.plugins.required.clone())
                .with_authentications(config.plugins.max_authentications()),
            ),
            false => Plugins::disabled(),
        };
        let events = Arc::downgrade(&plugins);
        let _ = sessions
            .on_expired
            .set(crate::session::ExpiryListener(Box::new(move |id| {
                if let Some(p) = events.upgrade() {
                    p.emit(crate::plugins::events::Event::SessionExpired(id.to_owned()));
                }
            })));
        Ok(Arc::new(Broker {
            plugins,
            sessions,
            router,
            config,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            store,
            reload: tokio::sync::watch::Sender::new(0),
        }))
    }

    /// Makes every TLS listener re-read its certificate, key and client CA files; a
    /// listener whose files do not load keeps its current ones.
    pub fn reload_certificates(&self) {
        self.reload.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Binds every listener and serves until `shutdown` is cancelled, then closes every
    /// connection (MQTT 5 clients get DISCONNECT 0x8B) and waits for them, at most `grace`.
    pub async fn run(self: Arc<Self>, grace: Duration) -> std::io::Result<Vec<SocketAddr>> {
        let mut bound = Vec::new();
        let mut accept_loops = Vec::new();
        // Open connections over all listeners, for `max_connections`.
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        // Plugins present at start are loaded before the first client is accepted.
        let plugins = self.plugins.clone();
        let stop = self.shutdown.clone();
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
        if let Some(rx) = self.plugins.take_published() {
            let me = Arc::downgrade(&self);
            let r = std::thread::Builder::new()
                .name("plugin-publish".into())
                .spawn(move || route_published(me, rx));
            if let Err(e) = r {
                tracing::error!(error = %e, "plugin publish thread failed to start");
            }
        }
        for l in &self.config.listeners {
            let (addr, task) = listener::start(self.clone(), l.clone(), open.clone()).await?;
            bound.push(addr);
            accept_loops.push(task);
        }
        self.shutdown.cancelled().await;
        for t in accept_loops {
            let _ = t.await;
        }
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.tasks.len(),
                "connections still open after the shutdown grace period"
            );
        }
        self.store.close();
        tracing::info!("broker stopped");
        Ok(bound)
    }
}

/// Routes the messages plugins publish, in order, through the other plugins' transforms,
/// until the broker is gone or shutting down.
fn route_published(
    broker: std::sync::Weak<Broker>,
    rx: std::sync::mpsc::Receiver<crate::plugins::host::Published>,
) {
    use crate::plugins::flow::Fate;
    let nobody = crate::plugins::ClientInfo {
        client_id: "".into(),
        username: None,
        listener: "".into(),
        attributes: Vec::new(),
    };
    loop {
        let p = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(p) => p,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => match broker.upgrade() {
                Some(b) if !b.shutdown.is_cancelled() => continue,
                _ => return,
            },
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let Some(b) = broker.upgrade() else { return };
        let mut drafts = [p.draft];
        let mut fates = [Fate::Route];
        b.plugins
            .transform(&nobody, &mut drafts, &mut fates, Some(&p.plugin));
        let [d] = drafts;
        if fates[0] != Fate::Route {
            continue;
        }
        if d.retain && !b.config.mqtt.retain_available {
            continue;
        }
        let msg = d.into_message(0);
        if b.router.route(&msg).not_retained {
            tracing::warn!(plugin = %p.plugin, topic = %msg.topic, "retained store full: a plugin's retained message was routed, not retained");
        }
        b.plugins.sink_offer("", &msg);
    }
}
