//! Bytes → packets. Framing does no I/O: [`decode_packet`] looks at the front of the
//! connection's read buffer, answers "need more bytes" until one whole packet is there, then
//! splits it off and parses it. Oversized packets and broken fixed headers are rejected as
//! soon as the fixed header is readable, before any body is buffered.
//!
//! Both directions decode (CONNACK and SUBACK as well as CONNECT and SUBSCRIBE), so a client
//! or load generator can share the codec. Which packets a side may *receive* is the
//! session's business, as are limits negotiated in CONNECT (topic alias maximum, receive
//! maximum, …).

use bytes::{Buf, Bytes, BytesMut};

use super::error::{ConnectError, DecodeError};
use super::packet::{
    Ack, AckProperties, Auth, AuthProperties, ConnAck, ConnAckProperties, Connect,
    ConnectProperties, Disconnect, DisconnectProperties, Packet, Publish, PublishProperties,
    PublishQoS, RetainHandling, SubAck, Subscribe, SubscribeProperties, SubscriptionOptions,
    UnsubAck, Unsubscribe, UserProperties, Will, WillProperties,
};
use super::properties;
use super::reader::{DecodeLimits, Reader, parse_varint};
use super::reason::{self, Carrier};
use super::types::{
    PacketId, ProtocolVersion, QoS, ReasonCode, TopicError, TopicFilter, TopicName,
};

const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const UNSUBSCRIBE: u8 = 10;
const UNSUBACK: u8 = 11;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;
const AUTH: u8 = 15;

/// The fixed header of a packet whose remaining length is known.
struct FixedHeader {
    /// Packet type, 1–15.
    kind: u8,
    /// The low nibble of the first byte.
    flags: u8,
    /// Bytes of the fixed header (1 + length of the remaining-length integer).
    header_len: usize,
    /// Remaining Length.
    body_len: usize,
}

impl FixedHeader {
    fn total(&self) -> usize {
        self.header_len + self.body_len
    }
}

/// Checks the flag bits of the first byte against the packet type (MQTT 3.1.1 §2.2.2,
/// MQTT 5 §2.1.3): fixed values everywhere but PUBLISH, whose QoS may not be 3
/// (MQTT-3.3.1-4) and whose DUP must be 0 at QoS 0 (MQTT-3.3.1-2).
fn check_first_byte(kind: u8, flags: u8, version: ProtocolVersion) -> Result<(), DecodeError> {
    match kind {
        0 => Err(DecodeError::Malformed("packet type 0 is reserved")),
        PUBLISH => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                Err(DecodeError::Malformed("PUBLISH with QoS 3"))
            } else if qos == 0 && flags & 0b1000 != 0 {
                Err(DecodeError::Malformed("PUBLISH with DUP set at QoS 0"))
            } else {
                Ok(())
            }
        }
        PUBREL | SUBSCRIBE | UNSUBSCRIBE if flags != 0b0010 => Err(DecodeError::Malformed(
            "fixed header flags of PUBREL, SUBSCRIBE or UNSUBSCRIBE are not 0010",
        )),
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => Ok(()),
        AUTH if !version.is_v5() => Err(DecodeError::Malformed("AUTH is not an MQTT 3.x packet")),
        _ if flags != 0 => Err(DecodeError::Malformed(
            "reserved fixed header flags are not 0",
        )),
        _ => Ok(()),
    }
}

/// Reads the remaining length after the first byte; `Ok(None)` until it is complete.
/// The whole length (fixed header included) of the packet at the front of `buf`, once its
/// fixed header is there; `None` before, or when the header is malformed (decoding says
/// why).
pub fn packet_len(buf: &[u8]) -> Option<usize> {
    fixed_header(buf).ok().flatten().map(|h| h.total())
}

fn fixed_header(buf: &[u8]) -> Result<Option<FixedHeader>, DecodeError> {
    let Some((&first, rest)) = buf.split_first() else {
        return Ok(None);
    };
    let Some((body_len, len_len)) = parse_varint(rest)? else {
        return Ok(None);
    };
    Ok(Some(FixedHeader {
        kind: first >> 4,
        flags: first & 0x0F,
        header_len: 1 + len_len,
        body_len: usize::try_from(body_len)
            .map_err(|_| DecodeError::Malformed("remaining length does not fit in memory"))?,
    }))
}

