//! A persistent session moving from one node of a cluster to another: what travels (its
//! subscriptions, queued and in-flight messages, inbound QoS 2 identifiers, next packet
//! identifier, expiry and owner) and its encoding, without I/O. The registry gives and
//! adopts sessions (`Sessions::give`, `Sessions::attach`); the cluster carries the bytes.
//!
//! Encoding (big-endian): format 1 (u8), expiry (u32), next packet id (u16), owner (u8: 0
//! none, 1 anonymous, 2 a user; then the user name if any and the listener, each a u32
//! length and UTF-8), then four lists, each a u32 count: inbound QoS 2 ids (u16 each),
//! subscriptions (filter, then the store's subscription record), in-flight deliveries and
//! queued deliveries (the store's queue records, the in-flight ones with their packet id
//! and stage), each item after its u32 length.

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;

use bytes::{BufMut, BytesMut};

use crate::codec::{PacketId, SubscriptionOptions, TopicFilter};
use crate::config::PrincipalPolicy;
use crate::message::{ClientId, Delivery};
use crate::store::record;

use super::{Inflight, Principal};

const FORMAT: u8 = 1;

/// Why a moved session could not be read.
#[derive(Debug, thiserror::Error)]
#[error("moved session: {0}")]
pub struct MoveError(String);

fn bad(why: impl Into<String>) -> MoveError {
    MoveError(why.into())
}

/// A session on its way between nodes.
#[derive(Debug, Default)]
pub struct Moved {
    /// Session Expiry Interval.
    pub expiry: u32,
    /// Next packet identifier to try.
    pub next_id: u16,
    /// Who owns it.
    pub principal: Option<Principal>,
    /// Its subscriptions.
    pub subscriptions: Vec<(TopicFilter, SubscriptionOptions, Option<NonZeroU32>)>,
    /// Messages in flight to the client, in the order sent.
    pub inflight: Vec<Inflight>,
    /// Messages queued for the client, in order.
    pub queued: Vec<Delivery>,
    /// Inbound QoS 2 messages received and not yet released.
    pub qos2_received: Vec<PacketId>,
}

fn put_bytes(out: &mut BytesMut, b: &[u8]) -> Result<(), MoveError> {
    out.put_u32(u32::try_from(b.len()).map_err(|_| bad("item too large"))?);
    out.put_slice(b);
    Ok(())
}

fn put_count(out: &mut BytesMut, n: usize) -> Result<(), MoveError> {
    out.put_u32(u32::try_from(n).map_err(|_| bad("too many items"))?);
    Ok(())
}

impl Moved {
    /// Its bytes.
    pub fn encode(&self) -> Result<Vec<u8>, MoveError> {
        let mut out = BytesMut::new();
        out.put_u8(FORMAT);
        out.put_u32(self.expiry);
        out.put_u16(self.next_id);
        match &self.principal {
            None => out.put_u8(0),
            Some(Principal {
                user: None,
                listener,
            }) => {
                out.put_u8(1);
                put_bytes(&mut out, listener.as_bytes())?;
            }
            Some(Principal {
                user: Some(user),
                listener,
            }) => {
                out.put_u8(2);
                put_bytes(&mut out, user.as_bytes())?;
                put_bytes(&mut out, listener.as_bytes())?;
            }
        }
        put_count(&mut out, self.qos2_received.len())?;
        for id in &self.qos2_received {
            out.put_u16(id.get());
        }
        put_count(&mut out, self.subscriptions.len())?;
        for (filter, options, id) in &self.subscriptions {
            put_bytes(&mut out, filter.as_str().as_bytes())?;
            put_bytes(&mut out, &record::encode_subscription(*options, *id))?;
        }
        put_count(&mut out, self.inflight.len())?;
        for f in &self.inflight {
            let rec = record::encode_queued(&f.delivery, Some((f.id, f.stage)))
                .map_err(|e| bad(e.to_string()))?;
            put_bytes(&mut out, &rec)?;
        }
        put_count(&mut out, self.queued.len())?;
        for d in &self.queued {
            let rec = record::encode_queued(d, None).map_err(|e| bad(e.to_string()))?;
            put_bytes(&mut out, &rec)?;
        }
        Ok(out.to_vec())
    }

