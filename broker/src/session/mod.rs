//! Sessions: the state the broker keeps per client identifier, and the registry that attaches
//! sessions to connections, hands them over on takeover and expires them.
//!
//! While a client is connected its connection task owns the [`SessionState`]; when it goes,
//! the state comes back to the registry, which keeps it until it expires (running the will
//! delay and session expiry timers) or a new connection takes it. Only the [`Mailbox`] is
//! shared with the router at all times, so nothing on the hot path takes the registry lock.

mod aliases;
mod ending;
mod flows;
mod moving;
mod registry;
mod subscriptions;
#[cfg(test)]
mod tests;

pub use crate::message::Principal;
pub use aliases::{InboundAliases, Naming, OutboundAliases};
pub use flows::{Flows, Inflight, Received};
pub use moving::{Elsewhere, Found, Moved, Wanted};
pub use registry::{AttachListener, ExpiryListener, Given, Leaving, Sessions};
pub use subscriptions::{Permit, SubscribeLimits};

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use crate::codec::{
    Ack, Packet, PacketId, QoS, ReasonCode, SubscriptionOptions, TopicFilter, Will,
};
use crate::mailbox::Mailbox;
use crate::message::{ClientId, ClientKey, Delivery, Stage};
use crate::plugins::ClientInfo;
use crate::router::Subscriber;
use crate::store::record::SessionRecord;

/// Session expiry meaning "never".
pub const NEVER_EXPIRES: u32 = u32::MAX;

/// One subscription of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription {
    /// Its options.
    pub options: SubscriptionOptions,
    /// Its MQTT 5 subscription identifier.
    pub id: Option<NonZeroU32>,
}

/// A session's subscriptions by filter (as sent, with any share prefix), hashed without a
/// per-map seed (every session has one; [`crate::router::TreeHasher`]).
pub type Subscriptions = HashMap<TopicFilter, Subscription, crate::router::TreeHasher>;

/// Everything the broker keeps for one client identifier.
#[derive(Debug)]
pub struct SessionState {
    /// The client identifier.
    pub client_id: ClientId,
    /// The key of this session instance in the router.
    pub key: ClientKey,
    /// The queue the router delivers into.
    pub mailbox: Arc<Mailbox>,
    /// Subscriptions by filter (as sent, with any share prefix).
    pub subscriptions: Subscriptions,
    /// The QoS 1/2 flows: messages in flight, packet identifiers, inbound QoS 2 awaiting
    /// PUBREL.
    pub flows: Flows,
    /// Session Expiry Interval in seconds; [`NEVER_EXPIRES`] for never, 0 for "ends with the
    /// connection".
    pub expiry: u32,
    /// Who owns the session (`None`: not known, for sessions stored before it was kept);
    /// shared with the connection's plugin gate and the registry's slot.
    pub principal: Option<Arc<Principal>>,
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
}

/// What a session answers an acknowledgement with: a packet to send (once the store
/// ticket, if any, is durable).
#[derive(Debug)]
pub struct Reply {
    /// The packet to send, if any.
    pub packet: Option<Packet>,
    /// The store ticket it waits for.
    pub after: Option<u64>,
}

