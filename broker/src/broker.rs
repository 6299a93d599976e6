//! The broker: the state every connection of one running instance shares, rebuilt from
//! the store at start. `server` runs it.

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::mailbox::QueueLimits;
use crate::pipeline::Pipeline;
use crate::plugins::Plugins;
use crate::router::{RetainLimits, Router};
use crate::session::Sessions;
use crate::store::{Store, StoreError, record};

/// What every connection of one broker shares.
#[derive(Debug)]
pub struct Broker {
    /// The configuration it started with: what listeners, the store, the runtime and the
    /// broker-wide limits keep until a restart ([`Broker::current`] is the one in force).
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
    /// The way every message enters: transforms, routing, sinks.
    pub pipeline: Arc<Pipeline>,
    /// Bridges to other brokers (`[[bridge]]`).
    pub bridges: Arc<crate::bridge::Bridges>,
    /// This node's part in a cluster (`[cluster]`).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The keep-alive deadlines of idle connections, one watch for all of them.
    pub keep_alives: Arc<crate::connection::keepalive::KeepAlives>,
    /// Set once every listener is bound (readiness).
    pub listening: std::sync::atomic::AtomicBool,
    /// The runtime it was made in has one worker thread.
    pub one_worker: bool,
    /// The runtime it was made in: the park (`connection::park`) spawns the tasks of
    /// idle connections there again.
    pub runtime: Option<tokio::runtime::Handle>,
    /// The configuration in force: `config` until a reload (`reload.rs`) replaces it.
    live: std::sync::RwLock<Arc<Config>>,
    /// Bumped by every reload (what caches parsed from the configuration look at).
    generation: std::sync::atomic::AtomicU64,
    /// The file the configuration came from, if any (what a reload reads).
    pub source: std::sync::OnceLock<std::path::PathBuf>,
    /// Applies a new `[log]` level and format (set by the binary, which owns the log
    /// subscriber).
    pub log_hook: std::sync::OnceLock<LogHook>,
    /// Where a reload sends the listeners it wants (the server owns the running ones).
    pub listener_updates: std::sync::OnceLock<tokio::sync::mpsc::Sender<ListenerUpdate>>,
}

/// A reload's request to serve exactly `listeners`.
#[derive(Debug)]
pub struct ListenerUpdate {
    /// The listeners of the new configuration.
    pub listeners: Vec<crate::config::ListenerConfig>,
    /// What was done.
    pub done: tokio::sync::oneshot::Sender<ListenerChanges>,
}

/// What a [`ListenerUpdate`] did, by listener name (or address, for an unnamed one).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ListenerChanges {
    /// Bound and accepting (new, or changed and bound again).
    pub opened: Vec<String>,
    /// Closed with their connections (removed, or changed).
    pub closed: Vec<String>,
    /// Could not be bound: name and reason.
    pub failed: Vec<String>,
}

/// Puts a `[log]` section in force; `Err` when its level is not a valid filter.
pub type SetLog = dyn Fn(&crate::config::LogConfig) -> Result<(), String> + Send + Sync;

/// The binary's [`SetLog`].
pub struct LogHook(pub Box<SetLog>);

impl std::fmt::Debug for LogHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogHook")
    }
}

