//! An application message as the broker holds it, and one delivery of it to one session.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::codec::{MessageProperties, QoS, TopicFilter, TopicName};

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
    /// The session that published it (for No Local); 0 for messages of the broker itself.
    pub origin: ClientKey,
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
            origin: self.origin,
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