fn check_size(header: &FixedHeader, max_packet_size: u32) -> Result<(), DecodeError> {
    let size = header.total();
    if u64::try_from(size).unwrap_or(u64::MAX) > u64::from(max_packet_size) {
        return Err(DecodeError::PacketTooLarge {
            size,
            max: max_packet_size,
        });
    }
    Ok(())
}

/// Splits the packet's body off the front of `buf` as `Bytes`, so that payloads handed out
/// later are zero-copy slices of it. The caller has checked that it is all there.
fn split_body(buf: &mut BytesMut, header: &FixedHeader) -> Bytes {
    buf.advance(header.header_len);
    if header.body_len == 0 {
        Bytes::new()
    } else {
        buf.split_to(header.body_len).freeze()
    }
}

/// Decodes one packet from the front of `buf` if the whole packet is there.
///
/// `Ok(None)` means more bytes are needed; nothing is consumed then. On `Ok(Some)` the
/// packet's bytes are consumed and byte fields (PUBLISH payload, password, correlation
/// data…) are zero-copy slices of them. `version` is the version the connection speaks
/// (3.x peers may not send properties or AUTH). `max_packet_size` bounds the whole packet,
/// fixed header included, and is checked as soon as the fixed header is readable, so an
/// oversized packet is refused before its body is buffered. After an error the connection
/// must be closed: how much of `buf` was consumed is unspecified.
///
/// A CONNECT found here is decoded with its own protocol version; rejecting a second
/// CONNECT is the session's job.
pub fn decode_packet(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: u32,
) -> Result<Option<Packet>, DecodeError> {
    decode_packet_limited(buf, version, &DecodeLimits::size_only(max_packet_size))
}

/// [`decode_packet`] with `limits` on the fields a packet may repeat, checked as they are
/// read (before what they would cost is allocated).
pub fn decode_packet_limited(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    limits: &DecodeLimits,
) -> Result<Option<Packet>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    check_first_byte(first >> 4, first & 0x0F, version)?;
    let Some(header) = fixed_header(buf)? else {
        return Ok(None);
    };
    check_size(&header, limits.max_packet_size)?;
    if buf.len() < header.total() {
        return Ok(None);
    }
    let body = split_body(buf, &header);
    decode_body(&header, &body, version, limits).map(Some)
}

/// Decodes the first packet of a connection, which must be CONNECT (MQTT-3.1.0-1); its
/// protocol name and level decide the version of everything after it.
///
/// `Ok(None)` means more bytes are needed. A first byte that is not CONNECT fails at once
/// with [`DecodeError::NotConnect`]. On failure, [`ConnectError::version`] tells which
/// version the client asked for when that much was readable, so the server can refuse in
/// kind (a v5 CONNACK with the reason code, or a 3.x return code).
pub fn decode_connect(
    buf: &mut BytesMut,
    max_packet_size: u32,
) -> Result<Option<Box<Connect>>, ConnectError> {
    decode_connect_limited(buf, &DecodeLimits::size_only(max_packet_size))
}

/// [`decode_connect`] with `limits` on the fields a packet may repeat.
pub fn decode_connect_limited(
    buf: &mut BytesMut,
    limits: &DecodeLimits,
) -> Result<Option<Box<Connect>>, ConnectError> {
    let max_packet_size = limits.max_packet_size;
    let unknown = |error| ConnectError {
        version: None,
        error,
    };
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first >> 4 != CONNECT {
        return Err(unknown(DecodeError::NotConnect));
    }
    check_first_byte(CONNECT, first & 0x0F, ProtocolVersion::V5).map_err(unknown)?;
    let Some(header) = fixed_header(buf).map_err(unknown)? else {
        return Ok(None);
    };
    if let Err(error) = check_size(&header, max_packet_size) {
        let version = buf.get(header.header_len..).and_then(peek_version);
        return Err(ConnectError { version, error });
    }
    if buf.len() < header.total() {
        return Ok(None);
    }
    let body = split_body(buf, &header);
    let mut r = Reader::limited(&body, *limits);
    let connect = connect(&mut r)?;
    r.finish().map_err(|error| ConnectError {
        version: Some(connect.protocol),
        error,
    })?;
    Ok(Some(Box::new(connect)))
}

