//! How a message crosses to another node: records packed into one NATS message, each after
//! its length (u32, big-endian). A record is either *plain*, for a message without MQTT 5
//! properties (most): kind 0, flags (QoS in bits 0–1, RETAIN in bit 2), the expiry as Unix
//! milliseconds (0: none), the topic's length (u16) and bytes, then the payload; or *full*:
//! kind 1, then the store's record of a retained message (which carries the properties).
//! A message the receiving node is to hand to members of shared subscriptions is kind 2:
//! how many (u16), each shared subscription (`$share/GROUP/FILTER`) after its length (u16),
//! then the message's own plain or full record, without a length. A delivery for one
//! session (what reached a session while it moved to the receiving node) is kind 3: the
//! client id after its length (u16), then the store's queue record of the delivery.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::{QoS, TopicName};
use crate::message::Message;
use crate::store::record;

const PLAIN: u8 = 0;
const FULL: u8 = 1;
const SHARED: u8 = 2;
const SESSION: u8 = 3;

/// Why a record could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WireError(String);

fn bad(why: &str) -> WireError {
    WireError(why.to_owned())
}

fn has_properties(m: &Message) -> bool {
    let p = &m.properties;
    p.payload_format_indicator.is_some()
        || p.content_type.is_some()
        || p.response_topic.is_some()
        || p.correlation_data.is_some()
        || !p.user_properties.as_slice().is_empty()
}

/// Appends `m`'s record, after its length, to `out` (unchanged on an error).
pub fn put(out: &mut BytesMut, m: &Message) -> Result<(), WireError> {
    put_shared(out, m, &[])
}

/// Appends `m`'s record, after its length, to `out`, naming the shared subscriptions the
/// receiving node serves it to (unchanged on an error).
pub fn put_shared(out: &mut BytesMut, m: &Message, shares: &[Arc<str>]) -> Result<(), WireError> {
    framed(out, |out| put_body(out, m, shares))
}

/// Appends what `body` writes after its length (`out` unchanged on an error).
fn framed(
    out: &mut BytesMut,
    body: impl FnOnce(&mut BytesMut) -> Result<(), WireError>,
) -> Result<(), WireError> {
    let at = out.len();
    out.put_u32(0);
    let written = body(out);
    let len = written
        .and_then(|()| u32::try_from(out.len() - at - 4).map_err(|_| bad("message too large")));
    match len {
        Ok(len) => {
            out[at..at + 4].copy_from_slice(&len.to_be_bytes());
            Ok(())
        }
        Err(e) => {
            out.truncate(at);
            Err(e)
        }
    }
}

fn put_body(out: &mut BytesMut, m: &Message, shares: &[Arc<str>]) -> Result<(), WireError> {
    if !shares.is_empty() {
        out.put_u8(SHARED);
        out.put_u16(u16::try_from(shares.len()).map_err(|_| bad("too many shared subscriptions"))?);
        for s in shares {
            out.put_u16(u16::try_from(s.len()).map_err(|_| bad("filter too long"))?);
            out.put_slice(s.as_bytes());
        }
    }
    if has_properties(m) {
        out.put_u8(FULL);
        return record::encode_retained_into(out, m).map_err(|e| WireError(e.to_string()));
    }
    let topic = m.topic.as_str();
    let topic_len = u16::try_from(topic.len()).map_err(|_| bad("topic too long"))?;
    out.reserve(1 + 1 + 8 + 2 + topic.len() + m.payload.len());
    out.put_u8(PLAIN);
    out.put_u8(m.qos as u8 | u8::from(m.retain) << 2);
    out.put_u64(m.expires_at.map_or(0, record::instant_to_unix_ms));
    out.put_u16(topic_len);
    out.put_slice(topic.as_bytes());
    out.put_slice(&m.payload);
    Ok(())
}

/// Takes the next record from `rest`; `None` when it is cut short.
pub fn next<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, tail) = rest.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
    let (record, tail) = tail.split_at_checked(len)?;
    *rest = tail;
    Some(record)
}

/// Appends the record of a delivery for the session of `client_id`, after its length.
pub fn put_delivery(
    out: &mut BytesMut,
    client_id: &str,
    d: &crate::message::Delivery,
) -> Result<(), WireError> {
    let rec = record::encode_queued(d, None).map_err(|e| WireError(e.to_string()))?;
    let id_len = u16::try_from(client_id.len()).map_err(|_| bad("client id too long"))?;
    framed(out, |out| {
        out.put_u8(SESSION);
        out.put_u16(id_len);
        out.put_slice(client_id.as_bytes());
        out.put_slice(&rec);
        Ok(())
    })
}

