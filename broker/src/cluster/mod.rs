//! Several brokers acting as one: the nodes of a cluster route messages to each other
//! through NATS (`[cluster]`, the `async-nats` client). What is built: routing (QoS 1/2
//! through JetStream), one connection per client id, the retained messages, the wills of a
//! node that dies, shared subscriptions across nodes. A message
//! accepted on one node reaches the matching subscribers of every node; each node learns
//! which topics every other node's clients subscribe to and sends a message only to the
//! nodes that want it, once each, on that node's own subject.
//!
//! - **Interest.** A node counts its local subscriptions per filter (a shared one by its
//!   whole `$share/GROUP/FILTER`) and tells the others of each filter's first subscription and
//!   its last unsubscription, as numbered changes on `sandpiper.interest`. A node that
//!   starts, or sees a gap in another's numbers (in a change or in a heartbeat), asks that
//!   node for all of its filters (`sandpiper.snapshot.NODE`, answered in pieces to the
//!   asker's inbox) and applies the changes numbered after them.
//! - **Heartbeats.** Each node says it is alive on `sandpiper.beat` every second with the
//!   number of its last change; a node not heard for `node_timeout_ms` is taken as gone
//!   and nothing more is routed to it. A node that restarts comes back with a new run id,
//!   and the others ask it again.
//! - **Messages**: QoS 0 ones go to `sandpiper.msg.NODE`, packed (`wire`: flags, expiry as
//!   a wall-clock deadline, topic and payload; with MQTT 5 properties, the store's record
//!   of a retained message), through a bounded queue: when it is full, or NATS is away,
//!   they are dropped and counted. QoS 1 and 2 ones go through JetStream (`queue`): the
//!   publisher is acknowledged once JetStream holds the message for every node that wants
//!   it, and a node acknowledges a pack to JetStream once what it wrote is durable. The
//!   receiving node routes them to its own sessions only: transforms, sinks and bridges
//!   ran on the node that accepted the message.
//! - **Client ids**: a connection attached here is announced on `sandpiper.claim`; a node
//!   where the same client id is connected since earlier closes that connection (0x8E).
//! - **Retained messages** live in a JetStream key-value bucket every node watches into
//!   its own retained store (`retained`).
//! - **Wills** of connected clients wait in another bucket; when their node dies, one other
//!   node publishes them (`wills`).
//!
//! - **Shared subscriptions**: for each group matching a message's topic, the accepting
//!   node picks one of the nodes with members, in turn (`Outlet::place`); the message goes
//!   to that node naming the groups it serves, and each node's router serves only those.
//!
//! - **Sessions** move to the node their client connects to (`sessions`).
//!
//! What issue 19 asks beyond this (sessions of a dead node resuming elsewhere, retained
//! limits enforced by the bucket itself) is not built; ARCHITECTURE.md says so.

mod order;
mod queue;
mod retained;
mod routes;
mod sessions;
mod wills;
mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::ClusterConfig;
use crate::message::Message;
use crate::pipeline::{Offered, Origin, Outlet, Pipeline, Placed};
use routes::{Routes, Topic};

/// Messages waiting to be handed to NATS; beyond, messages for other nodes are dropped.
const OUTBOUND: usize = 65_536;
/// Most bytes of the messages in that queue (their `Message::size`).
const OUTBOUND_BYTES: usize = 64 * 1024 * 1024;
/// Most messages taken from that queue at once.
const WAITING: usize = 4096;
/// Most bytes of records in one NATS message (NATS's default maximum payload is 1 MiB);
/// a larger record goes alone (and is dropped if NATS refuses it).
const PACK: usize = 256 * 1024;
/// First among the shared subscriptions a message is sent to a node for (`wire` kind 2),
/// this empty name says the message was handed on: by a node whose members of the group
/// were gone or all offline, or from a member that left. The receiving node gives it to
/// an offline member rather than hand it on again.
const HANDED_ON: &str = "";
/// Between two heartbeats.
const BEAT: Duration = Duration::from_secs(1);
/// Most bytes of filters in one piece of a snapshot.
const PIECE: usize = 256 * 1024;
/// Longest wait for a node's snapshot.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most messages of another node's changes kept while its snapshot is awaited.
const MAX_HELD: usize = 4096;
/// Most changes in one message on `sandpiper.interest`.
const CHANGES_PER_MESSAGE: usize = 1024;

const SUBJECT_INTEREST: &str = "sandpiper.interest";
const SUBJECT_BEAT: &str = "sandpiper.beat";
const SUBJECT_CLAIM: &str = "sandpiper.claim";
/// Retained messages waiting to be put in the bucket; beyond, not put (logged).
const RETAIN: usize = 4096;
/// Connections attached here waiting to be told to the other nodes; beyond, dropped.
const CLAIMS: usize = 65_536;

/// A QoS 0 message for another node, and the shared subscriptions it serves it to.
type Outbound = (Arc<str>, Arc<Message>, Vec<Arc<str>>);

/// The shared subscriptions of `placed` that `node` serves.
fn shares_of(placed: &Placed, node: &str) -> Vec<Arc<str>> {
    (placed.0.iter())
        .filter(|(_, n)| **n == *node)
        .map(|(s, _)| s.clone())
        .collect()
}

fn msg_subject(node: &str) -> String {
    format!("sandpiper.msg.{node}")
}

fn snapshot_subject(node: &str) -> String {
    format!("sandpiper.snapshot.{node}")
}

/// Counters of the cluster link.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Messages handed to NATS for other nodes (one per node).
    pub sent: AtomicU64,
    /// Messages received from other nodes.
    pub received: AtomicU64,
    /// Messages for other nodes dropped (queue full, NATS away, too large).
    pub dropped: AtomicU64,
    /// Messages from other nodes that could not be read.
    pub damaged: AtomicU64,
    /// QoS 1/2 messages refused because JetStream could not hold them for other nodes.
    pub refused: AtomicU64,
    /// Connections attached here that the other nodes were not told of (the queue of
    /// claims was full).
    pub claims_dropped: AtomicU64,
}

/// One change of this node's interest.
#[derive(Debug)]
struct Change {
    version: u64,
    add: bool,
    filter: Box<str>,
}

/// This node's filters: local subscriptions per filter (a shared subscription by its whole
/// name), the number of the last change, and the shared subscriptions with members here.
#[derive(Debug, Default)]
struct Local {
    counts: HashMap<Box<str>, u32>,
    version: u64,
    shares: Routes,
}

/// What this node knows of another.
#[derive(Debug)]
struct Peer {
    run: u64,
    /// The number of its last change applied to `routes`.
    version: u64,
    routes: Routes,
    heard: Instant,
    /// A snapshot was asked for; changes wait in `held` until it comes.
    syncing: bool,
    held: Vec<Changes>,
}

impl Peer {
    fn new(run: u64) -> Peer {
        Peer {
            run,
            version: 0,
            routes: Routes::default(),
            heard: Instant::now(),
            syncing: false,
            held: Vec::new(),
        }
    }
}

/// Changes `from..=to` of a node's filters (`sandpiper.interest`).
#[derive(Debug, Serialize, Deserialize)]
struct Changes {
    node: String,
    run: u64,
    from: u64,
    to: u64,
    /// `+filter` or `-filter`, in order.
    ops: Vec<String>,
}

/// A heartbeat (`sandpiper.beat`).
#[derive(Debug, Serialize, Deserialize)]
struct Beat {
    node: String,
    run: u64,
    version: u64,
}

