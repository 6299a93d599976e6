//! The wasmtime side shared by every plugin: one `Engine` (cranelift, component model,
//! `concurrency_support` off, epoch interruption, pooling allocator, on-disk cache of
//! compiled code), the `Linker` built once, the epoch ticker thread, and the per-instance
//! store data with the host imports (log, kv, publish, metrics, config), WASI and
//! `wasi:http` (outgoing requests only, to the addresses of the sidecar's `network`).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, StoreLimits};
use wasmtime_wasi::sockets::SocketAddrUse;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::http::types::ErrorCode;
use wasmtime_wasi_http::{
    RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView,
};

use super::bindings::host::{config, kv, log, metrics, publish};
use super::bindings::{Plugin as PluginWorld, sandpiper::plugin::types};
use crate::store::Store as DataStore;

/// One epoch tick. A call's time budget is rounded up to whole ticks, so a hook is stopped
/// between `time_ms` and `time_ms + TICK` after it started.
pub const TICK: Duration = Duration::from_millis(2);

/// Pooling allocator sizing for this machine (2 cores, 24 GiB): at most this many
/// instances alive over all plugins. Each memory slot reserves `MAX_MEMORY_MB` MiB of
/// address space (plus guard), so 256 slots reserve ~ 300 GiB of virtual address space
/// and nothing of RAM until touched.
const POOL_INSTANCES: u32 = 256;

/// The engine, linker and ticker shared by all plugins.
pub struct Host {
    /// The one engine.
    pub engine: Engine,
    /// Host imports and WASI, linked once.
    pub linker: Linker<State>,
    stop: Arc<AtomicBool>,
    cache_dir: PathBuf,
}

impl Host {
    /// Builds the engine (compiled code cached under `cache_dir`) and starts the ticker.
    pub fn new(cache_dir: &Path) -> wasmtime::Result<Host> {
        let engine = match Engine::new(&engine_config(cache_dir, true)?) {
            Ok(e) => e,
            Err(e) => {
                // Address space can be limited (ulimit -v, some containers): fall back to
                // on-demand allocation, which costs a few µs more per instantiation.
                tracing::warn!(error = %e, "pooling allocator unavailable; using on-demand allocation");
                Engine::new(&engine_config(cache_dir, false)?)?
            }
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        // Name lookups only of the names a plugin's sidecar lists.
        super::net::add_to_linker(&mut linker, |s: &mut State| {
            let allowed = s.env.network.clone();
            super::net::Lookup {
                sockets: wasmtime_wasi::sockets::WasiSocketsView::sockets(s),
                allowed,
            }
        })?;
        // Its blocking wasi:io calls, replaced by ones safe on the runtime's workers.
        super::wasi_io::add_to_linker(&mut linker, |s: &mut State| super::wasi_io::Io {
            table: &mut s.table,
            cap: s
                .deadline
                .saturating_duration_since(std::time::Instant::now()),
        })?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_sync(&mut linker)?;
        PluginWorld::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (e, s) = (engine.clone(), stop.clone());
        std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    e.increment_epoch();
                }
            })
            .map_err(|e| wasmtime::format_err!("epoch thread: {e}"))?;
        Ok(Host {
            engine,
            linker,
            stop,
            cache_dir: cache_dir.to_path_buf(),
        })
    }

    /// Compiles (or loads from the cache) a component. The first load of a version is
    /// logged with the time it took: an interpreter compiled to WebAssembly (Python,
    /// JavaScript) takes tens of seconds, which should not pass in silence.
    pub fn compile(&self, name: &str, bytes: &[u8]) -> wasmtime::Result<Component> {
        let marker = self.compiled_marker(bytes);
        let first = !marker.exists();
        let started = std::time::Instant::now();
        if first {
            tracing::info!(
                plugin = name,
                bytes = bytes.len(),
                "compiling plugin (first load of this version, cached afterwards)"
            );
        }
        let component = Component::new(&self.engine, bytes)?;
        super::cow::prepare(&component)?;
        if first {
            tracing::info!(
                plugin = name,
                seconds = started.elapsed().as_secs_f64(),
                "plugin compiled"
            );
            if let Some(dir) = marker.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let _ = std::fs::write(&marker, b"");
        }
        Ok(component)
    }

    /// A file that exists once this engine has compiled `bytes` into its cache (wasmtime's
    /// cache does not tell hits from misses): named by a hash of the bytes and of what
    /// makes compiled code compatible (wasmtime version and engine settings). It lives
    /// beside the cache folder, whose files wasmtime's cache worker manages (and may
    /// remove).
    fn compiled_marker(&self, bytes: &[u8]) -> PathBuf {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        bytes.hash(&mut h);
        let mut dir = self.cache_dir.clone().into_os_string();
        dir.push(".compiled");
        PathBuf::from(dir).join(format!("{:016x}-{}", h.finish(), bytes.len()))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn engine_config(cache_dir: &Path, pooling: bool) -> wasmtime::Result<wasmtime::Config> {
    let mut c = wasmtime::Config::new();
    c.wasm_component_model(true);
    // Synchronous component calls are 50–100× slower with it on (DESIGN.md, measured).
    c.concurrency_support(false);
    c.epoch_interruption(true);
    c.cranelift_opt_level(wasmtime::OptLevel::Speed);
    let mut cache = wasmtime::CacheConfig::new();
    // wasmtime wants an absolute cache path.
    cache.with_directory(std::path::absolute(cache_dir)?);
    c.cache(Some(wasmtime::Cache::new(cache)?));
    if pooling {
        let max = u64::from(super::sidecar::MAX_MEMORY_MB) << 20;
        c.memory_reservation(max);
        c.memory_guard_size(32 << 20);
        let mut p = wasmtime::PoolingAllocationConfig::default();
        p.total_component_instances(POOL_INSTANCES);
        p.total_core_instances(POOL_INSTANCES * 4);
        p.total_memories(POOL_INSTANCES * 2);
        p.total_tables(POOL_INSTANCES * 4);
        p.total_stacks(POOL_INSTANCES);
        p.max_memory_size(usize::try_from(max).unwrap_or(usize::MAX));
        // Pages given back to the OS on reuse beyond this: keeps idle slots cheap.
        p.linear_memory_keep_resident(64 << 10);
        c.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(p));
    }
    Ok(c)
}