impl SessionState {
    /// PUBACK, PUBREC, PUBREL or PUBCOMP from the client (`v5`: an MQTT 5 client): moves
    /// the flow on, makes the change durable for a persistent session, and says what to
    /// answer. `None` for any other packet.
    pub fn acknowledged(&mut self, p: &Packet, v5: bool) -> Option<Reply> {
        let none = Reply {
            packet: None,
            after: None,
        };
        let not_found = |id| {
            let mut a = Ack::success(id);
            if v5 {
                a.reason = ReasonCode::PacketIdentifierNotFound;
            }
            a
        };
        Some(match p {
            Packet::PubAck(a) => {
                if let Some(f) = self.flows.acked(a.packet_id) {
                    self.mailbox.forget(&f.delivery);
                }
                none
            }
            Packet::PubComp(a) => {
                if let Some(f) = self.flows.completed(a.packet_id) {
                    self.mailbox.forget(&f.delivery);
                }
                none
            }
            Packet::PubRec(a) => {
                let id = a.packet_id;
                match self.flows.received(id, a.reason.is_error()) {
                    // The receiver refused it: the flow ends here (MQTT 5 §4.3.3).
                    Received::Refused(f) => {
                        self.mailbox.forget(&f.delivery);
                        none
                    }
                    Received::Release(f) => {
                        // Remember that PUBREL, not PUBLISH, is owed after a restart, before
                        // the PUBREL goes out: a PUBLISH resent after a restart that the
                        // receiver had already released would be a new message to it (a
                        // duplicate).
                        let mut after = None;
                        if let (Some(sid), Some((store, key))) =
                            (f.delivery.store_id, self.mailbox.store())
                            && let Ok(t) =
                                store.queue_put(key, sid, &f.delivery, Some((id, Stage::AwaitComp)))
                        {
                            after = t;
                        }
                        Reply {
                            packet: Some(Packet::PubRel(Ack::success(id))),
                            after,
                        }
                    }
                    Received::Unknown => Reply {
                        packet: Some(Packet::PubRel(not_found(id))),
                        after: None,
                    },
                }
            }
            Packet::PubRel(a) => {
                // PUBCOMP frees the packet id for a new message: it goes out once the id is
                // forgotten on disk too, or a restart would take that new message for a
                // duplicate and drop it.
                let id = a.packet_id;
                if !self.flows.released(id) {
                    return Some(Reply {
                        packet: Some(Packet::PubComp(not_found(id))),
                        after: None,
                    });
                }
                let after =
                    (self.mailbox.store()).and_then(|(store, key)| store.qos2_released(key, id));
                Reply {
                    packet: Some(Packet::PubComp(Ack::success(id))),
                    after,
                }
            }
            _ => return None,
        })
    }
}

impl SessionState {
    /// Records a delivery just sent with packet identifier `id` as in flight. For a
    /// persistent session the id and stage are written with the queued message, and the
    /// answer is the store ticket the PUBLISH waits for: a QoS 2 message goes out once its
    /// id is durable, so after a restart it is resent with the same id and the receiver can
    /// tell the duplicate (exactly once, MQTT 4.3.3). A QoS 1 message's id is written
    /// without waiting: after a restart it is resent with DUP and, if the record made it,
    /// its original id (MQTT-4.4.0-1); at least once holds either way.
    pub fn sent(&mut self, id: PacketId, d: Delivery) -> Option<u64> {
        let mut ticket = None;
        if let (Some(sid), Some((store, key))) = (d.store_id, self.mailbox.store()) {
            let stage = if d.qos == QoS::ExactlyOnce {
                Stage::AwaitRec
            } else {
                Stage::AwaitAck
            };
            if let Ok(t) = store.queue_put(key, sid, &d, Some((id, stage)))
                && stage == Stage::AwaitRec
            {
                ticket = t;
            }
        }
        self.flows.sent(id, d);
        ticket
    }
}

impl SessionState {
    /// An inbound QoS 2 PUBLISH with packet identifier `id`, `max` being our Receive
    /// Maximum. A new message is routed (`route`, which answers its store ticket) and its id
    /// kept until PUBREL; for a persistent session both commit together, so a crash cannot
    /// tear them apart (the client's resend after it would be routed a second time). A sink
    /// record may commit earlier than the id (a sink's log commits what it holds whenever the
    /// writer takes it): a crash between the two gives the sink a duplicate, never a loss. A
    /// resend of a message already received is not routed again. Answers the ticket the
    /// PUBREC waits for, or `ReceiveMaximumExceeded` when `max` messages await PUBREL.
    pub fn receive_exactly_once(
        &mut self,
        id: PacketId,
        max: u16,
        route: impl FnOnce() -> Option<u64>,
    ) -> Result<Option<u64>, ReasonCode> {
        match self.flows.receive(id, max) {
            Ok(false) => return Ok(None),
            Ok(true) => {}
            Err(_) => return Err(ReasonCode::ReceiveMaximumExceeded),
        }
        let durable = self.mailbox.store();
        let group = durable.map(|(store, _)| store.group());
        let mut ticket = route();
        if let Some((store, key)) = durable {
            ticket = ticket.max(store.qos2_received(key, id));
        }
        drop(group);
        Ok(ticket)
    }
}

