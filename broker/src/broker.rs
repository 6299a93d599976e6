//! The broker: shared state of one running instance and its start/stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::listener;
use crate::mailbox::QueueLimits;
use crate::router::Router;
use crate::session::Sessions;

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
}

impl Broker {
    /// A broker with empty state.
    pub fn new(config: Config) -> Arc<Broker> {
        let router = Arc::new(Router::new());
        let limits = QueueLimits {
            max_messages: config.mqtt.max_queued_messages,
            max_bytes: config.mqtt.max_queued_bytes,
        };
        Arc::new(Broker {
            sessions: Arc::new(Sessions::new(router.clone(), limits)),
            router,
            config,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }

    /// Binds every listener and serves until `shutdown` is cancelled, then closes every
    /// connection (MQTT 5 clients get DISCONNECT 0x8B) and waits for them, at most `grace`.
    pub async fn run(self: Arc<Self>, grace: Duration) -> std::io::Result<Vec<SocketAddr>> {
        let mut bound = Vec::new();
        let mut accept_loops = Vec::new();
        for l in &self.config.listeners {
            let (addr, task) = listener::start(self.clone(), l.clone()).await?;
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
        tracing::info!("broker stopped");
        Ok(bound)
    }
}