/// Messages published by plugins waiting to be routed; beyond, `publish` answers
/// `unavailable`.
pub const OUTBOX: usize = 4096;

/// A message a plugin published, on its way to the router.
#[derive(Debug)]
pub struct Published {
    /// The plugin that published it (its own transform hook is skipped).
    pub plugin: Arc<str>,
    /// The message.
    pub draft: crate::message::Draft,
}

/// Where the `publish` import puts messages.
#[derive(Debug, Clone)]
pub struct Outbox {
    /// The broker's end takes them in order.
    pub tx: std::sync::mpsc::SyncSender<Published>,
    /// Largest payload accepted (the broker's `max_packet_size`).
    pub max_payload: usize,
    /// The bounds of the topics plugins publish or rewrite to.
    pub topics: crate::config::TopicLimits,
}

/// What a plugin's host imports reach beyond the plugin itself.
#[derive(Debug, Clone, Default)]
pub struct Services {
    /// The durable store (`kv`).
    pub store: Option<Arc<DataStore>>,
    /// The router's queue (`publish`).
    pub outbox: Option<Outbox>,
}

/// What one plugin instance's host imports reach: shared by every instance of a plugin.
pub struct PluginEnv {
    /// Plugin name (the file name without `.wasm`): log field, kv namespace, metric prefix.
    pub name: Arc<str>,
    /// The sidecar's `[config]` table.
    pub config: toml::Table,
    /// The broker's durable store (kv table).
    pub store: Option<Arc<DataStore>>,
    /// Where `publish` puts messages.
    pub outbox: Option<Outbox>,
    /// The addresses the plugin may connect to (sidecar `network`, names resolved again as
    /// they age).
    pub network: Arc<super::net::Allowed>,
    /// Which `wasi:http` requests the plugin may send, and how long each may wait.
    pub http: HttpPolicy,
    /// Counters and gauges the plugin defined.
    pub metrics: PluginMetrics,
    /// Bytes of linear memory its live instances hold.
    pub memory: AtomicU64,
}