/// The version named by the start of a CONNECT body, if that much is buffered and known.
fn peek_version(body: &[u8]) -> Option<ProtocolVersion> {
    let (len, rest) = body.split_first_chunk::<2>()?;
    let (name, rest) = rest.split_at_checked(usize::from(u16::from_be_bytes(*len)))?;
    protocol(name, *rest.first()?).ok()
}

/// The version for a protocol name and level (MQTT 3.1.1 §3.1.2.1–2, MQTT 5 §3.1.2.1–2).
fn protocol(name: &[u8], level: u8) -> Result<ProtocolVersion, DecodeError> {
    match (name, level) {
        // 0x80: a bridge (Mosquitto's `try_private`), 3.x only.
        (b"MQTT", 4 | 0x84) => Ok(ProtocolVersion::V3_1_1),
        (b"MQTT", 5) => Ok(ProtocolVersion::V5),
        (b"MQIsdp", 3 | 0x83) => Ok(ProtocolVersion::V3_1),
        (b"MQTT" | b"MQIsdp", level) => Err(DecodeError::UnsupportedProtocolVersion { level }),
        _ => Err(DecodeError::Malformed("unknown protocol name")),
    }
}

fn decode_body(
    header: &FixedHeader,
    body: &Bytes,
    version: ProtocolVersion,
    limits: &DecodeLimits,
) -> Result<Packet, DecodeError> {
    let mut r = Reader::limited(body, *limits);
    let v5 = version.is_v5();
    let packet = match header.kind {
        CONNECT => Packet::Connect(Box::new(connect(&mut r).map_err(|e| e.error)?)),
        CONNACK => Packet::ConnAck(connack(&mut r, version)?),
        PUBLISH => Packet::Publish(publish(&mut r, header.flags, v5)?),
        PUBACK => Packet::PubAck(ack(&mut r, v5, Carrier::PubAck)?),
        PUBREC => Packet::PubRec(ack(&mut r, v5, Carrier::PubRec)?),
        PUBREL => Packet::PubRel(ack(&mut r, v5, Carrier::PubRel)?),
        PUBCOMP => Packet::PubComp(ack(&mut r, v5, Carrier::PubComp)?),
        SUBSCRIBE => Packet::Subscribe(subscribe(&mut r, v5)?),
        SUBACK => Packet::SubAck(suback(&mut r, v5)?),
        UNSUBSCRIBE => Packet::Unsubscribe(unsubscribe(&mut r, v5)?),
        UNSUBACK => Packet::UnsubAck(unsuback(&mut r, v5)?),
        PINGREQ => Packet::PingReq,
        PINGRESP => Packet::PingResp,
        DISCONNECT => Packet::Disconnect(disconnect(&mut r, v5)?),
        AUTH => Packet::Auth(auth(&mut r)?),
        _ => return Err(DecodeError::Malformed("unknown packet type")),
    };
    r.finish()?;
    Ok(packet)
}

fn packet_id(r: &mut Reader<'_>) -> Result<PacketId, DecodeError> {
    PacketId::new(r.u16()?).ok_or(DecodeError::Malformed("packet identifier 0"))
}

fn topic_name_error(e: TopicError) -> DecodeError {
    DecodeError::Malformed(match e {
        TopicError::Empty => "empty topic name",
        TopicError::WildcardInName => "wildcard in topic name",
        TopicError::NullCharacter => "U+0000 in topic name",
        _ => "invalid topic name",
    })
}

fn topic_filter_error(e: TopicError) -> DecodeError {
    DecodeError::Malformed(match e {
        TopicError::Empty => "empty topic filter",
        TopicError::MisplacedWildcard => "misplaced wildcard in topic filter",
        TopicError::InvalidShare => "invalid shared subscription filter",
        TopicError::NullCharacter => "U+0000 in topic filter",
        _ => "invalid topic filter",
    })
}

