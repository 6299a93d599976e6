//! Accept loops: one per configured listener, handing each socket to its own connection task.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::broker::Broker;
use crate::config::ListenerConfig;
use crate::connection::{self, ListenerInfo};
use crate::metrics::METRICS;

/// Binds the listener and spawns its accept loop, which stops when the broker shuts down.
pub async fn start(
    broker: Arc<Broker>,
    config: ListenerConfig,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let socket = TcpListener::bind(config.bind).await?;
    let addr = socket.local_addr()?;
    let info = Arc::new(ListenerInfo {
        name: config.name.clone().unwrap_or_default(),
        allow_anonymous: config.anonymous_allowed(),
    });
    tracing::info!(name = %info.name, %addr, anonymous = info.allow_anonymous, "listening");
    let task = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = broker.shutdown.cancelled() => break,
                r = socket.accept() => r,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            METRICS
                .connections
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            let span = tracing::info_span!("conn", %peer, client_id = tracing::field::Empty);
            let (rd, wr) = stream.into_split();
            let b = broker.clone();
            let l = info.clone();
            broker
                .tasks
                .spawn(connection::run(b, l, peer, rd, wr).instrument(span));
        }
        tracing::debug!(name = %info.name, "listener closed");
    });
    Ok((addr, task))
}
