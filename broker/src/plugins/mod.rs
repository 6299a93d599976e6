//! The plugin host: WebAssembly components (the `sandpiper:plugin` WIT contract in `wit/`)
//! loaded from the plugins folder, called at fixed hook points by the connection layer.
//!
//! Boundary: this module knows the contract, wasmtime and the plugins folder; it knows
//! nothing of sockets or sessions. The connection calls [`Plugins::authenticate`] at
//! CONNECT and [`Plugins::authorize`] at SUBSCRIBE and PUBLISH, after checking
//! [`Plugins::hooks`]: one relaxed atomic load, so a broker without plugins pays nothing
//! else. The chain is an `Arc<Chain>` swapped whole on reload (calls in flight finish on
//! the version they started with); each swap bumps [`Plugins::generation`], which
//! connections compare to drop their cached authorize decisions.

mod bindings;
pub mod events;
pub mod flow;
pub mod gate;
pub mod host;
pub mod net;
pub mod plugin;
pub mod sidecar;
pub mod sink;
mod wasi_io;
mod watch;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bindings::hooks::{authenticate as auth, authorize as authz, share};
use bindings::sandpiper::plugin::types;

use crate::codec::{ProtocolVersion, QoS};
pub use plugin::{Hooks, Plugin};
use sidecar::DecideFailure;

/// The version of the plugin contract (`wit/`, package `sandpiper:plugin`) this build
/// hosts.
pub const CONTRACT_VERSION: &str = "0.1.1";

/// The ordered plugin chain of one moment.
#[derive(Default)]
pub struct Chain {
    /// Plugins by (priority, name).
    pub plugins: Vec<Arc<Plugin>>,
}

impl Chain {
    fn mask(&self) -> u32 {
        self.plugins.iter().fold(0, |m, p| m | p.hooks.0)
    }
}

/// Authentications at once unless [`Plugins::with_authentications`] says otherwise.
const DEFAULT_AUTHENTICATIONS: usize = 8;

/// The plugin host of one broker.
pub struct Plugins {
    /// Plugins that must be loaded for the broker to serve; their files' removal does
    /// not unload them.
    required: Vec<String>,
    /// Authentications running at once (CONNECT and enhanced-authentication rounds).
    auth_slots: tokio::sync::Semaphore,
    auth_limit: usize,
    /// Union of the hooks of the current chain (hot-path check).
    mask: AtomicU32,
    /// Bumped on every chain change.
    generation: AtomicU64,
    chain: RwLock<Arc<Chain>>,
    host: OnceLock<Option<Arc<host::Host>>>,
    dir: Option<PathBuf>,
    cache_dir: PathBuf,
    store: Option<Arc<crate::store::Store>>,
    events_tx: SyncSender<events::Event>,
    events_rx: Mutex<Option<Receiver<events::Event>>>,
    outbox: host::Outbox,
    outbox_rx: Mutex<Option<Receiver<host::Published>>>,
    sinks: sink::Sinks,
    /// Until when (ms after `epoch`) hook calls hand their worker over (see `blocking`).
    slow_until: AtomicU64,
    /// Slow calls made in place since the chain last changed (see `blocking`).
    slow_strikes: std::sync::atomic::AtomicU32,
    epoch: Instant,
    /// Set by [`Plugins::start`]: what the sink threads hold and stop on.
    me: OnceLock<std::sync::Weak<Plugins>>,
    shutdown: OnceLock<tokio_util::sync::CancellationToken>,
}