/// A will message not yet published.
#[derive(Debug, Clone)]
pub struct PendingWill {
    /// The will as the client sent it.
    pub will: Will,
    /// The session that set it (for No Local).
    pub origin: ClientKey,
    /// The client that set it, as the plugins saw it (a will restored from the store knows
    /// the client id and the principal, not the attributes authentication set).
    pub client: ClientInfo,
}

impl PendingWill {
    /// MQTT 5 Will Delay Interval in seconds.
    pub fn delay(&self) -> u32 {
        self.will.properties.will_delay_interval.unwrap_or(0)
    }
}

pub use crate::mailbox::Kick;

/// Where and how a client is connected (for the admin API). Its address is kept as an IP
/// and a port (an IPv6 scope and flow label are not shown): 16 bytes less than a
/// `SocketAddr` in every connected client's registry slot.
#[derive(Debug, Clone)]
pub struct Presence {
    /// The client's IP address.
    pub ip: std::net::IpAddr,
    /// The client's port.
    pub port: u16,
    /// The protocol version of its CONNECT.
    pub protocol: crate::codec::ProtocolVersion,
    /// The keep alive in force, in seconds (0: none).
    pub keep_alive: u16,
    /// When it connected, in Unix milliseconds.
    pub since_ms: u64,
}

impl Presence {
    /// The client's address.
    pub fn peer(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.ip, self.port)
    }
}

/// A connected client, as the admin API lists it.
#[derive(Debug, Clone)]
pub struct ClientView {
    /// Its client identifier.
    pub client_id: ClientId,
    /// Who it is.
    pub principal: Principal,
    /// Where and how it is connected.
    pub presence: Presence,
    /// Its Session Expiry Interval.
    pub expiry: u32,
    /// Messages queued for it.
    pub queued: usize,
}

/// A session, as the admin API lists it.
#[derive(Debug, Clone)]
pub struct SessionView {
    /// Its client identifier.
    pub client_id: ClientId,
    /// Whether a connection holds it.
    pub online: bool,
    /// Its Session Expiry Interval.
    pub expiry: u32,
    /// Who it belongs to, when known.
    pub principal: Option<Principal>,
    /// Its subscriptions, for a session without a connection (a connection holds those of
    /// its session).
    pub subscriptions: Option<Vec<(TopicFilter, Subscription)>>,
    /// Messages queued for it.
    pub queued: usize,
}

impl SessionState {
    /// Writes the session record of a persistent session; returns the store ticket.
    /// `disconnected_at` is 0 while a connection holds the session.
    pub fn save(&self, disconnected_at: u64, will: Option<&PendingWill>) -> Option<u64> {
        let (store, key) = self.mailbox.store()?;
        let rec = SessionRecord {
            key,
            expiry: self.expiry,
            disconnected_at,
            next_id: self.flows.next_id().get(),
            will: will.map(|w| w.will.clone()),
            principal: (self.principal.as_ref())
                .map(|p| (p.user.as_deref().map(str::to_owned), p.listener.to_string())),
        };
        store.save_session(&self.client_id, &rec)
    }

    /// Writes (`Some`) or removes (`None`) one subscription of a persistent session;
    /// returns the store ticket.
    pub fn save_subscription(
        &self,
        filter: &TopicFilter,
        sub: Option<Subscription>,
    ) -> Option<u64> {
        let (store, key) = self.mailbox.store()?;
        match sub {
            Some(s) => store.save_subscription(key, filter, s.options, s.id),
            None => store.delete_subscription(key, filter),
        }
    }
}