/// CONNECT body (MQTT 3.1.1 §3.1, MQTT 5 §3.1). Errors after the protocol level carry the
/// version.
fn connect(r: &mut Reader<'_>) -> Result<Connect, ConnectError> {
    let unknown = |error| ConnectError {
        version: None,
        error,
    };
    let name = r.prefixed().map_err(unknown)?;
    let level = r.u8().map_err(unknown)?;
    let version = protocol(name, level).map_err(unknown)?;
    let mut c = connect_after_level(r, version).map_err(|error| ConnectError {
        version: Some(version),
        error,
    })?;
    c.bridge = level & 0x80 != 0;
    Ok(c)
}

fn connect_after_level(
    r: &mut Reader<'_>,
    version: ProtocolVersion,
) -> Result<Connect, DecodeError> {
    let v5 = version.is_v5();
    let flags = r.u8()?;
    // MQTT-3.1.2-3
    if flags & 0x01 != 0 {
        return Err(DecodeError::Malformed("CONNECT reserved flag is set"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    // MQTT-3.1.2-11/13/15 (3.1.1), §3.1.2.6 (5)
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(DecodeError::Malformed(
            "will QoS or retain set without will flag",
        ));
    }
    let will_qos = QoS::from_bits(will_qos).ok_or(DecodeError::Malformed("will QoS 3"))?;
    // MQTT-3.1.2-22; MQTT 5 allows a password without a user name.
    if !v5 && password_flag && !username_flag {
        return Err(DecodeError::Malformed(
            "password flag without user name flag",
        ));
    }
    let keep_alive = r.u16()?;
    let properties = if v5 {
        properties::connect(r)?
    } else {
        ConnectProperties::default()
    };
    let client_id = r.str()?.to_owned();
    let will = if will_flag {
        let properties = if v5 {
            properties::will(r)?
        } else {
            WillProperties::default()
        };
        let topic = TopicName::new(r.str()?).map_err(topic_name_error)?;
        let payload = r.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(r.str()?.to_owned())
    } else {
        None
    };
    let password = if password_flag {
        Some(r.binary()?)
    } else {
        None
    };
    Ok(Connect {
        protocol: version,
        clean_start,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
        bridge: false,
    })
}

/// CONNACK (MQTT 3.1.1 §3.2, MQTT 5 §3.2).
fn connack(r: &mut Reader<'_>, version: ProtocolVersion) -> Result<ConnAck, DecodeError> {
    let flags = r.u8()?;
    if flags & 0xFE != 0 {
        return Err(DecodeError::Malformed("CONNACK reserved flags are not 0"));
    }
    // MQTT 3.1 has no Session Present flag: the byte is unused there, and so is the bit.
    let session_present = flags & 0x01 != 0 && version != ProtocolVersion::V3_1;
    let code = r.u8()?;
    let (reason, properties) = if version.is_v5() {
        let reason = ReasonCode::from_u8(code)
            .filter(|c| Carrier::ConnAck.allows(*c))
            .ok_or(DecodeError::Malformed(Carrier::ConnAck.bad_reason()))?;
        (reason, properties::connack(r)?)
    } else {
        let reason = reason::from_connack_return_code(code)
            .ok_or(DecodeError::Malformed("reserved CONNACK return code"))?;
        (reason, ConnAckProperties::default())
    };
    // MQTT-3.2.2-4 (3.1.1), MQTT-3.2.2-6 (5)
    if session_present && reason != ReasonCode::Success {
        return Err(DecodeError::Protocol(
            "session present with a refused connection",
        ));
    }
    Ok(ConnAck {
        session_present,
        reason,
        properties,
    })
}

/// PUBLISH (MQTT 3.1.1 §3.3, MQTT 5 §3.3).
fn publish(r: &mut Reader<'_>, flags: u8, v5: bool) -> Result<Publish, DecodeError> {
    let dup = flags & 0b1000 != 0;
    let retain = flags & 0b0001 != 0;
    let topic = r.str()?;
    let qos = match QoS::from_bits((flags >> 1) & 0b11) {
        Some(QoS::AtMostOnce) => PublishQoS::AtMostOnce,
        Some(QoS::AtLeastOnce) => PublishQoS::AtLeastOnce(packet_id(r)?),
        Some(QoS::ExactlyOnce) => PublishQoS::ExactlyOnce(packet_id(r)?),
        None => return Err(DecodeError::Malformed("PUBLISH with QoS 3")),
    };
    let properties = if v5 {
        properties::publish(r)?
    } else {
        PublishProperties::default()
    };
    let topic = if topic.is_empty() && v5 {
        // MQTT 5 §3.3.2.1: a zero-length topic names the message by its alias alone.
        if properties.topic_alias.is_none() {
            return Err(DecodeError::Protocol(
                "empty topic name without Topic Alias",
            ));
        }
        None
    } else {
        Some(TopicName::new(topic).map_err(topic_name_error)?)
    };
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        payload: r.rest(),
        properties,
    })
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP (MQTT 5 §3.4–3.7). In MQTT 5 the reason code and the
/// properties may be left out (remaining length 2 or 3).
fn ack(r: &mut Reader<'_>, v5: bool, carrier: Carrier) -> Result<Ack, DecodeError> {
    let packet_id = packet_id(r)?;
    if !v5 || r.is_empty() {
        return Ok(Ack::success(packet_id));
    }
    let reason = reason_code(r, carrier)?;
    let properties = if r.is_empty() {
        AckProperties::default()
    } else {
        properties::ack(r, ack_misplaced(carrier))?
    };
    Ok(Ack {
        packet_id,
        reason,
        properties,
    })
}

fn ack_misplaced(carrier: Carrier) -> &'static str {
    match carrier {
        Carrier::PubAck => "property not allowed in PUBACK",
        Carrier::PubRec => "property not allowed in PUBREC",
        Carrier::PubRel => "property not allowed in PUBREL",
        Carrier::PubComp => "property not allowed in PUBCOMP",
        Carrier::SubAck => "property not allowed in SUBACK",
        _ => "property not allowed in UNSUBACK",
    }
}