/// Takes a length (u16) and that many bytes from the front of `r`.
fn take16<'a>(r: &mut &'a [u8]) -> Result<&'a [u8], WireError> {
    let (len, rest) = r.split_first_chunk::<2>().ok_or_else(|| bad("cut short"))?;
    let (bytes, rest) = rest
        .split_at_checked(usize::from(u16::from_be_bytes(*len)))
        .ok_or_else(|| bad("cut short"))?;
    *r = rest;
    Ok(bytes)
}

/// [`take16`] as UTF-8 text; `what` names it in the error.
fn text16<'a>(r: &mut &'a [u8], what: &str) -> Result<&'a str, WireError> {
    std::str::from_utf8(take16(r)?).map_err(|_| WireError(format!("{what} is not UTF-8")))
}

/// A record read: a message to route (and the shared subscriptions the receiving node
/// serves it to), or a delivery for one session.
#[derive(Debug)]
pub enum Record {
    /// A message to route.
    Routed(Message, Vec<Arc<str>>),
    /// A delivery for the session of this client id.
    Session(String, crate::message::Delivery),
}

/// Reads one record of any kind.
pub fn read_record(r: &[u8]) -> Result<Record, WireError> {
    let Some((&SESSION, mut rec)) = r.split_first() else {
        return read_shared(r).map(|(m, s)| Record::Routed(m, s));
    };
    let id = text16(&mut rec, "client id")?;
    let mut d = record::decode_queued(rec, 0)
        .map_err(|e| WireError(e.to_string()))?
        .delivery;
    d.store_id = None;
    Ok(Record::Session(id.to_owned(), d))
}

/// Reads one record (the payload is copied: the pack it came in is not kept alive by it);
/// the shared subscriptions it names are skipped.
pub fn read(r: &[u8]) -> Result<Message, WireError> {
    read_shared(r).map(|(m, _)| m)
}

/// Reads one record and the shared subscriptions it names (none: the receiving node
/// serves it to none of its shared subscriptions).
pub fn read_shared(r: &[u8]) -> Result<(Message, Vec<Arc<str>>), WireError> {
    let (&kind, rest) = r.split_first().ok_or_else(|| bad("empty record"))?;
    if kind != SHARED {
        return read_body(r).map(|m| (m, Vec::new()));
    }
    let (n, mut rest) = rest
        .split_first_chunk::<2>()
        .ok_or_else(|| bad("cut short"))?;
    let n = u16::from_be_bytes(*n);
    let mut shares = Vec::with_capacity(usize::from(n).min(rest.len() / 2));
    for _ in 0..n {
        shares.push(Arc::from(text16(&mut rest, "filter")?));
    }
    read_body(rest).map(|m| (m, shares))
}

