//! QoS 1 and 2 messages between nodes go through JetStream: the stream
//! `sandpiper_messages` (work-queue retention, `[cluster] replicas`, at most
//! `queue_max_bytes`) holds each node's messages under `sandpiper.q.NODE` until that node
//! has taken them. The accepting node packs them per node, publishes the packs pipelined
//! (a window of [`INFLIGHT`] packs awaiting JetStream's acknowledgement) and acknowledges
//! each message to its publisher once JetStream holds every pack it is in (a ticket per
//! message and node, [`Queue::replicated`]). The receiving node reads its subject through
//! one durable pull consumer (`sandpiper-NODE`, whatever its clients subscribe to), routes
//! a pack to its sessions, waits until what that wrote to its store is durable, and only
//! then acknowledges the pack to JetStream: a node killed before that is given the pack
//! again when it comes back (QoS 1: at least once). Packs are numbered per sender's run
//! and receiver; the receiver puts those that overtook a lost one back in line (`order`).
//!
//! QoS 0 messages keep to core NATS (`sandpiper.msg.NODE`, at most once), so a publisher's
//! QoS 0 and QoS 1 messages may reach another node in another order than it sent them;
//! each QoS keeps its order.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{Notify, mpsc, watch};

use super::{Cluster, PACK, WAITING, lock, order, wire};
use crate::message::Message;
use crate::pipeline::Pipeline;

/// The stream of messages between nodes.
pub(super) const STREAM: &str = "sandpiper_messages";
/// Packs published and not yet acknowledged by JetStream, at most.
pub(super) const INFLIGHT: usize = 64;
/// Bytes of messages handed to the queue and not yet held by JetStream: beyond half,
/// publishers wait for room; beyond all, new QoS 1/2 messages for other nodes are refused.
const QUEUED_BYTES: usize = 64 * 1024 * 1024;
/// How long JetStream keeps a message a node has not taken (a node gone for good).
const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// A pack handed to a node and not acknowledged within this is given to it again (a node
/// that restarts gets its unacknowledged packs at once: its consumer is made anew; a
/// pack waits behind up to 15 others, each waiting for congested subscribers).
const ACK_WAIT: Duration = Duration::from_secs(600);
/// A pack JetStream has not taken for this long stalls the queue (new messages refused).
const STALLED: Duration = Duration::from_secs(2);
/// Packs a node reads at once (each at most [`PACK`] bytes).
const READ_BATCH: usize = 16;

/// The subject of node `node`'s QoS 1/2 messages.
pub(super) fn subject(node: &str) -> String {
    format!("sandpiper.q.{node}")
}

/// What goes to node `node`, with its ticket.
type Queued = (u64, Arc<str>, Item);

/// A message for another node: one to route there (with the shared subscriptions that node
/// serves it to), or a delivery for one of its sessions.
#[derive(Debug)]
pub(super) enum Item {
    Routed(Arc<Message>, Vec<Arc<str>>),
    Session(Arc<str>, crate::message::Delivery),
}

impl Item {
    fn size(&self) -> usize {
        match self {
            Item::Routed(m, _) => m.size(),
            Item::Session(_, d) => d.msg.size(),
        }
    }

    fn topic(&self) -> &str {
        match self {
            Item::Routed(m, _) => m.topic.as_str(),
            Item::Session(_, d) => d.msg.topic.as_str(),
        }
    }
}

/// Messages for other nodes on their way to JetStream, and the tickets the publishers'
/// acknowledgements wait for.
#[derive(Debug)]
pub(super) struct Queue {
    /// The last ticket handed out.
    next: Mutex<u64>,
    tx: mpsc::UnboundedSender<Queued>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Queued>>>,
    /// Every ticket up to this one is held by JetStream.
    replicated: watch::Sender<u64>,
    /// Bytes of messages handed out and not yet held by JetStream.
    bytes: AtomicUsize,
    /// Wakes publishers waiting for room.
    room: Notify,
    /// The stream is open.
    open: AtomicBool,
    /// A pack has waited for JetStream for more than [`STALLED`].
    stalled: AtomicBool,
}

impl Queue {
    pub(super) fn new() -> Queue {
        let (tx, rx) = mpsc::unbounded_channel();
        Queue {
            next: Mutex::new(0),
            tx,
            rx: Mutex::new(Some(rx)),
            replicated: watch::Sender::new(0),
            bytes: AtomicUsize::new(0),
            room: Notify::new(),
            open: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
        }
    }

