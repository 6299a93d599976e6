//! The registry of sessions: attaches sessions to connections, hands them over on
//! takeover, keeps detached ones until they expire (will delay and expiry timers), and
//! restores them from the store at start.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::AbortHandle;

use crate::codec::PacketId;
use crate::config::{PrincipalPolicy, TopicLimits};
use crate::mailbox::{Mailbox, QueueLimits, SharedLimits};
use crate::message::{ClientId, ClientKey, Draft, Stage};
use crate::pipeline::{Origin, Pipeline};
use crate::plugins::ClientInfo;
use crate::store::record::{self, RecordError};
use crate::store::{Recovered, Store};

use super::ending::{self, Fate, WillAt};
use super::moving::{Elsewhere, Found, Moved, Wanted};
use super::{
    AttachRefused, ClientView, Flows, Inflight, Kick, PendingWill, Presence, Principal,
    SessionState, SessionView, Subscription,
};
use crate::mailbox::Inspection;

/// How long a new connection waits for the connection it takes over to hand its session
/// back.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// The result of attaching a connection to a session.
#[derive(Debug)]
pub struct Attachment {
    /// The session, now owned by the connection.
    pub state: SessionState,
    /// Whether an existing session was resumed (CONNACK Session Present).
    pub present: bool,
    /// Fires when the registry wanted this connection closed before it had its session
    /// (later kicks come through the session's mailbox, [`Mailbox::kicked`]).
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
    /// The channels a connection needs only while it connects or takes over (`None` once
    /// both are gone: every idle client keeps a slot, and a channel's sender is 16 bytes).
    waits: Option<Box<Waits>>,
    principal: Arc<Principal>,
    presence: Presence,
    /// The session's queue and expiry, once the connection has its session.
    session: Option<(Arc<Mailbox>, u32)>,
}

/// A slot's channels to its connection while it connects or takes over.
#[derive(Debug)]
struct Waits {
    /// A kick before the connection has its session (later ones go through its mailbox).
    kick: Option<oneshot::Sender<Kick>>,
    /// Where the connection this one took over hands the session.
    handover: Option<oneshot::Sender<Handover>>,
}

impl Waits {
    /// The channels, boxed, unless there are none.
    fn boxed(
        kick: Option<oneshot::Sender<Kick>>,
        handover: Option<oneshot::Sender<Handover>>,
    ) -> Option<Box<Waits>> {
        (kick.is_some() || handover.is_some()).then(|| Box::new(Waits { kick, handover }))
    }
}

impl Attached {
    /// Takes the kick channel, if the connection still has one.
    fn take_kick(&mut self) -> Option<oneshot::Sender<Kick>> {
        let kick = self.waits.as_mut()?.kick.take();
        self.tidy_waits();
        kick
    }

    /// Takes the handover channel, if the slot has one.
    fn take_handover(&mut self) -> Option<oneshot::Sender<Handover>> {
        let handover = self.waits.as_mut()?.handover.take();
        self.tidy_waits();
        handover
    }

    /// Drops the channels' box once both are gone.
    fn tidy_waits(&mut self) {
        if (self.waits.as_ref()).is_some_and(|w| w.kick.is_none() && w.handover.is_none()) {
            self.waits = None;
        }
    }

    /// Tells the connection to close, and wakes it: through the session's mailbox once
    /// the connection has its session (an idle connection waits on its mailbox, or is
    /// parked without a task, `connection::park`); before, through the kick channel,
    /// which the connection reads once when it has its session.
    fn kick(&mut self, why: Kick) {
        let channel = self.take_kick();
        match (&self.session, channel) {
            (Some((mailbox, _)), _) => mailbox.kick(why),
            (None, Some(k)) => {
                let _ = k.send(why);
            }
            (None, None) => {}
        }
    }
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
    /// Boxed, as `Detached` is: the map keeps one entry per client, and a table is rarely
    /// more than 7/8 full, so every inline byte costs a connection more than a byte.
    Attached(Box<Attached>),
    Detached(Box<Detached>),
}