fn reason_code(r: &mut Reader<'_>, carrier: Carrier) -> Result<ReasonCode, DecodeError> {
    ReasonCode::from_u8(r.u8()?)
        .filter(|c| carrier.allows(*c))
        .ok_or(DecodeError::Malformed(carrier.bad_reason()))
}

/// SUBSCRIBE (MQTT 3.1.1 §3.8, MQTT 5 §3.8).
fn subscribe(r: &mut Reader<'_>, v5: bool) -> Result<Subscribe, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = if v5 {
        properties::subscribe(r)?
    } else {
        SubscribeProperties::default()
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = TopicFilter::new(r.str()?).map_err(topic_filter_error)?;
        let options = subscription_options(r.u8()?, v5)?;
        // MQTT-3.8.3-4
        if options.no_local && filter.share_group().is_some() {
            return Err(DecodeError::Protocol("No Local on a shared subscription"));
        }
        if filters.len() >= r.limits.max_filters {
            return Err(DecodeError::OverLimit(
                "more topic filters in one SUBSCRIBE",
            ));
        }
        filters.push((filter, options));
    }
    // MQTT 3.1.1 MQTT-3.8.3-3, MQTT 5 MQTT-3.8.3-2
    if filters.is_empty() {
        return Err(DecodeError::Protocol("SUBSCRIBE without topic filters"));
    }
    Ok(Subscribe {
        packet_id,
        filters,
        properties,
    })
}

/// The Subscription Options byte (MQTT 5 §3.8.3.1) or, for 3.x, the Requested QoS byte whose
/// upper six bits are reserved (3.1.1 MQTT-3.8.3-4: malformed if not 0).
fn subscription_options(b: u8, v5: bool) -> Result<SubscriptionOptions, DecodeError> {
    if !v5 {
        if b & 0xFC != 0 {
            return Err(DecodeError::Malformed(
                "reserved bits of requested QoS are not 0",
            ));
        }
        let qos = QoS::from_bits(b).ok_or(DecodeError::Malformed("requested QoS 3"))?;
        return Ok(SubscriptionOptions::qos(qos));
    }
    // MQTT-3.8.3-5
    if b & 0xC0 != 0 {
        return Err(DecodeError::Malformed(
            "reserved subscription option bits are not 0",
        ));
    }
    // §3.8.3.1: QoS 3 and Retain Handling 3 are Protocol Errors.
    let qos = QoS::from_bits(b & 0b11).ok_or(DecodeError::Protocol("subscription QoS 3"))?;
    let retain_handling = match (b >> 4) & 0b11 {
        0 => RetainHandling::SendAtSubscribe,
        1 => RetainHandling::SendIfNew,
        2 => RetainHandling::DoNotSend,
        _ => return Err(DecodeError::Protocol("Retain Handling 3")),
    };
    Ok(SubscriptionOptions {
        qos,
        no_local: b & 0b0100 != 0,
        retain_as_published: b & 0b1000 != 0,
        retain_handling,
    })
}

