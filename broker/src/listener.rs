//! Accept loops: one per configured listener. Each accepted socket is admitted or refused
//! (connection limits, connection rate per source address), given its transport (TCP, TLS,
//! WebSocket, WebSocket over TLS; see `transport`) and handed to its own connection task.
//!
//! Refusals are answered the way the spec asks once the client's CONNECT says which
//! version it speaks: MQTT 5 gets CONNACK 0x97 (quota exceeded) or 0x9F (connection rate
//! exceeded), 3.x gets return code 3 (server unavailable). Answering costs a task, so at
//! most [`MAX_REFUSING`] refusals per listener are in progress; beyond that a refused
//! socket is closed at once.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::broker::Broker;
use crate::codec::{self, ReasonCode};
use crate::config::{ListenerConfig, ListenerKind};
use crate::connection::{self, ListenerInfo};
use crate::metrics::{self, C};
use crate::transport::tls::{ReloadableTls, TlsFiles};
use crate::transport::{self, ws};

/// Refusals being answered at once, per listener.
pub const MAX_REFUSING: usize = 64;
/// How long a refused client has to send its CONNECT before it is closed unanswered.
const REFUSE_WAIT: Duration = Duration::from_secs(2);
/// Largest CONNECT read from a refused client.
const REFUSE_MAX_PACKET: u32 = 64 * 1024;

/// The certificate files of a `tls` or `wss` listener.
pub fn tls_files(config: &ListenerConfig) -> Option<TlsFiles> {
    match (&config.cert, &config.key) {
        (Some(cert), Some(key)) if config.kind.is_tls() => Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: config.client_ca.clone(),
            require_client_cert: config.require_client_cert.unwrap_or(true),
        }),
        _ => None,
    }
}

/// One running listener's fixed facts and gauges.
struct Listener {
    info: Arc<ListenerInfo>,
    kind: ListenerKind,
    tls: Option<Arc<ReloadableTls>>,
    ws: ws::Endpoint,
    max_connections: usize,
    active: Arc<AtomicUsize>,
    refusing: Arc<AtomicUsize>,
    rate: RateLimiter,
}

/// Binds the listener and spawns its accept loop, which stops when the broker shuts down
/// or the returned [`Running::stop`] is cancelled.
/// `global` counts the open connections of all listeners. A TLS listener whose
/// certificates cannot be loaded fails here, so the broker does not start.
pub async fn start(
    broker: Arc<Broker>,
    config: ListenerConfig,
    global: Arc<AtomicUsize>,
) -> std::io::Result<Running> {
    let name = config.name.clone().unwrap_or_default();
    let tls = match tls_files(&config) {
        Some(files) => {
            let tls = ReloadableTls::load(files).map_err(|e| {
                std::io::Error::other(format!("listener {name}: TLS configuration: {e}"))
            })?;
            Some(Arc::new(tls))
        }
        None => None,
    };
    let socket = TcpListener::bind(config.bind).await?;
    let addr = socket.local_addr()?;
    let stop = broker.shutdown.child_token();
    let listener_name: Arc<str> = name.as_str().into();
    let listener = Arc::new(Listener {
        info: Arc::new(ListenerInfo {
            name: listener_name.clone(),
            anonymous: Arc::new(crate::message::Principal {
                user: None,
                listener: listener_name,
            }),
            allow_anonymous: config.anonymous_allowed(),
            protocols: config.versions(),
            username_from_cert: config.username_from_cert,
            client_cert: None,
            stop: stop.clone(),
        }),
        kind: config.kind,
        tls: tls.clone(),
        ws: ws::Endpoint {
            path: config.ws_path().to_owned(),
            origins: config.origins(),
        },
        max_connections: config.max_connections,
        active: Arc::new(AtomicUsize::new(0)),
        refusing: Arc::new(AtomicUsize::new(0)),
        rate: RateLimiter::new(config.connection_rate()),
    });
    for v in &listener.info.protocols {
        metrics::expect_connections(&listener.info.name, *v);
    }
    tracing::info!(
        name = %name,
        kind = ?config.kind,
        anonymous = listener.info.allow_anonymous,
        mtls = config.client_ca.is_some(),
        %addr,
        "listening"
    );
    let watcher =
        tls.map(|t| t.spawn_watcher(name.clone(), stop.clone(), broker.reload.subscribe()));
    let closing = stop.clone();
    let task = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = closing.cancelled() => break,
                r = socket.accept() => r,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            metrics::inc(C::Accepted);
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            let (permit, in_all, on_listener) = Permit::take(&global, &listener.active);
            let max_global = broker.config.mqtt.max_connections;
            let refusal = if !listener.rate.allow(peer.ip()) {
                Some(ReasonCode::ConnectionRateExceeded)
            } else if in_all > max_global
                || (listener.max_connections > 0 && on_listener > listener.max_connections)
            {
                Some(ReasonCode::QuotaExceeded)
            } else {
                None
            };
            let permit = match refusal {
                None => Some(permit),
                Some(reason) => {
                    drop(permit);
                    metrics::inc(metrics::refusal(reason));
                    tracing::debug!(%peer, ?reason, listener = %listener.info.name, "connection refused");
                    // A TLS handshake costs the server far more than the client: a refused
                    // TLS socket is closed before it, unanswered.
                    if listener.kind.is_tls()
                        || listener.refusing.load(Ordering::Relaxed) >= MAX_REFUSING
                    {
                        continue; // dropping the socket closes it
                    }
                    None
                }
            };
            let span = tracing::info_span!("conn", %peer, client_id = tracing::field::Empty);
            if refusal.is_none() && listener.kind == ListenerKind::Tcp {
                // A plain TCP client is served by `connection::run_tcp` as it is, which
                // parks it without a task while it is idle (memory per idle connection is
                // what bounds how many a broker holds).
                let info = listener.info.clone();
                let Some(permit) = permit else { continue };
                let run = connection::run_tcp(broker.clone(), info, peer, stream, permit);
                broker.tasks.spawn(run.instrument(span));
                continue;
            }
            let b = broker.clone();
            let l = listener.clone();
            broker.tasks.spawn(
                async move {
                    let _permit = permit;
                    let _refusing = refusal.map(|_| Gauge::enter(&l.refusing));
                    serve_socket(b, l, stream, peer, refusal).await;
                }
                .instrument(span),
            );
        }
        if let Some(w) = watcher {
            w.abort();
        }
        tracing::debug!(name = %listener.info.name, "listener closed");
    });
    Ok(Running { addr, task, stop })
}

