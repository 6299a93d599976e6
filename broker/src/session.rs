//! Sessions: the state the broker keeps per client identifier, and the registry that attaches
//! sessions to connections, hands them over on takeover and expires them.
//!
//! While a client is connected its connection task owns the [`SessionState`]; when it goes,
//! the state comes back to the registry, which keeps it until it expires (running the will
//! delay and session expiry timers) or a new connection takes it. Only the [`Mailbox`] is
//! shared with the router at all times, so nothing on the hot path takes the registry lock.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::task::AbortHandle;

use crate::codec::{PacketId, SubscriptionOptions, TopicFilter, Will};
use crate::config::TopicLimits;
use crate::mailbox::{Mailbox, QueueLimits};
use crate::message::{ClientKey, Delivery, Message};
use crate::router::{Router, Subscriber};
use crate::store::record::{self, RecordError, SessionRecord};
use crate::store::{Op, Recovered, Store};

/// Session expiry meaning "never".
pub const NEVER_EXPIRES: u32 = u32::MAX;

/// How long a new connection waits for the connection it takes over to hand its session
/// back.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// One subscription of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription {
    /// Its options.
    pub options: SubscriptionOptions,
    /// Its MQTT 5 subscription identifier.
    pub id: Option<NonZeroU32>,
}

/// Where an outbound QoS 1/2 message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// QoS 1 sent, waiting for PUBACK.
    AwaitAck,
    /// QoS 2 sent, waiting for PUBREC.
    AwaitRec,
    /// PUBREL sent, waiting for PUBCOMP.
    AwaitComp,
}

/// An outbound QoS 1/2 message not yet fully acknowledged.
#[derive(Debug, Clone)]
pub struct Inflight {
    /// Its packet identifier.
    pub id: PacketId,
    /// What was sent.
    pub delivery: Delivery,
    /// Where the handshake stands.
    pub stage: Stage,
}

/// Everything the broker keeps for one client identifier.
#[derive(Debug)]
pub struct SessionState {
    /// The client identifier.
    pub client_id: Arc<str>,
    /// The key of this session instance in the router.
    pub key: ClientKey,
    /// The queue the router delivers into.
    pub mailbox: Arc<Mailbox>,
    /// Subscriptions by filter (as sent, with any share prefix).
    pub subscriptions: HashMap<TopicFilter, Subscription>,
    /// Outbound QoS 1/2 messages in the order they were sent.
    pub inflight: VecDeque<Inflight>,
    /// The next packet identifier to try.
    pub next_id: PacketId,
    /// Inbound QoS 2 packet identifiers awaiting PUBREL (delivered once, MQTT-4.3.3).
    pub inbound_qos2: HashSet<PacketId>,
    /// Session Expiry Interval in seconds; [`NEVER_EXPIRES`] for never, 0 for "ends with the
    /// connection".
    pub expiry: u32,
    /// Who owns the session (`None`: not known, for sessions stored before it was kept).
    pub principal: Option<Principal>,
}

/// Who a session belongs to: the user name as authenticated (by a plugin or a client
/// certificate; none for an anonymous client) and the listener it came through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The authenticated user name.
    pub user: Option<Arc<str>>,
    /// The listener's name.
    pub listener: Arc<str>,
}

impl Principal {
    /// Whether `other` is the same principal: the same authenticated user (on whatever
    /// listener), or, for anonymous clients, the same listener.
    pub fn same_as(&self, other: &Principal) -> bool {
        match (&self.user, &other.user) {
            (Some(a), Some(b)) => a == b,
            (None, None) => self.listener == other.listener,
            _ => false,
        }
    }
}

/// What a CONNECT gets for a client id whose session belongs to another principal
/// (`[mqtt] session_principal`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrincipalPolicy {
    /// Refused (CONNACK 0x87, 3.x return code 5); the owner is not disturbed.
    #[default]
    Refuse,
    /// Taken over as if it were its own (the owner's connection is closed, its session
    /// resumed): what MQTT alone says.
    Allow,
    /// A fresh session instead: the owner's session is ended (its connection closed).
    Fresh,
}

/// Why a connection gets no session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachRefused {
    /// A newer connection with the same client id took over while this one waited for
    /// the session (it is closed before CONNACK).
    Displaced,
    /// The session belongs to another principal ([`PrincipalPolicy::Refuse`]).
    OtherPrincipal,
}