/// A connection attached on a node (`sandpiper.claim`): the other nodes disconnect an
/// older connection with the same client id.
#[derive(Debug, Serialize, Deserialize)]
struct Claim {
    node: String,
    client_id: String,
    /// When it connected, Unix ms.
    since_ms: u64,
}

/// A piece of a node's snapshot: its filters as of change `version`.
#[derive(Debug, Serialize, Deserialize)]
struct Piece {
    run: u64,
    version: u64,
    filters: Vec<String>,
    last: bool,
}

/// The queue of QoS 0 (and retained) messages for other nodes: what waits in it, and
/// room for publishers. A publisher whose message found it half full (in messages or
/// bytes) waits for room, at most `backpressure_timeout_ms`, as for a local subscriber's
/// queue; after such a wait ran out the queue holds nobody back until it is below half
/// again, and what comes beyond its limit is dropped and counted.
#[derive(Debug, Default)]
struct Outgoing {
    bytes: std::sync::atomic::AtomicUsize,
    /// Messages in `outbound` (retained ones, in their own channel, not counted).
    len: std::sync::atomic::AtomicUsize,
    stalled: AtomicBool,
    warned: AtomicBool,
    room: tokio::sync::Notify,
}

impl Outgoing {
    fn full_half(&self) -> bool {
        self.bytes.load(Ordering::Relaxed) > OUTBOUND_BYTES / 2
            || self.len.load(Ordering::Relaxed) > OUTBOUND / 2
    }

    fn congested(&self) -> bool {
        !self.stalled.load(Ordering::Relaxed) && self.full_half()
    }

    /// `bytes` and `messages` have left the queue.
    fn release(&self, bytes: usize, messages: usize) {
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.len.fetch_sub(messages, Ordering::Relaxed);
        if !self.full_half() {
            self.stalled.store(false, Ordering::Relaxed);
            self.room.notify_waiters();
        }
    }
}

impl crate::mailbox::Room for Outgoing {
    fn wait_for_room(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(crate::mailbox::until_room(&self.room, || self.congested()))
    }

    fn mark_stalled(&self) {
        if self.stalled.swap(true, Ordering::Relaxed) {
            return;
        }
        // Warned once; a queue that keeps falling behind says so in its dropped count.
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "cluster: the queue of QoS 0 messages for other nodes is not keeping up: publishers are no longer held back for it (beyond its limit messages are dropped, counted in sandpiper_cluster_dropped_total)"
            );
        }
    }
}

/// This node's part in a cluster.
pub struct Cluster {
    config: ClusterConfig,
    node: Arc<str>,
    /// Tells this process's run of the node from earlier ones.
    run: u64,
    local: Mutex<Local>,
    peers: RwLock<HashMap<Arc<str>, Peer>>,
    changes: mpsc::UnboundedSender<Change>,
    outbound: mpsc::Sender<Outbound>,
    claims: mpsc::Sender<Claim>,
    /// Retained messages accepted here, for the cluster's bucket.
    retain: mpsc::Sender<Arc<Message>>,
    /// Wills of the connections here, for the wills' bucket; requests to look for orphans.
    wills: mpsc::Sender<wills::Op>,
    /// What waits in `outbound` and `retain`, and room for the publishers waiting on it.
    outgoing: Arc<Outgoing>,
    /// The receiving ends, taken by [`Cluster::start`].
    receivers: Mutex<Option<Receivers>>,
    connected: AtomicBool,
    /// When the connection to NATS was last made.
    connected_at: Mutex<Option<Instant>>,
    /// A failed connection attempt was logged since the last connection.
    connect_warned: AtomicBool,
    /// Counts connections to NATS made (the first and each reconnection).
    connects: tokio::sync::watch::Sender<u64>,
    /// The retained messages' bucket is open and watched.
    bucket_open: AtomicBool,
    /// Client ids connected lately, here or on other nodes (for orphaned wills with a will
    /// delay: a client connected again does not get its will published).
    recent: Mutex<wills::Recent>,
    /// Orphaned wills this node waits to publish (their will delay), by client id.
    delayed_wills: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    /// QoS 1/2 messages for other nodes on their way to JetStream.
    queue: Arc<queue::Queue>,
    /// Turns of the nodes that have members of a shared subscription, per subscription.
    share_turns: Mutex<HashMap<Arc<str>, u64>>,
    /// The NATS client, once connected the first time.
    client: std::sync::OnceLock<async_nats::Client>,
    /// This node's sessions, once started.
    sessions: std::sync::OnceLock<Arc<crate::session::Sessions>>,
    /// Its counters.
    pub stats: ClusterStats,
}

type Receivers = (
    mpsc::UnboundedReceiver<Change>,
    mpsc::Receiver<Outbound>,
    mpsc::Receiver<Claim>,
    mpsc::Receiver<Arc<Message>>,
    mpsc::Receiver<wills::Op>,
);

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