/// A plugin's counters and gauges (at most 64 names).
#[derive(Default)]
pub struct PluginMetrics {
    values: std::sync::Mutex<Vec<(String, Metric)>>,
}

/// One counter or gauge.
pub enum Metric {
    /// Monotonic counter.
    Counter(AtomicU64),
    /// Gauge.
    Gauge(AtomicI64),
}

impl PluginMetrics {
    fn with(&self, name: &str, make: fn() -> Metric, f: impl FnOnce(&Metric)) {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return;
        }
        let mut v = self.values.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, m)) = v.iter().find(|(n, _)| n == name) {
            f(m);
        } else if v.len() < 64 {
            let m = make();
            f(&m);
            v.push((name.to_owned(), m));
        }
    }

    /// Current values (for tests; nothing exports them yet).
    pub fn snapshot(&self) -> Vec<(String, i128)> {
        let v = self.values.lock().unwrap_or_else(|p| p.into_inner());
        v.iter()
            .map(|(n, m)| {
                let x = match m {
                    Metric::Counter(c) => i128::from(c.load(Ordering::Relaxed)),
                    Metric::Gauge(g) => i128::from(g.load(Ordering::Relaxed)),
                };
                (n.clone(), x)
            })
            .collect()
    }
}

/// The caps of one instance (wasmtime's `StoreLimits`), counting what its linear memories
/// hold into the plugin's total while the instance lives.
pub struct Limits {
    caps: StoreLimits,
    held: usize,
    env: Arc<PluginEnv>,
}

impl wasmtime::ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = self.caps.memory_growing(current, desired, maximum)?;
        if ok {
            let grown = desired.saturating_sub(current);
            self.held += grown;
            self.env.memory.fetch_add(grown as u64, Ordering::Relaxed);
        }
        Ok(ok)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.caps.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.caps.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.caps.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.caps.instances()
    }

    fn tables(&self) -> usize {
        self.caps.tables()
    }

    fn memories(&self) -> usize {
        self.caps.memories()
    }
}

impl Drop for Limits {
    fn drop(&mut self) {
        self.env
            .memory
            .fetch_sub(self.held as u64, Ordering::Relaxed);
    }
}

/// The data of one plugin instance's `Store`.
pub struct State {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    http_gate: HttpGate,
    table: ResourceTable,
    /// Memory cap of this instance, and what its memories hold.
    pub limits: Limits,
    env: Arc<PluginEnv>,
    /// When the running call's time budget ends: a blocking WASI call waits no longer.
    pub deadline: std::time::Instant,
}

impl State {
    /// Store data for a new instance: WASI with no preopened directories, no environment,
    /// no arguments and no stdio; TCP connections only to the plugin's `network`
    /// addresses (none: no sockets at all), no listening, no UDP, no name lookups.
    pub fn new(env: Arc<PluginEnv>, memory_bytes: usize) -> State {
        let mut wasi = WasiCtx::builder();
        if !env.network.is_empty() {
            let allowed = env.network.clone();
            // Name lookups only for plugins given host names, and then only of those names
            // (super::net); the connect is checked at connect time.
            wasi.allow_tcp(true)
                .allow_ip_name_lookup(allowed.has_names())
                .socket_addr_check(move |addr, use_| {
                    let allowed = allowed.clone();
                    Box::pin(async move {
                        let ok = match use_ {
                            // The implicit bind before a connect.
                            SocketAddrUse::TcpBind => {
                                addr.ip().is_unspecified() && addr.port() == 0
                            }
                            SocketAddrUse::TcpConnect => allowed.may_connect(addr).await,
                            _ => false,
                        };
                        if !ok {
                            tracing::warn!(plugin = %allowed.plugin_name(), %addr, use_ = ?use_,
                                "plugin network use refused: address not in its sidecar's network list");
                        }
                        ok
                    })
                });
        }
        State {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            http_gate: HttpGate { env: env.clone() },
            table: ResourceTable::new(),
            limits: Limits {
                caps: wasmtime::StoreLimitsBuilder::new()
                    .memory_size(memory_bytes)
                    .instances(64)
                    .tables(64)
                    .memories(8)
                    .trap_on_grow_failure(true)
                    .build(),
                held: 0,
                env: env.clone(),
            },
            env,
            deadline: std::time::Instant::now(),
        }
    }
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for State {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_gate,
        }
    }
}