    /// Reads one from its bytes (deliveries come without store ids: the adopting node's
    /// queue gives them new ones).
    pub fn decode(mut b: &[u8]) -> Result<Moved, MoveError> {
        let r = &mut b;
        if take::<1>(r)? != [FORMAT] {
            return Err(bad("unknown format"));
        }
        let expiry = u32::from_be_bytes(take(r)?);
        let next_id = u16::from_be_bytes(take(r)?);
        let principal = match take::<1>(r)? {
            [0] => None,
            [1] => Some(Principal {
                user: None,
                listener: text(r)?.into(),
            }),
            [2] => Some(Principal {
                user: Some(text(r)?.into()),
                listener: text(r)?.into(),
            }),
            _ => return Err(bad("owner")),
        };
        let mut m = Moved {
            expiry,
            next_id,
            principal,
            ..Moved::default()
        };
        for _ in 0..count(r)? {
            let id =
                PacketId::new(u16::from_be_bytes(take(r)?)).ok_or_else(|| bad("packet id 0"))?;
            m.qos2_received.push(id);
        }
        for _ in 0..count(r)? {
            let filter = text(r)?;
            let sub =
                record::decode_subscription(filter, item(r)?).map_err(|e| bad(e.to_string()))?;
            m.subscriptions.push(sub);
        }
        for _ in 0..count(r)? {
            let rec = record::decode_queued(item(r)?, 0).map_err(|e| bad(e.to_string()))?;
            let Some((id, stage)) = rec.inflight else {
                return Err(bad("in-flight delivery without a packet id"));
            };
            let mut delivery = rec.delivery;
            delivery.store_id = None;
            m.inflight.push(Inflight {
                id,
                delivery,
                stage,
            });
        }
        for _ in 0..count(r)? {
            let mut d = record::decode_queued(item(r)?, 0)
                .map_err(|e| bad(e.to_string()))?
                .delivery;
            d.store_id = None;
            m.queued.push(d);
        }
        if !r.is_empty() {
            return Err(bad("bytes after the end"));
        }
        Ok(m)
    }
}

fn take<const N: usize>(r: &mut &[u8]) -> Result<[u8; N], MoveError> {
    let (head, tail) = r.split_first_chunk::<N>().ok_or_else(|| bad("cut short"))?;
    *r = tail;
    Ok(*head)
}

fn count(r: &mut &[u8]) -> Result<u32, MoveError> {
    let n = u32::from_be_bytes(take(r)?);
    // Every item takes at least two bytes: a count beyond is a lie, not a reason to loop.
    if n as usize > r.len() / 2 + 1 {
        return Err(bad("count beyond the bytes left"));
    }
    Ok(n)
}

fn item<'a>(r: &mut &'a [u8]) -> Result<&'a [u8], MoveError> {
    let len = u32::from_be_bytes(take(r)?) as usize;
    let (head, tail) = r.split_at_checked(len).ok_or_else(|| bad("cut short"))?;
    *r = tail;
    Ok(head)
}

fn text<'a>(r: &mut &'a [u8]) -> Result<&'a str, MoveError> {
    std::str::from_utf8(item(r)?).map_err(|_| bad("not UTF-8"))
}

/// A connection asking for a session that may be on another node.
#[derive(Debug, Clone)]
pub struct Wanted {
    /// Its client id.
    pub client_id: ClientId,
    /// Clean Start: the session elsewhere ends instead of moving.
    pub clean: bool,
    /// Who connects.
    pub principal: Principal,
    /// What to do when the session belongs to someone else.
    pub policy: PrincipalPolicy,
    /// When the asking connection connected (Unix ms): a connection here since later is
    /// newer, and stays.
    pub since_ms: u64,
    /// At the same millisecond, the asker wins (its node's name sorts after this one's).
    pub ties: bool,
}

/// What the other nodes answered.
pub enum Found {
    /// No other node had the session (or it ended there: Clean Start).
    Nothing,
    /// Another node has it, owned by another principal, and the policy refuses.
    Refused,
    /// The session, and what tells the node that gave it that it is held here now.
    Session(Moved, Box<dyn FnOnce() + Send>),
}

impl std::fmt::Debug for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Found::Nothing => f.write_str("Nothing"),
            Found::Refused => f.write_str("Refused"),
            Found::Session(m, _) => f.debug_tuple("Session").field(m).finish(),
        }
    }
}

/// The other nodes of a cluster, as the registry asks them for sessions.
pub trait Elsewhere: Send + Sync + std::fmt::Debug {
    /// Takes `wanted`'s session from whichever other node holds it (closing its connection
    /// there); with Clean Start, ends it there.
    fn take(&self, wanted: Wanted) -> Pin<Box<dyn Future<Output = Found> + Send + 'static>>;
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use crate::codec::{QoS, RetainHandling, TopicName};
    use crate::message::{Message, Stage};
    use std::sync::Arc;

