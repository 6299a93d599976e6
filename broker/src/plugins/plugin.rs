//! One loaded plugin: its compiled component, which hooks it exports, and a small pool of
//! live instances. A call takes an instance from the pool (instantiating one when the
//! pool is empty), sets its deadline, calls, and gives it back; an instance whose call
//! failed (trap, timeout, memory cap) is dropped and a fresh one is made on the next call,
//! since a component instance that trapped may never be entered again.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use wasmtime::Store;
use wasmtime::component::{Component, InstancePre};

use super::bindings::hooks::{
    authenticate, authorize, deliver, events, lifecycle, share, sink, transform,
};
use super::host::{Host, PluginEnv, Services, State, TICK};
use super::sidecar::Sidecar;

/// Runs `f`, turning a panic inside it into an error.
fn unwound<R>(f: impl FnOnce() -> wasmtime::Result<R>) -> wasmtime::Result<R> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned());
            Err(wasmtime::format_err!("panic in the call: {what}"))
        }
    }
}

/// The hooks a component exports, as a bit set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hooks(pub u32);

impl Hooks {
    /// `lifecycle.init`.
    pub const INIT: u32 = 1;
    /// `authenticate`.
    pub const AUTHENTICATE: u32 = 2;
    /// `authorize`.
    pub const AUTHORIZE: u32 = 4;
    /// `transform`.
    pub const TRANSFORM: u32 = 8;
    /// `deliver`.
    pub const DELIVER: u32 = 16;
    /// `sink`.
    pub const SINK: u32 = 32;
    /// `events`.
    pub const EVENTS: u32 = 64;
    /// `share` (since contract 0.1.1).
    pub const SHARE: u32 = 128;

    const NAMES: [(u32, &'static str); 8] = [
        (Hooks::INIT, "lifecycle (init)"),
        (Hooks::AUTHENTICATE, "authenticate"),
        (Hooks::AUTHORIZE, "authorize"),
        (Hooks::SHARE, "share"),
        (Hooks::TRANSFORM, "transform"),
        (Hooks::DELIVER, "deliver"),
        (Hooks::SINK, "sink"),
        (Hooks::EVENTS, "events"),
    ];

    /// Whether every bit of `h` is set.
    pub fn has(self, h: u32) -> bool {
        self.0 & h == h
    }

    /// Names of the hooks, for logs and `plugin check`.
    pub fn names(self) -> Vec<&'static str> {
        Hooks::NAMES
            .iter()
            .filter(|(b, _)| self.has(*b))
            .map(|(_, n)| *n)
            .collect()
    }
}

/// Export lookups of the hooks a component has (resolved once per plugin version).
struct Exports {
    init: Option<lifecycle::GuestIndices>,
    authenticate: Option<authenticate::GuestIndices>,
    authorize: Option<authorize::GuestIndices>,
    share: Option<share::GuestIndices>,
    transform: Option<transform::GuestIndices>,
    deliver: Option<deliver::GuestIndices>,
    sink: Option<sink::GuestIndices>,
    events: Option<events::GuestIndices>,
}

impl Exports {
    /// A hook that the component exports under its name but with the wrong shape is an
    /// error (the component was built against another contract); a missing one is not.
    fn find(pre: &InstancePre<State>) -> wasmtime::Result<Exports> {
        fn one<I>(
            pre: &InstancePre<State>,
            name: &str,
            f: fn(&InstancePre<State>) -> wasmtime::Result<I>,
        ) -> wasmtime::Result<Option<I>> {
            let full = format!("sandpiper:plugin/{name}@{}", super::CONTRACT_VERSION);
            if pre.component().get_export_index(None, &full).is_none() {
                return Ok(None);
            }
            f(pre)
                .map(Some)
                .map_err(|e| wasmtime::format_err!("export {full}: {e}"))
        }
        Ok(Exports {
            init: one(pre, "lifecycle", lifecycle::GuestIndices::new)?,
            authenticate: one(pre, "authenticate", authenticate::GuestIndices::new)?,
            authorize: one(pre, "authorize", authorize::GuestIndices::new)?,
            share: one(pre, "share", share::GuestIndices::new)?,
            transform: one(pre, "transform", transform::GuestIndices::new)?,
            deliver: one(pre, "deliver", deliver::GuestIndices::new)?,
            sink: one(pre, "sink", sink::GuestIndices::new)?,
            events: one(pre, "events", events::GuestIndices::new)?,
        })
    }

    fn hooks(&self) -> Hooks {
        let mut h = 0;
        let mut set = |present: bool, bit| {
            if present {
                h |= bit;
            }
        };
        set(self.init.is_some(), Hooks::INIT);
        set(self.authenticate.is_some(), Hooks::AUTHENTICATE);
        set(self.authorize.is_some(), Hooks::AUTHORIZE);
        set(self.share.is_some(), Hooks::SHARE);
        set(self.transform.is_some(), Hooks::TRANSFORM);
        set(self.deliver.is_some(), Hooks::DELIVER);
        set(self.sink.is_some(), Hooks::SINK);
        set(self.events.is_some(), Hooks::EVENTS);
        Hooks(h)
    }
}

