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
mod cow;
pub(crate) mod events;
pub mod flow;
pub mod gate;
pub mod host;
pub(crate) mod net;
mod pass;
pub mod plugin;
pub mod sidecar;
pub(crate) mod sink;
mod slow;
pub(crate) mod stats;
mod wasi_io;
mod watch;

pub use watch::{Control, ControlError, State as PluginState};

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bindings::hooks::{authenticate as auth, authorize as authz, share};
use bindings::sandpiper::plugin::types;

use crate::codec::{Carrier, ProtocolVersion, QoS, ReasonCode, plugin_refusal};
use crate::message::{ClientId, Principal};
use plugin::CallError;
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
    /// Signalled on every chain change (see [`Plugins::changed`]).
    changed: tokio::sync::Notify,
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
    /// The folder's watcher: its thread scans through this, the admin API controls
    /// plugins through it.
    watcher: Mutex<watch::Watcher>,
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
    Deny(ReasonCode),
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
            AuthDecision::Deny(reason) => write!(f, "Deny({reason:?})"),
            AuthDecision::Continue { plugin, .. } => write!(f, "Continue({})", plugin.name),
            AuthDecision::NoOpinion => f.write_str("NoOpinion"),
        }
    }
}

/// Who asks [`Plugins::authorize`]: an authenticated client.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// Client identifier (shared with the session: every idle connection keeps one).
    pub client_id: ClientId,
    /// Who it is: the user name after authentication and the listener (shared with the
    /// session; anonymous clients share their listener's).
    pub principal: Arc<Principal>,
    /// Attributes set by authentication (a boxed slice: 8 bytes less than a `Vec` in every
    /// idle connection, and no allocation when empty).
    pub attributes: Box<[(String, String)]>,
}

impl ClientInfo {
    /// The user name after authentication.
    pub fn username(&self) -> Option<&str> {
        self.principal.user.as_deref()
    }

    /// The listener's name.
    pub fn listener(&self) -> &Arc<str> {
        &self.principal.listener
    }
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

impl Action {
    /// What a plugin's refusal code becomes: a SUBACK code for a subscription, a CONNACK
    /// code for a will (it refuses the CONNECT), a PUBACK code otherwise.
    fn refusal(self, code: u8) -> ReasonCode {
        let carrier = match self {
            Action::Subscribe => Carrier::SubAck,
            Action::Will => Carrier::ConnAck,
            Action::Publish | Action::Retained => Carrier::PubAck,
        };
        plugin_refusal(code, carrier)
    }
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
    Deny(ReasonCode),
}

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
            changed: tokio::sync::Notify::new(),
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
            watcher: Mutex::new(watch::Watcher::default()),
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
        let missing = {
            let mut w = self.watcher();
            w.load_disabled(self);
            w.scan(self);
            w.missing_required(self)
        };
        watch::spawn(Arc::downgrade(self), shutdown);
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

    /// The required plugins (`[plugins] required`) not serving now.
    pub fn missing_required(&self) -> Vec<String> {
        let chain = self.chain();
        (self.required.iter())
            .filter(|r| !chain.plugins.iter().any(|p| &*p.name == r.as_str()))
            .cloned()
            .collect()
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
        self.changed.notify_one();
    }

    /// Resolves after the chain changed (a plugin loaded, replaced or removed) since the
    /// last call returned. One waiter: the broker, which then wakes the connections so
    /// that each authorizes its subscriptions again.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Asks the chain about a CONNECT. Runs the plugins on a blocking thread (a hook may
    /// take its whole time budget, e.g. a slow password hash).
    pub async fn authenticate(self: &Arc<Self>, info: ConnectInfo, wait: Duration) -> AuthDecision {
        if self.hooks() & Hooks::AUTHENTICATE == 0 {
            return AuthDecision::NoOpinion;
        }
        let Some(_slot) = self.auth_slot(wait).await else {
            return AuthDecision::Deny(ReasonCode::ServerBusy);
        };
        let chain = self.chain();
        tokio::task::spawn_blocking(move || authenticate_chain(&chain, &info))
            .await
            .unwrap_or(AuthDecision::Deny(ReasonCode::NotAuthorized))
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
            return AuthDecision::Deny(ReasonCode::ServerBusy);
        };
        tokio::task::spawn_blocking(move || auth_step(&plugin, client_id, method, auth_data, state))
            .await
            .unwrap_or(AuthDecision::Deny(ReasonCode::NotAuthorized))
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
                    return AuthDecision::Deny(ReasonCode::NotAuthorized);
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
        None => Ok(auth::Decision::Deny(ReasonCode::NotAuthorized.code())),
    });
    match r {
        // A plugin that ignores its own exchange ends it.
        Ok(auth::Decision::Ignore) | Err(_) => AuthDecision::Deny(ReasonCode::NotAuthorized),
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
        auth::Decision::Deny(code) => AuthDecision::Deny(plugin_refusal(code, Carrier::ConnAck)),
        auth::Decision::Continue(c) if enhanced => AuthDecision::Continue {
            plugin: p.clone(),
            auth_data: c.auth_data,
            state: c.state,
        },
        auth::Decision::Continue(_) | auth::Decision::Ignore => {
            AuthDecision::Deny(ReasonCode::NotAuthorized)
        }
    }
}