    fn delivery(topic: &str, qos: QoS) -> Delivery {
        Delivery {
            msg: Arc::new(Message {
                topic: TopicName::new(topic).unwrap(),
                payload: bytes::Bytes::from_static(b"payload"),
                qos,
                retain: false,
                properties: Default::default(),
                expires_at: None,
                publisher: None,
            }),
            qos,
            retain: false,
            sub_ids: vec![NonZeroU32::new(7).unwrap()],
            shared: Some(TopicFilter::new("$share/g/a/#").unwrap()),
            store_id: Some(12),
            hooked: false,
        }
    }

    fn session() -> Moved {
        let options = SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            no_local: true,
            retain_as_published: false,
            retain_handling: RetainHandling::SendIfNew,
        };
        Moved {
            expiry: 3600,
            next_id: 9,
            principal: Some(Principal {
                user: Some("alice".into()),
                listener: "default".into(),
            }),
            subscriptions: vec![
                (TopicFilter::new("a/+").unwrap(), options, None),
                (
                    TopicFilter::new("$share/g/a/#").unwrap(),
                    options,
                    NonZeroU32::new(3),
                ),
            ],
            inflight: vec![Inflight {
                id: PacketId::new(4).unwrap(),
                delivery: delivery("a/1", QoS::ExactlyOnce),
                stage: Stage::AwaitComp,
            }],
            queued: vec![
                delivery("a/2", QoS::AtLeastOnce),
                delivery("a/3", QoS::AtLeastOnce),
            ],
            qos2_received: vec![PacketId::new(2).unwrap(), PacketId::new(65535).unwrap()],
        }
    }

    #[test]
    fn a_session_moves_whole() {
        let s = session();
        let back = Moved::decode(&s.encode().unwrap()).unwrap();
        assert_eq!((back.expiry, back.next_id), (3600, 9));
        assert_eq!(back.principal, s.principal);
        assert_eq!(back.qos2_received, s.qos2_received);
        assert_eq!(back.subscriptions, s.subscriptions);
        let f = &back.inflight[0];
        assert_eq!((f.id.get(), f.stage), (4, Stage::AwaitComp));
        assert_eq!(f.delivery.msg.topic.as_str(), "a/1");
        assert_eq!(f.delivery.store_id, None);
        let topics: Vec<&str> = back.queued.iter().map(|d| d.msg.topic.as_str()).collect();
        assert_eq!(topics, ["a/2", "a/3"]);
        assert_eq!(back.queued[0].sub_ids, s.queued[0].sub_ids);
        assert_eq!(back.queued[0].shared, s.queued[0].shared);
        let anonymous = Moved {
            principal: Some(Principal {
                user: None,
                listener: "l".into(),
            }),
            ..Moved::default()
        };
        let back = Moved::decode(&anonymous.encode().unwrap()).unwrap();
        assert_eq!(back.principal, anonymous.principal);
    }

    proptest::proptest! {
        /// Bytes from another node: nothing panics, and whatever decodes encodes to bytes
        /// that decode to the same session.
        #[test]
        fn any_bytes_decode_or_fail_cleanly(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
            cut in 0usize..2000,
        ) {
            let mut whole = session().encode().unwrap();
            whole.truncate(cut.min(whole.len()));
            whole.extend_from_slice(&bytes);
            for input in [&bytes[..], &whole[..]] {
                if let Ok(m) = Moved::decode(input) {
                    let again = Moved::decode(&m.encode().unwrap()).unwrap();
                    proptest::prop_assert_eq!(again.subscriptions, m.subscriptions);
                    proptest::prop_assert_eq!(again.qos2_received, m.qos2_received);
                    proptest::prop_assert_eq!(again.queued.len(), m.queued.len());
                    proptest::prop_assert_eq!(again.inflight.len(), m.inflight.len());
                }
            }
        }
    }

    #[test]
    fn damaged_bytes_are_errors_not_panics() {
        let bytes = session().encode().unwrap();
        for n in 0..bytes.len() {
            assert!(Moved::decode(&bytes[..n]).is_err());
        }
        let mut more = bytes.clone();
        more.push(0);
        assert!(Moved::decode(&more).is_err());
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0xff;
            let _ = Moved::decode(&b);
        }
    }
}
