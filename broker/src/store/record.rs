//! The byte layout of stored records. Messages are kept as MQTT 5 PUBLISH packets (the codec
//! already encodes and validates every property), wrapped in a few fixed fields. Each record
//! starts with a format byte so a later version can read older records.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::reader::Reader;
use crate::codec::{
    self, DecodeError, MessageProperties, Packet, PacketId, ProtocolVersion, Publish,
    PublishProperties, PublishQoS, QoS, RetainHandling, SubscriptionOptions, TopicFilter, Will,
    WillProperties,
};
use crate::message::{ClientKey, Delivery, Message, Stage};

const FORMAT: u8 = 1;

/// A record that does not decode: the store is damaged or from another version.
#[derive(Debug, thiserror::Error)]
#[error("damaged record: {0}")]
pub struct RecordError(String);

impl From<DecodeError> for RecordError {
    fn from(e: DecodeError) -> Self {
        RecordError(e.to_string())
    }
}

fn bad(what: &str) -> RecordError {
    RecordError(what.to_owned())
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn instant_to_unix_ms(at: Instant) -> u64 {
    let now = Instant::now();
    let base = unix_ms_now();
    if at >= now {
        base.saturating_add(u64::try_from((at - now).as_millis()).unwrap_or(u64::MAX))
    } else {
        base.saturating_sub(u64::try_from((now - at).as_millis()).unwrap_or(u64::MAX))
    }
}

pub(crate) fn unix_ms_to_instant(ms: u64) -> Instant {
    let now = Instant::now();
    let base = unix_ms_now();
    if ms >= base {
        now + Duration::from_millis(ms - base)
    } else {
        now.checked_sub(Duration::from_millis(base - ms))
            .unwrap_or(now)
    }
}

fn put_u64(out: &mut BytesMut, v: u64) {
    out.put_u64(v);
}

fn get_u64(r: &mut Reader<'_>) -> Result<u64, RecordError> {
    let hi = u64::from(r.u32()?);
    let lo = u64::from(r.u32()?);
    Ok(hi << 32 | lo)
}

fn put_str(out: &mut BytesMut, s: &str) -> Result<(), RecordError> {
    let len = u16::try_from(s.len()).map_err(|_| bad("string longer than 65535 bytes"))?;
    out.put_u16(len);
    out.put_slice(s.as_bytes());
    Ok(())
}

/// Encodes the message part shared by queue entries, retained messages and wills.
/// `keep_expiry_interval` keeps the Message Expiry Interval property (wills, whose expiry
/// counts from publication); otherwise the absolute deadline is stored.
fn put_message(
    out: &mut BytesMut,
    m: &Message,
    keep_expiry_interval: bool,
) -> Result<(), RecordError> {
    put_u64(out, m.expires_at.map_or(0, instant_to_unix_ms));
    // Session keys start at 1: 0 is "no publishing session".
    put_u64(out, m.publisher.unwrap_or(0));
    let mut properties = m.properties.clone();
    if !keep_expiry_interval {
        properties.message_expiry_interval = None;
    }
    let p = Publish {
        dup: false,
        qos: PublishQoS::with_id(m.qos, PacketId::FIRST),
        retain: m.retain,
        topic: Some(m.topic.clone()),
        payload: m.payload.clone(),
        properties: PublishProperties {
            topic_alias: None,
            subscription_identifiers: Vec::new(),
            message: properties,
        },
    };
    // The packet goes straight after its length, which is filled in once it is known.
    let at = out.len();
    out.put_u32(0);
    if let Err(e) = codec::encode_packet(&Packet::Publish(p), ProtocolVersion::V5, out) {
        out.truncate(at);
        return Err(RecordError(e.to_string()));
    }
    let Ok(len) = u32::try_from(out.len() - at - 4) else {
        out.truncate(at);
        return Err(bad("message too large"));
    };
    if let Some(head) = out.get_mut(at..at + 4) {
        head.copy_from_slice(&len.to_be_bytes());
    }
    Ok(())
}

fn get_message(r: &mut Reader<'_>) -> Result<Message, RecordError> {
    let expires = get_u64(r)?;
    let publisher = get_u64(r)?;
    let len = usize::try_from(r.u32()?).map_err(|_| bad("length"))?;
    let mut sub = r.sub(len)?;
    let mut buf = BytesMut::from(&sub.rest()[..]);
    let packet = codec::decode_packet(&mut buf, ProtocolVersion::V5, u32::MAX)?;
    let Some(Packet::Publish(p)) = packet else {
        return Err(bad("stored message is not a PUBLISH"));
    };
    let topic = p.topic.ok_or_else(|| bad("stored message without topic"))?;
    Ok(Message {
        topic,
        payload: p.payload,
        qos: p.qos.qos(),
        retain: p.retain,
        properties: p.properties.message,
        expires_at: (expires != 0).then(|| unix_ms_to_instant(expires)),
        publisher: (publisher != 0).then_some(publisher),
    })
}

/// A retained message.
pub fn encode_retained(m: &Message) -> Result<Vec<u8>, RecordError> {
    let mut out = BytesMut::new();
    encode_retained_into(&mut out, m)?;
    Ok(out.to_vec())
}

/// A retained message's record appended to `out` (which holds part of it on an error);
/// also the record a message crosses a cluster as (`cluster`).
pub fn encode_retained_into(out: &mut BytesMut, m: &Message) -> Result<(), RecordError> {
    out.put_u8(FORMAT);
    put_message(out, m, false)
}

/// Decodes a retained message.
pub fn decode_retained(bytes: &[u8]) -> Result<Message, RecordError> {
    let data = Bytes::copy_from_slice(bytes);
    let mut r = Reader::new(&data);
    if r.u8()? != FORMAT {
        return Err(bad("unknown retained record format"));
    }
    get_message(&mut r)
}

/// A message queued for a sink plugin (its publisher's client id, when it was received in
/// Unix ms, and the message), appended to `out` (which holds part of it on an error).
pub fn encode_sink(
    out: &mut BytesMut,
    publisher: &str,
    received_at: u64,
    m: &Message,
) -> Result<(), RecordError> {
    out.put_u8(FORMAT);
    put_u64(out, received_at);
    put_str(out, publisher)?;
    put_message(out, m, true)
}

/// Decodes a sink record: (publisher, received at, message).
pub fn decode_sink(bytes: &[u8]) -> Result<(String, u64, Message), RecordError> {
    let data = Bytes::copy_from_slice(bytes);
    let mut r = Reader::new(&data);
    if r.u8()? != FORMAT {
        return Err(bad("unknown sink record format"));
    }
    let received_at = get_u64(&mut r)?;
    let publisher = r.str()?.to_owned();
    let m = get_message(&mut r)?;
    Ok((publisher, received_at, m))
}

/// A queued or in-flight delivery of a persistent session.
#[derive(Debug)]
pub struct QueuedRecord {
    /// The delivery.
    pub delivery: Delivery,
    /// In flight with this packet id and stage, or `None` if still queued.
    pub inflight: Option<(PacketId, Stage)>,
}

fn stage_byte(s: Option<(PacketId, Stage)>) -> (u8, u16) {
    match s {
        None => (0, 0),
        Some((id, Stage::AwaitAck)) => (1, id.get()),
        Some((id, Stage::AwaitRec)) => (2, id.get()),
        Some((id, Stage::AwaitComp)) => (3, id.get()),
    }
}

/// Encodes a delivery (queued, or in flight with its packet id).
pub fn encode_queued(
    d: &Delivery,
    inflight: Option<(PacketId, Stage)>,
) -> Result<Vec<u8>, RecordError> {
    let mut out = BytesMut::new();
    out.put_u8(FORMAT);
    out.put_u8(d.qos.bits());
    out.put_u8(u8::from(d.retain));
    let (stage, id) = stage_byte(inflight);
    out.put_u8(stage);
    out.put_u16(id);
    let n = u8::try_from(d.sub_ids.len()).map_err(|_| bad("too many subscription ids"))?;
    out.put_u8(n);
    for id in &d.sub_ids {
        out.put_u32(id.get());
    }
    put_str(&mut out, d.shared.as_ref().map_or("", |f| f.as_str()))?;
    put_message(&mut out, &d.msg, false)?;
    Ok(out.to_vec())
}

/// Whether a delivery record is in flight (has a packet id), without decoding it all.
pub fn queued_in_flight(bytes: &[u8]) -> Result<bool, RecordError> {
    match bytes {
        [FORMAT, _, _, stage, ..] => Ok(*stage != 0),
        _ => Err(bad("queue record header")),
    }
}

/// Decodes a delivery record; `store_id` is its key in the queue table.
pub fn decode_queued(bytes: &[u8], store_id: u64) -> Result<QueuedRecord, RecordError> {
    let data = Bytes::copy_from_slice(bytes);
    let mut r = Reader::new(&data);
    if r.u8()? != FORMAT {
        return Err(bad("unknown queue record format"));
    }
    let qos = QoS::from_bits(r.u8()?).ok_or_else(|| bad("qos"))?;
    let retain = r.u8()? != 0;
    let stage = r.u8()?;
    let id = PacketId::new(r.u16()?);
    let inflight = match (stage, id) {
        (0, _) => None,
        (1, Some(id)) => Some((id, Stage::AwaitAck)),
        (2, Some(id)) => Some((id, Stage::AwaitRec)),
        (3, Some(id)) => Some((id, Stage::AwaitComp)),
        _ => return Err(bad("inflight stage")),
    };
    let n = r.u8()?;
    let mut sub_ids = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        sub_ids.push(NonZeroU32::new(r.u32()?).ok_or_else(|| bad("subscription id 0"))?);
    }
    let shared = r.str()?;
    let shared = if shared.is_empty() {
        None
    } else {
        Some(TopicFilter::new(shared).map_err(|e| RecordError(e.to_string()))?)
    };
    let msg = get_message(&mut r)?;
    Ok(QueuedRecord {
        delivery: Delivery {
            msg: Arc::new(msg),
            qos,
            retain,
            sub_ids,
            shared,
            store_id: Some(store_id),
            hooked: false,
        },
        inflight,
    })
}

