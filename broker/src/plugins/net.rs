//! A plugin's network allow-list (its sidecar's `network`), enforced where WASI sockets
//! meet the host: which names the plugin may look up, and which addresses it may connect
//! to, checked at connect time.
//!
//! Listed IP addresses are fixed. Listed host names are resolved at load and again when a
//! resolution is older than [`REFRESH`] (getaddrinfo does not expose DNS TTLs, so a fixed
//! age stands for them), or at once (at most once a second) when the plugin connects to
//! an address the last resolution did not give: a database or Kafka endpoint that moves
//! is followed, and an address is allowed only if a listed name resolves to it when the
//! connection is made. A name lookup of the plugin's own goes through only for a listed
//! name (or an IP literal), so the lookups themselves carry nothing out.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::component::{HasData, Resource};
use wasmtime_wasi::p2::SocketError;
use wasmtime_wasi::p2::bindings::sockets::ip_name_lookup::{Host, HostResolveAddressStream};
use wasmtime_wasi::p2::bindings::sockets::network::{ErrorCode, IpAddress, Network};
use wasmtime_wasi::sockets::WasiSocketsCtxView;

/// How old a resolution of the listed names may get before a connect resolves them again.
pub const REFRESH: Duration = Duration::from_secs(30);
/// Least time between two resolutions made because of an unknown address.
const RETRY: Duration = Duration::from_secs(1);

/// The addresses a plugin may connect to.
#[derive(Debug)]
pub struct Allowed {
    plugin: Arc<str>,
    /// `ip:port` entries.
    fixed: Vec<SocketAddr>,
    /// `host:port` entries, as written (names compared case-insensitively).
    names: Vec<(String, u16)>,
    /// The names' addresses, and when they were resolved.
    resolved: Mutex<(Instant, Vec<SocketAddr>)>,
}

impl Allowed {
    /// The allow-list of the sidecar's `network` entries (resolved now).
    pub fn new(plugin: Arc<str>, network: &[String]) -> Allowed {
        let mut fixed = Vec::new();
        let mut names = Vec::new();
        for entry in network {
            if let Ok(a) = entry.parse::<SocketAddr>() {
                fixed.push(a);
            } else if let Some((host, port)) = entry.rsplit_once(':')
                && let Ok(port) = port.parse::<u16>()
            {
                names.push((host.to_ascii_lowercase(), port));
            }
        }
        let allowed = Allowed {
            plugin,
            fixed,
            names,
            resolved: Mutex::new((Instant::now(), Vec::new())),
        };
        let now = allowed.resolve_now();
        allowed.store(now);
        allowed
    }

    /// The plugin's name, for logs.
    pub fn plugin_name(&self) -> &str {
        &self.plugin
    }

    /// Whether the list allows any network use at all.
    pub fn is_empty(&self) -> bool {
        self.fixed.is_empty() && self.names.is_empty()
    }

    /// Whether the list names hosts (then the plugin may look names up).
    pub fn has_names(&self) -> bool {
        !self.names.is_empty()
    }

    /// Whether `name` (a host name or an IP literal) may be looked up.
    pub fn may_resolve(&self, name: &str) -> bool {
        name.parse::<IpAddr>().is_ok()
            || self.names.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    fn resolve_now(&self) -> Vec<SocketAddr> {
        use std::net::ToSocketAddrs;
        let mut out = Vec::new();
        for (host, port) in &self.names {
            match (host.as_str(), *port).to_socket_addrs() {
                Ok(addrs) => out.extend(addrs),
                Err(e) => {
                    tracing::warn!(plugin = %self.plugin, host = %host, error = %e, "plugin network name does not resolve");
                }
            }
        }
        out
    }

    fn store(&self, addrs: Vec<SocketAddr>) {
        *self.resolved.lock().unwrap_or_else(|e| e.into_inner()) = (Instant::now(), addrs);
    }

    /// Whether a connect to `addr` is allowed now, resolving the listed names again when
    /// their resolution is old or does not hold `addr` (not more than once a second).
    pub async fn may_connect(&self, addr: SocketAddr) -> bool {
        if self.fixed.contains(&addr) {
            return true;
        }
        if self.names.is_empty() {
            return false;
        }
        let (age, known) = {
            let r = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
            (r.0.elapsed(), r.1.contains(&addr))
        };
        if (known && age < REFRESH) || (!known && age < RETRY) {
            return known;
        }
        let mut fresh = Vec::new();
        for (host, port) in &self.names {
            if let Ok(addrs) = tokio::net::lookup_host((host.as_str(), *port)).await {
                fresh.extend(addrs);
            }
        }
        let ok = fresh.contains(&addr);
        self.store(fresh);
        ok
    }
}

/// The host data of the name-lookup gate.
pub struct Lookup<'a> {
    /// wasmtime-wasi's sockets, which do the lookup.
    pub sockets: WasiSocketsCtxView<'a>,
    /// The plugin's allow-list.
    pub allowed: Arc<Allowed>,
}