impl Broker {
    /// Opens the store and rebuilds the state it holds: retained messages, persistent
    /// sessions with their subscriptions and queues. Must run inside the tokio runtime
    /// (restored sessions get their expiry timers).
    pub fn new(config: Config) -> Result<Arc<Broker>, StoreError> {
        // Parked connections count their last read from here: before any connection.
        crate::connection::epoch();
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
        // Before any session subscribes (persistent ones are restored below): the other
        // nodes are told of every filter.
        let cluster = config.cluster.clone().map(crate::cluster::Cluster::new);
        if let Some(c) = &cluster {
            router.set_interest(c.clone());
        }
        let now = Instant::now();
        let topics = m.topic_limits();
        let (mut retained, mut over_topic, mut over_store) = (0, 0, 0);
        for msg in recovered.take_retained().map_err(damaged)? {
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
        let pipeline = Arc::new(Pipeline::new(
            router.clone(),
            plugins.clone(),
            config.mqtt.retain_available,
        ));
        let bridges = Arc::new(crate::bridge::Bridges::new(
            &config.bridges,
            Some(store.clone()),
            config.mqtt.backpressure_timeout_ms > 0,
        )?);
        let mut outlets: Vec<Arc<dyn crate::pipeline::Outlet>> = Vec::new();
        if !bridges.is_empty() {
            outlets.push(bridges.clone());
        }
        if let Some(c) = &cluster {
            outlets.push(c.clone());
        }
        pipeline.set_outlets(outlets);
        let limits = QueueLimits {
            max_messages: config.mqtt.max_queued_messages,
            max_bytes: config.mqtt.max_queued_bytes,
            backpressure: config.mqtt.backpressure_timeout_ms > 0,
        };
        let sessions = Arc::new(Sessions::new(
            pipeline.clone(),
            limits,
            Some(store.clone()),
            topics,
        ));
        if let Some(c) = &cluster {
            let elsewhere: Arc<dyn crate::session::Elsewhere> = c.clone();
            let _ = sessions.elsewhere.set(elsewhere);
            let c = Arc::downgrade(c);
            let _ = sessions
                .on_attached
                .set(crate::session::AttachListener(Box::new(
                    move |id, since| {
                        if let Some(c) = c.upgrade() {
                            c.attached(id, since);
                        }
                    },
                )));
        }
        let restored = sessions.restore(&mut recovered).map_err(damaged)?;
        tracing::info!(
            data_dir = %path,
            durability = ?config.store.durability,
            sessions = restored,
            retained,
            "store opened"
        );
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
            pipeline,
            bridges,
            cluster,
            sessions,
            router,
            live: std::sync::RwLock::new(Arc::new(config.clone())),
            generation: std::sync::atomic::AtomicU64::new(0),
            source: std::sync::OnceLock::new(),
            log_hook: std::sync::OnceLock::new(),
            listener_updates: std::sync::OnceLock::new(),
            config,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            keep_alives: Arc::default(),
            store,
            reload: tokio::sync::watch::Sender::new(0),
            listening: std::sync::atomic::AtomicBool::new(false),
            one_worker: tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.metrics().num_workers() == 1),
            runtime: tokio::runtime::Handle::try_current().ok(),
        }))
    }

    /// What keeps the broker from being ready (empty: ready): a store that cannot write,
    /// listeners not bound yet, no connection to NATS or no retained messages' bucket (a
    /// cluster node), required plugins not serving.
    pub fn ready(&self) -> Vec<String> {
        let mut missing = Vec::new();
        if self.store.is_failing() {
            missing.push("store: commits are failing".to_owned());
        }
        if !self.listening() {
            missing.push("listeners: not all bound yet".to_owned());
        }
        if let Some(c) = &self.cluster {
            if !c.is_connected() {
                missing.push("cluster: not connected to NATS".to_owned());
            } else {
                if !c.bucket_open() {
                    missing.push(
                        "cluster: the retained messages' bucket is not open (JetStream)".to_owned(),
                    );
                }
                if !c.stream_open() {
                    missing.push(
                        "cluster: the stream of messages between nodes is not open (JetStream)"
                            .to_owned(),
                    );
                }
            }
        }
        for name in self.plugins.missing_required() {
            missing.push(format!("plugin {name}: required, not loaded"));
        }
        missing
    }

    /// Whether every listener is bound.
    pub fn listening(&self) -> bool {
        self.listening.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The configuration in force now (what new connections use).
    pub fn current(&self) -> Arc<Config> {
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Bumped by every reload.
    pub fn config_generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Puts `config` in force (see `reload.rs` for what follows it and what does not).
    pub(crate) fn replace_config(&self, config: Config) {
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Makes every TLS listener re-read its certificate, key and client CA files; a
    /// listener whose files do not load keeps its current ones.
    pub fn reload_certificates(&self) {
        self.reload.send_modify(|n| *n = n.wrapping_add(1));
    }
}