/// The registry of sessions by client identifier.
#[derive(Debug)]
pub struct Sessions {
    /// Wills enter the broker here; subscriptions go to its router.
    pipeline: Arc<Pipeline>,
    limits: Arc<SharedLimits>,
    store: Option<Arc<Store>>,
    /// Subscriptions read back from the store beyond these are skipped.
    topics: TopicLimits,
    slots: Mutex<HashMap<ClientId, Slot>>,
    next_key: AtomicU64,
    next_conn: AtomicU64,
    /// Told the client id of every session that expires (the plugins' events hook).
    pub on_expired: std::sync::OnceLock<ExpiryListener>,
    /// Told of every connection attached, with when it connected (the cluster tells the
    /// other nodes, which disconnect an older connection with the same client id).
    pub on_attached: std::sync::OnceLock<AttachListener>,
    /// The other nodes of a cluster: a connection whose session is not here asks them.
    pub elsewhere: std::sync::OnceLock<Arc<dyn Elsewhere>>,
}

/// What this node answers another that asks for a session ([`Sessions::give`]).
#[derive(Debug)]
pub enum Given {
    /// No session here (or it ended here: Clean Start).
    Nothing,
    /// It belongs to another principal and the asker's policy refuses.
    Refused,
    /// The session's bytes ([`Moved::encode`]), and what [`Sessions::settle`] needs once
    /// the asker said whether it holds it.
    Session(Vec<u8>, Box<Handback>),
}

/// A session given to another node, kept until that node holds it.
#[derive(Debug)]
pub struct Handback {
    state: SessionState,
    will: Option<PendingWill>,
    inflight: Vec<Inflight>,
    queued: Vec<crate::message::Delivery>,
}

/// How long a session's queue may take to be read for another node (entries still being
/// committed).
const GIVE_READ_TRIES: usize = 200;

/// A session that moved to another node, still in this node's router: what reaches it is
/// taken ([`Leaving::take_queued`]) and sent after it, until it stops being routed to and
/// is forgotten.
#[derive(Debug)]
pub struct Leaving {
    sessions: Arc<Sessions>,
    state: SessionState,
}

impl Leaving {
    /// The client id.
    pub fn client_id(&self) -> &ClientId {
        &self.state.client_id
    }

    /// Takes what was queued for the session since it was given (from disk too).
    pub async fn take_queued(&self) -> Vec<crate::message::Delivery> {
        let mut out = VecDeque::new();
        for _ in 0..GIVE_READ_TRIES {
            if self.state.mailbox.drain(&mut out, usize::MAX, usize::MAX) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        out.into()
    }

    /// Takes the session's subscriptions out of the router: nothing more reaches it here.
    pub fn stop_routing(&self) {
        for filter in self.state.subscriptions.keys() {
            (self.sessions.pipeline.router()).unsubscribe(self.state.key, filter);
        }
    }

    /// Forgets the session: deletes it from the store.
    pub fn forget(self) {
        let state = self.state;
        state.mailbox.set_online(false);
        if let Some((store, key)) = state.mailbox.store() {
            store.delete_session(&state.client_id, key);
        }
        state.mailbox.set_persistent(false);
    }
}

/// Called with the client id of a connection attached and when it connected (Unix ms).
pub struct AttachListener(pub Box<OnAttached>);

/// See [`AttachListener`].
pub type OnAttached = dyn Fn(&ClientId, u64) + Send + Sync;

impl std::fmt::Debug for AttachListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AttachListener")
    }
}

/// What the admin API shows of a slot with a connection.
fn client_view(id: &ClientId, slot: &Slot) -> Option<ClientView> {
    let Slot::Attached(a) = slot else { return None };
    Some(ClientView {
        client_id: id.clone(),
        principal: (*a.principal).clone(),
        presence: a.presence.clone(),
        expiry: a.session.as_ref().map_or(0, |s| s.1),
        queued: a.session.as_ref().map_or(0, |s| s.0.len()),
    })
}

/// Called with the client id of a session that expired.
pub struct ExpiryListener(pub Box<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for ExpiryListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExpiryListener")
    }
}