/// The `wasi:http` requests a plugin may send: those whose authority (`host:port`, the
/// port defaulting to 80 for `http` and 443 for `https`) its sidecar's `network` lists.
/// A listed IP matches that IP written in the URL; a listed host name matches that name
/// (ASCII case-insensitive), whatever it resolves to when the request is sent.
#[derive(Debug, Clone, Default)]
pub struct HttpPolicy {
    ips: Vec<SocketAddr>,
    names: Vec<(String, u16)>,
    /// Longest connect, first-byte and between-bytes wait of one request.
    wait: Duration,
}

impl HttpPolicy {
    /// The policy of a plugin whose sidecar lists `network` and gives each call `time_ms`.
    /// Each wait of a request defaults to, and is capped at, the call's time budget: a
    /// request that outlasts it fails the call anyway (when the plugin resumes), and the
    /// cap keeps a host call the epoch deadline cannot interrupt bounded.
    pub fn new(network: &[String], time_ms: u32) -> HttpPolicy {
        let mut p = HttpPolicy {
            wait: Duration::from_millis(u64::from(time_ms.max(1))),
            ..HttpPolicy::default()
        };
        for entry in network {
            if let Ok(addr) = entry.parse::<SocketAddr>() {
                p.ips.push(addr);
            } else if let Some((host, port)) = entry.rsplit_once(':')
                && let Ok(port) = port.parse::<u16>()
            {
                p.names.push((host.to_ascii_lowercase(), port));
            }
        }
        p
    }

    /// Whether a request to `uri` may be sent.
    pub fn allows(&self, uri: &http::Uri) -> bool {
        let Some(authority) = uri.authority() else {
            return false;
        };
        // User info is never sent as part of a destination; refuse it outright.
        if authority.as_str().contains('@') {
            return false;
        }
        let port = match authority.port_u16() {
            Some(p) => p,
            None if uri.scheme() == Some(&http::uri::Scheme::HTTPS) => 443,
            None if uri.scheme() == Some(&http::uri::Scheme::HTTP) => 80,
            None => return false,
        };
        let host = authority.host();
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        match bare.parse::<IpAddr>() {
            Ok(ip) => self.ips.contains(&SocketAddr::new(ip, port)),
            Err(_) => self
                .names
                .iter()
                .any(|(n, p)| *p == port && n.eq_ignore_ascii_case(host)),
        }
    }

    /// The guest's request options with every wait bounded.
    fn bound(&self, options: Option<RequestOptions>) -> RequestOptions {
        let o = options.unwrap_or_default();
        let cap = |d: Option<Duration>| Some(d.map_or(self.wait, |d| d.min(self.wait)));
        RequestOptions {
            connect_timeout: cap(o.connect_timeout),
            first_byte_timeout: cap(o.first_byte_timeout),
            between_bytes_timeout: cap(o.between_bytes_timeout),
        }
    }
}

/// One instance's `wasi:http` hooks: every outgoing request passes [`HttpPolicy`] before
/// it is sent; a refused one fails with `HTTP-request-denied` and is logged.
struct HttpGate {
    env: Arc<PluginEnv>,
}

/// The future `send_request` answers with: the response and the connection's own driver.
type Sent = wasmtime_wasi_http::Result<(
    http::Response<WasiBody>,
    Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
)>;

impl WasiHttpHooks for HttpGate {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _request_done: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> Box<dyn Future<Output = Sent> + Send> {
        let policy = &self.env.http;
        if !policy.allows(request.uri()) {
            let authority = request.uri().authority().map(|a| a.as_str()).unwrap_or("");
            tracing::warn!(plugin = %self.env.name, authority, use_ = "wasi:http",
                "plugin network use refused: address not in its sidecar's network list");
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        let options = policy.bound(options);
        // The TLS handshake has no timeout of its own in the default sender: bound the
        // whole way to the response head by connect + first-byte.
        let head = options.connect_timeout.unwrap_or(policy.wait)
            + options.first_byte_timeout.unwrap_or(policy.wait);
        Box::new(async move {
            use http_body_util::BodyExt;
            let send = wasmtime_wasi_http::default_send_request(request, Some(options));
            let (response, connection) = tokio::time::timeout(head, send)
                .await
                .map_err(|_| wasmtime_wasi_http::Error::ConnectionTimeout)??;
            let connection: Box<dyn Future<Output = _> + Send> = Box::new(connection);
            Ok((response.map(BodyExt::boxed_unsync), connection))
        })
    }