/// What is stored of a session (its subscriptions are rows of their own).
#[derive(Debug, Clone)]
pub struct SessionRecord {
    /// Router key of the session: its incarnation (queue entries, inbound QoS 2 ids and
    /// subscriptions are stored under it).
    pub key: ClientKey,
    /// Session Expiry Interval.
    pub expiry: u32,
    /// When the client disconnected (Unix ms), 0 while connected.
    pub disconnected_at: u64,
    /// Next packet id to try.
    pub next_id: u16,
    /// A will waiting for its delay, with the session that set it.
    pub will: Option<Will>,
    /// Who owns the session: the user name as authenticated (none for an anonymous
    /// client) and the listener it came through. `None` for records written before it
    /// was kept.
    pub principal: Option<(Option<String>, String)>,
}

/// A subscription as a format-1 session record held it.
pub type StoredSubscription = (TopicFilter, SubscriptionOptions, Option<NonZeroU32>);

/// Session records of format 1 carried their subscriptions; format 2 does not.
const SESSION_V1: u8 = 1;
const SESSION_V2: u8 = 2;

/// The incarnation (key) a session record belongs to, read without decoding the rest.
pub fn session_key(bytes: &[u8]) -> Option<ClientKey> {
    match bytes {
        [SESSION_V1 | SESSION_V2, rest @ ..] => {
            let key: [u8; 8] = rest.get(..8)?.try_into().ok()?;
            Some(u64::from_be_bytes(key))
        }
        _ => None,
    }
}