/// What the connection knows about a connecting client.
#[derive(Debug, Clone)]
pub struct ConnectInfo {
    /// Client identifier (assigned one if the client sent none).
    pub client_id: String,
    /// User name of CONNECT.
    pub username: Option<String>,
    /// Password of CONNECT.
    pub password: Option<Vec<u8>>,
    /// Peer address.
    pub peer: std::net::SocketAddr,
    /// Listener name.
    pub listener: String,
    /// Protocol version.
    pub protocol: ProtocolVersion,
    /// Subject of a verified client certificate.
    pub cert_subject: Option<String>,
    /// MQTT 5 user properties of CONNECT.
    pub user_properties: Vec<(String, String)>,
    /// MQTT 5 Authentication Method (enhanced authentication).
    pub auth_method: Option<String>,
    /// MQTT 5 Authentication Data of the CONNECT.
    pub auth_data: Option<Vec<u8>>,
}

/// The chain's answer to a CONNECT.
#[derive(Clone)]
pub enum AuthDecision {
    /// Let in; the user name (possibly replaced) and attributes go with the connection.
    Allow {
        /// User name for later hooks (the CONNECT's unless a plugin replaced it).
        username: Option<String>,
        /// Attributes for later hooks.
        attributes: Vec<(String, String)>,
        /// Authentication Data for the CONNACK (enhanced authentication).
        auth_data: Option<Vec<u8>>,
    },
    /// Refuse with this CONNACK reason code.
    Deny(u8),
    /// MQTT 5 enhanced authentication goes on: send AUTH (0x18) with `auth_data`, and
    /// hand the client's answer to [`Plugins::auth_step`] with `state`, for `plugin`.
    Continue {
        /// The plugin that asked (the same version answers every step).
        plugin: Arc<Plugin>,
        /// Authentication Data for the AUTH packet.
        auth_data: Vec<u8>,
        /// Opaque state for the next step.
        state: Vec<u8>,
    },
    /// No plugin had an opinion: the listener's own rule applies.
    NoOpinion,
}

impl std::fmt::Debug for AuthDecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthDecision::Allow { username, .. } => write!(f, "Allow({username:?})"),
            AuthDecision::Deny(code) => write!(f, "Deny({code:#04x})"),
            AuthDecision::Continue { plugin, .. } => write!(f, "Continue({})", plugin.name),
            AuthDecision::NoOpinion => f.write_str("NoOpinion"),
        }
    }
}

/// Who asks [`Plugins::authorize`]: an authenticated client.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// Client identifier (shared with the session: every idle connection keeps one).
    pub client_id: Arc<str>,
    /// User name (after authentication).
    pub username: Option<String>,
    /// Listener name (shared with the listener).
    pub listener: Arc<str>,
    /// Attributes set by authentication.
    pub attributes: Vec<(String, String)>,
}

/// What an authorize request is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// PUBLISH to a topic.
    Publish,
    /// SUBSCRIBE to a filter.
    Subscribe,
    /// A will message's topic.
    Will,
    /// Retained message delivery on subscribe.
    Retained,
}

/// One authorize question.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// What.
    pub action: Action,
    /// Topic name or filter.
    pub topic: &'a str,
    /// QoS of the message or asked for the subscription.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
}

/// One request to join a shared subscription's group (`$share/{group}/{filter}`).
#[derive(Debug, Clone)]
pub struct Join<'a> {
    /// The share name.
    pub group: &'a str,
    /// The filter without the `$share/{group}/` prefix.
    pub filter: &'a str,
    /// The maximum QoS asked for.
    pub qos: QoS,
}

/// The chain's answer to one authorize request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed, with at most this QoS if given.
    Allow(Option<QoS>),
    /// Refused with this reason code.
    Deny(u8),
}

/// Reason code of a refusal whose plugin gave none we can send.
pub const NOT_AUTHORIZED: u8 = 0x87;
/// 0x89 Server busy: too many authentications at once.
pub const SERVER_BUSY: u8 = 0x89;

impl Plugins {
    /// A host with no plugins folder: every check is a no-op.
    pub fn disabled() -> Arc<Plugins> {
        Arc::new(Plugins::new(None, PathBuf::new(), None, 0))
    }