/// The `share` hook's pass: the first plugin to decide a join decides it.
struct SharePass<'a> {
    client: types::Client,
    joins: &'a [Join<'a>],
    out: Vec<Option<Verdict>>,
}

impl pass::Pass for SharePass<'_> {
    const HOOK: u32 = Hooks::SHARE;
    const NAME: &'static str = "share";
    type Answer = share::Decision;

    fn wants(&self, _p: &Plugin, i: usize) -> bool {
        self.out[i].is_none()
    }

    fn call(&mut self, p: &Plugin, idx: &[usize]) -> Result<Vec<share::Decision>, CallError> {
        let batch: Vec<share::Request> = (idx.iter())
            .map(|&i| share::Request {
                group: self.joins[i].group.to_owned(),
                filter: self.joins[i].filter.to_owned(),
                qos: qos_to_wit(self.joins[i].qos),
            })
            .collect();
        let client = &self.client;
        p.call("share", |s| match &s.guests.share {
            Some(g) => g.call_join(&mut s.store, client, &batch),
            None => Ok(vec![share::Decision::Ignore; batch.len()]),
        })
    }

    fn apply(&mut self, _p: &Plugin, i: usize, d: share::Decision) {
        self.out[i] = match d {
            share::Decision::Allow => Some(Verdict::Allow(None)),
            share::Decision::AllowQos(q) => Some(Verdict::Allow(Some(qos_from_wit(q)))),
            share::Decision::Deny(c) => Some(Verdict::Deny(plugin_refusal(c, Carrier::SubAck))),
            share::Decision::Ignore => None,
        };
    }

    fn failed(&mut self, p: &Plugin, idx: &[usize]) {
        if p.sidecar.on_failure.authorize == DecideFailure::Deny {
            for &i in idx {
                self.out[i] = Some(Verdict::Deny(ReasonCode::NotAuthorized));
            }
        }
    }
}

fn share_chain(chain: &Chain, client: &ClientInfo, joins: &[Join<'_>]) -> Vec<Verdict> {
    let mut pass = SharePass {
        client: flow::client_to_wit(client),
        joins,
        out: vec![None; joins.len()],
    };
    pass::run(chain, joins.len(), &mut pass);
    (pass.out.into_iter())
        .map(|v| v.unwrap_or(Verdict::Allow(None)))
        .collect()
}

/// The `authorize` hook's pass: the first plugin to decide a request decides it. A
/// subscription goes to every authorize plugin (a filter may overlap its topics in ways
/// matching cannot tell); other requests to those whose topics select the topic.
struct AuthorizePass<'a> {
    client: types::Client,
    requests: &'a [Request<'a>],
    out: Vec<Option<Verdict>>,
}

impl pass::Pass for AuthorizePass<'_> {
    const HOOK: u32 = Hooks::AUTHORIZE;
    const NAME: &'static str = "authorize";
    type Answer = authz::Decision;

    fn wants(&self, p: &Plugin, i: usize) -> bool {
        let r = &self.requests[i];
        self.out[i].is_none() && (r.action == Action::Subscribe || p.sidecar.selects(r.topic))
    }

    fn call(&mut self, p: &Plugin, idx: &[usize]) -> Result<Vec<authz::Decision>, CallError> {
        let batch: Vec<authz::Request> = (idx.iter())
            .map(|&i| {
                let r = &self.requests[i];
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
        let client = &self.client;
        p.call("authorize", |s| match &s.guests.authorize {
            Some(g) => g.call_authorize(&mut s.store, client, &batch),
            None => Ok(vec![authz::Decision::Ignore; batch.len()]),
        })
    }

    fn apply(&mut self, _p: &Plugin, i: usize, d: authz::Decision) {
        self.out[i] = match d {
            authz::Decision::Allow => Some(Verdict::Allow(None)),
            authz::Decision::AllowQos(q) => Some(Verdict::Allow(Some(qos_from_wit(q)))),
            authz::Decision::Deny(c) => Some(Verdict::Deny(self.requests[i].action.refusal(c))),
            authz::Decision::Ignore => None,
        };
    }

    fn failed(&mut self, p: &Plugin, idx: &[usize]) {
        if p.sidecar.on_failure.authorize == DecideFailure::Deny {
            for &i in idx {
                self.out[i] = Some(Verdict::Deny(ReasonCode::NotAuthorized));
            }
        }
    }
}

fn authorize_chain(chain: &Chain, client: &ClientInfo, requests: &[Request<'_>]) -> Vec<Verdict> {
    let mut pass = AuthorizePass {
        client: flow::client_to_wit(client),
        requests,
        out: vec![None; requests.len()],
    };
    pass::run(chain, requests.len(), &mut pass);
    (pass.out.into_iter())
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