impl Cluster {
    /// This node's part in the cluster `config` describes; nothing is sent until
    /// [`Cluster::start`].
    pub fn new(config: ClusterConfig) -> Arc<Cluster> {
        let (changes, changes_rx) = mpsc::unbounded_channel();
        let (outbound, outbound_rx) = mpsc::channel(OUTBOUND);
        let (claims, claims_rx) = mpsc::channel(CLAIMS);
        let (retain, retain_rx) = mpsc::channel(RETAIN);
        let (wills, wills_rx) = mpsc::channel(CLAIMS);
        let mut seed = [0u8; 8];
        let run = match ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        {
            Ok(()) => u64::from_le_bytes(seed),
            Err(_) => crate::store::record::unix_ms_now(),
        };
        Arc::new(Cluster {
            node: config.node.as_str().into(),
            config,
            run,
            local: Mutex::default(),
            peers: RwLock::default(),
            changes,
            outbound,
            claims,
            retain,
            wills,
            outgoing: Arc::default(),
            receivers: Mutex::new(Some((
                changes_rx,
                outbound_rx,
                claims_rx,
                retain_rx,
                wills_rx,
            ))),
            connected: AtomicBool::new(false),
            connected_at: Mutex::new(None),
            connect_warned: AtomicBool::new(false),
            connects: tokio::sync::watch::Sender::new(0),
            bucket_open: AtomicBool::new(false),
            recent: Mutex::default(),
            delayed_wills: Mutex::default(),
            queue: Arc::new(queue::Queue::new()),
            share_turns: Mutex::default(),
            client: std::sync::OnceLock::new(),
            sessions: std::sync::OnceLock::new(),
            stats: ClusterStats::default(),
        })
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// A connection with `client_id` was attached here at `since_ms` (Unix ms): the other
    /// nodes are told, and disconnect an older one with the same client id.
    pub fn attached(&self, client_id: &crate::message::ClientId, since_ms: u64) {
        self.reconnected(client_id.as_str(), since_ms);
        let claim = Claim {
            node: self.node.to_string(),
            client_id: client_id.as_str().to_owned(),
            since_ms,
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = self.claims.try_send(claim) {
            let n = self.stats.claims_dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n == 1 || n.is_multiple_of(1000) {
                tracing::warn!(
                    dropped = n,
                    client_id = client_id.as_str(),
                    "cluster: too many connections waiting to be told to the other nodes; this one is not told (an older connection with its client id on another node is not closed)"
                );
            }
        }
    }

    /// Connection `conn` with will `w` was attached here: the will goes into the cluster's
    /// wills' bucket, for another node to publish if this one dies before the connection
    /// ends.
    pub fn will_set(&self, conn: u64, w: &crate::session::PendingWill) {
        match wills::encode(w, crate::store::record::unix_ms_now()) {
            Ok(value) => {
                let key = wills::key(&self.node, self.run, w.client.client_id.as_str(), conn);
                if self.wills.try_send(wills::Op::Set { key, value }).is_err() {
                    tracing::warn!(client_id = %w.client.client_id,
                        "cluster: will not put in the wills' bucket (queue full)");
                }
            }
            Err(e) => tracing::warn!(client_id = %w.client.client_id, error = %e,
                "cluster: will not put in the wills' bucket"),
        }
    }

    /// Connection `conn` of `client_id`, which had a will, ended here: this node owns the will
    /// from now on.
    pub fn will_cleared(&self, conn: u64, client_id: &crate::message::ClientId) {
        let key = wills::key(&self.node, self.run, client_id.as_str(), conn);
        if self.wills.try_send(wills::Op::Clear { key }).is_err() {
            tracing::warn!(client_id = %client_id,
                "cluster: a will left in the wills' bucket (queue full): another node may publish it if this one dies");
        }
    }

    /// Whether the retained messages' bucket is open and watched.
    pub fn bucket_open(&self) -> bool {
        self.bucket_open.load(Ordering::Relaxed)
    }

    /// Whether the NATS connection is up.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// When the connection to NATS was last made.
    fn connected_at(&self) -> Option<Instant> {
        *lock(&self.connected_at)
    }

    /// Whether the stream of QoS 1/2 messages between nodes is open.
    pub fn stream_open(&self) -> bool {
        self.queue.is_open()
    }

    /// The highest cluster ticket up to which JetStream holds every QoS 1/2 message for
    /// other nodes (what [`Outlet::offer`] returns as `replicated`).
    pub fn replicated(&self) -> tokio::sync::watch::Receiver<u64> {
        self.queue.replicated()
    }

    /// Whether the QoS 1/2 message `msg` must be refused: other nodes' clients subscribe
    /// to it (or are the only members of a shared subscription to it) and JetStream cannot
    /// hold it now (NATS away, the stream not open or not answering, the queue to it full).
    pub fn refuses(&self, msg: &Message) -> bool {
        let topic = &Topic::new(msg.topic.as_str());
        let refused = self.queue.refuses(self.is_connected()) && {
            let peers = read(&self.peers);
            peers.values().any(|p| p.routes.matches(topic)) || {
                let mut there = Vec::new();
                for p in peers.values() {
                    p.routes.shares_matching(topic, &mut there);
                }
                let mut here = Vec::new();
                if !there.is_empty() {
                    lock(&self.local).shares.shares_matching(topic, &mut here);
                }
                there.iter().any(|s| !here.contains(s))
            }
        };
        if refused {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
        }
        refused
    }

    /// The other nodes heard from, with the filters each holds, sorted by name.
    pub fn nodes(&self) -> Vec<(String, usize)> {
        let mut v: Vec<_> = (read(&self.peers).iter())
            .map(|(n, p)| (n.to_string(), p.routes.held()))
            .collect();
        v.sort();
        v
    }

    /// Filters this node's clients hold (each once).
    pub fn local_filters(&self) -> usize {
        lock(&self.local).counts.len()
    }
}

impl crate::router::Interest for Cluster {
    /// A local subscription to `filter` (its topic part) was made.
    fn subscribed(&self, filter: &str) {
        let mut local = lock(&self.local);
        match local.counts.get_mut(filter) {
            Some(n) => *n += 1,
            None => {
                local.counts.insert(filter.into(), 1);
                if filter.starts_with("$share/") {
                    local.shares.insert(filter);
                }
                local.version += 1;
                let version = local.version;
                let _ = self.changes.send(Change {
                    version,
                    add: true,
                    filter: filter.into(),
                });
            }
        }
    }

    /// A local subscription to `filter` (its topic part) was removed.
    fn unsubscribed(&self, filter: &str) {
        let mut local = lock(&self.local);
        let Some(n) = local.counts.get_mut(filter) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            local.counts.remove(filter);
            if filter.starts_with("$share/") {
                local.shares.remove(filter);
            }
            local.version += 1;
            let version = local.version;
            let _ = self.changes.send(Change {
                version,
                add: false,
                filter: filter.into(),
            });
        }
    }
}

impl Cluster {
    /// Connects to NATS and runs the cluster's tasks until `stop`; messages from other
    /// nodes wait up to `backpressure` for a congested subscriber (none: they do not).
    pub fn start(
        self: &Arc<Self>,
        pipeline: Arc<Pipeline>,
        sessions: Arc<crate::session::Sessions>,
        committed: tokio::sync::watch::Receiver<u64>,
        backpressure: Option<Duration>,
        tasks: &tokio_util::task::TaskTracker,
        stop: CancellationToken,
    ) {
        let Some(receivers) = lock(&self.receivers).take() else {
            return;
        };
        let me = self.clone();
        let work = tasks.track_future(async move {
            let client = match me.connect().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "cluster: cannot use the NATS settings");
                    return;
                }
            };
            tokio::select! {
                () = stop.cancelled() => {}
                () = me.run(client.clone(), pipeline, sessions, receivers, committed, backpressure) => {}
            }
            let js = async_nats::jetstream::context::ContextBuilder::new()
                .timeout(Duration::from_secs(2))
                .build(client.clone());
            let _ = tokio::time::timeout(Duration::from_secs(3), me.drop_own_wills(js)).await;
            // What was handed to the client goes out, unless NATS is away.
            let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
        });
        // A thread and a runtime of its own: the NATS client's tasks and the packing of
        // messages for other nodes do not wait behind busy connections for a worker (on
        // one worker they got a turn per 128 messages and their queue overflowed).
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        let started = runtime.and_then(|rt| {
            std::thread::Builder::new()
                .name("sandpiper-cluster".into())
                .spawn(move || rt.block_on(work))
        });
        if let Err(e) = started {
            tracing::error!(error = %e, "cluster: cannot start its thread; this node is alone");
        }
    }

    async fn connect(self: &Arc<Self>) -> Result<async_nats::Client, async_nats::Error> {
        let c = &self.config;
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("sandpiper {}", self.node))
            .no_echo()
            .retry_on_initial_connect()
            .reconnect_delay_callback(|attempt| {
                Duration::from_millis(100 * (attempt as u64).min(20))
            });
        if c.nats_order == crate::config::NatsOrder::Listed {
            options = options.retain_servers_order();
        }
        if let (Some(u), Some(p)) = (&c.user, &c.password) {
            options = options.user_and_password(u.clone(), p.clone());
        }
        if let Some(t) = &c.token {
            options = options.token(t.clone());
        }
        if let Some(path) = &c.creds {
            options = options.credentials_file(path).await.map_err(|e| {
                tracing::error!(path = %path.display(), error = %e,
                    "cluster: cannot read the NATS credentials file of [cluster] creds");
                e
            })?;
        }
        if let Some(path) = &c.nkey {
            let seed = std::fs::read_to_string(path).map_err(|e| {
                tracing::error!(path = %path.display(), error = %e,
                    "cluster: cannot read the NKEY seed file of [cluster] nkey");
                e
            })?;
            // The seed alone, or the seed's line among others (nsc's `.nk` files).
            let seed = seed.lines().map(str::trim).find(|l| l.starts_with("SU"));
            let Some(seed) = seed else {
                tracing::error!(path = %path.display(),
                    "cluster: the file of [cluster] nkey holds no user NKEY seed (a line starting SU)");
                return Err("no user NKEY seed".into());
            };
            options = options.nkey(seed.to_owned());
        }
        for path in [&c.ca, &c.cert, &c.key].into_iter().flatten() {
            // Read at each connection attempt, where a failure shows only as an I/O error.
            if let Err(e) = std::fs::metadata(path) {
                tracing::error!(path = %path.display(), error = %e,
                    "cluster: cannot read a TLS file of [cluster]; the node cannot connect to NATS");
            }
        }
        if let Some(ca) = &c.ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&c.cert, &c.key) {
            options = options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        let me = Arc::downgrade(self);
        options = options.event_callback(move |event| {
            let me = me.clone();
            async move {
                let Some(me) = me.upgrade() else {
                    return;
                };
                match event {
                    async_nats::Event::Connected => {
                        me.connect_warned.store(false, Ordering::Relaxed);
                        me.connected.store(true, Ordering::Relaxed);
                        *lock(&me.connected_at) = Some(Instant::now());
                        me.connects.send_modify(|n| *n += 1);
                        tracing::info!(node = %me.node, "cluster: connected to NATS");
                    }
                    async_nats::Event::Disconnected => {
                        me.connected.store(false, Ordering::Relaxed);
                        tracing::warn!(node = %me.node, "cluster: NATS connection lost; reconnecting");
                    }
                    async_nats::Event::ClientError(e)
                        if !me.connect_warned.swap(true, Ordering::Relaxed) =>
                    {
                        // Once until connected: attempts repeat every 2 s at most.
                        tracing::warn!(node = %me.node, error = %e,
                            "cluster: cannot connect to NATS (its addresses, user, token and TLS: ca, cert, key); trying again");
                    }
                    async_nats::Event::ClientError(e) => {
                        tracing::debug!(error = %e, "cluster: NATS");
                    }
                    other => tracing::info!(event = %other, "cluster: NATS"),
                }
            }
        });
        Ok(options.connect(c.nats.clone()).await?)
    }

    async fn run(
        self: &Arc<Self>,
        client: async_nats::Client,
        pipeline: Arc<Pipeline>,
        sessions: Arc<crate::session::Sessions>,
        (changes, outbound, claims, retain, wills): Receivers,
        committed: tokio::sync::watch::Receiver<u64>,
        backpressure: Option<Duration>,
    ) {
        let subscribe = |subject: String| {
            let client = client.clone();
            async move {
                loop {
                    match client.subscribe(subject.clone()).await {
                        Ok(s) => return s,
                        Err(e) => {
                            tracing::warn!(subject, error = %e, "cluster: cannot subscribe; trying again");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            }
        };
        let messages = subscribe(msg_subject(&self.node)).await;
        let interest = subscribe(SUBJECT_INTEREST.to_owned()).await;
        let beats = subscribe(SUBJECT_BEAT.to_owned()).await;
        let asks = subscribe(snapshot_subject(&self.node)).await;
        let others_claims = subscribe(SUBJECT_CLAIM.to_owned()).await;
        let session_asks = subscribe(sessions::SUBJECT.to_owned()).await;
        let _ = self.client.set(client.clone());
        let _ = self.sessions.set(sessions.clone());
        // Requests answered within 2 s, or tried again: a JetStream cluster that has just
        // elected its leader may not answer the first ones at all.
        let js = async_nats::jetstream::context::ContextBuilder::new()
            .timeout(Duration::from_secs(2))
            .build(client.clone());
        tokio::join!(
            self.retained(js.clone(), retain, pipeline.router().clone()),
            self.claims(client.clone(), claims, others_claims, sessions.clone()),
            self.give_sessions(client.clone(), session_asks, sessions),
            self.send_queued(js.clone()),
            self.wills(js.clone(), wills, pipeline.clone()),
            self.take_queued(js, pipeline.clone(), committed, backpressure),
            self.receive(messages, pipeline, backpressure),
            self.send(client.clone(), outbound),
            self.control(client.clone(), changes, interest, beats),
            self.answer(client.clone(), asks),
        );
    }

    /// Keeps the cluster's retained messages: puts (or deletes) what is retained here in
    /// the bucket, and watches the bucket into this node's retained store.
    async fn retained(
        &self,
        js: async_nats::jetstream::Context,
        mut mine: mpsc::Receiver<Arc<Message>>,
        router: Arc<crate::router::Router>,
    ) {
        use async_nats::jetstream::kv;
        let config = kv::Config {
            bucket: retained::BUCKET.to_owned(),
            description: "Sandpiper: the newest retained message of each topic".to_owned(),
            history: 1,
            num_replicas: self.config.replicas,
            ..Default::default()
        };
        // Topics of hashed keys, learnt from their values (a deletion carries no value).
        let mut hashed: HashMap<String, String> = HashMap::new();
        let mut warned = false;
        'bucket: loop {
            let (store, mut watch) = match js.create_or_update_key_value(config.clone()).await {
                Ok(store) => match store.watch_with_history(">").await {
                    Ok(w) => (store, w),
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster: cannot watch the retained messages' bucket; trying again in 5 s");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        continue;
                    }
                },
                Err(e) => {
                    if !std::mem::replace(&mut warned, true) {
                        tracing::error!(error = %e, bucket = retained::BUCKET,
                            "cluster: cannot open the retained messages' bucket (is JetStream on?); retained messages wait here (up to 4,096) until it opens, and the node is not ready; trying again every second");
                    }
                    // What is retained here meanwhile waits in its queue (bounded), in order.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if warned {
                tracing::info!(
                    bucket = retained::BUCKET,
                    "cluster: retained messages' bucket open"
                );
                warned = false;
            }
            self.bucket_open.store(true, Ordering::Relaxed);
            loop {
                tokio::select! {
                    Some(m) = mine.recv() => {
                        self.outgoing.release(m.size(), 0);
                        let key = retained::key(m.topic.as_str());
                        let done = if m.payload.is_empty() {
                            store.delete(&key).await.map_err(|e| e.to_string())
                        } else {
                            let mut b = BytesMut::new();
                            match wire::put(&mut b, &m) {
                                Ok(()) => store.put(&key, b.split_off(4).freeze()).await
                                    .map(|_| ()).map_err(|e| e.to_string()),
                                Err(e) => Err(e.to_string()),
                            }
                        };
                        if let Err(e) = done {
                            tracing::warn!(topic = %m.topic, error = %e,
                                "cluster: retained message not kept in the cluster's bucket");
                        }
                    }
                    entry = watch.next() => {
                        let Some(entry) = entry else {
                            tracing::warn!("cluster: the retained messages' watch ended; watching again");
                            self.bucket_open.store(false, Ordering::Relaxed);
                            continue 'bucket;
                        };
                        match entry {
                            Ok(e) => self.mirror(e, &router, &mut hashed),
                            Err(e) => {
                                tracing::warn!(error = %e, "cluster: the retained messages' watch failed; watching again");
                                self.bucket_open.store(false, Ordering::Relaxed);
                                continue 'bucket;
                            }
                        }
                    }
                }
            }
        }
    }

    /// One entry of the retained messages' bucket into this node's retained store.
    fn mirror(
        &self,
        e: async_nats::jetstream::kv::Entry,
        router: &crate::router::Router,
        hashed: &mut HashMap<String, String>,
    ) {
        use async_nats::jetstream::kv::Operation;
        let msg = match e.operation {
            Operation::Put => match wire::read(&e.value) {
                Ok(mut m) if retained::key(m.topic.as_str()) == e.key => {
                    m.publisher = None;
                    if e.key.starts_with("=H.") {
                        hashed.insert(e.key.clone(), m.topic.as_str().to_owned());
                    }
                    m
                }
                Ok(_) => {
                    tracing::warn!(key = %e.key, "cluster: a retained message under another topic's key: skipped");
                    return;
                }
                Err(err) => {
                    tracing::warn!(key = %e.key, error = %err, "cluster: unreadable retained message: skipped");
                    return;
                }
            },
            Operation::Delete | Operation::Purge => {
                let topic = match retained::topic(&e.key) {
                    Some(t) => t,
                    None => match hashed.remove(&e.key) {
                        Some(t) => t,
                        None => return,
                    },
                };
                let Ok(topic) = crate::codec::TopicName::new(&topic) else {
                    return;
                };
                Message {
                    topic,
                    payload: Bytes::new(),
                    qos: crate::codec::QoS::AtMostOnce,
                    retain: true,
                    properties: Default::default(),
                    expires_at: None,
                    publisher: None,
                }
            }
        };
        if router.retain(&Arc::new(msg)).is_err() {
            tracing::warn!(key = %e.key, "cluster: retained store full: a retained message of the cluster is not kept here");
        }
    }

    /// Tells the other nodes of the connections attached here; disconnects a connection
    /// here that is older than one another node attached with the same client id (the
    /// newer one wins; at the same millisecond, the node whose name sorts last).
    async fn claims(
        &self,
        client: async_nats::Client,
        mut mine: mpsc::Receiver<Claim>,
        mut theirs: async_nats::Subscriber,
        sessions: Arc<crate::session::Sessions>,
    ) {
        loop {
            tokio::select! {
                Some(c) = mine.recv() => {
                    self.publish_json(&client, SUBJECT_CLAIM, &c).await;
                }
                Some(m) = theirs.next() => {
                    let Ok(c) = serde_json::from_slice::<Claim>(&m.payload) else {
                        tracing::warn!("cluster: unreadable claim of a client id");
                        continue;
                    };
                    self.reconnected(&c.client_id, c.since_ms);
                    let id = crate::message::ClientId::new(&c.client_id);
                    let ties = *self.node < *c.node;
                    if sessions.taken_over_elsewhere(&id, c.since_ms, ties) {
                        tracing::info!(client_id = %c.client_id, node = %c.node,
                            "client connected to another node: its connection here is closed (0x8E)");
                    }
                }
                else => return,
            }
        }
    }

    /// Routes what other nodes send to this node's sessions (QoS 0 over core NATS).
    async fn receive(
        &self,
        mut messages: async_nats::Subscriber,
        pipeline: Arc<Pipeline>,
        backpressure: Option<Duration>,
    ) {
        while let Some(m) = messages.next().await {
            let _ = self.route_pack(&m.payload, &pipeline, backpressure).await;
        }
    }

    /// Routes the records of one pack from another node to this node's sessions: the
    /// store ticket of what that wrote, and the cluster ticket of what it handed on to
    /// other nodes (shared messages whose members here are gone).
    async fn route_pack(
        &self,
        pack: &[u8],
        pipeline: &Pipeline,
        backpressure: Option<Duration>,
    ) -> (Option<u64>, Option<u64>) {
        let mut ticket = None;
        let mut replicated = None;
        let mut rest = pack;
        while !rest.is_empty() {
            let Some(record) = wire::next(&mut rest) else {
                self.stats.damaged.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("cluster: a message from another node was cut short");
                break;
            };
            match wire::read_record(record) {
                Ok(wire::Record::Session(client_id, d)) => {
                    self.stats.received.fetch_add(1, Ordering::Relaxed);
                    let id = crate::message::ClientId::new(&client_id);
                    let delivered = self.sessions.get().map(|s| s.deliver_moved(&id, d));
                    ticket = ticket.max(delivered.flatten());
                }
                Ok(wire::Record::Routed(mut msg, mut shares)) => {
                    // A session key of the sending node means nothing here (No Local is
                    // about this node's sessions).
                    msg.publisher = None;
                    self.stats.received.fetch_add(1, Ordering::Relaxed);
                    let handed_on = shares.first().is_some_and(|s| **s == *HANDED_ON);
                    if handed_on {
                        shares.remove(0);
                    }
                    let routed = pipeline.route_from_node(&Arc::new(msg), &shares, handed_on);
                    ticket = ticket.max(routed.ticket);
                    replicated = replicated.max(routed.replicated);
                    // A subscriber half full: what follows waits for it, as a local
                    // publisher would (at most the back-pressure timeout), rather than
                    // overflowing its queue with the rest of the pack.
                    if let (Some(room), Some(wait)) = (routed.congested, backpressure)
                        && tokio::time::timeout(wait, room.wait_for_room())
                            .await
                            .is_err()
                    {
                        room.mark_stalled();
                    }
                }
                Err(e) => {
                    self.stats.damaged.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "cluster: a message from another node could not be read");
                }
            }
        }
        (ticket, replicated)
    }

    /// Hands messages for other nodes to NATS, in the order they were accepted: what is
    /// waiting goes in one NATS message per node (records with their lengths, at most
    /// [`PACK`] bytes each).
    async fn send(&self, client: async_nats::Client, mut outbound: mpsc::Receiver<Outbound>) {
        let mut packs: HashMap<Arc<str>, Pack> = HashMap::new();
        let mut batch = Vec::with_capacity(WAITING);
        loop {
            if outbound.recv_many(&mut batch, WAITING).await == 0 {
                return;
            }
            let taken: usize = batch.iter().map(|(_, m, _)| m.size()).sum();
            self.outgoing.release(taken, batch.len());
            for (node, msg, shares) in batch.drain(..) {
                let pack = packs.entry(node.clone()).or_insert_with(|| Pack {
                    subject: msg_subject(&node).into(),
                    bytes: BytesMut::new(),
                    records: 0,
                });
                if !pack.bytes.is_empty() && pack.bytes.len() + msg.size() > PACK {
                    self.publish_pack(&client, pack).await;
                }
                match wire::put_shared(&mut pack.bytes, &msg, &shares) {
                    Ok(()) => pack.records += 1,
                    Err(e) => {
                        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(topic = %msg.topic, error = %e,
                            "cluster: message not sent to node {node}");
                    }
                }
            }
            for pack in packs.values_mut() {
                if !pack.bytes.is_empty() {
                    self.publish_pack(&client, pack).await;
                }
            }
            // No buffer kept for nodes between batches (node names come and go).
            packs.clear();
        }
    }

    async fn publish_pack(&self, client: &async_nats::Client, pack: &mut Pack) {
        let bytes = pack.bytes.split().freeze();
        let records = std::mem::take(&mut pack.records);
        match client.publish(pack.subject.clone(), bytes).await {
            Ok(()) => {
                self.stats.sent.fetch_add(records, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.dropped.fetch_add(records, Ordering::Relaxed);
                tracing::debug!(error = %e, subject = %pack.subject, records,
                    "cluster: messages for another node dropped");
            }
        }
    }

    /// Publishes this node's changes and heartbeats; applies the other nodes' changes and
    /// heartbeats; forgets nodes not heard from.
    async fn control(
        self: &Arc<Self>,
        client: async_nats::Client,
        mut changes: mpsc::UnboundedReceiver<Change>,
        mut interest: async_nats::Subscriber,
        mut beats: async_nats::Subscriber,
    ) {
        let (synced_tx, mut synced) = mpsc::unbounded_channel::<(Arc<str>, Option<Snapshot>)>();
        let mut beat = tokio::time::interval(BEAT);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The number of the last change published.
        let mut published = 0u64;
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                // Another node's changes before its heartbeat: it sent them first, and a
                // heartbeat read before them would look like a gap.
                biased;
                Some(m) = interest.next() => {
                    match serde_json::from_slice::<Changes>(&m.payload) {
                        Ok(c) => self.apply(c, &client, &synced_tx),
                        Err(e) => tracing::warn!(error = %e, "cluster: unreadable interest change"),
                    }
                }
                n = changes.recv_many(&mut batch, CHANGES_PER_MESSAGE) => {
                    if n == 0 {
                        return;
                    }
                    // In messages of at most PIECE bytes as JSON (a filter is at most
                    // 65,535 bytes, six times that escaped: under NATS's 1 MiB).
                    let mut msg = self.changes_from(0);
                    let mut bytes = 0;
                    for c in batch.drain(..) {
                        let op = format!("{}{}", if c.add { '+' } else { '-' }, c.filter);
                        let size = json_size(&op);
                        if !msg.ops.is_empty() && bytes + size > PIECE {
                            self.publish_json(&client, SUBJECT_INTEREST, &msg).await;
                            msg = self.changes_from(c.version);
                            bytes = 0;
                        }
                        if msg.ops.is_empty() {
                            msg.from = c.version;
                        }
                        msg.to = c.version;
                        msg.ops.push(op);
                        bytes += size;
                    }
                    published = msg.to;
                    self.publish_json(&client, SUBJECT_INTEREST, &msg).await;
                }
                _ = beat.tick() => {
                    let msg = Beat { node: self.node.to_string(), run: self.run, version: published };
                    self.publish_json(&client, SUBJECT_BEAT, &msg).await;
                    self.forget_silent();
                }
                Some(m) = beats.next() => {
                    match serde_json::from_slice::<Beat>(&m.payload) {
                        Ok(b) => self.heard(b, &client, &synced_tx),
                        Err(e) => tracing::warn!(error = %e, "cluster: unreadable heartbeat"),
                    }
                }
                Some((node, snapshot)) = synced.recv() => {
                    self.synced(node, snapshot, &client, &synced_tx);
                }
            }
        }
    }

    /// An empty message of this node's changes, starting at number `from`.
    fn changes_from(&self, from: u64) -> Changes {
        Changes {
            node: self.node.to_string(),
            run: self.run,
            from,
            to: from,
            ops: Vec::new(),
        }
    }

    async fn publish_json<T: Serialize>(
        &self,
        client: &async_nats::Client,
        subject: &'static str,
        msg: &T,
    ) {
        match serde_json::to_vec(msg) {
            Ok(v) => {
                if let Err(e) = client.publish(subject, v.into()).await {
                    tracing::warn!(subject, error = %e, "cluster: cannot publish");
                }
            }
            Err(e) => tracing::error!(subject, error = %e, "cluster: cannot encode"),
        }
    }

    /// A heartbeat of another node.
    fn heard(
        self: &Arc<Self>,
        b: Beat,
        client: &async_nats::Client,
        synced: &mpsc::UnboundedSender<(Arc<str>, Option<Snapshot>)>,
    ) {
        if *b.node == *self.node {
            if b.run != self.run {
                tracing::error!(node = %b.node, "cluster: another process uses this node's name");
            }
            return;
        }
        let mut peers = write(&self.peers);
        let name: Arc<str> = b.node.as_str().into();
        let peer = heard_from(&mut peers, &name, b.run, &self.wills);
        if !peer.syncing && peer.version < b.version {
            self.ask(peer, name, client, synced);
        }
    }

    /// Changes of another node's filters.
    fn apply(
        self: &Arc<Self>,
        c: Changes,
        client: &async_nats::Client,
        synced: &mpsc::UnboundedSender<(Arc<str>, Option<Snapshot>)>,
    ) {
        if *c.node == *self.node {
            return;
        }
        let mut peers = write(&self.peers);
        let name: Arc<str> = c.node.as_str().into();
        let peer = heard_from(&mut peers, &name, c.run, &self.wills);
        if peer.syncing {
            if peer.held.len() < MAX_HELD {
                peer.held.push(c);
            }
            // Beyond, the snapshot's answer is behind what was dropped: a gap, asked again.
            return;
        }
        if !apply_changes(peer, &c) {
            peer.held.push(c);
            self.ask(peer, name, client, synced);
        }
    }

    /// Asks `peer` for all of its filters.
    fn ask(
        self: &Arc<Self>,
        peer: &mut Peer,
        name: Arc<str>,
        client: &async_nats::Client,
        synced: &mpsc::UnboundedSender<(Arc<str>, Option<Snapshot>)>,
    ) {
        peer.syncing = true;
        let client = client.clone();
        let synced = synced.clone();
        tokio::spawn(async move {
            let snapshot = fetch_snapshot(&client, &name).await;
            if let Err(e) = &snapshot {
                tracing::warn!(node = %name, error = %e, "cluster: could not read the node's filters; asking again at its next heartbeat");
            }
            let _ = synced.send((name, snapshot.ok()));
        });
    }

    /// A snapshot asked of `node` came (or could not be read).
    fn synced(
        self: &Arc<Self>,
        node: Arc<str>,
        snapshot: Option<Snapshot>,
        client: &async_nats::Client,
        synced: &mpsc::UnboundedSender<(Arc<str>, Option<Snapshot>)>,
    ) {
        // Built before the lock: every routed message reads the peers.
        let routes = snapshot.as_ref().map(|s| {
            let mut routes = Routes::default();
            for f in &s.filters {
                routes.insert(f);
            }
            routes
        });
        let mut peers = write(&self.peers);
        let Some(peer) = peers.get_mut(&node) else {
            return;
        };
        peer.syncing = false;
        let (Some(s), Some(routes)) = (snapshot, routes) else {
            // Asked again at its next heartbeat.
            peer.version = 0;
            peer.routes = Routes::default();
            peer.held.clear();
            return;
        };
        if s.run != peer.run {
            // An answer of an earlier run (or of another process with the same name): the
            // next heartbeat of the run this node knows asks again.
            peer.version = 0;
            peer.held.clear();
            return;
        }
        peer.routes = routes;
        peer.version = s.version;
        let held = std::mem::take(&mut peer.held);
        for c in held {
            if c.run != peer.run || c.to <= peer.version {
                continue;
            }
            if !apply_changes(peer, &c) {
                self.ask(peer, node, client, synced);
                return;
            }
        }
        tracing::info!(node = %node, filters = peer.routes.len(), version = peer.version,
            "cluster: node's filters read");
    }

    /// Forgets nodes not heard from for `node_timeout_ms`.
    fn forget_silent(&self) {
        let timeout = Duration::from_millis(self.config.node_timeout_ms);
        let mut peers = write(&self.peers);
        if !self.is_connected() {
            // Cut off from NATS, this node hears nobody: it keeps what it knew (QoS 1/2
            // messages for the others are refused, not lost to them), and gives every node
            // a full timeout again once reconnected.
            for p in peers.values_mut() {
                p.heard = Instant::now();
            }
            return;
        }
        let mut gone = false;
        peers.retain(|name, p| {
            let alive = p.heard.elapsed() < timeout;
            if !alive {
                tracing::warn!(node = %name, "cluster: node not heard from; nothing more is routed to it; its clients' wills are published");
                gone = true;
            }
            alive
        });
        if gone {
            let _ = self.wills.try_send(wills::Op::Scan);
        }
    }

    /// Answers other nodes' requests for this node's filters.
    async fn answer(&self, client: async_nats::Client, mut asks: async_nats::Subscriber) {
        while let Some(m) = asks.next().await {
            let Some(reply) = m.reply else {
                continue;
            };
            let (filters, version) = {
                let local = lock(&self.local);
                let f: Vec<String> = local.counts.keys().map(|k| k.to_string()).collect();
                (f, local.version)
            };
            let mut piece = Piece {
                run: self.run,
                version,
                filters: Vec::new(),
                last: false,
            };
            let mut bytes = 0;
            let mut rest = filters.into_iter().peekable();
            loop {
                let next = rest.next();
                let done = next.is_none();
                if let Some(f) = next {
                    bytes += json_size(&f);
                    piece.filters.push(f);
                }
                if done || bytes >= PIECE {
                    piece.last = done || rest.peek().is_none();
                    match serde_json::to_vec(&piece) {
                        Ok(v) => {
                            if let Err(e) = client.publish(reply.clone(), v.into()).await {
                                tracing::warn!(error = %e, "cluster: cannot answer a snapshot request");
                                break;
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cluster: cannot encode a snapshot");
                            break;
                        }
                    }
                    if piece.last {
                        break;
                    }
                    piece.filters.clear();
                    bytes = 0;
                }
            }
        }
    }

    /// What of this node the admin API and the metrics show: connected, nodes, filters.
    pub fn summary(&self) -> (bool, usize, usize) {
        (
            self.is_connected(),
            read(&self.peers).len(),
            self.local_filters(),
        )
    }
}