impl SessionState {
    /// The router's view of this session.
    pub fn subscriber(&self) -> Subscriber {
        Subscriber {
            key: self.key,
            mailbox: self.mailbox.clone(),
        }
    }

    /// Allocates a packet identifier not used by any message in flight.
    pub fn allocate_id(&mut self) -> Option<PacketId> {
        for _ in 0..u16::MAX {
            let id = self.next_id;
            self.next_id = id.next();
            if !self.inflight.iter().any(|f| f.id == id) {
                return Some(id);
            }
        }
        None
    }

    /// Finds an inflight message by identifier. Acknowledgements come mostly in order, so
    /// the front is checked first.
    pub fn inflight_position(&self, id: PacketId) -> Option<usize> {
        self.inflight.iter().position(|f| f.id == id)
    }
}

/// A will message not yet published.
#[derive(Debug, Clone)]
pub struct PendingWill {
    /// The will as the client sent it.
    pub will: Will,
    /// The session that set it (for No Local).
    pub origin: ClientKey,
}

impl PendingWill {
    /// MQTT 5 Will Delay Interval in seconds.
    pub fn delay(&self) -> u32 {
        self.will.properties.will_delay_interval.unwrap_or(0)
    }

    /// The message to publish now. Its Message Expiry Interval counts from now, the moment
    /// the will is published (MQTT 5 §3.1.3.2.4).
    pub fn into_message(self) -> Arc<Message> {
        let w = self.will;
        let expires_at = w
            .properties
            .message
            .message_expiry_interval
            .map(|s| Instant::now() + Duration::from_secs(u64::from(s)));
        Arc::new(Message {
            topic: w.topic,
            payload: w.payload,
            qos: w.qos,
            retain: w.retain,
            properties: w.properties.message,
            expires_at,
            origin: self.origin,
        })
    }
}

/// Why the registry asks a connection to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// Another connection with the same client identifier arrived (MQTT 5 reason 0x8E).
    TakenOver,
}

/// The result of attaching a connection to a session.
#[derive(Debug)]
pub struct Attachment {
    /// The session, now owned by the connection.
    pub state: SessionState,
    /// Whether an existing session was resumed (CONNACK Session Present).
    pub present: bool,
    /// Fires when the registry wants this connection closed.
    pub kick: oneshot::Receiver<Kick>,
    /// The connection's number, to give back to [`Sessions::detach`].
    pub conn: u64,
    /// The store ticket of the session record written at attach: CONNACK waits for it, so
    /// a session the client was told about survives a crash right after.
    pub ticket: Option<u64>,
}

/// What a connection that was taken over hands to the new one: its session, unless that
/// session ended with the connection (expiry 0).
type Handover = Option<(SessionState, Option<PendingWill>)>;

#[derive(Debug)]
struct Attached {
    conn: u64,
    kick: Option<oneshot::Sender<Kick>>,
    handover: Option<oneshot::Sender<Handover>>,
    principal: Principal,
}

#[derive(Debug)]
struct Detached {
    state: SessionState,
    will: Option<PendingWill>,
    generation: u64,
    timer: Option<AbortHandle>,
}

#[derive(Debug)]
enum Slot {
    Attached(Attached),
    Detached(Box<Detached>),
}

/// The registry of sessions by client identifier.
#[derive(Debug)]
pub struct Sessions {
    router: Arc<Router>,
    limits: QueueLimits,
    store: Option<Arc<Store>>,
    /// Subscriptions read back from the store beyond these are skipped.
    topics: TopicLimits,
    slots: Mutex<HashMap<Arc<str>, Slot>>,
    next_key: AtomicU64,
    next_conn: AtomicU64,
    /// Told the client id of every session that expires (the plugins' events hook).
    pub on_expired: std::sync::OnceLock<ExpiryListener>,
}

/// Called with the client id of a session that expired.
pub struct ExpiryListener(pub Box<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for ExpiryListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExpiryListener")
    }
}