    /// The highest ticket up to which JetStream holds every message.
    pub(super) fn replicated(&self) -> watch::Receiver<u64> {
        self.replicated.subscribe()
    }

    /// Whether a new message cannot be made durable now (with NATS connected or not).
    pub(super) fn refuses(&self, connected: bool) -> bool {
        !connected
            || !self.open.load(Ordering::Relaxed)
            || self.stalled.load(Ordering::Relaxed)
            || self.bytes.load(Ordering::Relaxed) > QUEUED_BYTES
    }

    /// Whether the stream is open.
    pub(super) fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    /// Queues `msg` for each of `nodes` (with the shared subscriptions it serves it to):
    /// the last ticket (none: no node), or the number of nodes it was dropped for (far
    /// beyond the limit: only what nobody waits on gets here then, as client messages are
    /// refused first).
    pub(super) fn offer<'a>(
        &self,
        nodes: impl Iterator<Item = (&'a Arc<str>, Vec<Arc<str>>)>,
        msg: &Arc<Message>,
    ) -> Result<Option<u64>, usize> {
        if self.bytes.load(Ordering::Relaxed) > 2 * QUEUED_BYTES {
            return Err(nodes.count());
        }
        // Tickets are handed out in the order they reach the queue.
        let mut next = lock(&self.next);
        let mut last = None;
        for (node, shares) in nodes {
            *next += 1;
            self.bytes.fetch_add(msg.size(), Ordering::Relaxed);
            let _ = (self.tx).send((*next, node.clone(), Item::Routed(msg.clone(), shares)));
            last = Some(*next);
        }
        Ok(last)
    }

    /// Queues deliveries for the session of `client_id` on `node`, in order: the last
    /// ticket, or `None` when the queue is far beyond its limit (nothing queued).
    pub(super) fn offer_to_session(
        &self,
        node: &Arc<str>,
        client_id: &str,
        deliveries: Vec<crate::message::Delivery>,
    ) -> Option<u64> {
        if self.bytes.load(Ordering::Relaxed) > 2 * QUEUED_BYTES {
            return None;
        }
        let id: Arc<str> = Arc::from(client_id);
        let mut next = lock(&self.next);
        let mut last = None;
        for d in deliveries {
            *next += 1;
            self.bytes.fetch_add(d.msg.size(), Ordering::Relaxed);
            let _ = (self.tx).send((*next, node.clone(), Item::Session(id.clone(), d)));
            last = Some(*next);
        }
        last
    }

    /// Whether publishers should wait for room.
    pub(super) fn congested(&self) -> bool {
        self.bytes.load(Ordering::Relaxed) > QUEUED_BYTES / 2
    }
}

impl crate::mailbox::Room for Queue {
    fn wait_for_room(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(crate::mailbox::until_room(&self.room, || self.congested()))
    }

    fn mark_stalled(&self) {}
}

/// The records of one NATS message for one node, with their tickets.
#[derive(Debug, Default)]
struct Pack {
    bytes: BytesMut,
    tickets: Vec<u64>,
    /// Their messages' `Message::size`.
    size: usize,
}

/// Tickets handed out and not yet all held by JetStream, from `base` on.
#[derive(Debug)]
struct Pending {
    base: u64,
    held: VecDeque<bool>,
}

impl Pending {
    fn done(&mut self, t: u64) {
        if let Some(slot) = t
            .checked_sub(self.base)
            .and_then(|i| self.held.get_mut(i as usize))
        {
            *slot = true;
        }
    }

    /// The new highest ticket up to which all are held, if it moved.
    fn advance(&mut self) -> Option<u64> {
        let mut moved = false;
        while self.held.front() == Some(&true) {
            self.held.pop_front();
            self.base += 1;
            moved = true;
        }
        moved.then(|| self.base - 1)
    }
}