/// Another node, heard from now in run `run`: made if new, started over if it restarted.
fn heard_from<'a>(
    peers: &'a mut HashMap<Arc<str>, Peer>,
    name: &Arc<str>,
    run: u64,
    wills: &mpsc::Sender<wills::Op>,
) -> &'a mut Peer {
    let peer = peers.entry(name.clone()).or_insert_with(|| {
        tracing::info!(node = %name, "cluster: node joined");
        Peer::new(run)
    });
    peer.heard = Instant::now();
    if peer.run != run {
        tracing::info!(node = %name, "cluster: node restarted; the wills of its earlier run's clients are published");
        *peer = Peer::new(run);
        let _ = wills.try_send(wills::Op::Scan);
    }
    peer
}

/// Records waiting for one node, in order.
struct Pack {
    subject: async_nats::Subject,
    bytes: BytesMut,
    records: u64,
}

/// The bytes `s` takes in JSON.
fn json_size(s: &str) -> usize {
    serde_json::to_string(s).map_or(s.len() * 6 + 2, |j| j.len()) + 1
}

/// Applies changes in order; false on a gap (the caller asks for a snapshot).
fn apply_changes(peer: &mut Peer, c: &Changes) -> bool {
    if c.to <= peer.version {
        return true;
    }
    // One op per number: a message that starts at or before the next number (a snapshot
    // taken while it was still queued covers its first ops) is applied from there.
    let Some(skip) = (c.to.checked_sub(c.from))
        .and_then(|d| d.checked_add(1))
        .filter(|n| *n == c.ops.len() as u64)
        .and(peer.version.checked_add(1))
        .and_then(|next| next.checked_sub(c.from))
        .and_then(|skip| usize::try_from(skip).ok())
    else {
        return false;
    };
    for op in &c.ops[skip..] {
        match op.split_at_checked(1) {
            Some(("+", f)) => {
                peer.routes.insert(f);
            }
            Some(("-", f)) => {
                peer.routes.remove(f);
            }
            _ => tracing::warn!(op, "cluster: unreadable interest change"),
        }
    }
    peer.version = c.to;
    true
}

