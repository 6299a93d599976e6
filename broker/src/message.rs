//! An application message as the broker holds it, and one delivery of it to one session.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::codec::{MessageProperties, QoS, TopicFilter, TopicName, Will};

/// Who a session belongs to: the user name as authenticated (by a plugin or a client
/// certificate; none for an anonymous client) and the listener it came through. Held as an
/// `Arc`, shared by a session, its connection's plugin gate and the registry; the anonymous
/// clients of a listener share the listener's one.
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

/// A client identifier as the client sent it or the broker assigned it. Shared (every
/// idle connection, its session and the plugins' view of it hold the same one), compared
/// and hashed as the string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(Arc<str>);

impl ClientId {
    /// The identifier `id`.
    pub fn new(id: &str) -> ClientId {
        ClientId(Arc::from(id))
    }

    /// The identifier as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for ClientId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for ClientId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for ClientId {
    fn from(id: &str) -> ClientId {
        ClientId::new(id)
    }
}

impl From<String> for ClientId {
    fn from(id: String) -> ClientId {
        ClientId(Arc::from(id))
    }
}

/// Identifies one session instance inside the broker (stable across reconnects of a
/// persistent session, new for every clean start).
pub type ClientKey = u64;

/// A published message. Immutable once built and shared by every delivery (`Arc`), so fan-out
/// copies nothing but a pointer.
#[derive(Debug)]
pub struct Message {
    /// Topic it was published to.
    pub topic: TopicName,
    /// Payload, shared with the buffer it was read into.
    pub payload: Bytes,
    /// QoS it was published with.
    pub qos: QoS,
    /// RETAIN flag as published.
    pub retain: bool,
    /// MQTT 5 properties forwarded unchanged. The expiry interval here is the one published;
    /// what is forwarded is recomputed from `expires_at`.
    pub properties: MessageProperties,
    /// When the message expires (MQTT 5 Message Expiry Interval).
    pub expires_at: Option<Instant>,
    /// The session that published it (a client's message or its will), for No Local;
    /// `None` for what a plugin publishes.
    pub publisher: Option<ClientKey>,
}

/// What one User Property costs in memory beyond its name and value: the pair in the
/// shared slice and the two string allocations.
const USER_PROPERTY_OVERHEAD: usize = 64;

impl Message {
    /// The bytes this message accounts for in queues and in the retained store: topic,
    /// payload and properties, each User Property with what it costs in memory (an empty
    /// one is 4 bytes on the wire but about 64 in the heap).
    pub fn size(&self) -> usize {
        let p = &self.properties;
        let users: usize = (p.user_properties.as_slice().iter())
            .map(|(n, v)| USER_PROPERTY_OVERHEAD + n.len() + v.len())
            .sum();
        self.topic.as_str().len()
            + self.payload.len()
            + users
            + p.content_type.as_ref().map_or(0, |c| c.len())
            + p.response_topic.as_ref().map_or(0, |t| t.as_str().len())
            + p.correlation_data.as_ref().map_or(0, |d| d.len())
    }

    /// The same message without its RETAIN flag (routed, not retained).
    pub fn unretained(&self) -> Message {
        Message {
            topic: self.topic.clone(),
            payload: self.payload.clone(),
            qos: self.qos,
            retain: false,
            properties: self.properties.clone(),
            expires_at: self.expires_at,
            publisher: self.publisher,
        }
    }

    /// Whether the message has expired at `now`.
    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// Remaining expiry interval in whole seconds (rounded up) to forward, or `None` if the
    /// message never expires. `Some(0)` never happens: an expired message is dropped instead.
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        let at = self.expires_at?;
        let left = at.saturating_duration_since(now);
        let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        Some(u32::try_from(secs).unwrap_or(u32::MAX).max(1))
    }
}

/// A message on its way in, before routing: what the `transform` hook may change.
#[derive(Debug, Clone)]
pub struct Draft {
    /// Topic name.
    pub topic: TopicName,
    /// Payload.
    pub payload: Bytes,
    /// QoS it was published with.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// MQTT 5 properties.
    pub properties: MessageProperties,
}

impl Draft {
    /// The message this draft becomes once routed, published by session `publisher`; its
    /// expiry counts from now.
    pub fn into_message(self, publisher: Option<ClientKey>) -> Arc<Message> {
        Arc::new(Message {
            // The clock is read only for a message that expires.
            expires_at: (self.properties.message_expiry_interval)
                .map(|s| Instant::now() + std::time::Duration::from_secs(u64::from(s))),
            topic: self.topic,
            payload: self.payload,
            qos: self.qos,
            retain: self.retain,
            properties: self.properties,
            publisher,
        })
    }
}

impl Draft {
    /// A will as a message to publish. Its Message Expiry Interval counts from the moment
    /// it becomes a message (MQTT 5 §3.1.3.2.4).
    pub fn from_will(w: Will) -> Draft {
        Draft {
            topic: w.topic,
            payload: w.payload,
            qos: w.qos,
            retain: w.retain,
            properties: w.properties.message,
        }
    }
}

/// One message on its way to one session, with what differs per subscriber.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The shared message.
    pub msg: Arc<Message>,
    /// QoS it is delivered at: min(published, granted).
    pub qos: QoS,
    /// RETAIN flag to send.
    pub retain: bool,
    /// Subscription identifiers of every matching subscription of this session.
    pub sub_ids: Vec<NonZeroU32>,
    /// The shared subscription it came through, so it can move to another member.
    pub shared: Option<TopicFilter>,
    /// Its entry in the durable queue of a persistent session.
    pub store_id: Option<u64>,
    /// Already passed the `deliver` plugin hook (a delivery handed back to the mailbox
    /// unsent is not passed twice).
    pub hooked: bool,
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

#[cfg(test)]
impl Delivery {
    /// A delivery of a message on topic `t` with `payload` at `qos`, for tests.
    #[allow(clippy::unwrap_used, reason = "a constant topic")]
    pub(crate) fn for_test(qos: QoS, payload: &[u8]) -> Delivery {
        Delivery {
            msg: Arc::new(Message {
                topic: TopicName::new("t").unwrap(),
                payload: Bytes::copy_from_slice(payload),
                qos,
                retain: false,
                properties: MessageProperties::default(),
                expires_at: None,
                publisher: None,
            }),
            qos,
            retain: false,
            sub_ids: Vec::new(),
            shared: None,
            store_id: None,
            hooked: false,
        }
    }
}
