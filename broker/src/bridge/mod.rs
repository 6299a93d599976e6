//! Bridges: connections to other MQTT brokers (`[[bridge]]`) that forward topics both
//! ways.
//!
//! **Out** (local → remote): the pipeline offers every routed message to the bridges
//! ([`crate::pipeline::Outlet`]). A bridge whose outbound topics select it queues a QoS 1/2
//! message in its durable queue (a [`Fifo`] named `bridge/NAME`, bounded by `max_queue`,
//! oldest dropped and counted), and the publisher's acknowledgement waits for that queue,
//! never for the remote. The bridge's connection ([`link`]) sends the queue in order as
//! the remote's window allows and consumes it as the remote acknowledges. QoS 0 messages
//! are kept in memory only while the bridge is connected.
//!
//! **In** (remote → local): the bridge subscribes at the remote to its inbound topics and
//! publishes what arrives through the pipeline ([`Origin::Bridge`]): transforms, routing,
//! sinks, like any message. A QoS 1/2 message is acknowledged to the remote once routed
//! durably; inbound QoS 2 identifiers are kept in the store with the routing, so a resend
//! after a crash is not routed twice.
//!
//! **No loops**: a bridge never takes back what it brought in (the pipeline tells it the
//! origin); at the remote, its subscriptions carry No Local (MQTT 5), or its CONNECT the
//! bridge bit of the protocol level Mosquitto uses (3.1.1, `try_private`).

pub mod link;
pub mod outbox;
pub mod topics;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::codec::QoS;
use crate::config::BridgeConfig;
use crate::message::Message;
use crate::pipeline::{Origin, Outlet, Pipeline};
use crate::store::{Fifo, Store, StoreError};
use topics::TopicMap;

/// Most QoS 0 messages held in memory for a connected bridge before newer ones are
/// dropped.
const MAX_QOS0: usize = 10_000;

/// A bridge's queue records: a message to send, or a QoS 2 message the remote has
/// received (PUBREC) whose PUBREL is what goes out again.
const ROW_MESSAGE: u8 = 0;
const ROW_RELEASED: u8 = 1;

/// What a bridge counts (`/metrics`, `$SYS`).
#[derive(Debug, Default)]
pub struct BridgeStats {
    /// Whether it is connected to its remote now.
    pub connected: AtomicBool,
    /// Messages sent to the remote (acknowledged by it, at QoS 1 and 2).
    pub sent: AtomicU64,
    /// Messages received from the remote.
    pub received: AtomicU64,
    /// Outbound messages dropped: the queue was full, QoS 0 while disconnected, expired,
    /// or larger than the remote accepts.
    pub dropped: AtomicU64,
    /// Connections lost or refused (each one is followed by a new attempt).
    pub reconnects: AtomicU64,
}

/// One bridge: its configuration, topic map, durable outbound queue and counters.
#[derive(Debug)]
pub struct Bridge {
    /// Its settings.
    pub config: BridgeConfig,
    map: TopicMap,
    fifo: Fifo,
    /// Its counters.
    pub stats: BridgeStats,
    /// QoS 0 messages waiting to go out while connected.
    qos0: Mutex<VecDeque<Arc<Message>>>,
    /// Woken when something is queued.
    wake: tokio::sync::Notify,
    /// The highest queue record sent so far in this process or before it (what is sent
    /// again carries DUP).
    sent_high: AtomicU64,
}

impl Bridge {
    /// The bridge's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// QoS 1/2 messages waiting in its queue (sent and not yet acknowledged included).
    pub fn queued(&self) -> u64 {
        self.fifo.len()
    }

    fn lock_qos0(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Message>>> {
        self.qos0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dropped(&self, what: &str) {
        let n = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(bridge = %self.config.name, dropped = n, "bridge dropped a message: {what}");
        }
    }

    /// Takes `msg` if its outbound topics select it; the store ticket of its queue record.
    fn offer(&self, msg: &Arc<Message>) -> Option<u64> {
        let ceiling = self.map.out_qos(msg.topic.as_str())?;
        if msg.qos.min(ceiling) == QoS::AtMostOnce {
            if self.stats.connected.load(Ordering::Relaxed) {
                let mut q = self.lock_qos0();
                if q.len() < MAX_QOS0 {
                    q.push_back(msg.clone());
                    drop(q);
                    self.wake.notify_one();
                    return None;
                }
            }
            self.dropped("QoS 0 while the remote is unreachable or slow");
            return None;
        }
        let mut row = vec![ROW_MESSAGE];
        row.extend_from_slice(&Store::sink_record("", msg)?);
        let a = self.fifo.push(row, self.config.max_queue);
        if a.dropped_oldest {
            self.dropped("queue full (max_queue), oldest dropped");
        }
        self.wake.notify_one();
        a.ticket
    }
}

/// Every bridge of a broker.
#[derive(Debug, Default)]
pub struct Bridges {
    list: Vec<Arc<Bridge>>,
}

impl Bridges {
    /// The bridges of `configs`, their queues opened from `store` (what waited before a
    /// restart is still there).
    pub fn new(configs: &[BridgeConfig], store: Option<Arc<Store>>) -> Result<Bridges, StoreError> {
        let mut list = Vec::with_capacity(configs.len());
        for c in configs {
            let fifo = Fifo::open(store.clone(), format!("bridge/{}", c.name).into())?;
            if !fifo.is_empty() {
                tracing::info!(bridge = %c.name, waiting = fifo.len(), "bridge queue recovered");
            }
            list.push(Arc::new(Bridge {
                map: TopicMap::new(&c.topics),
                sent_high: AtomicU64::new(fifo.last()),
                fifo,
                config: c.clone(),
                stats: BridgeStats::default(),
                qos0: Mutex::new(VecDeque::new()),
                wake: tokio::sync::Notify::new(),
            }));
        }
        Ok(Bridges { list })
    }

    /// The bridges, in configuration order.
    pub fn list(&self) -> &[Arc<Bridge>] {
        &self.list
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Starts every bridge's connection; each stops when `shutdown` is cancelled.
    pub fn start(
        &self,
        pipeline: &Arc<Pipeline>,
        store: &Arc<Store>,
        max_packet_size: u32,
        shutdown: &tokio_util::sync::CancellationToken,
        tasks: &tokio_util::task::TaskTracker,
    ) {
        for b in &self.list {
            tasks.spawn(link::run(
                b.clone(),
                pipeline.clone(),
                store.clone(),
                max_packet_size,
                shutdown.clone(),
            ));
        }
    }
}

impl Outlet for Bridges {
    fn offer(&self, from: &Origin<'_>, msg: &Arc<Message>) -> Option<u64> {
        let mut ticket = None;
        for b in &self.list {
            // A bridge never sends back what it brought in.
            if matches!(from, Origin::Bridge { name } if *name == b.config.name) {
                continue;
            }
            ticket = ticket.max(b.offer(msg));
        }
        ticket
    }

    fn selects(&self, topic: &str) -> bool {
        self.list.iter().any(|b| b.map.out_qos(topic).is_some())
    }
}