/// A node's filters as of one of its changes.
#[derive(Debug)]
struct Snapshot {
    run: u64,
    version: u64,
    filters: Vec<String>,
}

async fn fetch_snapshot(client: &async_nats::Client, node: &str) -> Result<Snapshot, String> {
    let inbox = client.new_inbox();
    let mut pieces = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| e.to_string())?;
    client
        .publish_with_reply(snapshot_subject(node), inbox, Bytes::new())
        .await
        .map_err(|e| e.to_string())?;
    let mut filters = Vec::new();
    let deadline = tokio::time::Instant::now() + SNAPSHOT_TIMEOUT;
    loop {
        let m = tokio::time::timeout_at(deadline, pieces.next())
            .await
            .map_err(|_| "no answer".to_owned())?
            .ok_or_else(|| "NATS connection closed".to_owned())?;
        let p: Piece = serde_json::from_slice(&m.payload).map_err(|e| e.to_string())?;
        filters.extend(p.filters);
        if p.last {
            return Ok(Snapshot {
                run: p.run,
                version: p.version,
                filters,
            });
        }
    }
}

impl Outlet for Cluster {
    fn offer(&self, from: &Origin<'_>, msg: &Arc<Message>, placed: &Placed) -> Offered {
        let _ = from;
        if msg.retain {
            let size = msg.size();
            if self.outgoing.bytes.fetch_add(size, Ordering::Relaxed) + size > OUTBOUND_BYTES
                || self.retain.try_send(msg.clone()).is_err()
            {
                self.outgoing.bytes.fetch_sub(size, Ordering::Relaxed);
                tracing::warn!(topic = %msg.topic,
                    "cluster: retained message not put in the cluster's bucket (queue full)");
            }
        }
        let peers = read(&self.peers);
        let topic = &Topic::new(msg.topic.as_str());
        let mut offered = Offered::default();
        if msg.qos != crate::codec::QoS::AtMostOnce {
            // Through JetStream: the publisher's acknowledgement waits for it.
            let taken = std::cell::Cell::new(false);
            let nodes = (peers.iter()).filter_map(|(n, p)| {
                let shares = shares_of(placed, n);
                let wants = p.routes.matches(topic) || !shares.is_empty();
                taken.set(taken.get() || wants);
                wants.then_some((n, shares))
            });
            let queued = self.queue.offer(nodes, msg);
            offered.taken = taken.get();
            match queued {
                Ok(last) => offered.replicated = last,
                Err(n) => {
                    self.stats.dropped.fetch_add(n as u64, Ordering::Relaxed);
                    tracing::warn!(topic = %msg.topic,
                        "cluster: QoS 1/2 message not sent to other nodes (queue to JetStream full)");
                }
            }
            if offered.replicated.is_some() && self.queue.congested() {
                let room: Arc<dyn crate::mailbox::Room> = self.queue.clone();
                offered.congested = Some(room);
            }
            return offered;
        }
        if !self.is_connected() {
            // The NATS client would queue 2,048 publishes, then hold the cluster's tasks.
            let n = peers.values().filter(|p| p.routes.matches(topic)).count();
            self.stats.dropped.fetch_add(n as u64, Ordering::Relaxed);
            offered.taken = n > 0;
            return offered;
        }
        for (name, peer) in peers.iter() {
            let shares = shares_of(placed, name);
            if shares.is_empty() && !peer.routes.matches(topic) {
                continue;
            }
            offered.taken = true;
            self.send_qos0(name, msg, shares);
        }
        if offered.taken && self.outgoing.congested() {
            let room: Arc<dyn crate::mailbox::Room> = self.outgoing.clone();
            offered.congested = Some(room);
        }
        offered
    }