impl Sessions {
    /// An empty registry subscribing through `pipeline`'s router and publishing wills
    /// through `pipeline`.
    pub fn new(
        pipeline: Arc<Pipeline>,
        limits: QueueLimits,
        store: Option<Arc<Store>>,
        topics: TopicLimits,
    ) -> Sessions {
        Sessions {
            pipeline,
            limits: SharedLimits::with_store(limits, store.clone()),
            store,
            topics,
            slots: Mutex::new(HashMap::new()),
            next_key: AtomicU64::new(1),
            next_conn: AtomicU64::new(1),
            on_expired: std::sync::OnceLock::new(),
            on_attached: std::sync::OnceLock::new(),
            elsewhere: std::sync::OnceLock::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<ClientId, Slot>> {
        // Each critical section below is a handful of map operations without panicking
        // points, so a poisoned lock still guards a consistent map.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_state(&self, client_id: ClientId, expiry: u32) -> SessionState {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        SessionState {
            client_id,
            key,
            mailbox: Arc::new(self.mailbox(key)),
            subscriptions: Default::default(),
            flows: Flows::default(),
            expiry,
            principal: None,
        }
    }

    fn mailbox(&self, key: ClientKey) -> Mailbox {
        Mailbox::with_key(self.limits.clone(), key)
    }

    /// Rebuilds the sessions read from the store at start: subscriptions go back into the
    /// router, queued and in-flight messages into the session. Sessions that expired while
    /// the broker was down are ended (publishing their pending will).
    pub fn restore(self: &Arc<Self>, recovered: &mut Recovered) -> Result<usize, RecordError> {
        let now_ms = record::unix_ms_now();
        let mut restored = 0;
        for (client_id, rec) in recovered.take_sessions()? {
            self.next_key.fetch_max(rec.key + 1, Ordering::Relaxed);
            let mailbox = Arc::new(self.mailbox(rec.key));
            mailbox.set_persistent(true);
            let mut state = SessionState {
                client_id: client_id.clone(),
                key: rec.key,
                mailbox,
                subscriptions: Default::default(),
                flows: Flows::new(PacketId::new(rec.next_id).unwrap_or(PacketId::FIRST)),
                expiry: rec.expiry,
                principal: rec.principal.map(|(user, listener)| {
                    Arc::new(Principal {
                        user: user.map(Arc::from),
                        listener: Arc::from(listener),
                    })
                }),
            };
            let sub = state.subscriber();
            for (filter, options, id) in recovered.take_subscriptions(rec.key)? {
                if !self.topics.fits(filter.as_str()) {
                    tracing::warn!(client_id = %client_id, filter_len = filter.as_str().len(),
                        "stored subscription over max_topic_length or max_topic_levels: skipped");
                    continue;
                }
                self.pipeline.router().subscribe(&sub, &filter, options, id);
                state
                    .subscriptions
                    .insert(filter, Subscription { options, id });
            }
            let queue = recovered.take_queue(rec.key)?;
            for q in queue.inflight {
                if let Some((pid, stage)) = q.inflight {
                    state.flows.restore([Inflight {
                        id: pid,
                        delivery: q.delivery,
                        stage,
                    }]);
                }
            }
            (state.mailbox).restore_disk(queue.queued, queue.after, queue.bytes, queue.next_id);
            for id in recovered.take_qos2_received(rec.key) {
                state.flows.restore_received(id);
            }
            let will = rec.will.and_then(|will| {
                if self.topics.fits(will.topic.as_str()) {
                    let principal = state.principal.clone().unwrap_or_else(|| {
                        Arc::new(Principal {
                            user: None,
                            listener: "".into(),
                        })
                    });
                    return Some(PendingWill {
                        will,
                        origin: rec.key,
                        client: ClientInfo {
                            client_id: client_id.clone(),
                            principal,
                            attributes: Box::default(),
                        },
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
            let delay = will.as_ref().map(PendingWill::delay);
            let (will_in, expires_in) = match ending::after_disconnect(rec.expiry, delay, elapsed) {
                Fate::EndsNow => {
                    tracing::info!(client_id = %client_id, "session expired while the broker was down");
                    self.end_with_will(state, will);
                    continue;
                }
                // A will due now goes out from its timer, once every session is back in the
                // router.
                Fate::Kept { will, expires_in } => (will.in_from_now(), expires_in),
            };
            if rec.disconnected_at == 0 {
                state.save(now_ms, will.as_ref());
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
        client_id: ClientId,
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

    /// Sessions with a connection and sessions without one, for metrics.
    pub fn counts(&self) -> (usize, usize) {
        let slots = self.lock();
        let online = (slots.values())
            .filter(|s| matches!(s, Slot::Attached(_)))
            .count();
        (online, slots.len() - online)
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
        client_id: ClientId,
        clean_start: bool,
        expiry: u32,
        principal: Arc<Principal>,
        policy: PrincipalPolicy,
        presence: Presence,
    ) -> Result<Attachment, AttachRefused> {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (kick_tx, mut kick_rx) = oneshot::channel();
        let mut clean_start = clean_start;
        let attached = |handover| {
            Slot::Attached(Box::new(Attached {
                conn,
                waits: Waits::boxed(Some(kick_tx), handover),
                principal: principal.clone(),
                presence: presence.clone(),
                session: None,
            }))
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
                    old.kick(Kick::TakenOver);
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
            None => match self.elsewhere.get() {
                // Not here: maybe on another node of the cluster, which gives it up (or,
                // with Clean Start, ends it).
                Some(e) if found.is_none() => {
                    let wanted = Wanted {
                        client_id: client_id.clone(),
                        clean: clean_start,
                        principal: (*principal).clone(),
                        policy,
                        since_ms: presence.since_ms,
                        ties: false,
                    };
                    match e.take(wanted).await {
                        Found::Nothing => None,
                        Found::Refused => {
                            let mut slots = self.lock();
                            if let Some(Slot::Attached(a)) = slots.get(&client_id)
                                && a.conn == conn
                            {
                                slots.remove(&client_id);
                            }
                            return Err(AttachRefused::OtherPrincipal);
                        }
                        Found::Session(moved, held) => {
                            let (state, durable) = self.adopt(client_id.clone(), moved).await;
                            // Not on disk in time: the giving node keeps its copy too.
                            if durable {
                                held();
                            }
                            Some((state, None))
                        }
                    }
                }
                _ => found,
            },
        };
        let (mut state, present) = match found {
            Some((state, _will)) if !ending::will_on_connect(clean_start) => {
                // Reconnected before the will delay passed: the will is not sent.
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
            ticket = state.save(0, None);
        }
        state.mailbox.set_online(true);
        if let Some(Slot::Attached(a)) = self.lock().get_mut(&state.client_id)
            && a.conn == conn
        {
            // From here on kicks go through the mailbox; one meant for the connection that
            // served the session before is forgotten.
            state.mailbox.clear_kick();
            a.session = Some((state.mailbox.clone(), expiry));
            drop(a.take_kick());
        }
        if let Some(l) = self.on_attached.get() {
            (l.0)(&state.client_id, presence.since_ms);
        }
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
        let fate = ending::after_disconnect(
            state.expiry,
            will.as_ref().map(PendingWill::delay),
            Duration::ZERO,
        );
        let will = match (fate, will) {
            (
                Fate::EndsNow
                | Fate::Kept {
                    will: WillAt::Now, ..
                },
                Some(w),
            ) => {
                self.publish_will(w);
                None
            }
            (_, other) => other,
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
            match a.take_handover() {
                Some(tx) if fate == Fate::EndsNow => {
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
        let Fate::Kept {
            will: will_at,
            expires_in,
        } = fate
        else {
            slot.remove();
            drop(slots);
            self.end(state);
            return;
        };
        let generation = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let will_in = will.as_ref().and_then(|_| will_at.in_from_now());
        state.save(record::unix_ms_now(), will.as_ref());
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
        client_id: ClientId,
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
                        d.state.save(record::unix_ms_now(), None);
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
    /// Publishes a will through the pipeline, like any message (transforms, sinks).
    /// Puts new queue limits in force for every session (a configuration reload).
    pub fn set_queue_limits(&self, limits: QueueLimits) {
        self.limits.set(limits);
    }

    /// The connected clients, for the admin API.
    pub fn clients(&self) -> Vec<ClientView> {
        let slots = self.lock();
        (slots.iter())
            .filter_map(|(id, slot)| client_view(id, slot))
            .collect()
    }

    /// The connected client `client_id`, if there is one.
    pub fn client(&self, client_id: &ClientId) -> Option<ClientView> {
        let slots = self.lock();
        slots
            .get(client_id)
            .and_then(|slot| client_view(client_id, slot))
    }

    /// Every session, connected or not, for the admin API.
    pub fn sessions(&self) -> Vec<SessionView> {
        let slots = self.lock();
        let mut out = Vec::with_capacity(slots.len());
        for (id, slot) in slots.iter() {
            out.push(match slot {
                Slot::Attached(a) => SessionView {
                    client_id: id.clone(),
                    online: true,
                    expiry: a.session.as_ref().map_or(0, |s| s.1),
                    principal: Some((*a.principal).clone()),
                    subscriptions: None,
                    queued: a.session.as_ref().map_or(0, |s| s.0.len()),
                },
                Slot::Detached(d) => SessionView {
                    client_id: id.clone(),
                    online: false,
                    expiry: d.state.expiry,
                    principal: d.state.principal.as_deref().cloned(),
                    subscriptions: Some(
                        (d.state.subscriptions.iter())
                            .map(|(f, s)| (f.clone(), *s))
                            .collect(),
                    ),
                    queued: d.state.mailbox.len(),
                },
            });
        }
        out
    }

    /// Asks the connection of `client_id` for its subscriptions and messages in flight;
    /// `None` when no such client is connected or it does not answer within 2 s.
    pub async fn inspect(&self, client_id: &ClientId) -> Option<Inspection> {
        let mailbox = match self.lock().get(client_id) {
            Some(Slot::Attached(a)) => a.session.as_ref().map(|s| s.0.clone())?,
            _ => return None,
        };
        let (tx, rx) = oneshot::channel();
        mailbox.ask(tx);
        tokio::time::timeout(Duration::from_secs(2), rx)
            .await
            .ok()?
            .ok()
    }

    /// Disconnects the client `client_id` if it connected before `since_ms` (Unix ms; at
    /// the same millisecond when `ties` says so): a connection with its client id was
    /// attached on another node of the cluster (MQTT 5: DISCONNECT 0x8E Session taken
    /// over). Its session stays here, detached, as after any disconnection. True if it
    /// was disconnected.
    pub fn taken_over_elsewhere(&self, client_id: &ClientId, since_ms: u64, ties: bool) -> bool {
        let mut slots = self.lock();
        let Some(Slot::Attached(a)) = slots.get_mut(client_id) else {
            return false;
        };
        let here = a.presence.since_ms;
        if here > since_ms || (here == since_ms && !ties) {
            return false;
        }
        a.kick(Kick::TakenOver);
        true
    }

    /// Disconnects the client `client_id` (MQTT 5: DISCONNECT 0x98 Administrative action).
    /// False when no such client is connected.
    pub fn kick(&self, client_id: &ClientId) -> bool {
        let mut slots = self.lock();
        let Some(Slot::Attached(a)) = slots.get_mut(client_id) else {
            return false;
        };
        a.kick(Kick::Admin);
        true
    }

    /// Discards the session of `client_id` with its subscriptions and queue, without its
    /// will; a connected client is disconnected first (0x98). False when there is no such
    /// session.
    pub async fn discard(&self, client_id: &ClientId) -> bool {
        let deadline = tokio::time::Instant::now() + HANDOVER_TIMEOUT;
        let mut kicked = false;
        loop {
            {
                let mut slots = self.lock();
                match slots.get_mut(client_id) {
                    None => return kicked,
                    Some(Slot::Detached(_)) => {
                        if let Some(Slot::Detached(d)) = slots.remove(client_id) {
                            drop(slots);
                            if let Some(t) = &d.timer {
                                t.abort();
                            }
                            tracing::info!(client_id = %client_id, "session discarded");
                            self.end(d.state);
                        }
                        return true;
                    }
                    Some(Slot::Attached(a)) => {
                        a.kick(Kick::Admin);
                        kicked = true;
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(client_id = %client_id, "session not discarded: its connection did not end");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Makes a session moved from another node this node's: its subscriptions go into the
    /// router, its messages into its queue (on disk), everything into the store, whose
    /// commit this waits for (the giving node forgets the session once told).
    async fn adopt(&self, client_id: ClientId, moved: Moved) -> (SessionState, bool) {
        let mut state = self.new_state(client_id, moved.expiry);
        state.flows = Flows::new(PacketId::new(moved.next_id).unwrap_or(PacketId::FIRST));
        state.principal = moved.principal.map(Arc::new);
        state.mailbox.set_persistent(true);
        let mut ticket = None;
        for f in moved.inflight {
            let mut d = f.delivery;
            d.store_id = state.mailbox.take_store_id();
            if let (Some(sid), Some((store, key))) = (d.store_id, state.mailbox.store())
                && let Ok(t) = store.queue_put(key, sid, &d, Some((f.id, f.stage)))
            {
                ticket = ticket.max(t);
            }
            state.flows.restore([Inflight {
                id: f.id,
                delivery: d,
                stage: f.stage,
            }]);
        }
        let mut dropped = 0;
        for d in moved.queued {
            match state.mailbox.push(d) {
                Ok(p) => ticket = ticket.max(p.ticket),
                Err(_) => dropped += 1,
            }
        }
        if dropped > 0 {
            tracing::warn!(client_id = %state.client_id, dropped,
                "messages of a session moved from another node dropped: over this node's queue limits");
        }
        for id in moved.qos2_received {
            state.flows.restore_received(id);
            if let Some((store, key)) = state.mailbox.store() {
                ticket = ticket.max(store.qos2_received(key, id));
            }
        }
        // Subscribed last: what is routed from now on comes after what was queued.
        let sub = state.subscriber();
        for (filter, options, id) in moved.subscriptions {
            if !self.topics.fits(filter.as_str()) {
                tracing::warn!(client_id = %state.client_id,
                    "moved subscription over max_topic_length or max_topic_levels: skipped");
                continue;
            }
            self.pipeline.router().subscribe(&sub, &filter, options, id);
            let s = Subscription { options, id };
            ticket = ticket.max(state.save_subscription(&filter, Some(s)));
            state.subscriptions.insert(filter, s);
        }
        ticket = ticket.max(state.save(record::unix_ms_now(), None));
        let mut durable = true;
        if let (Some(t), Some(store)) = (ticket, &self.store) {
            let mut committed = store.committed();
            let written = committed.wait_for(|c| *c >= t);
            if !matches!(
                tokio::time::timeout(HANDOVER_TIMEOUT, written).await,
                Ok(Ok(_))
            ) {
                tracing::warn!(client_id = %state.client_id,
                    "a session moved from another node is not on disk yet: the other node keeps its copy");
                durable = false;
            }
        }
        tracing::info!(client_id = %state.client_id, queued = state.mailbox.len(),
            inflight = state.flows.in_flight(), "session moved here from another node");
        (state, durable)
    }

    /// A delivery for the session of `client_id`, which moved here: what reached it on the
    /// node it left meanwhile. Returns the store ticket that makes it durable.
    pub fn deliver_moved(&self, client_id: &ClientId, d: crate::message::Delivery) -> Option<u64> {
        let mailbox = match self.lock().get(client_id) {
            Some(Slot::Attached(a)) => a.session.as_ref().map(|s| s.0.clone()),
            Some(Slot::Detached(d)) => Some(d.state.mailbox.clone()),
            None => None,
        };
        let Some(mailbox) = mailbox else {
            tracing::warn!(client_id = %client_id,
                "a message that reached a session on the node it left is dropped: the session is not here");
            return None;
        };
        match mailbox.push(d) {
            Ok(p) => p.ticket,
            Err(_) => {
                tracing::warn!(client_id = %client_id,
                    "a message that reached a session on the node it left is dropped: its queue is full");
                None
            }
        }
    }

    /// Whether a session of `client_id` is here (connected or not).
    pub fn holds(&self, client_id: &ClientId) -> bool {
        self.lock().contains_key(client_id)
    }

    /// Another node asks for `wanted`'s session: closes its connection here (MQTT 5:
    /// 0x8E) and gives the session up, or with Clean Start ends it here (its will, if any,
    /// goes out). Refused when the session belongs to another principal and the asker's
    /// policy says so. A given session stays here until [`Sessions::settle`].
    pub async fn give(self: &Arc<Self>, wanted: Wanted) -> Given {
        let client_id = wanted.client_id;
        let mut clean = wanted.clean;
        let taken = {
            let mut slots = self.lock();
            let owner = match slots.get(&client_id) {
                Some(Slot::Attached(a)) => Some(&a.principal),
                Some(Slot::Detached(d)) => d.state.principal.as_ref(),
                None => return Given::Nothing,
            };
            if owner.is_some_and(|o| !o.same_as(&wanted.principal)) {
                match wanted.policy {
                    PrincipalPolicy::Refuse => return Given::Refused,
                    PrincipalPolicy::Fresh => clean = true,
                    PrincipalPolicy::Allow => {}
                }
            }
            if let Some(Slot::Attached(a)) = slots.get(&client_id) {
                let here = a.presence.since_ms;
                if here > wanted.since_ms || (here == wanted.since_ms && !wanted.ties) {
                    // The connection here is the newer one: it keeps the session.
                    return Given::Nothing;
                }
            }
            match slots.remove(&client_id) {
                Some(Slot::Attached(mut old)) => {
                    old.kick(Kick::TakenOver);
                    tracing::info!(client_id = %client_id,
                        "client connected to another node: its connection here is closed (0x8E)");
                    // A stand-in the old connection hands its session to when it ends.
                    let (tx, rx) = oneshot::channel();
                    let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
                    slots.insert(
                        client_id.clone(),
                        Slot::Attached(Box::new(Attached {
                            conn,
                            waits: Waits::boxed(None, Some(tx)),
                            principal: old.principal.clone(),
                            presence: old.presence.clone(),
                            session: None,
                        })),
                    );
                    Err((rx, conn))
                }
                Some(Slot::Detached(d)) => {
                    if let Some(t) = &d.timer {
                        t.abort();
                    }
                    Ok(Some((d.state, d.will)))
                }
                None => return Given::Nothing,
            }
        };
        let handed = match taken {
            Ok(h) => h,
            Err((rx, conn)) => {
                let h = tokio::time::timeout(HANDOVER_TIMEOUT, rx).await;
                let mut slots = self.lock();
                if let Some(Slot::Attached(a)) = slots.get(&client_id)
                    && a.conn == conn
                {
                    slots.remove(&client_id);
                }
                drop(slots);
                match h {
                    Ok(Ok(h)) => h,
                    _ => {
                        tracing::warn!(client_id = %client_id,
                            "the connection here did not hand its session over for another node");
                        None
                    }
                }
            }
        };
        let Some((mut state, will)) = handed else {
            // It ended with its connection (expiry 0).
            return Given::Nothing;
        };
        if clean {
            let will = will.filter(|_| ending::will_on_connect(true));
            self.end_with_will(state, will);
            return Given::Nothing;
        }
        let mut queued = std::collections::VecDeque::new();
        for _ in 0..GIVE_READ_TRIES {
            if state.mailbox.drain(&mut queued, usize::MAX, usize::MAX) {
                break;
            }
            // Entries on disk not committed yet.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let inflight: Vec<Inflight> = state.flows.take_inflight().into();
        let queued: Vec<_> = queued.into();
        let moved = Moved {
            expiry: state.expiry,
            next_id: state.flows.next_id().get(),
            principal: state.principal.as_deref().cloned(),
            subscriptions: (state.subscriptions.iter())
                .map(|(f, s)| (f.clone(), s.options, s.id))
                .collect(),
            inflight: inflight.clone(),
            queued: queued.clone(),
            qos2_received: state.flows.received_ids().collect(),
        };
        let back = Handback {
            state,
            will,
            inflight,
            queued,
        };
        match moved.encode() {
            Ok(bytes) => Given::Session(bytes, Box::new(back)),
            Err(e) => {
                tracing::warn!(client_id = %back.state.client_id, error = %e,
                    "cannot move a session to another node; it stays here");
                self.keep(Box::new(back));
                Given::Nothing
            }
        }
    }

    /// A session given to another node, which holds it now: it leaves this node
    /// ([`Leaving`]: what still reaches it here goes after it, then it is forgotten).
    pub fn leave(self: &Arc<Self>, back: Box<Handback>) -> Leaving {
        tracing::info!(client_id = %back.state.client_id, "session moved to another node");
        Leaving {
            sessions: self.clone(),
            state: back.state,
        }
    }

    /// A session given to another node that did not say it holds it: kept here as it was,
    /// without a connection.
    pub fn keep(self: &Arc<Self>, back: Box<Handback>) {
        let Handback {
            mut state,
            will,
            inflight,
            queued,
        } = *back;
        state.flows.restore(inflight);
        state.mailbox.unshift(queued.into_iter());
        state.mailbox.spill();
        let fate = ending::after_disconnect(
            state.expiry,
            will.as_ref().map(PendingWill::delay),
            Duration::ZERO,
        );
        let Fate::Kept {
            will: will_at,
            expires_in,
        } = fate
        else {
            self.end_with_will(state, will);
            return;
        };
        let mut slots = self.lock();
        if slots.contains_key(&state.client_id) {
            // Connected here again meanwhile: that connection has a session of its own.
            drop(slots);
            self.end_with_will(state, will);
            return;
        }
        let generation = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let will_in = will.as_ref().and_then(|_| will_at.in_from_now());
        let timer = self.spawn_timers(state.client_id.clone(), generation, will_in, expires_in);
        slots.insert(
            state.client_id.clone(),
            Slot::Detached(Box::new(Detached {
                state,
                will,
                generation,
                timer,
            })),
        );
    }

    fn publish_will(&self, w: PendingWill) {
        let PendingWill {
            will,
            origin,
            client,
        } = w;
        let from = Origin::Will {
            session: origin,
            client: &client,
        };
        self.pipeline.publish(&from, Draft::from_will(will));
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
            store.delete_session(&state.client_id, key);
        }
        state.mailbox.set_persistent(false);
        for filter in state.subscriptions.keys() {
            self.pipeline.router().unsubscribe(state.key, filter);
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
        let taken = state.flows.take_inflight();
        let mut keep = VecDeque::with_capacity(taken.len());
        for f in taken {
            let movable = match f.stage {
                Stage::AwaitAck => true,
                Stage::AwaitRec => ending,
                Stage::AwaitComp => false,
            };
            if f.delivery.shared.is_some() && movable {
                let mut d = f.delivery.clone();
                d.retain = false;
                if self.pipeline.redeliver_shared(d, key).is_ok() {
                    state.mailbox.forget(&f.delivery);
                    continue;
                }
            }
            keep.push_back(f);
        }
        state.flows.restore(keep);
        if state.mailbox.is_empty() {
            return;
        }
        let moved = state.mailbox.extract(|d| d.shared.is_some());
        let mut back = Vec::new();
        for d in moved {
            let copy = d.store_id.map(|_| d.clone());
            match self.pipeline.redeliver_shared(d, key) {
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

#[cfg(test)]
mod size {
    /// Every connected client has one slot: 80 bytes at most, one of the allocator's size
    /// classes (the next is 96). A change that grows it grows every connection.
    #[test]
    fn an_attached_slot_stays_small() {
        let size = std::mem::size_of::<super::Attached>();
        assert!(size <= 80, "Attached is {size} bytes");
    }
}