fn read_body(r: &[u8]) -> Result<Message, WireError> {
    let (&kind, r) = r.split_first().ok_or_else(|| bad("empty record"))?;
    match kind {
        FULL => record::decode_retained(r).map_err(|e| WireError(e.to_string())),
        PLAIN => {
            let (&flags, r) = r.split_first().ok_or_else(|| bad("cut short"))?;
            let (expires, mut payload) =
                r.split_first_chunk::<8>().ok_or_else(|| bad("cut short"))?;
            let topic = text16(&mut payload, "topic")?;
            let topic = TopicName::new(topic).map_err(|e| WireError(e.to_string()))?;
            let qos = match flags & 3 {
                0 => QoS::AtMostOnce,
                1 => QoS::AtLeastOnce,
                2 => QoS::ExactlyOnce,
                _ => return Err(bad("QoS 3")),
            };
            let expires = u64::from_be_bytes(*expires);
            Ok(Message {
                topic,
                payload: Bytes::copy_from_slice(payload),
                qos,
                retain: flags & 4 != 0,
                properties: Default::default(),
                expires_at: (expires != 0).then(|| record::unix_ms_to_instant(expires)),
                publisher: None,
            })
        }
        _ => Err(bad("unknown record kind")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn message(topic: &str, payload: &[u8], qos: QoS, retain: bool) -> Message {
        Message {
            topic: TopicName::new(topic).unwrap(),
            payload: Bytes::copy_from_slice(payload),
            qos,
            retain,
            properties: Default::default(),
            expires_at: None,
            publisher: Some(42),
        }
    }

    #[test]
    fn plain_and_full_records_round_trip_in_one_pack() {
        let a = message("a/b", b"one", QoS::AtLeastOnce, true);
        let mut b = message("c", b"", QoS::ExactlyOnce, false);
        b.properties.content_type = Some("text/plain".into());
        b.expires_at = Some(Instant::now() + Duration::from_secs(60));
        let mut pack = BytesMut::new();
        put(&mut pack, &a).unwrap();
        put(&mut pack, &b).unwrap();
        let mut rest = &pack[..];
        let ra = read(next(&mut rest).unwrap()).unwrap();
        let rb = read(next(&mut rest).unwrap()).unwrap();
        assert!(rest.is_empty());
        assert_eq!(
            (ra.topic.as_str(), &ra.payload[..], ra.qos, ra.retain),
            ("a/b", &b"one"[..], QoS::AtLeastOnce, true)
        );
        assert_eq!(ra.publisher, None);
        assert_eq!(rb.properties.content_type.as_deref(), Some("text/plain"));
        assert_eq!(rb.qos, QoS::ExactlyOnce);
        let left = rb.expires_at.unwrap() - Instant::now();
        assert!(left > Duration::from_secs(58) && left <= Duration::from_secs(61));
    }

    #[test]
    fn shared_subscriptions_travel_with_their_record() {
        let mut full = message("a/b", b"one", QoS::AtLeastOnce, false);
        full.properties.content_type = Some("text/plain".into());
        let shares: Vec<Arc<str>> = vec!["$share/g/a/+".into(), "$share/h/#".into()];
        let mut pack = BytesMut::new();
        put_shared(&mut pack, &full, &shares).unwrap();
        put_shared(
            &mut pack,
            &message("c", b"two", QoS::AtMostOnce, false),
            &shares[1..],
        )
        .unwrap();
        put(&mut pack, &message("d", b"", QoS::AtMostOnce, false)).unwrap();
        let mut rest = &pack[..];
        let (a, sa) = read_shared(next(&mut rest).unwrap()).unwrap();
        assert_eq!(a.properties.content_type.as_deref(), Some("text/plain"));
        assert_eq!(sa, shares);
        let (c, sc) = read_shared(next(&mut rest).unwrap()).unwrap();
        assert_eq!((c.topic.as_str(), &sc[..]), ("c", &shares[1..]));
        let (d, sd) = read_shared(next(&mut rest).unwrap()).unwrap();
        assert_eq!((d.topic.as_str(), sd.len()), ("d", 0));
        assert!(rest.is_empty());
        // Every cut of a shared record is an error, never a panic.
        let mut one = BytesMut::new();
        put_shared(&mut one, &full, &shares).unwrap();
        for n in 0..one.len() - 4 {
            let _ = read_shared(&one[4..4 + n]);
        }
    }

    #[test]
    fn a_delivery_for_one_session_reads_back() {
        let d = crate::message::Delivery {
            msg: std::sync::Arc::new(message("s/t", b"x", QoS::AtLeastOnce, false)),
            qos: QoS::AtLeastOnce,
            retain: false,
            sub_ids: vec![std::num::NonZeroU32::new(5).unwrap()],
            shared: None,
            store_id: Some(3),
            hooked: false,
        };
        let mut pack = BytesMut::new();
        put_delivery(&mut pack, "client", &d).unwrap();
        let mut rest = &pack[..];
        let record = next(&mut rest).unwrap();
        let Record::Session(id, back) = read_record(record).unwrap() else {
            panic!("not a session's delivery");
        };
        assert_eq!((id.as_str(), back.msg.topic.as_str()), ("client", "s/t"));
        assert_eq!((back.sub_ids, back.store_id), (d.sub_ids, None));
        for n in 0..record.len() {
            let _ = read_record(&record[..n]);
        }
    }

    proptest::proptest! {
        /// Records from another node: any bytes read as a message, a session's delivery
        /// or an error, never a panic.
        #[test]
        fn any_bytes_read_or_fail_cleanly(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
            kind in 0u8..5,
        ) {
            let mut r = vec![kind];
            r.extend_from_slice(&bytes);
            let _ = read_record(&r);
            let _ = read_shared(&r);
            let mut rest = &bytes[..];
            while let Some(rec) = next(&mut rest) {
                let _ = read_record(rec);
            }
        }
    }

    #[test]
    fn damaged_records_are_errors_not_panics() {
        let mut pack = BytesMut::new();
        put(
            &mut pack,
            &message("a/b", b"payload", QoS::AtMostOnce, false),
        )
        .unwrap();
        let record = &pack[4..];
        for n in 0..record.len() {
            let _ = read(&record[..n]);
        }
        let mut bad = record.to_vec();
        bad[1] = 3;
        assert!(read(&bad).is_err());
        bad[1] = 0;
        bad[0] = 9;
        assert!(read(&bad).is_err());
        let mut rest = &pack[..pack.len() - 1];
        assert!(next(&mut rest).is_none());
        let mut wild = record.to_vec();
        wild[12] = b'+';
        assert!(read(&wild).is_err());
    }
}