    /// Each shared subscription with members on this node and others goes to the nodes in
    /// turn; one with members only elsewhere, to one of those nodes in turn. The node
    /// chosen hands the message to one of its members (the router's own turn).
    fn place(&self, msg: &Message) -> Placed {
        let peers = read(&self.peers);
        if !peers.values().any(|p| p.routes.has_shares())
            || !self.is_connected()
            || (msg.qos != crate::codec::QoS::AtMostOnce && self.queue.refuses(true))
        {
            // Nothing can go elsewhere: this node serves what it has members of.
            return Placed::default();
        }
        let topic = &Topic::new(msg.topic.as_str());
        let mut there: Vec<(Arc<str>, Arc<str>)> = Vec::new();
        let mut found = Vec::new();
        for (name, p) in peers.iter() {
            p.routes.shares_matching(topic, &mut found);
            there.extend(found.drain(..).map(|s| (s, name.clone())));
        }
        if there.is_empty() {
            return Placed::default();
        }
        lock(&self.local).shares.shares_matching(topic, &mut found);
        there.sort_unstable();
        let mut placed = Vec::new();
        for run in there.chunk_by(|a, b| a.0 == b.0) {
            let Some((share, _)) = run.first() else {
                continue;
            };
            let here = usize::from(found.contains(share));
            let turn = self.turn(share);
            let pick = usize::try_from(turn % (run.len() + here) as u64).unwrap_or(0);
            if let Some((share, node)) = run.get(pick) {
                placed.push((share.clone(), node.clone()));
            }
        }
        Placed(placed)
    }