/// SUBACK (MQTT 3.1.1 §3.9, MQTT 5 §3.9).
fn suback(r: &mut Reader<'_>, v5: bool) -> Result<SubAck, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = if v5 {
        properties::ack(r, ack_misplaced(Carrier::SubAck))?
    } else {
        AckProperties::default()
    };
    let mut reasons = Vec::with_capacity(r.remaining());
    while !r.is_empty() {
        let code = r.u8()?;
        let reason = if v5 {
            ReasonCode::from_u8(code).filter(|c| Carrier::SubAck.allows(*c))
        } else {
            reason::from_suback_return_code(code)
        };
        reasons.push(reason.ok_or(DecodeError::Malformed(Carrier::SubAck.bad_reason()))?);
    }
    Ok(SubAck {
        packet_id,
        reasons,
        properties,
    })
}

/// UNSUBSCRIBE (MQTT 3.1.1 §3.10, MQTT 5 §3.10).
fn unsubscribe(r: &mut Reader<'_>, v5: bool) -> Result<Unsubscribe, DecodeError> {
    let packet_id = packet_id(r)?;
    let user_properties = if v5 {
        properties::unsubscribe(r)?
    } else {
        UserProperties::default()
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        if filters.len() >= r.limits.max_filters {
            return Err(DecodeError::OverLimit(
                "more topic filters in one UNSUBSCRIBE",
            ));
        }
        filters.push(TopicFilter::new(r.str()?).map_err(topic_filter_error)?);
    }
    // MQTT-3.10.3-2
    if filters.is_empty() {
        return Err(DecodeError::Protocol("UNSUBSCRIBE without topic filters"));
    }
    Ok(Unsubscribe {
        packet_id,
        filters,
        user_properties,
    })
}

/// UNSUBACK (MQTT 3.1.1 §3.11: packet identifier only; MQTT 5 §3.11).
fn unsuback(r: &mut Reader<'_>, v5: bool) -> Result<UnsubAck, DecodeError> {
    let packet_id = packet_id(r)?;
    if !v5 {
        return Ok(UnsubAck {
            packet_id,
            reasons: Vec::new(),
            properties: AckProperties::default(),
        });
    }
    let properties = properties::ack(r, ack_misplaced(Carrier::UnsubAck))?;
    let mut reasons = Vec::with_capacity(r.remaining());
    while !r.is_empty() {
        reasons.push(reason_code(r, Carrier::UnsubAck)?);
    }
    Ok(UnsubAck {
        packet_id,
        reasons,
        properties,
    })
}

/// DISCONNECT (MQTT 3.1.1 §3.14: empty; MQTT 5 §3.14: remaining length 0 means normal
/// disconnection, 1 means a reason code without properties).
fn disconnect(r: &mut Reader<'_>, v5: bool) -> Result<Disconnect, DecodeError> {
    if !v5 || r.is_empty() {
        return Ok(Disconnect::new(ReasonCode::Success));
    }
    let reason = reason_code(r, Carrier::Disconnect)?;
    let properties = if r.is_empty() {
        DisconnectProperties::default()
    } else {
        properties::disconnect(r)?
    };
    Ok(Disconnect { reason, properties })
}

/// AUTH (MQTT 5 §3.15): remaining length 0 means Success without properties.
fn auth(r: &mut Reader<'_>) -> Result<Auth, DecodeError> {
    if r.is_empty() {
        return Ok(Auth {
            reason: ReasonCode::Success,
            properties: AuthProperties::default(),
        });
    }
    let reason = reason_code(r, Carrier::Auth)?;
    let properties = if r.is_empty() {
        AuthProperties::default()
    } else {
        properties::auth(r)?
    };
    Ok(Auth { reason, properties })
}
