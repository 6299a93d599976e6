//! The `[http]` listener: `/metrics` (Prometheus text format), `/healthz` and `/readyz`,
//! and the admin API under `/api/v1` (`api.rs`). HTTP/1.1 through hyper; one task per
//! connection, each request answered from the broker's shared state without touching the
//! hot path.

mod api;
mod exposition;
mod messages;
mod tokens;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;

/// A request must arrive whole within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once; more are closed at accept (a scraper or a probe needs one).
const MAX_CONNECTIONS: usize = 64;

/// Binds the HTTP listener (when configured) and serves it until shutdown. Returns the
/// bound address.
pub async fn start(broker: Arc<Broker>) -> std::io::Result<Option<SocketAddr>> {
    let Some(addr) = broker.config.http.addr() else {
        return Ok(None);
    };
    let socket = match TcpListener::bind(addr).await {
        Ok(s) => s,
        Err(e) if !broker.config.http.explicit() => {
            tracing::warn!(http = %addr, error = %e,
                "metrics and health endpoints off: the default address cannot be bound (set [http] bind)");
            return Ok(None);
        }
        Err(e) => {
            return Err(std::io::Error::new(
                e.kind(),
                format!("[http] bind {addr}: {e}"),
            ));
        }
    };
    let tls = match (&broker.config.http.cert, &broker.config.http.key) {
        (Some(cert), Some(key)) => {
            let files = crate::transport::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: broker.config.http.client_ca.clone(),
                require_client_cert: true,
            };
            let tls = crate::transport::tls::ReloadableTls::load(files)
                .map_err(|e| std::io::Error::other(format!("[http] TLS configuration: {e}")))?;
            let tls = Arc::new(tls);
            tls.clone().spawn_watcher(
                "http".to_owned(),
                broker.shutdown.clone(),
                broker.reload.subscribe(),
            );
            Some(tls)
        }
        _ => None,
    };
    let bound = socket.local_addr()?;
    // Not worded like the MQTT listeners' line: tools take the first line with that
    // word and an address for the MQTT address.
    tracing::info!(http = %bound, tls = tls.is_some(), "metrics and health endpoints up");
    let shutdown = broker.shutdown.clone();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let tokens = Arc::new(tokens::Tokens::new(&broker));
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = socket.accept() => match r {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "http accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "http connection closed: {MAX_CONNECTIONS} already open");
                continue;
            };
            let broker = broker.clone();
            let shutdown = shutdown.clone();
            let tls = tls.clone();
            let tokens = tokens.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let Some(tls) = tls else {
                    return serve(broker, tokens, shutdown, peer, stream).await;
                };
                let handshake = tls.acceptor().accept(stream);
                match tokio::time::timeout(HEADER_TIMEOUT, handshake).await {
                    Ok(Ok(stream)) => serve(broker, tokens, shutdown, peer, stream).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "http TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "http TLS handshake timed out"),
                }
            });
        }
    });
    Ok(Some(bound))
}

/// Serves one HTTP/1.1 connection until it ends or the broker stops.
async fn serve<S>(
    broker: Arc<Broker>,
    tokens: Arc<tokens::Tokens>,
    shutdown: CancellationToken,
    peer: SocketAddr,
    stream: S,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| answer(broker.clone(), tokens.clone(), req));
    let mut builder = http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "http connection ended");
            }
        }
        _ = shutdown.cancelled() => {}
    }
}

type Answer = Response<Full<Bytes>>;

/// The web dashboard (served at `/`, embedded: it works offline), a client of the admin API.
const DASHBOARD_HTML: &str = include_str!("dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("dashboard/app.js");
const DASHBOARD_CSS: &str = include_str!("dashboard/style.css");

/// One of the dashboard's files, with headers that keep the page to its own origin.
fn asset(content_type: &'static str, body: &'static str) -> Answer {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    r
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Answer {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

async fn answer(
    broker: Arc<Broker>,
    tokens: Arc<tokens::Tokens>,
    req: Request<Incoming>,
) -> Result<Answer, Infallible> {
    let path = req.uri().path();
    if path == "/api/v1" || path.starts_with("/api/v1/") {
        return Ok(api::answer(&broker, &tokens, req).await);
    }
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    let open = matches!(path, "/healthz" | "/readyz" | "/metrics");
    if open && broker.current().http.metrics_auth && tokens.check(&broker, req.headers()).is_none()
    {
        let mut r = reply(
            StatusCode::UNAUTHORIZED,
            "text/plain; charset=utf-8",
            "a valid bearer token is needed\n".into(),
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return Ok(r);
    }
    Ok(match (get, req.uri().path()) {
        (true, "/" | "/index.html") => asset("text/html; charset=utf-8", DASHBOARD_HTML),
        (true, "/app.js") => asset("text/javascript; charset=utf-8", DASHBOARD_JS),
        (true, "/style.css") => asset("text/css; charset=utf-8", DASHBOARD_CSS),
        (true, "/healthz") => reply(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into()),
        (true, "/readyz") => readiness(&broker),
        (true, "/metrics") => {
            let body = exposition::render(&broker);
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                body,
            )
        }
        (false, "/healthz" | "/readyz" | "/metrics") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET\n".into(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found\n".into(),
        ),
    })
}

/// 200 when the store writes, every listener is bound and every required plugin is
/// loaded; else 503 naming what is missing.
fn readiness(broker: &Broker) -> Answer {
    #[derive(serde::Serialize)]
    struct Readiness<'a> {
        ready: bool,
        missing: &'a [String],
    }
    let missing = broker.ready();
    let ready = missing.is_empty();
    let mut body = serde_json::to_string(&Readiness {
        ready,
        missing: &missing,
    })
    .unwrap_or_default();
    body.push('\n');
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    reply(status, "application/json", body)
}