/// A subscription row's value: the options byte and the subscription identifier (0 for
/// none).
pub fn encode_subscription(options: SubscriptionOptions, id: Option<NonZeroU32>) -> Vec<u8> {
    let mut out = Vec::with_capacity(5);
    out.push(options_byte(options));
    out.extend_from_slice(&id.map_or(0, NonZeroU32::get).to_be_bytes());
    out
}

/// Decodes a subscription row: its filter (the row's key) and its value.
pub fn decode_subscription(filter: &str, bytes: &[u8]) -> Result<StoredSubscription, RecordError> {
    let filter = TopicFilter::new(filter).map_err(|e| RecordError(e.to_string()))?;
    match bytes {
        [options, a, b, c, d] => Ok((
            filter,
            options_from(*options)?,
            NonZeroU32::new(u32::from_be_bytes([*a, *b, *c, *d])),
        )),
        _ => Err(bad("subscription record")),
    }
}

fn options_byte(o: SubscriptionOptions) -> u8 {
    o.qos.bits()
        | u8::from(o.no_local) << 2
        | u8::from(o.retain_as_published) << 3
        | (o.retain_handling as u8) << 4
}

fn options_from(b: u8) -> Result<SubscriptionOptions, RecordError> {
    Ok(SubscriptionOptions {
        qos: QoS::from_bits(b & 3).ok_or_else(|| bad("subscription qos"))?,
        no_local: b & 4 != 0,
        retain_as_published: b & 8 != 0,
        retain_handling: match (b >> 4) & 3 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => return Err(bad("retain handling")),
        },
    })
}