    /// A host watching `dir` (nothing is loaded until [`Plugins::start`]); compiled code is
    /// cached under `cache_dir`. Plugins may publish payloads of at most `max_payload`
    /// bytes.
    pub fn new(
        dir: Option<PathBuf>,
        cache_dir: PathBuf,
        store: Option<Arc<crate::store::Store>>,
        max_payload: usize,
    ) -> Plugins {
        let (events_tx, events_rx) = sync_channel(events::QUEUE);
        let (outbox_tx, outbox_rx) = sync_channel(host::OUTBOX);
        Plugins {
            mask: AtomicU32::new(0),
            generation: AtomicU64::new(0),
            chain: RwLock::new(Arc::new(Chain::default())),
            host: OnceLock::new(),
            dir,
            cache_dir,
            store,
            events_tx,
            events_rx: Mutex::new(Some(events_rx)),
            outbox: host::Outbox {
                tx: outbox_tx,
                max_payload,
                topics: crate::config::TopicLimits::default(),
            },
            outbox_rx: Mutex::new(Some(outbox_rx)),
            sinks: sink::Sinks::default(),
            slow_until: AtomicU64::new(0),
            required: Vec::new(),
            auth_slots: tokio::sync::Semaphore::new(DEFAULT_AUTHENTICATIONS),
            auth_limit: DEFAULT_AUTHENTICATIONS,
            slow_strikes: std::sync::atomic::AtomicU32::new(0),
            epoch: Instant::now(),
            me: OnceLock::new(),
            shutdown: OnceLock::new(),
        }
    }

    /// Bounds the topics plugins publish or rewrite to (`max_topic_length`,
    /// `max_topic_levels`; the defaults otherwise).
    pub fn with_topic_limits(mut self, limits: crate::config::TopicLimits) -> Plugins {
        self.outbox.topics = limits;
        self
    }