/// The typed entry points of one live instance.
pub struct Guests {
    /// `authenticate`, if exported.
    pub authenticate: Option<authenticate::Guest>,
    /// `authorize`, if exported.
    pub authorize: Option<authorize::Guest>,
    /// `share`, if exported.
    pub share: Option<share::Guest>,
    /// `transform`, if exported.
    pub transform: Option<transform::Guest>,
    /// `deliver`, if exported.
    pub deliver: Option<deliver::Guest>,
    /// `sink`, if exported.
    pub sink: Option<sink::Guest>,
    /// `events`, if exported.
    pub events: Option<events::Guest>,
}

/// One live instance.
pub struct Slot {
    /// Its store (memory cap, epoch deadline).
    pub store: Store<State>,
    /// Its hooks.
    pub guests: Guests,
}

/// Why a hook call failed. All of them apply the plugin's failure policy.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The plugin trapped, ran out of time or memory, or could not be instantiated.
    #[error("plugin failed: {0}")]
    Failed(String),
    /// The plugin answered with the wrong number of results.
    #[error("plugin answered {got} results for {want} requests")]
    Arity {
        /// Results expected.
        want: usize,
        /// Results received.
        got: usize,
    },
}

/// The contract version `component` was built against, from its exports' names.
fn contract_of(component: &Component, engine: &wasmtime::Engine) -> String {
    (component.component_type().exports(engine))
        .find_map(|(name, _)| {
            let (_, version) = name.strip_prefix("sandpiper:plugin/")?.split_once('@')?;
            Some(version.to_owned())
        })
        .unwrap_or_default()
}

/// A loaded plugin version.
pub struct Plugin {
    /// Name: the file name without `.wasm`.
    pub name: Arc<str>,
    /// Its sidecar.
    pub sidecar: Sidecar,
    /// What it exports.
    pub hooks: Hooks,
    pre: InstancePre<State>,
    exports: Exports,
    env: Arc<PluginEnv>,
    engine: wasmtime::Engine,
    pool: Mutex<Vec<Slot>>,
    /// Calls and failures by hook and kind.
    pub stats: super::stats::PluginStats,
    /// The first 12 hex digits of the SHA-256 of the component's bytes.
    pub version: String,
    /// The contract version the component was built against (the `@X.Y.Z` of its
    /// `sandpiper:plugin/...` exports; empty if it names none).
    pub contract: String,
    /// Its sink queue (it belongs to the name: every version of the plugin finds the
    /// same), kept at the first message it takes so that the next ones do not look it up.
    pub(super) sink: std::sync::OnceLock<Arc<super::sink::SinkQueue>>,
}

impl Plugin {
    /// Compiles (or loads from the cache), links and instantiates one instance (running
    /// `init`), so that a version that cannot serve is refused before it replaces anything.
    pub fn load(
        host: &Host,
        name: &str,
        bytes: &[u8],
        sidecar: Sidecar,
        services: Services,
    ) -> wasmtime::Result<Plugin> {
        let component = host.compile(name, bytes)?;
        let mut plugin = Plugin::from_component(host, name, &component, sidecar, services)?;
        plugin.version = version_of(bytes);
        Ok(plugin)
    }

    /// [`Plugin::load`] from a compiled component.
    pub fn from_component(
        host: &Host,
        name: &str,
        component: &Component,
        sidecar: Sidecar,
        services: Services,
    ) -> wasmtime::Result<Plugin> {
        let pre = host.linker.instantiate_pre(component)?;
        let exports = Exports::find(&pre)?;
        let env = Arc::new(PluginEnv {
            name: Arc::from(name),
            config: sidecar.config.clone(),
            store: services.store,
            outbox: services.outbox,
            network: Arc::new(super::net::Allowed::new(Arc::from(name), &sidecar.network)),
            http: super::host::HttpPolicy::new(&sidecar.network, sidecar.time_ms),
            metrics: Default::default(),
            memory: AtomicU64::new(0),
        });
        let plugin = Plugin {
            name: Arc::from(name),
            hooks: exports.hooks(),
            sidecar,
            pre,
            exports,
            env,
            engine: host.engine.clone(),
            pool: Mutex::new(Vec::new()),
            stats: Default::default(),
            version: String::new(),
            contract: contract_of(component, &host.engine),
            sink: std::sync::OnceLock::new(),
        };
        let first = plugin.instantiate()?;
        plugin.put(first);
        Ok(plugin)
    }

