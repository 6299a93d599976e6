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
//! **Back-pressure**: while a bridge is connected and its queue holds `pressure_at`
//! messages or more (half of `max_queue`, at most 10,000), the publishers whose messages it
//! takes are asked to wait for room ([`Room`]), as for a subscriber whose queue is half
//! full: their connections stop reading until the queue is back to half that (their
//! acknowledgements still never wait for the remote), at most
//! `[mqtt] backpressure_timeout_ms`; a bridge that makes no room in that
//! time is marked stalled and holds nobody back until it has caught up. A disconnected
//! bridge holds nobody back: its queue fills and drops its oldest.
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
use crate::mailbox::Room;
use crate::message::Message;
use crate::pipeline::{Offered, Origin, Outlet, Pipeline, Placed};
use crate::store::{Fifo, Store, StoreError};
use topics::TopicMap;

/// Most QoS 0 messages held in memory for a connected bridge before newer ones are
/// dropped.
const MAX_QOS0: usize = 10_000;

/// A bridge's queue record for a QoS 2 message the remote has received (PUBREC): its
/// PUBREL is what goes out again. Any other record is the message's sink record (never
/// empty).
const RELEASED: Vec<u8> = Vec::new();

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
    /// Whether publishers are held back at all (`[mqtt] backpressure_timeout_ms` > 0).
    backpressure: bool,
    /// Queue length from which publishers are asked to wait while connected.
    pressure_at: u64,
    /// Publishers waiting for room are woken through this.
    room: tokio::sync::Notify,
    /// Someone waits on `room`.
    waiting: AtomicBool,
    /// It made no room within a publisher's back-pressure timeout: it holds nobody back
    /// until its queue is under half of `pressure_at`.
    stalled: AtomicBool,
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

    /// Whether publishers should wait for this bridge, its queue holding `waiting`.
    fn congested(&self, waiting: u64) -> bool {
        self.over(waiting, self.pressure_at)
    }

    /// Whether a waiting publisher must go on waiting: the queue has not yet come down to
    /// half of `pressure_at` (publishers then go on in runs of thousands, not one message
    /// per wake-up).
    fn still_congested(&self) -> bool {
        self.over(self.fifo.len(), self.pressure_at / 2)
    }

    fn over(&self, waiting: u64, mark: u64) -> bool {
        self.backpressure
            && self.stats.connected.load(Ordering::Relaxed)
            && !self.stalled.load(Ordering::Acquire)
            && waiting >= mark.max(1)
    }

    /// Called as the queue shrinks, and when the connection comes or goes: wakes waiting
    /// publishers once there is room, and ends a stall once half the way back.
    fn made_room(&self) {
        if self.stalled.load(Ordering::Relaxed) && self.fifo.len() < self.pressure_at / 2 {
            self.stalled.store(false, Ordering::Release);
        }
        if self.waiting.load(Ordering::Acquire) && !self.still_congested() {
            self.waiting.store(false, Ordering::Release);
            self.room.notify_waiters();
        }
    }

    fn dropped(&self, what: &str) {
        let n = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(bridge = %self.config.name, dropped = n, "bridge dropped a message: {what}");
        }
    }

    /// Takes `msg` if its outbound topics select it: the store ticket of its queue record,
    /// and whether the publisher should wait for room.
    fn offer(&self, msg: &Arc<Message>) -> (Option<u64>, bool) {
        let Some(ceiling) = self.map.out_qos(msg.topic.as_str()) else {
            return (None, false);
        };
        if msg.qos.min(ceiling) == QoS::AtMostOnce {
            if self.stats.connected.load(Ordering::Relaxed) {
                let mut q = self.lock_qos0();
                if q.len() < MAX_QOS0 {
                    q.push_back(msg.clone());
                    drop(q);
                    self.wake.notify_one();
                    return (None, false);
                }
            }
            self.dropped("QoS 0 while the remote is unreachable or slow");
            return (None, false);
        }
        let Some(record) = Store::sink_record("", msg) else {
            return (None, false);
        };
        let a = self.fifo.push(record, self.config.max_queue);
        if a.dropped_oldest {
            self.dropped("queue full (max_queue), oldest dropped");
        }
        self.wake.notify_one();
        (a.ticket, self.congested(a.waiting))
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
    pub fn new(
        configs: &[BridgeConfig],
        store: Option<Arc<Store>>,
        backpressure: bool,
    ) -> Result<Bridges, StoreError> {
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
                backpressure,
                pressure_at: (c.max_queue / 2).clamp(1, 10_000),
                room: tokio::sync::Notify::new(),
                waiting: AtomicBool::new(false),
                stalled: AtomicBool::new(false),
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
    fn offer(&self, from: &Origin<'_>, msg: &Arc<Message>, _placed: &Placed) -> Offered {
        let mut offered = Offered::default();
        for b in &self.list {
            // A bridge never sends back what it brought in.
            if matches!(from, Origin::Bridge { name } if *name == b.config.name) {
                continue;
            }
            offered.taken |= b.map.out_qos(msg.topic.as_str()).is_some();
            let (ticket, congested) = b.offer(msg);
            offered.ticket = offered.ticket.max(ticket);
            if congested && offered.congested.is_none() {
                let room: Arc<dyn Room> = b.clone();
                offered.congested = Some(room);
            }
        }
        offered
    }
}

impl Room for Bridge {
    fn wait_for_room(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            loop {
                let notified = self.room.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                self.waiting.store(true, Ordering::Release);
                if !self.still_congested() {
                    return;
                }
                notified.await;
            }
        })
    }

    fn mark_stalled(&self) {
        if !self.stalled.swap(true, Ordering::AcqRel) {
            tracing::warn!(bridge = %self.config.name, queued = self.fifo.len(),
                "bridge is not keeping up: publishers are no longer held back for it (its queue drops its oldest when full)");
        }
        if self.waiting.swap(false, Ordering::AcqRel) {
            self.room.notify_waiters();
        }
    }
}