impl Cluster {
    /// The stream's settings.
    fn stream_config(&self) -> async_nats::jetstream::stream::Config {
        use async_nats::jetstream::stream;
        stream::Config {
            name: STREAM.to_owned(),
            description: Some(
                "Sandpiper: QoS 1/2 messages for nodes that have not taken them yet".to_owned(),
            ),
            subjects: vec!["sandpiper.q.>".to_owned()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: self.config.replicas,
            max_bytes: i64::try_from(self.config.queue_max_bytes).unwrap_or(i64::MAX),
            max_age: MAX_AGE,
            discard: stream::DiscardPolicy::New,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        }
    }

    /// Opens the stream (made, or its settings updated to this node's), trying again every
    /// second.
    async fn open_stream(&self, js: &async_nats::jetstream::Context) {
        let mut warned = false;
        loop {
            match js.create_or_update_stream(self.stream_config()).await {
                Ok(_) => {
                    if warned {
                        tracing::info!(stream = STREAM, "cluster: messages' stream open");
                    }
                    return;
                }
                Err(e) => {
                    if !std::mem::replace(&mut warned, true) {
                        tracing::error!(error = %e, stream = STREAM,
                            "cluster: cannot open the stream of QoS 1/2 messages between nodes (is JetStream on?); such messages are refused and the node is not ready; trying again every second");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Publishes the queued messages to JetStream, packed per node, and moves the
    /// publishers' tickets as JetStream acknowledges them.
    pub(super) async fn send_queued(&self, js: async_nats::jetstream::Context) {
        let Some(mut rx) = lock(&self.queue.rx).take() else {
            return;
        };
        self.open_stream(&js).await;
        let q = &self.queue;
        q.open.store(true, Ordering::Relaxed);
        let mut pending = Pending {
            base: *q.replicated.borrow() + 1,
            held: VecDeque::new(),
        };
        let mut inflight: FuturesUnordered<_> = FuturesUnordered::new();
        let mut packs: HashMap<Arc<str>, Pack> = HashMap::new();
        let mut batch = Vec::with_capacity(WAITING);
        // Packs are numbered per receiving node (its `order` puts them back in line).
        let mut seqs: HashMap<Arc<str>, u64> = HashMap::new();
        let mut next = |node: &Arc<str>| {
            let s = seqs.entry(node.clone()).or_insert(0);
            *s += 1;
            *s
        };
        loop {
            tokio::select! {
                Some((tickets, size, sent)) = inflight.next() => {
                    let (tickets, size, sent): (Vec<u64>, usize, bool) = (tickets, size, sent);
                    if sent {
                        self.stats.sent.fetch_add(tickets.len() as u64, Ordering::Relaxed);
                    }
                    for t in tickets {
                        pending.done(t);
                    }
                    self.release(size, &mut pending);
                }
                n = rx.recv_many(&mut batch, WAITING), if inflight.len() < INFLIGHT => {
                    if n == 0 {
                        return;
                    }
                    let mut dropped = 0;
                    for (t, node, item) in batch.drain(..) {
                        pending.held.push_back(false);
                        let pack = packs.entry(node.clone()).or_default();
                        if !pack.bytes.is_empty() && pack.bytes.len() + item.size() > PACK {
                            let seq = next(&node);
                            let put = self.put(&js, &node, seq, std::mem::take(pack)).await;
                            inflight.push(put);
                        }
                        let put = match &item {
                            Item::Routed(msg, shares) => wire::put_shared(&mut pack.bytes, msg, shares),
                            Item::Session(id, d) => wire::put_delivery(&mut pack.bytes, id, d),
                        };
                        match put {
                            Ok(()) => {
                                pack.tickets.push(t);
                                pack.size += item.size();
                            }
                            Err(e) => {
                                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(topic = %item.topic(), error = %e,
                                    "cluster: message not sent to node {node}");
                                pending.done(t);
                                dropped += item.size();
                            }
                        }
                    }
                    for (node, pack) in packs.drain() {
                        if !pack.tickets.is_empty() {
                            let seq = next(&node);
                            let put = self.put(&js, &node, seq, pack).await;
                            inflight.push(put);
                        }
                    }
                    self.release(dropped, &mut pending);
                }
            }
        }
    }

    /// `size` bytes of the queue are done with: tickets move, publishers get room.
    fn release(&self, size: usize, pending: &mut Pending) {
        let q = &self.queue;
        q.bytes.fetch_sub(size, Ordering::Relaxed);
        if !q.congested() {
            q.room.notify_waiters();
        }
        if let Some(t) = pending.advance() {
            q.replicated.send_replace(t);
        }
    }

    /// Hands one pack to the NATS client now (the stream keeps the packs in the order of
    /// these calls, which the caller makes one after the other) and returns what awaits
    /// JetStream's acknowledgement, publishing the pack again until JetStream holds it
    /// (its id makes a repeat harmless): its tickets, size, and whether it went (a pack
    /// over NATS's maximum payload is dropped).
    async fn put<'a>(
        &'a self,
        js: &async_nats::jetstream::Context,
        node: &str,
        seq: u64,
        pack: Pack,
    ) -> impl Future<Output = (Vec<u64>, usize, bool)> + 'a {
        let js = js.clone();
        let subject = subject(node);
        let id = order::pack_id(&self.node, self.run, node, seq);
        let bytes = pack.bytes.freeze();
        let publish = |js: async_nats::jetstream::Context, subject: String, id: String, bytes| async move {
            let message = async_nats::jetstream::message::PublishMessage::build()
                .payload(bytes)
                .message_id(id);
            js.send_publish(subject, message).await
        };
        let first = publish(js.clone(), subject.clone(), id.clone(), bytes.clone()).await;
        async move {
            let mut bytes = bytes;
            let mut dropped = false;
            let mut sent = Some(first);
            let mut failing_since: Option<std::time::Instant> = None;
            let mut pause = Duration::from_millis(50);
            loop {
                let attempt = match sent.take() {
                    Some(s) => s,
                    None => publish(js.clone(), subject.clone(), id.clone(), bytes.clone()).await,
                };
                let held = match attempt {
                    Ok(ack) => ack.await.map(drop),
                    Err(e) => Err(e),
                };
                match held {
                    Ok(()) => {
                        if failing_since.is_some()
                            && self.queue.stalled.swap(false, Ordering::Relaxed)
                        {
                            tracing::info!(subject, "cluster: JetStream holds the messages again");
                        }
                        return (pack.tickets, pack.size, !dropped);
                    }
                    Err(e)
                        if e.kind()
                            == async_nats::jetstream::context::PublishErrorKind::MaxPayloadExceeded
                            && !dropped =>
                    {
                        // Never taken, however often sent: dropped, as a QoS 0 message over
                        // NATS's maximum payload is (README, Cluster). An empty pack with its
                        // number goes instead, so the receiver does not wait for it.
                        self.stats
                            .dropped
                            .fetch_add(pack.tickets.len() as u64, Ordering::Relaxed);
                        tracing::warn!(subject, error = %e, records = pack.tickets.len(),
                            "cluster: messages for another node dropped: larger than NATS's maximum payload");
                        dropped = true;
                        bytes = bytes::Bytes::new();
                    }
                    Err(e) => {
                        // A moment's trouble (a stream leader moving) is waited out; a
                        // longer one stalls the queue: new messages are refused meanwhile.
                        // (A pack published again may land after later ones: the
                        // receiving node puts them back in order.)
                        let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                        if since.elapsed() >= STALLED
                            && !self.queue.stalled.swap(true, Ordering::Relaxed)
                        {
                            tracing::warn!(subject, error = %e,
                                "cluster: JetStream does not take QoS 1/2 messages for another node; their publishers wait, new ones are refused; trying again every second");
                        } else {
                            tracing::debug!(subject, error = %e, "cluster: JetStream did not take a pack; trying again");
                        }
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(1));
                    }
                }
            }
        }
    }

    /// Reads this node's QoS 1/2 messages from the stream, routes them to its sessions and
    /// acknowledges each pack once what it wrote to the store is durable.
    pub(super) async fn take_queued(
        &self,
        js: async_nats::jetstream::Context,
        pipeline: Arc<Pipeline>,
        mut committed: watch::Receiver<u64>,
        backpressure: Option<Duration>,
    ) {
        use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
        let name = format!("sandpiper-{}", self.node);
        let mut warned = false;
        // The sending side makes the stream (or updates its settings).
        while !self.queue.is_open() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // What an earlier run of this node was handed and did not acknowledge is given
        // again at once, not after `ACK_WAIT`: the consumer is made anew at start (the
        // stream keeps every message not acknowledged, and a new consumer starts at the
        // first).
        let mut fresh = true;
        let mut connects = self.connects.subscribe();
        let mut order = order::Order::default();
        loop {
            connects.mark_unchanged();
            let messages = async {
                let stream = js.get_stream(STREAM).await?;
                if fresh {
                    use async_nats::jetstream::{ErrorCode, stream::ConsumerErrorKind};
                    match stream.delete_consumer(&name).await {
                        Ok(_) => {}
                        // None yet: nothing to do.
                        Err(e)
                            if matches!(e.kind(), ConsumerErrorKind::JetStream(j)
                            if j.error_code() == ErrorCode::CONSUMER_NOT_FOUND) => {}
                        // Tried again: the old consumer keeps what it handed out.
                        Err(e) => return Err(e.into()),
                    }
                    fresh = false;
                }
                let config = pull::Config {
                    durable_name: Some(name.clone()),
                    description: Some(format!("Sandpiper node {}", self.node)),
                    filter_subject: subject(&self.node),
                    ack_policy: AckPolicy::Explicit,
                    deliver_policy: DeliverPolicy::All,
                    ack_wait: ACK_WAIT,
                    ..Default::default()
                };
                let consumer = stream.get_or_create_consumer(&name, config).await?;
                let messages = (consumer.stream())
                    .max_messages_per_batch(READ_BATCH)
                    .heartbeat(Duration::from_secs(5))
                    .messages()
                    .await?;
                Ok::<_, async_nats::Error>(messages)
            };
            let mut messages = match messages.await {
                Ok(m) => m,
                Err(e) => {
                    if !std::mem::replace(&mut warned, true) {
                        tracing::error!(error = %e, stream = STREAM,
                            "cluster: cannot read this node's messages from the stream; trying again every second");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            warned = false;
            // The consumer numbers what it hands out, one after the other.
            let mut delivered = 0u64;
            loop {
                let wait = order.deadline();
                let m = tokio::select! {
                    m = messages.next() => m,
                    // NATS reconnected: what the consumer handed out through the lost
                    // connection would come back only after `ACK_WAIT`; a new consumer
                    // hands it out again at once.
                    _ = connects.changed() => {
                        tracing::info!("cluster: NATS reconnected; reading the messages' stream again");
                        break;
                    }
                    () = tokio::time::sleep_until(tokio::time::Instant::from_std(
                        wait.unwrap_or_else(Instant::now))), if wait.is_some() => {
                        let late = order.overdue(Instant::now());
                        tracing::warn!(packs = late.len(),
                            "cluster: a pack of QoS 1/2 messages from another node has not come for 10 s; the ones after it go on (a sender that died with it acknowledged none of its messages)");
                        for m in late {
                            if !self.take_pack(m, &pipeline, &mut committed, backpressure).await {
                                return;
                            }
                        }
                        continue;
                    }
                };
                let Some(m) = m else { break };
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        // NATS away, the consumer lost: read again with a new consumer.
                        tracing::info!(error = %e, "cluster: reading the messages' stream again");
                        break;
                    }
                };
                if let Ok(info) = m.info() {
                    let n = info.consumer_sequence;
                    if delivered != 0 && n != delivered + 1 {
                        // Handed out and never received (its consumer's leader moved with
                        // it on the way): given again at once by a new consumer, not
                        // after `ACK_WAIT`.
                        tracing::info!(
                            expected = delivered + 1,
                            got = n,
                            "cluster: a pack of the messages' stream was lost on its way; reading the stream again"
                        );
                        break;
                    }
                    delivered = n;
                }
                let line = (m.headers.as_ref())
                    .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                    .and_then(|id| order::parse_pack_id(id.as_str()))
                    .map(|(line, seq)| (line.to_owned(), seq));
                let ready = match line {
                    Some((line, seq)) => order.arrive(&line, seq, m, Instant::now()),
                    None => vec![m],
                };
                for m in ready {
                    if !self
                        .take_pack(m, &pipeline, &mut committed, backpressure)
                        .await
                    {
                        return;
                    }
                }
            }
            // Held packs were not acknowledged: the new consumer hands them out again.
            order.drop_held();
            fresh = true;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

impl Cluster {
    /// Routes one pack, waits until what it wrote to the store is durable and acknowledges
    /// it to JetStream; false when the store is gone (shutting down: not acknowledged,
    /// given again).
    async fn take_pack(
        &self,
        m: async_nats::jetstream::Message,
        pipeline: &Arc<Pipeline>,
        committed: &mut watch::Receiver<u64>,
        backpressure: Option<Duration>,
    ) -> bool {
        let (ticket, handed_on) = self.route_pack(&m.payload, pipeline, backpressure).await;
        if let Some(t) = ticket
            && committed.wait_for(|c| *c >= t).await.is_err()
        {
            return false;
        }
        if let Some(t) = handed_on
            && self.queue.replicated().wait_for(|r| *r >= t).await.is_err()
        {
            return false;
        }
        if let Err(e) = m.ack().await {
            tracing::debug!(error = %e, "cluster: cannot acknowledge a pack of messages");
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_move_only_when_every_earlier_one_is_held() {
        let mut p = Pending {
            base: 1,
            held: VecDeque::from(vec![false; 4]),
        };
        p.done(2);
        p.done(4);
        assert_eq!(p.advance(), None);
        p.done(1);
        assert_eq!(p.advance(), Some(2));
        p.done(3);
        assert_eq!(p.advance(), Some(4));
        assert!(p.held.is_empty());
        // Tickets already passed or never handed out change nothing.
        p.done(1);
        p.done(99);
        assert_eq!(p.advance(), None);
    }
}