/// A listener serving: where it is bound, its accept loop, and what closes it with its
/// connections.
#[derive(Debug)]
pub struct Running {
    /// The bound address.
    pub addr: SocketAddr,
    /// The accept loop (ends once `stop` is cancelled).
    pub task: JoinHandle<()>,
    /// Cancelled to close the listener and its connections.
    pub stop: tokio_util::sync::CancellationToken,
}

/// Sets up the transport, then serves the client (or answers its refusal).
async fn serve_socket(
    broker: Arc<Broker>,
    l: Arc<Listener>,
    tcp: TcpStream,
    peer: SocketAddr,
    refusal: Option<ReasonCode>,
) {
    // What the configuration in force says now (not kept: every idle connection's future
    // would carry it).
    let (deadline, max_message) = {
        let config = broker.current();
        (
            Duration::from_secs(config.mqtt.connect_timeout),
            usize::try_from(config.mqtt.max_packet_size)
                .unwrap_or(usize::MAX)
                .saturating_add(4096),
        )
    };
    let mut info = l.info.clone();
    let (rd, wr) = match (l.kind, &l.tls) {
        (ListenerKind::Tcp, _) => {
            let (rd, wr) = tcp.into_split();
            return serve(broker, info, peer, rd, wr, refusal).await;
        }
        // The handshakes are boxed: an async fn's state is as large as its largest await,
        // and every plain TCP connection would otherwise carry room for a TLS handshake for
        // its whole life (memory per idle connection is what bounds how many a broker holds).
        (ListenerKind::Ws, _) => {
            let accept = Box::pin(ws::accept(tcp, &l.ws, max_message));
            match tokio::time::timeout(deadline, accept).await {
                Ok(Ok(ws)) => transport::split(ws),
                Ok(Err(e)) => return tracing::debug!(error = %e, "WebSocket handshake failed"),
                Err(_) => return tracing::debug!("WebSocket handshake timed out"),
            }
        }
        (ListenerKind::Tls | ListenerKind::Wss, Some(tls)) => {
            let handshake = async {
                let stream = tls.acceptor().accept(tcp).await?;
                let cert = crate::transport::tls::client_cert(stream.get_ref().1);
                if l.kind == ListenerKind::Tls {
                    return Ok((transport::split(stream), cert));
                }
                let ws = ws::accept(stream, &l.ws, max_message)
                    .await
                    .map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>((transport::split(ws), cert))
            };
            match tokio::time::timeout(deadline, Box::pin(handshake)).await {
                Ok(Ok((halves, cert))) => {
                    if let Some(cert) = cert {
                        tracing::debug!(subject = %cert.subject, "client certificate");
                        info = Arc::new(ListenerInfo {
                            client_cert: Some(cert),
                            ..(*info).clone()
                        });
                    }
                    halves
                }
                Ok(Err(e)) => {
                    metrics::inc(C::TlsFailures);
                    return tracing::info!(error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    metrics::inc(C::TlsFailures);
                    return tracing::info!("TLS handshake timed out");
                }
            }
        }
        (ListenerKind::Tls | ListenerKind::Wss, None) => return,
    };
    Box::pin(serve(broker, info, peer, rd, wr, refusal)).await;
}

async fn serve<R, W>(
    broker: Arc<Broker>,
    info: Arc<ListenerInfo>,
    peer: SocketAddr,
    rd: R,
    wr: W,
    refusal: Option<ReasonCode>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match refusal {
        None => connection::run(broker, info, peer, rd, wr).await,
        // Boxed: a refusal's state would otherwise be part of every connection's task.
        Some(reason) => Box::pin(refuse(rd, wr, reason, &info.stop)).await,
    }
}

/// Reads the client's CONNECT (briefly) to learn its version, answers with a refusing
/// CONNACK and closes.
async fn refuse<R, W>(
    mut rd: R,
    mut wr: W,
    reason: ReasonCode,
    stop: &tokio_util::sync::CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(512);
    let read = async {
        loop {
            match codec::decode_connect(&mut buf, REFUSE_MAX_PACKET) {
                Ok(Some(c)) => return Some(c.protocol),
                Ok(None) => {}
                Err(_) => return None,
            }
            match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    };
    let Ok(Some(version)) = tokio::time::timeout(REFUSE_WAIT, read).await else {
        return;
    };
    connection::send_connack_and_close(&mut wr, version, reason, REFUSE_WAIT).await;
    connection::linger(&mut rd, stop).await;
}

/// One connection counted in the global and the listener's gauges while it lives (kept by
/// every connection's task: two pointers, no more).
pub(crate) struct Permit {
    global_gauge: Arc<AtomicUsize>,
    local_gauge: Arc<AtomicUsize>,
}

impl Permit {
    /// Counts a connection in; also answers the counts including it (global, listener).
    fn take(global: &Arc<AtomicUsize>, local: &Arc<AtomicUsize>) -> (Permit, usize, usize) {
        let counts = (
            global.fetch_add(1, Ordering::Relaxed) + 1,
            local.fetch_add(1, Ordering::Relaxed) + 1,
        );
        let permit = Permit {
            global_gauge: global.clone(),
            local_gauge: local.clone(),
        };
        (permit, counts.0, counts.1)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.global_gauge.fetch_sub(1, Ordering::Relaxed);
        self.local_gauge.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A counter held up while a value lives.
struct Gauge(Arc<AtomicUsize>);

impl Gauge {
    fn enter(g: &Arc<AtomicUsize>) -> Gauge {
        g.fetch_add(1, Ordering::Relaxed);
        Gauge(g.clone())
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// New connections per source, over a sliding window of one second: the count of the
/// current second plus the previous second's count weighted by how much of it the window
/// still covers. A source is an IPv4 address or an IPv6 /64 (one host usually owns a whole
/// /64, so counting addresses would let it pick a new one per connection).
///
/// Each accept costs O(1): a hash lookup, and (amortized) the expiry of sources idle for
/// two seconds from the front of a queue in the order they were seen. Memory is bounded
/// by the sources seen in the last two seconds and at most [`RateLimiter::MAX_SOURCES`];
/// beyond, the longest-idle sources are forgotten first.
struct RateLimiter {
    per_second: u32,
    start: Instant,
    windows: Mutex<Windows>,
}

#[derive(Default)]
struct Windows {
    by_source: HashMap<u128, Window>,
    /// (second, source) in the order windows started; a source's entry is stale when its
    /// window has moved on since.
    order: VecDeque<(u64, u128)>,
}

#[derive(Clone, Copy)]
struct Window {
    /// The second `current` counts.
    second: u64,
    current: u32,
    previous: u32,
}

impl RateLimiter {
    const MAX_SOURCES: usize = 65_536;

    fn new(per_second: u32) -> RateLimiter {
        RateLimiter {
            per_second,
            start: Instant::now(),
            windows: Mutex::new(Windows::default()),
        }
    }

    /// The source a peer address counts as: IPv4 (also when mapped into IPv6), or the /64
    /// of an IPv6 address.
    fn source(ip: IpAddr) -> u128 {
        match ip {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => u128::from(u32::from(v4)),
                None => (u128::from(a) >> 64) | (1 << 64),
            },
        }
    }

    /// Counts a connection from `ip`; false if it is over the rate.
    fn allow(&self, ip: IpAddr) -> bool {
        if self.per_second == 0 {
            return true;
        }
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.allow_at(Self::source(ip), ms)
    }

    fn allow_at(&self, source: u128, ms: u64) -> bool {
        let (second, into) = (ms / 1000, ms % 1000);
        let Ok(mut w) = self.windows.lock() else {
            return true;
        };
        let w = &mut *w;
        // Forget sources whose window ended two seconds ago or more (they count 0 now).
        while let Some(&(s, src)) = w.order.front() {
            let full = w.by_source.len() >= Self::MAX_SOURCES;
            if s + 2 > second && !full {
                break;
            }
            w.order.pop_front();
            if w.by_source.get(&src).is_some_and(|x| x.second == s) {
                w.by_source.remove(&src);
            }
        }
        let entry = w.by_source.entry(source).or_insert(Window {
            second,
            current: 0,
            previous: 0,
        });
        if entry.second != second {
            let previous = if entry.second + 1 == second {
                entry.current
            } else {
                0
            };
            *entry = Window {
                second,
                current: 0,
                previous,
            };
        }
        if entry.current == 0 {
            w.order.push_back((second, source));
        }
        // previous × (1 − into/1000) + current < per_second, in thousandths.
        let estimate = u64::from(entry.previous) * (1000 - into) + u64::from(entry.current) * 1000;
        if estimate >= u64::from(self.per_second) * 1000 {
            return false;
        }
        entry.current = entry.current.saturating_add(1);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_slides_over_one_second() {
        let r = RateLimiter::new(10);
        let a = RateLimiter::source(IpAddr::from([10, 0, 0, 1]));
        let b = RateLimiter::source(IpAddr::from([10, 0, 0, 2]));
        for _ in 0..10 {
            assert!(r.allow_at(a, 900));
        }
        assert!(!r.allow_at(a, 950), "11th within the second");
        assert!(r.allow_at(b, 950), "another source has its own window");
        // 100 ms into the next second the window still covers 90% of the last one:
        // 10 × 0.9 = 9 counted, so one more fits, then none.
        assert!(r.allow_at(a, 1100));
        assert!(!r.allow_at(a, 1100));
        // Half way, half of the last second counts: 5, and the 1 of this second.
        assert!(r.allow_at(a, 1500));
        assert!(r.allow_at(a, 1500));
        assert!(r.allow_at(a, 1500));
        assert!(r.allow_at(a, 1500));
        assert!(!r.allow_at(a, 1500));
        // Two seconds on, nothing of it counts.
        for _ in 0..10 {
            assert!(r.allow_at(a, 3000));
        }
        assert!(RateLimiter::new(0).allow(IpAddr::from([10, 0, 0, 1])));
    }

    #[test]
    fn an_ipv6_slash_64_is_one_source() {
        let host = |last: u16| IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, last]);
        assert_eq!(RateLimiter::source(host(1)), RateLimiter::source(host(2)));
        assert_ne!(
            RateLimiter::source(host(1)),
            RateLimiter::source(IpAddr::from([0x2001, 0xdb8, 0, 2, 0, 0, 0, 1]))
        );
        // IPv4 mapped into IPv6 is the IPv4 address.
        let mapped = IpAddr::from([0, 0, 0, 0, 0, 0xffff, 0x0a00, 0x0001]);
        assert_eq!(
            RateLimiter::source(mapped),
            RateLimiter::source(IpAddr::from([10, 0, 0, 1]))
        );
        let r = RateLimiter::new(2);
        assert!(r.allow(host(1)));
        assert!(r.allow(host(2)));
        assert!(!r.allow(host(3)), "a third address of the same /64");
    }

    /// A flood from ever new sources keeps the table bounded, and old sources go.
    #[test]
    fn rate_limiter_memory_is_bounded() {
        let r = RateLimiter::new(5);
        for i in 0..200_000u128 {
            r.allow_at(i, 500);
        }
        let w = r.windows.lock().unwrap_or_else(|e| e.into_inner());
        assert!(w.by_source.len() <= RateLimiter::MAX_SOURCES);
        assert!(w.order.len() <= RateLimiter::MAX_SOURCES + 1);
        drop(w);
        r.allow_at(1, 10_000);
        let w = r.windows.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(w.by_source.len(), 1, "idle sources expire");
    }
}