    /// A node with members of `share` takes the message, in turn.
    fn take_shared(
        &self,
        msg: &Arc<Message>,
        share: &crate::codec::TopicFilter,
    ) -> Option<Offered> {
        let qos0 = msg.qos == crate::codec::QoS::AtMostOnce;
        if !self.is_connected() || (!qos0 && self.queue.refuses(true)) {
            return None;
        }
        let node = {
            let peers = read(&self.peers);
            let mut nodes: Vec<&Arc<str>> = (peers.iter())
                .filter(|(_, p)| p.routes.has_share(share))
                .map(|(n, _)| n)
                .collect();
            if nodes.is_empty() {
                return None;
            }
            nodes.sort_unstable();
            let turn = self.turn(&Arc::from(share.as_str()));
            let pick = usize::try_from(turn % nodes.len() as u64).unwrap_or(0);
            Arc::clone(nodes.get(pick)?)
        };
        let shares = vec![Arc::from(HANDED_ON), Arc::from(share.as_str())];
        if qos0 {
            return self.send_qos0(&node, msg, shares).then(Offered::default);
        }
        match self.queue.offer(std::iter::once((&node, shares)), msg) {
            Ok(Some(t)) => Some(Offered {
                replicated: Some(t),
                ..Offered::default()
            }),
            _ => None,
        }
    }
}