    // The guest gets these errors as its answer (a sink says why in its `retry`): logged
    // at debug, with the plugin, instead of the crate's default warning per failure.
    fn p2_error_from_connect(&mut self, err: &std::io::Error) -> ErrorCode {
        tracing::debug!(plugin = %self.env.name, error = %err, "plugin http connect failed");
        match err.kind() {
            std::io::ErrorKind::TimedOut => ErrorCode::ConnectionTimeout,
            _ => ErrorCode::ConnectionRefused,
        }
    }

    fn p2_error_from_hyper(&mut self, err: &hyper::Error) -> ErrorCode {
        tracing::debug!(plugin = %self.env.name, error = %err, "plugin http request failed");
        ErrorCode::HttpProtocolError
    }

    fn p2_error_from_tls(&mut self, err: &std::io::Error) -> ErrorCode {
        tracing::debug!(plugin = %self.env.name, error = %err, "plugin https handshake failed");
        ErrorCode::TlsProtocolError
    }
}

impl types::Host for State {}

impl log::Host for State {
    fn log(&mut self, level: log::Level, message: String, fields: Vec<(String, String)>) {
        let plugin = &*self.env.name;
        // Bounded: a plugin cannot flood the log with megabyte lines.
        let message = truncate(&message, 4096);
        let fields: Vec<_> = fields
            .iter()
            .take(16)
            .map(|(k, v)| format!("{}={}", truncate(k, 64), truncate(v, 256)))
            .collect();
        let fields = fields.join(" ");
        match level {
            log::Level::Trace => tracing::trace!(plugin, fields, "{message}"),
            log::Level::Debug => tracing::debug!(plugin, fields, "{message}"),
            log::Level::Info => tracing::info!(plugin, fields, "{message}"),
            log::Level::Warn => tracing::warn!(plugin, fields, "{message}"),
            log::Level::Error => tracing::error!(plugin, fields, "{message}"),
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

const KV_MAX_KEY: usize = 1024;
const KV_MAX_VALUE: usize = 1 << 20;

impl kv::Host for State {
    fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, kv::Error> {
        if key.len() > KV_MAX_KEY {
            return Err(kv::Error::TooLarge);
        }
        let Some(store) = &self.env.store else {
            return Ok(None);
        };
        store
            .kv_get(&self.env.name, &key)
            .map_err(|e| kv::Error::Store(e.to_string()))
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), kv::Error> {
        if key.len() > KV_MAX_KEY || value.len() > KV_MAX_VALUE {
            return Err(kv::Error::TooLarge);
        }
        let Some(store) = &self.env.store else {
            return Err(kv::Error::Store("no store".into()));
        };
        wait_durable(store, store.kv_set(&self.env.name, &key, value))
    }

    fn delete(&mut self, key: String) -> Result<(), kv::Error> {
        if key.len() > KV_MAX_KEY {
            return Err(kv::Error::TooLarge);
        }
        let Some(store) = &self.env.store else {
            return Ok(());
        };
        wait_durable(store, store.kv_delete(&self.env.name, &key))
    }
}

/// Waits (at most 2 s) until the store has committed `ticket`, so that a `get` after a
/// `set` sees the new value and the write is durable when the guest hears `ok`. With
/// `durability = "periodic"` there is no ticket and the write is visible at the next
/// commit.
fn wait_durable(store: &DataStore, ticket: Option<u64>) -> Result<(), kv::Error> {
    let Some(ticket) = ticket else {
        return Ok(());
    };
    let rx = store.committed();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while *rx.borrow() < ticket {
        if std::time::Instant::now() > deadline {
            return Err(kv::Error::Store("store commit timed out".into()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

impl publish::Host for State {
    fn publish(&mut self, msg: types::Message) -> Result<(), publish::Error> {
        let Some(outbox) = &self.env.outbox else {
            return Err(publish::Error::Unavailable);
        };
        if msg.payload.len() > outbox.max_payload {
            return Err(publish::Error::TooLarge);
        }
        let draft = crate::message::Draft::from_wit(msg, &outbox.topics)
            .map_err(|_| publish::Error::InvalidTopic)?;
        let p = Published {
            plugin: self.env.name.clone(),
            draft,
        };
        outbox.tx.try_send(p).map_err(|_| {
            crate::metrics::inc(crate::metrics::C::PluginPublishDropped);
            publish::Error::Unavailable
        })
    }
}

impl metrics::Host for State {
    fn counter_add(&mut self, name: String, delta: u64) {
        self.env.metrics.with(
            &name,
            || Metric::Counter(AtomicU64::new(0)),
            |m| {
                if let Metric::Counter(c) = m {
                    c.fetch_add(delta, Ordering::Relaxed);
                }
            },
        );
    }

    fn gauge_set(&mut self, name: String, value: i64) {
        self.env.metrics.with(
            &name,
            || Metric::Gauge(AtomicI64::new(0)),
            |m| {
                if let Metric::Gauge(g) = m {
                    g.store(value, Ordering::Relaxed);
                }
            },
        );
    }
}

impl config::Host for State {
    fn get(&mut self, key: String) -> Option<String> {
        self.env.config.get(&key).map(|v| match v {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    }

    fn toml(&mut self) -> String {
        self.env.config.to_string()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
    use super::*;

    fn policy(network: &[&str]) -> HttpPolicy {
        let list: Vec<String> = network.iter().map(|s| s.to_string()).collect();
        HttpPolicy::new(&list, 5000)
    }

    fn allows(p: &HttpPolicy, url: &str) -> bool {
        p.allows(&url.parse::<http::Uri>().unwrap())
    }

    #[test]
    fn http_authority_must_be_listed() {
        let p = policy(&["127.0.0.1:8080", "Hooks.Example.com:443", "[::1]:80"]);
        assert!(allows(&p, "http://127.0.0.1:8080/x"));
        assert!(!allows(&p, "http://127.0.0.1:8081/x"), "other port");
        assert!(!allows(&p, "http://127.0.0.1/x"), "default port 80");
        assert!(
            !allows(&p, "http://localhost:8080/x"),
            "a name does not match an IP"
        );
        assert!(
            allows(&p, "https://hooks.example.COM/in"),
            "default 443, case"
        );
        assert!(allows(&p, "https://hooks.example.com:443/in"));
        assert!(!allows(&p, "http://hooks.example.com/in"), "http: port 80");
        assert!(!allows(&p, "https://evil.hooks.example.com/in"));
        assert!(allows(&p, "http://[::1]/"));
        assert!(!allows(&p, "http://[::2]/"));
        assert!(!allows(&p, "http://user@127.0.0.1:8080/"), "user info");
        assert!(!allows(&p, "/relative"), "no authority");
        assert!(
            !allows(&policy(&[]), "http://127.0.0.1:8080/"),
            "empty list"
        );
    }

    #[test]
    fn http_waits_are_bounded_by_the_time_budget() {
        let p = policy(&[]);
        let none = p.bound(None);
        assert_eq!(none.connect_timeout, Some(Duration::from_secs(5)));
        assert_eq!(none.first_byte_timeout, Some(Duration::from_secs(5)));
        assert_eq!(none.between_bytes_timeout, Some(Duration::from_secs(5)));
        let asked = p.bound(Some(RequestOptions {
            connect_timeout: Some(Duration::from_millis(300)),
            first_byte_timeout: Some(Duration::from_secs(600)),
            between_bytes_timeout: None,
        }));
        assert_eq!(asked.connect_timeout, Some(Duration::from_millis(300)));
        assert_eq!(asked.first_byte_timeout, Some(Duration::from_secs(5)));
        assert_eq!(asked.between_bytes_timeout, Some(Duration::from_secs(5)));
    }
}