    /// A new instance, `init` done.
    fn instantiate(&self) -> wasmtime::Result<Slot> {
        let memory = usize::try_from(self.sidecar.memory_mb)
            .unwrap_or(usize::MAX)
            .saturating_mul(1 << 20);
        let mut store = Store::new(&self.engine, State::new(self.env.clone(), memory));
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(ticks(self.sidecar.init_ms));
        store.data_mut().deadline = std::time::Instant::now() + millis(self.sidecar.init_ms);
        let instance = self.pre.instantiate(&mut store)?;
        let e = &self.exports;
        let guests = Guests {
            authenticate: e
                .authenticate
                .as_ref()
                .map(|i| i.load(&mut store, &instance))
                .transpose()?,
            authorize: e
                .authorize
                .as_ref()
                .map(|i| i.load(&mut store, &instance))
                .transpose()?,
            share: e
                .share
                .as_ref()
                .map(|i| i.load(&mut store, &instance))
                .transpose()?,
            transform: e
                .transform
                .as_ref()
                .map(|i| i.load(&mut store, &instance))
                .transpose()?,
            deliver: e
                .deliver
                .as_ref()
                .map(|i| i.load(&mut store, &instance))
                .transpose()?,
            sink: e
                .sink
                .as_ref()
                .map(|i| i.load(&mut store, &instance))
                .transpose()?,
            events: e
                .events
                .as_ref()
                .map(|i| i.load(&mut store, &instance))
                .transpose()?,
        };
        if let Some(init) = &e.init {
            let init = init.load(&mut store, &instance)?;
            init.call_init(&mut store)?
                .map_err(|msg| wasmtime::format_err!("init failed: {msg}"))?;
        }
        Ok(Slot { store, guests })
    }

    fn put(&self, slot: Slot) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < self.sidecar.instances as usize {
            pool.push(slot);
        }
    }

    /// Runs `f` on a live instance within the plugin's time budget. An instance whose call
    /// failed is discarded; the failure is counted and logged. A panic inside the call (a
    /// host function's, or one a guest's call caused in the host) is a failure like a
    /// trap: it never leaves this function, and the instance, frozen mid-call, is dropped.
    pub fn call<R>(
        &self,
        hook: &'static str,
        f: impl FnOnce(&mut Slot) -> wasmtime::Result<R>,
    ) -> Result<R, CallError> {
        let taken = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut slot = match taken {
            Some(s) => s,
            None => unwound(|| self.instantiate()).map_err(|e| self.failed(hook, e))?,
        };
        slot.store.set_epoch_deadline(ticks(self.sidecar.time_ms));
        let started = std::time::Instant::now();
        slot.store.data_mut().deadline = started + millis(self.sidecar.time_ms);
        let r = unwound(|| f(&mut slot));
        self.stats.called(hook, started.elapsed());
        match r {
            Ok(r) => {
                self.put(slot);
                Ok(r)
            }
            Err(e) => Err(self.failed(hook, e)),
        }
    }

    /// Counts and logs a failure (the instance, if any, is already dropped).
    pub fn failed(&self, hook: &'static str, e: wasmtime::Error) -> CallError {
        self.stats.failed(super::stats::classify(&e));
        let why = match e.downcast_ref::<wasmtime::Trap>() {
            Some(wasmtime::Trap::Interrupt) => {
                format!("time budget of {} ms exceeded", self.sidecar.time_ms)
            }
            Some(t) => format!("trap: {t}"),
            None => format!("{e:#}"),
        };
        tracing::warn!(plugin = %self.name, hook, "plugin call failed, instance replaced: {why}");
        CallError::Failed(why)
    }

    /// Counts and logs a wrong-length answer.
    pub fn arity(&self, hook: &'static str, want: usize, got: usize) -> CallError {
        self.stats.failed(super::stats::Failure::Answer);
        tracing::warn!(plugin = %self.name, hook, want, got, "plugin answered the wrong number of results");
        CallError::Arity { want, got }
    }

    /// Counts and logs an answer the broker cannot use (the rest of the answer stands).
    pub fn bad_answer(&self, hook: &'static str, why: &'static str) {
        self.stats.failed(super::stats::Failure::Answer);
        tracing::warn!(plugin = %self.name, hook, "plugin answer ignored: {why}");
    }

    /// The plugin's metrics.
    pub fn metrics(&self) -> Vec<(String, i128)> {
        self.env.metrics.snapshot()
    }

    /// Bytes of linear memory its live instances hold.
    pub fn memory_bytes(&self) -> u64 {
        self.env.memory.load(Ordering::Relaxed)
    }

    /// Idle instances ready for a call.
    pub fn idle_instances(&self) -> usize {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// The version label of a component: the first 12 hex digits of its SHA-256 (what
/// `sha256sum NAME.wasm` prints first).
fn version_of(bytes: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// A budget of `ms` milliseconds.
fn millis(ms: u32) -> std::time::Duration {
    std::time::Duration::from_millis(u64::from(ms))
}

/// Epoch ticks for a budget of `ms` milliseconds (at least one, plus one for the tick in
/// progress).
fn ticks(ms: u32) -> u64 {
    let tick = TICK.as_millis().max(1) as u64;
    u64::from(ms).div_ceil(tick) + 1
}