impl Sessions {
    /// An empty registry delivering through `router`.
    pub fn new(
        router: Arc<Router>,
        limits: QueueLimits,
        store: Option<Arc<Store>>,
        topics: TopicLimits,
    ) -> Sessions {
        Sessions {
            router,
            limits,
            store,
            topics,
            slots: Mutex::new(HashMap::new()),
            next_key: AtomicU64::new(1),
            next_conn: AtomicU64::new(1),
            on_expired: std::sync::OnceLock::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, Slot>> {
        // Each critical section below is a handful of map operations without panicking
        // points, so a poisoned lock still guards a consistent map.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_state(&self, client_id: Arc<str>, expiry: u32) -> SessionState {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        SessionState {
            client_id,
            key,
            mailbox: Arc::new(self.mailbox(key)),
            subscriptions: HashMap::new(),
            inflight: VecDeque::new(),
            next_id: PacketId::FIRST,
            inbound_qos2: HashSet::new(),
            expiry,
            principal: None,
        }
    }

    fn mailbox(&self, key: ClientKey) -> Mailbox {
        match &self.store {
            Some(store) => Mailbox::with_store(self.limits, store.clone(), key),
            None => Mailbox::new(self.limits),
        }
    }

    /// Writes the session record of a persistent session; returns the store ticket.
    /// `disconnected_at` is 0 while a connection holds the session.
    pub fn save(
        &self,
        state: &SessionState,
        disconnected_at: u64,
        will: Option<&PendingWill>,
    ) -> Option<u64> {
        let (store, key) = state.mailbox.store()?;
        let rec = SessionRecord {
            key,
            expiry: state.expiry,
            disconnected_at,
            next_id: state.next_id.get(),
            will: will.map(|w| w.will.clone()),
            principal: (state.principal.as_ref())
                .map(|p| (p.user.as_deref().map(str::to_owned), p.listener.to_string())),
        };
        match record::encode_session(&rec) {
            Ok(bytes) => store.submit_one(Op::PutSession(state.client_id.clone(), bytes)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot store a session");
                None
            }
        }
    }

    /// Writes (`Some`) or removes (`None`) one subscription of a persistent session;
    /// returns the store ticket.
    pub fn save_subscription(
        &self,
        state: &SessionState,
        filter: &TopicFilter,
        sub: Option<Subscription>,
    ) -> Option<u64> {
        let (store, key) = state.mailbox.store()?;
        let filter: Arc<str> = Arc::from(filter.as_str());
        store.submit_one(match sub {
            Some(s) => {
                Op::PutSubscription(key, filter, record::encode_subscription(s.options, s.id))
            }
            None => Op::DeleteSubscription(key, filter),
        })
    }

    /// Rebuilds the sessions read from the store at start: subscriptions go back into the
    /// router, queued and in-flight messages into the session. Sessions that expired while
    /// the broker was down are ended (publishing their pending will).
    pub fn restore(self: &Arc<Self>, recovered: &mut Recovered) -> Result<usize, RecordError> {
        let now_ms = record::unix_ms_now();
        let mut restored = 0;
        let sessions = std::mem::take(&mut recovered.sessions);
        for (client_id, bytes) in sessions {
            let (rec, _) = record::decode_session(&bytes)?;
            let client_id: Arc<str> = Arc::from(client_id.as_str());
            self.next_key.fetch_max(rec.key + 1, Ordering::Relaxed);
            let mailbox = Arc::new(self.mailbox(rec.key));
            mailbox.set_persistent(true);
            let mut state = SessionState {
                client_id: client_id.clone(),
                key: rec.key,
                mailbox,
                subscriptions: HashMap::new(),
                inflight: VecDeque::new(),
                next_id: PacketId::new(rec.next_id).unwrap_or(PacketId::FIRST),
                inbound_qos2: HashSet::new(),
                expiry: rec.expiry,
                principal: rec.principal.map(|(user, listener)| Principal {
                    user: user.map(Arc::from),
                    listener: Arc::from(listener),
                }),
            };
            let sub = state.subscriber();
            let rows = recovered.subscriptions.remove(&rec.key).unwrap_or_default();
            for (filter, bytes) in rows {
                let (filter, options, id) = record::decode_subscription(&filter, &bytes)?;
                if !self.topics.fits(filter.as_str()) {
                    tracing::warn!(client_id = %client_id, filter_len = filter.as_str().len(),
                        "stored subscription over max_topic_length or max_topic_levels: skipped");
                    continue;
                }
                self.router.subscribe(&sub, &filter, options, id);
                state
                    .subscriptions
                    .insert(filter, Subscription { options, id });
            }
            let summary = recovered.queues.remove(&rec.key).unwrap_or_default();
            for (id, bytes) in summary.inflight {
                let q = record::decode_queued(&bytes, id)?;
                if let Some((pid, stage)) = q.inflight {
                    state.inflight.push_back(Inflight {
                        id: pid,
                        delivery: q.delivery,
                        stage,
                    });
                }
            }
            state.mailbox.restore_disk(
                summary.queued,
                summary.after,
                summary.bytes,
                summary.max_id + 1,
            );
            for id in recovered.qos2_in.remove(&rec.key).unwrap_or_default() {
                if let Some(id) = PacketId::new(id) {
                    state.inbound_qos2.insert(id);
                }
            }
            let will = rec.will.and_then(|will| {
                if self.topics.fits(will.topic.as_str()) {
                    return Some(PendingWill {
                        will,
                        origin: rec.key,
                    });
                }
                tracing::warn!(client_id = %client_id,
                    "stored will over max_topic_length or max_topic_levels: dropped");
                None
            });
            // A session that was connected when the broker stopped counts as disconnected
            // now.
            let since = if rec.disconnected_at == 0 {
                0
            } else {
                now_ms.saturating_sub(rec.disconnected_at)
            };
            let elapsed = Duration::from_millis(since);
            let expiry = rec.expiry;
            let expires_in = (expiry != NEVER_EXPIRES)
                .then(|| Duration::from_secs(u64::from(expiry)).saturating_sub(elapsed));
            if expires_in == Some(Duration::ZERO) {
                tracing::info!(client_id = %client_id, "session expired while the broker was down");
                self.end_with_will(state, will);
                continue;
            }
            let will_in = will.as_ref().map(|w| {
                Duration::from_secs(u64::from(w.delay().min(expiry))).saturating_sub(elapsed)
            });
            if rec.disconnected_at == 0 {
                self.save(&state, now_ms, will.as_ref());
            }
            let generation = self.next_conn.fetch_add(1, Ordering::Relaxed);
            let timer = self.spawn_timers(client_id.clone(), generation, will_in, expires_in);
            self.lock().insert(
                client_id,
                Slot::Detached(Box::new(Detached {
                    state,
                    will,
                    generation,
                    timer,
                })),
            );
            restored += 1;
        }
        Ok(restored)
    }

    fn spawn_timers(
        self: &Arc<Self>,
        client_id: Arc<str>,
        generation: u64,
        will_in: Option<Duration>,
        expires_in: Option<Duration>,
    ) -> Option<AbortHandle> {
        if will_in.is_none() && expires_in.is_none() {
            return None;
        }
        let me = Arc::clone(self);
        Some(
            tokio::spawn(async move {
                me.run_timers(client_id, generation, will_in, expires_in)
                    .await
            })
            .abort_handle(),
        )
    }

    /// Number of sessions, connected or not.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when there are no sessions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Attaches a new connection to the session of `client_id`, taking it over from a
    /// connection that holds it (MQTT-3.1.4-3). With `clean_start` any existing session is
    /// ended first; otherwise it is resumed. Refused when yet another connection with the
    /// same client id took over while this one was waiting for the session (the newest
    /// connection gets the session, this one nothing: it is closed before CONNACK), or when
    /// the session belongs to another principal and `policy` refuses that (nothing of the
    /// owner's is touched).
    pub async fn attach(
        &self,
        client_id: Arc<str>,
        clean_start: bool,
        expiry: u32,
        principal: Principal,
        policy: PrincipalPolicy,
    ) -> Result<Attachment, AttachRefused> {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (kick_tx, mut kick_rx) = oneshot::channel();
        let mut clean_start = clean_start;
        let attached = |handover| {
            Slot::Attached(Attached {
                conn,
                kick: Some(kick_tx),
                handover,
                principal: principal.clone(),
            })
        };
        let (found, waiting) = {
            let mut slots = self.lock();
            let owner = match slots.get(&client_id) {
                Some(Slot::Attached(a)) => Some(&a.principal),
                Some(Slot::Detached(d)) => d.state.principal.as_ref(),
                None => None,
            };
            if owner.is_some_and(|o| !o.same_as(&principal)) {
                match policy {
                    PrincipalPolicy::Refuse => return Err(AttachRefused::OtherPrincipal),
                    PrincipalPolicy::Fresh => clean_start = true,
                    PrincipalPolicy::Allow => {}
                }
            }
            match slots.remove(&client_id) {
                Some(Slot::Attached(mut old)) => {
                    if let Some(k) = old.kick.take() {
                        let _ = k.send(Kick::TakenOver);
                    }
                    let (tx, rx) = oneshot::channel();
                    slots.insert(client_id.clone(), attached(Some(tx)));
                    (None, Some(rx))
                }
                Some(Slot::Detached(d)) => {
                    if let Some(t) = &d.timer {
                        t.abort();
                    }
                    slots.insert(client_id.clone(), attached(None));
                    (Some((d.state, d.will)), None)
                }
                None => {
                    slots.insert(client_id.clone(), attached(None));
                    (None, None)
                }
            }
        };
        let found = match waiting {
            Some(rx) => match tokio::time::timeout(HANDOVER_TIMEOUT, rx).await {
                Ok(Ok(h)) => h,
                // Our slot was replaced (its handover sender dropped with it) by a newer
                // connection, which the previous one hands the session to.
                Ok(Err(_)) if kick_rx.try_recv().is_ok() => {
                    tracing::info!(client_id = %client_id, "taken over by a newer connection before CONNACK");
                    return Err(AttachRefused::Displaced);
                }
                _ => {
                    tracing::warn!(client_id = %client_id, "previous connection did not hand its session over; starting a new one");
                    None
                }
            },
            None => found,
        };
        let (mut state, present) = match found {
            Some((state, _will)) if !clean_start => {
                // Reconnected before the will delay passed: the will is not sent
                // (MQTT 5 §3.1.3.2.2).
                (state, true)
            }
            Some((state, will)) => {
                if let Some(w) = will {
                    self.publish_will(w);
                }
                self.end(state);
                (self.new_state(client_id, expiry), false)
            }
            None => (self.new_state(client_id, expiry), false),
        };
        state.expiry = expiry;
        state.principal = Some(principal.clone());
        // A session resumed with expiry 0 is resumed whole (MQTT 5 §3.1.2.11.2: the new
        // interval only decides what happens when this connection ends): its queue may
        // still be on disk, so it stays in the store until the connection ends, and its
        // record says 0 so that a restart in between ends it too.
        let mut ticket = None;
        if expiry > 0 || state.mailbox.is_persistent() {
            state.mailbox.set_persistent(true);
            ticket = self.save(&state, 0, None);
        }
        state.mailbox.set_online(true);
        Ok(Attachment {
            state,
            present,
            kick: kick_rx,
            conn,
            ticket,
        })
    }

    /// Takes back the session of a connection that ended. Publishes the will now if its delay
    /// is 0 or the session ends now; otherwise keeps it pending with the session. Moves
    /// unacknowledged shared-subscription messages to other members of their group.
    pub fn detach(self: &Arc<Self>, conn: u64, mut state: SessionState, will: Option<PendingWill>) {
        state.mailbox.set_online(false);
        self.redistribute_shared(&mut state, false);
        state.mailbox.spill();
        let will = match will {
            Some(w) if w.delay() == 0 || state.expiry == 0 => {
                self.publish_will(w);
                None
            }
            other => other,
        };
        let mut slots = self.lock();
        let MapEntry::Occupied(mut slot) = slots.entry(state.client_id.clone()) else {
            drop(slots);
            self.end_with_will(state, will);
            return;
        };
        let Slot::Attached(a) = slot.get_mut() else {
            drop(slots);
            self.end_with_will(state, will);
            return;
        };
        if a.conn != conn {
            // Taken over: hand the session to the new connection.
            match a.handover.take() {
                Some(tx) if state.expiry == 0 => {
                    // The session ended with its connection: nothing to resume.
                    drop(slots);
                    self.end_with_will(state, will);
                    let _ = tx.send(None);
                }
                Some(tx) => {
                    drop(slots);
                    if let Err(Some((state, will))) = tx.send(Some((state, will))) {
                        self.end_with_will(state, will);
                    }
                }
                None => {
                    drop(slots);
                    self.end_with_will(state, will);
                }
            }
            return;
        }
        if state.expiry == 0 {
            slot.remove();
            drop(slots);
            self.end(state);
            return;
        }
        let generation = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let expiry = state.expiry;
        let will_in = will
            .as_ref()
            .map(|w| Duration::from_secs(u64::from(w.delay().min(expiry))));
        let expires_in = (expiry != NEVER_EXPIRES).then(|| Duration::from_secs(u64::from(expiry)));
        self.save(&state, record::unix_ms_now(), will.as_ref());
        let timer = self.spawn_timers(state.client_id.clone(), generation, will_in, expires_in);
        slot.insert(Slot::Detached(Box::new(Detached {
            state,
            will,
            generation,
            timer,
        })));
    }

    async fn run_timers(
        self: Arc<Self>,
        client_id: Arc<str>,
        generation: u64,
        will_in: Option<Duration>,
        expires_in: Option<Duration>,
    ) {
        let start = tokio::time::Instant::now();
        if let Some(delay) = will_in {
            tokio::time::sleep_until(start + delay).await;
            let will = match self.lock().get_mut(&client_id) {
                Some(Slot::Detached(d)) if d.generation == generation => {
                    let w = d.will.take();
                    if w.is_some() {
                        self.save(&d.state, record::unix_ms_now(), None);
                    }
                    w
                }
                _ => return,
            };
            if let Some(w) = will {
                tracing::debug!(client_id = %client_id, "will delay passed: publishing will");
                self.publish_will(w);
            }
        }
        let Some(expires_in) = expires_in else {
            return;
        };
        tokio::time::sleep_until(start + expires_in).await;
        let state = {
            let mut slots = self.lock();
            match slots.get(&client_id) {
                Some(Slot::Detached(d)) if d.generation == generation => {}
                _ => return,
            }
            match slots.remove(&client_id) {
                Some(Slot::Detached(d)) => d.state,
                _ => return,
            }
        };
        tracing::info!(client_id = %client_id, "session expired");
        if let Some(l) = self.on_expired.get() {
            (l.0)(&client_id);
        }
        self.end(state);
    }

    /// Publishes a will (routed like any message; retained if it asks and there is room).
    fn publish_will(&self, w: PendingWill) {
        let msg = w.into_message();
        if self.router.route(&msg).not_retained {
            tracing::warn!(topic = %msg.topic, "retained store full: a will was routed, not retained");
        }
    }

    fn end_with_will(&self, state: SessionState, will: Option<PendingWill>) {
        if let Some(w) = will {
            self.publish_will(w);
        }
        self.end(state);
    }

    /// Ends a session: its subscriptions go, and its shared-subscription messages move to
    /// other members.
    fn end(&self, mut state: SessionState) {
        state.mailbox.set_online(false);
        self.redistribute_shared(&mut state, true);
        if let Some((store, key)) = state.mailbox.store() {
            store.submit_one(Op::DeleteSession(state.client_id.clone(), key));
        }
        state.mailbox.set_persistent(false);
        for filter in state.subscriptions.keys() {
            self.router.unsubscribe(state.key, filter);
        }
    }

    /// Moves QoS 1/2 messages received through shared subscriptions, not yet acknowledged,
    /// to another member of their group if one is connected (MQTT 5 §4.8.2).
    ///
    /// A QoS 2 message whose delivery has begun (PUBLISH sent) stays with the session while
    /// it exists, to be completed on reconnect (MQTT-4.8.2-4); it moves only when the
    /// session `ending`. Completed QoS 2 handshakes (PUBREC received) never move.
    fn redistribute_shared(&self, state: &mut SessionState, ending: bool) {
        let key = state.key;
        let mut keep = VecDeque::with_capacity(state.inflight.len());
        for f in state.inflight.drain(..) {
            let movable = match f.stage {
                Stage::AwaitAck => true,
                Stage::AwaitRec => ending,
                Stage::AwaitComp => false,
            };
            if f.delivery.shared.is_some() && movable {
                let mut d = f.delivery.clone();
                d.retain = false;
                if self.router.redeliver_shared(d, key).is_ok() {
                    state.mailbox.forget(&f.delivery);
                    continue;
                }
            }
            keep.push_back(f);
        }
        state.inflight = keep;
        if state.mailbox.is_empty() {
            return;
        }
        let moved = state.mailbox.extract(|d| d.shared.is_some());
        let mut back = Vec::new();
        for d in moved {
            let copy = d.store_id.map(|_| d.clone());
            match self.router.redeliver_shared(d, key) {
                Ok(()) => {
                    if let Some(c) = copy {
                        state.mailbox.forget(&c);
                    }
                }
                Err(mut d) => {
                    d.store_id = copy.and_then(|c| c.store_id);
                    back.push(d);
                }
            }
        }
        if !back.is_empty() {
            state.mailbox.unshift(back.into_iter());
        }
    }
}