/// Encodes a session.
pub fn encode_session(s: &SessionRecord) -> Result<Vec<u8>, RecordError> {
    let mut out = BytesMut::new();
    out.put_u8(SESSION_V2);
    put_u64(&mut out, s.key);
    out.put_u32(s.expiry);
    put_u64(&mut out, s.disconnected_at);
    out.put_u16(s.next_id);
    match &s.will {
        None => out.put_u8(0),
        Some(w) => {
            out.put_u8(1);
            out.put_u32(w.properties.will_delay_interval.unwrap_or(0));
            let m = Message {
                topic: w.topic.clone(),
                payload: w.payload.clone(),
                qos: w.qos,
                retain: w.retain,
                properties: w.properties.message.clone(),
                expires_at: None,
                publisher: Some(s.key),
            };
            put_message(&mut out, &m, true)?;
        }
    }
    if let Some((user, listener)) = &s.principal {
        out.put_u8(1);
        match user {
            Some(u) => {
                out.put_u8(1);
                put_str(&mut out, u)?;
            }
            None => out.put_u8(0),
        }
        put_str(&mut out, listener)?;
    }
    Ok(out.to_vec())
}

/// Decodes a session, with the subscriptions a format-1 record carries (none from
/// format 2, whose subscriptions are rows of their own).
pub fn decode_session(
    bytes: &[u8],
) -> Result<(SessionRecord, Vec<StoredSubscription>), RecordError> {
    let data = Bytes::copy_from_slice(bytes);
    let mut r = Reader::new(&data);
    let format = r.u8()?;
    if format != SESSION_V1 && format != SESSION_V2 {
        return Err(bad("unknown session record format"));
    }
    let key = get_u64(&mut r)?;
    let expiry = r.u32()?;
    let disconnected_at = get_u64(&mut r)?;
    let next_id = r.u16()?;
    let mut subscriptions = Vec::new();
    if format == SESSION_V1 {
        let n = r.u32()?;
        for _ in 0..n {
            let filter = TopicFilter::new(r.str()?).map_err(|e| RecordError(e.to_string()))?;
            let options = options_from(r.u8()?)?;
            let id = NonZeroU32::new(r.u32()?);
            subscriptions.push((filter, options, id));
        }
    }
    let will = match r.u8()? {
        0 => None,
        _ => {
            let delay = r.u32()?;
            let m = get_message(&mut r)?;
            Some(Will {
                topic: m.topic,
                payload: m.payload,
                qos: m.qos,
                retain: m.retain,
                properties: WillProperties {
                    will_delay_interval: Some(delay),
                    message: MessageProperties { ..m.properties },
                },
            })
        }
    };
    // Format 2 records may end here (written before the principal was kept).
    let principal = if format == SESSION_V2 && !r.is_empty() && r.u8()? == 1 {
        let user = match r.u8()? {
            0 => None,
            _ => Some(r.str()?.to_owned()),
        };
        Some((user, r.str()?.to_owned()))
    } else {
        None
    };
    Ok((
        SessionRecord {
            key,
            expiry,
            disconnected_at,
            next_id,
            will,
            principal,
        },
        subscriptions,
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use crate::codec::{TopicName, UserProperties};

    fn msg() -> Message {
        Message {
            topic: TopicName::new("a/b").unwrap(),
            payload: Bytes::from_static(b"payload"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: MessageProperties {
                content_type: Some(Arc::from("text/plain")),
                user_properties: UserProperties::new(vec![(Arc::from("k"), Arc::from("v"))]),
                ..Default::default()
            },
            expires_at: Some(Instant::now() + Duration::from_secs(100)),
            publisher: Some(7),
        }
    }

    #[test]
    fn queued_round_trip() {
        let d = Delivery {
            msg: Arc::new(msg()),
            qos: QoS::AtLeastOnce,
            retain: false,
            sub_ids: vec![NonZeroU32::new(3).unwrap()],
            shared: Some(TopicFilter::new("$share/g/a/#").unwrap()),
            store_id: None,
            hooked: false,
        };
        let id = PacketId::new(9).unwrap();
        let bytes = encode_queued(&d, Some((id, Stage::AwaitRec))).unwrap();
        let back = decode_queued(&bytes, 42).unwrap();
        assert_eq!(back.inflight, Some((id, Stage::AwaitRec)));
        assert_eq!(back.delivery.store_id, Some(42));
        assert_eq!(back.delivery.qos, QoS::AtLeastOnce);
        assert_eq!(back.delivery.sub_ids, d.sub_ids);
        assert_eq!(back.delivery.shared, d.shared);
        let m = &back.delivery.msg;
        assert_eq!(m.topic.as_str(), "a/b");
        assert_eq!(&m.payload[..], b"payload");
        assert_eq!(m.properties, d.msg.properties);
        assert_eq!(m.publisher, Some(7));
        let left = m.remaining_expiry(Instant::now()).unwrap();
        assert!((98..=100).contains(&left), "{left}");
    }

    #[test]
    fn subscription_round_trip() {
        let options = SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            no_local: true,
            retain_as_published: true,
            retain_handling: RetainHandling::DoNotSend,
        };
        for id in [None, NonZeroU32::new(5)] {
            let bytes = encode_subscription(options, id);
            let (f, o, i) = decode_subscription("x/+", &bytes).unwrap();
            assert_eq!((f.as_str(), o, i), ("x/+", options, id));
        }
        assert!(decode_subscription("x", &[0, 0]).is_err());
    }

    /// A format-1 session record (subscriptions inside) still decodes, for the migration.
    #[test]
    fn format_1_session_records_decode_with_their_subscriptions() {
        let mut v1 = vec![SESSION_V1];
        v1.extend_from_slice(&7u64.to_be_bytes());
        v1.extend_from_slice(&60u32.to_be_bytes());
        v1.extend_from_slice(&0u64.to_be_bytes());
        v1.extend_from_slice(&3u16.to_be_bytes());
        v1.extend_from_slice(&1u32.to_be_bytes());
        v1.extend_from_slice(&[0, 3, b'a', b'/', b'b', 1, 0, 0, 0, 9, 0]);
        assert_eq!(session_key(&v1), Some(7));
        let (rec, subs) = decode_session(&v1).unwrap();
        assert_eq!((rec.key, rec.expiry, rec.next_id), (7, 60, 3));
        assert!(rec.will.is_none());
        assert_eq!(subs.len(), 1);
        assert_eq!(subs[0].0.as_str(), "a/b");
        assert_eq!(subs[0].2, NonZeroU32::new(9));
        let v2 = encode_session(&rec).unwrap();
        assert_eq!(session_key(&v2), Some(7));
        assert!(decode_session(&v2).unwrap().1.is_empty());
    }

    #[test]
    fn session_round_trip() {
        let s = SessionRecord {
            key: 1 << 40,
            expiry: 3600,
            disconnected_at: 123,
            next_id: 77,
            principal: Some((Some("alice".to_owned()), "tls".to_owned())),
            will: Some(Will {
                topic: TopicName::new("w").unwrap(),
                payload: Bytes::from_static(b"bye"),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: WillProperties {
                    will_delay_interval: Some(10),
                    message: MessageProperties {
                        message_expiry_interval: Some(60),
                        ..Default::default()
                    },
                },
            }),
        };
        let (back, subs) = decode_session(&encode_session(&s).unwrap()).unwrap();
        assert!(subs.is_empty());
        assert_eq!(back.key, s.key);
        assert_eq!(back.expiry, 3600);
        assert_eq!(back.disconnected_at, 123);
        assert_eq!(back.next_id, 77);
        assert_eq!(back.will, s.will);
        assert_eq!(back.principal, s.principal);
        let anonymous = SessionRecord {
            principal: Some((None, "default".to_owned())),
            will: None,
            ..s.clone()
        };
        let (back, _) = decode_session(&encode_session(&anonymous).unwrap()).unwrap();
        assert_eq!(back.principal, anonymous.principal);
    }

    #[test]
    fn truncated_records_are_errors_not_panics() {
        let bytes = encode_retained(&msg()).unwrap();
        for n in 0..bytes.len() {
            assert!(decode_retained(&bytes[..n]).is_err());
        }
    }
}