impl Cluster {
    /// The next turn of the shared subscription `share` (the turns of subscriptions seen
    /// start over past 65,536 of them).
    fn turn(&self, share: &Arc<str>) -> u64 {
        let mut turns = lock(&self.share_turns);
        if turns.len() >= 65_536 && !turns.contains_key(share) {
            turns.clear();
        }
        let t = turns.entry(share.clone()).or_insert(0);
        *t += 1;
        *t
    }

    /// Queues a QoS 0 message for `node` (encoded on the cluster's thread, not on the
    /// connection's); false if it was dropped (the queue is full).
    fn send_qos0(&self, node: &Arc<str>, msg: &Arc<Message>, shares: Vec<Arc<str>>) -> bool {
        let size = msg.size();
        let o = &self.outgoing;
        if o.bytes.fetch_add(size, Ordering::Relaxed) + size > OUTBOUND_BYTES
            || self
                .outbound
                .try_send((node.clone(), msg.clone(), shares))
                .is_err()
        {
            o.bytes.fetch_sub(size, Ordering::Relaxed);
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        o.len.fetch_add(1, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;

    fn changes(from: u64, to: u64, ops: &[&str]) -> Changes {
        Changes {
            node: "b".into(),
            run: 7,
            from,
            to,
            ops: ops.iter().map(|o| o.to_string()).collect(),
        }
    }

    #[test]
    fn changes_apply_in_order_from_where_the_node_is() {
        let mut p = Peer::new(7);
        assert!(apply_changes(&mut p, &changes(1, 2, &["+a/#", "+b"])));
        assert_eq!((p.version, p.routes.len()), (2, 2));
        // Already applied: nothing happens.
        assert!(apply_changes(&mut p, &changes(1, 2, &["-a/#", "-b"])));
        assert_eq!(p.routes.len(), 2);
        // Overlapping (a snapshot covered its first op): applied from number 3.
        assert!(apply_changes(&mut p, &changes(2, 4, &["+b", "-b", "+c"])));
        assert_eq!(p.version, 4);
        let m = |t: &str| p.routes.matches(&Topic::new(t));
        assert!(m("a/x") && !m("b") && m("c"));
        // A gap, a count of ops that does not fit its numbers, numbers at the edge: refused.
        assert!(!apply_changes(&mut p, &changes(6, 6, &["+d"])));
        assert!(!apply_changes(&mut p, &changes(5, 6, &["+d"])));
        assert!(!apply_changes(&mut p, &changes(u64::MAX, 9, &["+d"])));
        assert!(!apply_changes(&mut p, &changes(5, u64::MAX, &["+d"])));
        assert_eq!(p.version, 4);
        p.version = u64::MAX - 1;
        assert!(apply_changes(&mut p, &changes(u64::MAX, u64::MAX, &["+d"])));
        assert!(apply_changes(&mut p, &changes(u64::MAX, u64::MAX, &["+e"])));
        assert!(!p.routes.matches(&Topic::new("e")));
    }

    #[tokio::test]
    async fn the_outgoing_queue_holds_publishers_back_while_half_full() {
        use crate::mailbox::Room;
        let o = Arc::new(Outgoing::default());
        o.len.store(OUTBOUND / 2, Ordering::Relaxed);
        assert!(!o.congested());
        o.bytes.store(OUTBOUND_BYTES / 2 + 10, Ordering::Relaxed);
        assert!(o.congested());
        let waiter = tokio::spawn({
            let o = o.clone();
            async move { o.wait_for_room().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        // Still above half: nobody is woken.
        o.release(5, 0);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        o.release(5, 0);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        // A wait that ran out: nobody is held back until the queue is below half again.
        o.len.store(OUTBOUND, Ordering::Relaxed);
        assert!(o.congested());
        o.mark_stalled();
        assert!(!o.congested());
        o.release(0, OUTBOUND / 4);
        assert!(!o.congested(), "still above half, still stalled");
        o.release(0, OUTBOUND / 2);
        o.len.store(OUTBOUND, Ordering::Relaxed);
        assert!(o.congested(), "below half once: holding back again");
    }
}