    /// Loads what the folder holds now, then watches it (every 250 ms) and hands events to
    /// the plugins until `shutdown`.
    /// Returns the required plugins (`[plugins] required`) that could not be loaded: the
    /// broker must not serve without them.
    pub fn start(self: &Arc<Self>, shutdown: tokio_util::sync::CancellationToken) -> Vec<String> {
        if self.dir.is_none() {
            return self.required.clone();
        }
        let _ = self.me.set(Arc::downgrade(self));
        let _ = self.shutdown.set(shutdown.clone());
        if let Some(rx) = self
            .events_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            events::spawn(Arc::downgrade(self), rx, shutdown.clone());
        }
        let mut w = watch::Watcher::default();
        w.scan(self);
        let missing = w.missing_required(self);
        watch::spawn(Arc::downgrade(self), w, shutdown);
        missing
    }

    /// Plugins the broker does not serve without (`[plugins] required`).
    pub fn with_required(mut self, required: Vec<String>) -> Plugins {
        self.required = required;
        self
    }

    /// The messages plugins publish (`publish` import), in order; the broker takes this
    /// once and routes them.
    pub fn take_published(&self) -> Option<Receiver<host::Published>> {
        self.outbox_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// What a plugin's host imports reach besides its own state.
    fn services(&self) -> host::Services {
        host::Services {
            store: self.store.clone(),
            outbox: Some(self.outbox.clone()),
        }
    }

    /// The engine, made on first use (a broker that never sees a plugin never builds one).
    fn host(&self) -> Option<Arc<host::Host>> {
        self.host
            .get_or_init(|| {
                let _ = std::fs::create_dir_all(&self.cache_dir);
                match host::Host::new(&self.cache_dir) {
                    Ok(h) => Some(Arc::new(h)),
                    Err(e) => {
                        tracing::error!(error = %e, "plugin engine failed to start; plugins disabled");
                        None
                    }
                }
            })
            .clone()
    }

    /// Union of the hooks the chain has ([`Hooks`] bits). One relaxed load.
    #[inline]
    pub fn hooks(&self) -> u32 {
        self.mask.load(Ordering::Relaxed)
    }

    /// Changes on every chain change; cached decisions of an older generation are stale.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current chain.
    pub fn chain(&self) -> Arc<Chain> {
        self.chain.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Installs a new chain (sorted by priority, then name).
    fn install(&self, mut plugins: Vec<Arc<Plugin>>) {
        plugins.sort_by(|a, b| (a.sidecar.priority, &a.name).cmp(&(b.sidecar.priority, &b.name)));
        let chain = Arc::new(Chain { plugins });
        let mask = chain.mask();
        for p in &chain.plugins {
            if p.hooks.has(Hooks::SINK) {
                // Its queue drains from now on (a restart's backlog included).
                self.sink_queue(&p.name);
            }
        }
        *self.chain.write().unwrap_or_else(|p| p.into_inner()) = chain;
        self.mask.store(mask, Ordering::Relaxed);
        // A new chain gets a fresh start: the slow plugin may be gone.
        self.slow_strikes.store(0, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Asks the chain about a CONNECT. Runs the plugins on a blocking thread (a hook may
    /// take its whole time budget, e.g. a slow password hash).
    pub async fn authenticate(self: &Arc<Self>, info: ConnectInfo, wait: Duration) -> AuthDecision {
        if self.hooks() & Hooks::AUTHENTICATE == 0 {
            return AuthDecision::NoOpinion;
        }
        let Some(_slot) = self.auth_slot(wait).await else {
            return AuthDecision::Deny(SERVER_BUSY);
        };
        let chain = self.chain();
        tokio::task::spawn_blocking(move || authenticate_chain(&chain, &info))
            .await
            .unwrap_or(AuthDecision::Deny(NOT_AUTHORIZED))
    }

    /// One of the [`Plugins::with_authentications`] slots, waiting at most `wait`: an
    /// authentication may spend its whole time budget hashing a password, so a flood of
    /// CONNECTs must not run them all at once (nor hold a thread each).
    async fn auth_slot(&self, wait: Duration) -> Option<tokio::sync::SemaphorePermit<'_>> {
        match tokio::time::timeout(wait, self.auth_slots.acquire()).await {
            Ok(Ok(permit)) => Some(permit),
            _ => {
                tracing::warn!(
                    running = self.auth_limit,
                    "authentications at their limit for {wait:?}: CONNECT refused as server busy"
                );
                None
            }
        }
    }

    /// Caps the authentications running at once (`[plugins] authentications_per_core`).
    pub fn with_authentications(mut self, max: usize) -> Plugins {
        self.auth_slots = tokio::sync::Semaphore::new(max);
        self.auth_limit = max;
        self
    }

    /// One step of MQTT 5 enhanced authentication: the client's AUTH answer to a
    /// [`AuthDecision::Continue`] of `plugin`. Runs on a blocking thread.
    pub async fn auth_step(
        &self,
        plugin: Arc<Plugin>,
        client_id: String,
        method: String,
        auth_data: Option<Vec<u8>>,
        state: Vec<u8>,
        wait: Duration,
    ) -> AuthDecision {
        let Some(_slot) = self.auth_slot(wait).await else {
            return AuthDecision::Deny(SERVER_BUSY);
        };
        tokio::task::spawn_blocking(move || auth_step(&plugin, client_id, method, auth_data, state))
            .await
            .unwrap_or(AuthDecision::Deny(NOT_AUTHORIZED))
    }

    /// [`Plugins::auth_step`] from a connection task (re-authentication).
    pub fn auth_step_now(
        &self,
        plugin: &Arc<Plugin>,
        client_id: String,
        method: String,
        auth_data: Option<Vec<u8>>,
        state: Vec<u8>,
    ) -> AuthDecision {
        self.blocking(|| auth_step(plugin, client_id, method, auth_data, state))
    }

    /// [`Plugins::authenticate`] from a connection task (re-authentication).
    pub fn authenticate_now(&self, info: ConnectInfo) -> AuthDecision {
        if self.hooks() & Hooks::AUTHENTICATE == 0 {
            return AuthDecision::NoOpinion;
        }
        let chain = self.chain();
        self.blocking(|| authenticate_chain(&chain, &info))
    }

    /// Asks the chain about a batch of requests of one client; one verdict per request.
    /// Synchronous: a call costs at most the plugins' time budgets (on a multi-threaded
    /// runtime the worker is handed over to other tasks meanwhile).
    pub fn authorize(&self, client: &ClientInfo, requests: &[Request<'_>]) -> Vec<Verdict> {
        if self.hooks() & Hooks::AUTHORIZE == 0 {
            return vec![Verdict::Allow(None); requests.len()];
        }
        let chain = self.chain();
        self.blocking(|| authorize_chain(&chain, client, requests))
    }

    /// Asks the chain's `share` hooks about joins to shared subscription groups; one
    /// verdict per join, allowed when no plugin decides. Synchronous, as
    /// [`Plugins::authorize`].
    pub fn join(&self, client: &ClientInfo, joins: &[Join<'_>]) -> Vec<Verdict> {
        if self.hooks() & Hooks::SHARE == 0 || joins.is_empty() {
            return vec![Verdict::Allow(None); joins.len()];
        }
        let chain = self.chain();
        self.blocking(|| share_chain(&chain, client, joins))
    }
}

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
    fn blocking<R>(&self, run: impl FnOnce() -> R) -> R {
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

fn qos_to_wit(q: QoS) -> types::Qos {
    match q {
        QoS::AtMostOnce => types::Qos::AtMostOnce,
        QoS::AtLeastOnce => types::Qos::AtLeastOnce,
        QoS::ExactlyOnce => types::Qos::ExactlyOnce,
    }
}

fn qos_from_wit(q: types::Qos) -> QoS {
    match q {
        types::Qos::AtMostOnce => QoS::AtMostOnce,
        types::Qos::AtLeastOnce => QoS::AtLeastOnce,
        types::Qos::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn attrs(a: &[(String, String)]) -> Vec<types::Attribute> {
    a.iter()
        .map(|(n, v)| types::Attribute {
            name: n.clone(),
            value: v.clone(),
        })
        .collect()
}

/// CONNACK reason codes a plugin may refuse with (MQTT 5 §3.2.2.2, errors only).
pub(crate) fn connack_code(c: u8) -> u8 {
    const OK: &[u8] = &[
        0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97,
        0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
    ];
    if OK.contains(&c) { c } else { NOT_AUTHORIZED }
}

/// SUBACK and PUBACK/PUBREC error codes a plugin may refuse with (§3.9.3, §3.4.2.1).
fn ack_code(action: Action, c: u8) -> u8 {
    const SUB: &[u8] = &[0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2];
    const PUB: &[u8] = &[0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
    let ok = if action == Action::Subscribe {
        SUB
    } else {
        PUB
    };
    if ok.contains(&c) { c } else { NOT_AUTHORIZED }
}

fn authenticate_chain(chain: &Chain, info: &ConnectInfo) -> AuthDecision {
    let wit = auth::ConnectInfo {
        client_id: info.client_id.clone(),
        username: info.username.clone(),
        password: info.password.clone(),
        peer: info.peer.to_string(),
        listener: info.listener.clone(),
        protocol: match info.protocol {
            ProtocolVersion::V3_1 => types::ProtocolVersion::V31,
            ProtocolVersion::V3_1_1 => types::ProtocolVersion::V311,
            ProtocolVersion::V5 => types::ProtocolVersion::V5,
        },
        cert_subject: info.cert_subject.clone(),
        auth_method: info.auth_method.clone(),
        auth_data: info.auth_data.clone(),
        user_properties: info
            .user_properties
            .iter()
            .map(|(n, v)| types::UserProperty {
                name: n.clone(),
                value: v.clone(),
            })
            .collect(),
    };
    for p in &chain.plugins {
        if !p.hooks.has(Hooks::AUTHENTICATE) {
            continue;
        }
        let _span =
            tracing::debug_span!("plugin", plugin = %p.name, hook = "authenticate").entered();
        let r = p.call("authenticate", |s| match &s.guests.authenticate {
            Some(g) => g.call_authenticate(&mut s.store, &wit),
            None => Ok(auth::Decision::Ignore),
        });
        match r {
            Ok(auth::Decision::Ignore) => {}
            Ok(d) => {
                let enhanced = info.auth_method.is_some();
                return auth_decision(p, d, info.username.clone(), enhanced);
            }
            Err(_) => {
                if p.sidecar.on_failure.authenticate == DecideFailure::Deny {
                    return AuthDecision::Deny(NOT_AUTHORIZED);
                }
            }
        }
    }
    AuthDecision::NoOpinion
}

fn auth_step(
    plugin: &Arc<Plugin>,
    client_id: String,
    method: String,
    auth_data: Option<Vec<u8>>,
    state: Vec<u8>,
) -> AuthDecision {
    let step = auth::Step {
        client_id,
        auth_method: method,
        auth_data,
        state,
    };
    let _span = tracing::debug_span!("plugin", plugin = %plugin.name, hook = "auth-step").entered();
    let r = plugin.call("auth-step", |s| match &s.guests.authenticate {
        Some(g) => g.call_auth_step(&mut s.store, &step),
        None => Ok(auth::Decision::Deny(NOT_AUTHORIZED)),
    });
    match r {
        // A plugin that ignores its own exchange ends it.
        Ok(auth::Decision::Ignore) | Err(_) => AuthDecision::Deny(NOT_AUTHORIZED),
        Ok(d) => auth_decision(plugin, d, None, true),
    }
}

/// The chain's answer from one plugin's decision (not `ignore`). `Continue` is only valid
/// in an enhanced authentication exchange; elsewhere it refuses (0x87).
fn auth_decision(
    p: &Arc<Plugin>,
    d: auth::Decision,
    username: Option<String>,
    enhanced: bool,
) -> AuthDecision {
    match d {
        auth::Decision::Allow(g) => AuthDecision::Allow {
            username: g.username.or(username),
            attributes: g
                .attributes
                .into_iter()
                .map(|a| (a.name, a.value))
                .collect(),
            auth_data: g.auth_data,
        },
        auth::Decision::Deny(code) => AuthDecision::Deny(connack_code(code)),
        auth::Decision::Continue(c) if enhanced => AuthDecision::Continue {
            plugin: p.clone(),
            auth_data: c.auth_data,
            state: c.state,
        },
        auth::Decision::Continue(_) | auth::Decision::Ignore => AuthDecision::Deny(NOT_AUTHORIZED),
    }
}

fn share_chain(chain: &Chain, client: &ClientInfo, joins: &[Join<'_>]) -> Vec<Verdict> {
    let mut out: Vec<Option<Verdict>> = vec![None; joins.len()];
    let wit_client = flow::client_to_wit(client);
    for p in chain.plugins.iter().filter(|p| p.hooks.has(Hooks::SHARE)) {
        let idx: Vec<usize> = (0..joins.len()).filter(|&i| out[i].is_none()).collect();
        if idx.is_empty() {
            break;
        }
        let batch: Vec<share::Request> = (idx.iter())
            .map(|&i| share::Request {
                group: joins[i].group.to_owned(),
                filter: joins[i].filter.to_owned(),
                qos: qos_to_wit(joins[i].qos),
            })
            .collect();
        let _span = tracing::debug_span!("plugin", plugin = %p.name, hook = "share").entered();
        let r = p
            .call("share", |s| match &s.guests.share {
                Some(g) => g.call_join(&mut s.store, &wit_client, &batch),
                None => Ok(vec![share::Decision::Ignore; batch.len()]),
            })
            .and_then(|d| {
                if d.len() == batch.len() {
                    Ok(d)
                } else {
                    Err(p.arity("share", batch.len(), d.len()))
                }
            });
        match r {
            Ok(decisions) => {
                for (&i, d) in idx.iter().zip(decisions) {
                    out[i] = match d {
                        share::Decision::Allow => Some(Verdict::Allow(None)),
                        share::Decision::AllowQos(q) => Some(Verdict::Allow(Some(qos_from_wit(q)))),
                        share::Decision::Deny(c) => {
                            Some(Verdict::Deny(ack_code(Action::Subscribe, c)))
                        }
                        share::Decision::Ignore => None,
                    };
                }
            }
            Err(_) => {
                if p.sidecar.on_failure.authorize == DecideFailure::Deny {
                    for &i in &idx {
                        out[i] = Some(Verdict::Deny(NOT_AUTHORIZED));
                    }
                }
            }
        }
    }
    out.into_iter()
        .map(|v| v.unwrap_or(Verdict::Allow(None)))
        .collect()
}

fn authorize_chain(chain: &Chain, client: &ClientInfo, requests: &[Request<'_>]) -> Vec<Verdict> {
    let mut out: Vec<Option<Verdict>> = vec![None; requests.len()];
    let wit_client = flow::client_to_wit(client);
    for p in &chain.plugins {
        if !p.hooks.has(Hooks::AUTHORIZE) {
            continue;
        }
        // The undecided requests this plugin's topics select, in order.
        let idx: Vec<usize> = (0..requests.len())
            .filter(|&i| out[i].is_none())
            .filter(|&i| {
                let r = &requests[i];
                r.action == Action::Subscribe || p.sidecar.selects(r.topic)
            })
            .collect();
        if idx.is_empty() {
            continue;
        }
        let batch: Vec<authz::Request> = idx
            .iter()
            .map(|&i| {
                let r = &requests[i];
                authz::Request {
                    action: match r.action {
                        Action::Publish => authz::Action::Publish,
                        Action::Subscribe => authz::Action::Subscribe,
                        Action::Will => authz::Action::Will,
                        Action::Retained => authz::Action::Retained,
                    },
                    topic: r.topic.to_owned(),
                    qos: qos_to_wit(r.qos),
                    retain: r.retain,
                }
            })
            .collect();
        let _span = tracing::debug_span!("plugin", plugin = %p.name, hook = "authorize").entered();
        let r = p
            .call("authorize", |s| match &s.guests.authorize {
                Some(g) => g.call_authorize(&mut s.store, &wit_client, &batch),
                None => Ok(vec![authz::Decision::Ignore; batch.len()]),
            })
            .and_then(|d| {
                if d.len() == batch.len() {
                    Ok(d)
                } else {
                    Err(p.arity("authorize", batch.len(), d.len()))
                }
            });
        match r {
            Ok(decisions) => {
                for (&i, d) in idx.iter().zip(decisions) {
                    out[i] = match d {
                        authz::Decision::Allow => Some(Verdict::Allow(None)),
                        authz::Decision::AllowQos(q) => Some(Verdict::Allow(Some(qos_from_wit(q)))),
                        authz::Decision::Deny(c) => {
                            Some(Verdict::Deny(ack_code(requests[i].action, c)))
                        }
                        authz::Decision::Ignore => None,
                    };
                }
            }
            Err(_) => {
                if p.sidecar.on_failure.authorize == DecideFailure::Deny {
                    for &i in &idx {
                        out[i] = Some(Verdict::Deny(NOT_AUTHORIZED));
                    }
                }
            }
        }
    }
    out.into_iter()
        .map(|v| v.unwrap_or(Verdict::Allow(None)))
        .collect()
}

impl std::fmt::Debug for Plugins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugins")
            .field("dir", &self.dir)
            .field("hooks", &self.hooks())
            .field("generation", &self.generation())
            .finish_non_exhaustive()
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