/// Marker for the linker: the host data is a [`Lookup`].
pub struct GatedLookup;

impl HasData for GatedLookup {
    type Data<'a> = Lookup<'a>;
}

type ResolveAddressStream =
    wasmtime_wasi::p2::bindings::sockets::ip_name_lookup::ResolveAddressStream;

impl Host for Lookup<'_> {
    fn resolve_addresses(
        &mut self,
        network: Resource<Network>,
        name: String,
    ) -> Result<Resource<ResolveAddressStream>, SocketError> {
        if !self.allowed.may_resolve(&name) {
            tracing::warn!(plugin = %self.allowed.plugin, name = %name,
                "plugin name lookup refused: not in its sidecar's network list");
            return Err(ErrorCode::AccessDenied.into());
        }
        Host::resolve_addresses(&mut self.sockets, network, name)
    }
}

// The lookup interface uses `network`'s error conversions: wasmtime-wasi's own.
impl wasmtime_wasi::p2::bindings::sockets::network::Host for Lookup<'_> {
    fn convert_error_code(&mut self, error: SocketError) -> wasmtime::Result<ErrorCode> {
        wasmtime_wasi::p2::bindings::sockets::network::Host::convert_error_code(
            &mut self.sockets,
            error,
        )
    }

    fn network_error_code(
        &mut self,
        err: Resource<wasmtime::Error>,
    ) -> wasmtime::Result<Option<ErrorCode>> {
        wasmtime_wasi::p2::bindings::sockets::network::Host::network_error_code(
            &mut self.sockets,
            err,
        )
    }
}

impl wasmtime_wasi::p2::bindings::sockets::network::HostNetwork for Lookup<'_> {
    fn drop(&mut self, this: Resource<Network>) -> wasmtime::Result<()> {
        wasmtime_wasi::p2::bindings::sockets::network::HostNetwork::drop(&mut self.sockets, this)
    }
}

impl HostResolveAddressStream for Lookup<'_> {
    fn resolve_next_address(
        &mut self,
        stream: Resource<ResolveAddressStream>,
    ) -> Result<Option<IpAddress>, SocketError> {
        HostResolveAddressStream::resolve_next_address(&mut self.sockets, stream)
    }

    fn subscribe(
        &mut self,
        stream: Resource<ResolveAddressStream>,
    ) -> wasmtime::Result<Resource<wasmtime_wasi::p2::DynPollable>> {
        HostResolveAddressStream::subscribe(&mut self.sockets, stream)
    }

    fn drop(&mut self, stream: Resource<ResolveAddressStream>) -> wasmtime::Result<()> {
        HostResolveAddressStream::drop(&mut self.sockets, stream)
    }
}

/// Registers the gated `wasi:sockets/ip-name-lookup` over wasmtime-wasi's.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut wasmtime::component::Linker<T>,
    lookup: fn(&mut T) -> Lookup<'_>,
) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    wasmtime_wasi::p2::bindings::sockets::ip_name_lookup::add_to_linker::<T, GatedLookup>(
        linker, lookup,
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fixed_addresses_names_and_lookups() {
        let a = Allowed::new(
            Arc::from("p"),
            &["127.0.0.1:5432".to_owned(), "LocalHost:9092".to_owned()],
        );
        assert!(a.may_connect("127.0.0.1:5432".parse().unwrap()).await);
        assert!(!a.may_connect("127.0.0.1:5433".parse().unwrap()).await);
        // localhost resolves to 127.0.0.1 (and perhaps ::1).
        assert!(a.may_connect("127.0.0.1:9092".parse().unwrap()).await);
        assert!(!a.may_connect("10.0.0.1:9092".parse().unwrap()).await);
        assert!(a.may_resolve("localhost") && a.may_resolve("10.1.2.3"));
        assert!(!a.may_resolve("example.com"));
        let none = Allowed::new(Arc::from("p"), &[]);
        assert!(none.is_empty() && !none.has_names());
    }
}
