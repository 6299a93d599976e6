//! Packets → bytes. Each packet is measured and validated first (nothing is written when it
//! cannot be encoded), then `out` grows once and the fields are put straight into it.
//!
//! The encoder writes only what the peer's version can carry: for MQTT 3.x it drops
//! properties and reason codes (mapping CONNACK and SUBACK codes to 3.x return codes) and
//! refuses AUTH. Everything it writes is accepted by the decoder.

use bytes::{BufMut, BytesMut};

use super::error::EncodeError;
use super::packet::{
    Ack, Auth, ConnAck, Connect, Disconnect, Packet, Publish, PublishQoS, RetainHandling, SubAck,
    Subscribe, SubscriptionOptions, UnsubAck, Unsubscribe,
};
use super::property_write::{
    self as props, Writer, bin_len, put_prefixed, put_varint, size_of, str_len, varint_len,
};
use super::reason::{self, Carrier};
use super::types::{ProtocolVersion, ReasonCode};

/// The largest remaining length a packet can have (MQTT 5 §2.1.4).
const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Encodes `packet` for a peer speaking `version` and appends it to `out`.
///
/// On error nothing is written. A CONNECT is encoded in its own `protocol` version. Note that
/// a server must not send DISCONNECT to a 3.x client (3.x has no server DISCONNECT); the
/// encoder does not know the direction and leaves that rule to the caller.
pub fn encode_packet(
    packet: &Packet,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let v5 = version.is_v5();
    match packet {
        Packet::Connect(c) => connect(c, out),
        Packet::ConnAck(c) => connack(c, version, out),
        Packet::Publish(p) => publish(p, v5, out),
        Packet::PubAck(a) => ack(a, 0x40, Carrier::PubAck, v5, out),
        Packet::PubRec(a) => ack(a, 0x50, Carrier::PubRec, v5, out),
        Packet::PubRel(a) => ack(a, 0x62, Carrier::PubRel, v5, out),
        Packet::PubComp(a) => ack(a, 0x70, Carrier::PubComp, v5, out),
        Packet::Subscribe(s) => subscribe(s, v5, out),
        Packet::SubAck(s) => suback(s, v5, out),
        Packet::Unsubscribe(u) => unsubscribe(u, v5, out),
        Packet::UnsubAck(u) => unsuback(u, v5, out),
        Packet::PingReq => header(out, 0xC0, 0),
        Packet::PingResp => header(out, 0xD0, 0),
        Packet::Disconnect(d) => disconnect(d, v5, out),
        Packet::Auth(a) if v5 => auth(a, out),
        Packet::Auth(_) => Err(EncodeError::NotInVersion {
            packet: "AUTH",
            version,
        }),
    }
}

/// Exact encoded size of `p` (fixed header included) for a peer speaking `version`, without
/// encoding it: what the connection compares with the client's Maximum Packet Size.
/// `usize::MAX` when the PUBLISH cannot be encoded at all ([`encode_packet`] would fail).
pub fn publish_len(p: &Publish, version: ProtocolVersion) -> usize {
    match publish_layout(p, version.is_v5()) {
        Ok(layout) => 1 + varint_len(layout.remaining) + layout.remaining,
        Err(_) => usize::MAX,
    }
}

/// Checks the remaining length, grows `out` once for the whole packet and writes the fixed
/// header.
fn header(out: &mut BytesMut, first: u8, remaining: usize) -> Result<(), EncodeError> {
    if remaining > MAX_REMAINING_LENGTH {
        return Err(EncodeError::PacketTooLarge { len: remaining });
    }
    out.reserve(1 + varint_len(remaining) + remaining);
    out.put_u8(first);
    put_varint(out, remaining);
    Ok(())
}

/// Size of a property section with its length prefix.
fn with_len(props: usize) -> usize {
    varint_len(props) + props
}

fn check_reason(carrier: Carrier, code: ReasonCode) -> Result<(), EncodeError> {
    if carrier.allows(code) {
        Ok(())
    } else {
        Err(EncodeError::InvalidReasonCode {
            packet: carrier.name(),
            code,
        })
    }
}

/// CONNECT (MQTT 3.1.1 §3.1, MQTT 5 §3.1), in the version it names.
fn connect(c: &Connect, out: &mut BytesMut) -> Result<(), EncodeError> {
    let v5 = c.protocol.is_v5();
    let name = c.protocol.name();
    if !v5 && c.password.is_some() && c.username.is_none() {
        return Err(EncodeError::InvalidValue(
            "MQTT 3.x cannot send a password without a user name",
        ));
    }
    let mut remaining = 2 + name.len() + 1 + 1 + 2 + str_len(&c.client_id, "client identifier")?;
    let props = if v5 {
        let n = size_of(|s| props::put_connect(&c.properties, s))?;
        remaining += with_len(n);
        n
    } else {
        0
    };
    let will_props = match &c.will {
        Some(will) => {
            remaining += 2 + will.topic.as_str().len() + bin_len(&will.payload, "will payload")?;
            if v5 {
                let n = size_of(|s| props::put_will(&will.properties, s))?;
                remaining += with_len(n);
                n
            } else {
                0
            }
        }
        None => 0,
    };
    if let Some(u) = &c.username {
        remaining += str_len(u, "user name")?;
    }
    if let Some(p) = &c.password {
        remaining += bin_len(p, "password")?;
    }

    let mut flags = 0u8;
    if c.clean_start {
        flags |= 0x02;
    }
    if let Some(will) = &c.will {
        flags |= 0x04 | (will.qos.bits() << 3);
        if will.retain {
            flags |= 0x20;
        }
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }

    header(out, 0x10, remaining)?;
    put_prefixed(out, name.as_bytes());
    out.put_u8(c.protocol.level() | if c.bridge && !v5 { 0x80 } else { 0 });
    out.put_u8(flags);
    out.put_u16(c.keep_alive);
    if v5 {
        put_varint(out, props);
        props::put_connect(&c.properties, &mut Writer(out))?;
    }
    put_prefixed(out, c.client_id.as_bytes());
    if let Some(will) = &c.will {
        if v5 {
            put_varint(out, will_props);
            props::put_will(&will.properties, &mut Writer(out))?;
        }
        put_prefixed(out, will.topic.as_str().as_bytes());
        put_prefixed(out, &will.payload);
    }
    if let Some(u) = &c.username {
        put_prefixed(out, u.as_bytes());
    }
    if let Some(p) = &c.password {
        put_prefixed(out, p);
    }
    Ok(())
}

/// CONNACK (MQTT 3.1.1 §3.2, MQTT 5 §3.2). Session Present is forced to 0 with an error
/// code (MQTT-3.2.2-4/-6) and for MQTT 3.1, whose CONNACK has no such flag.
fn connack(c: &ConnAck, version: ProtocolVersion, out: &mut BytesMut) -> Result<(), EncodeError> {
    let session_present =
        c.session_present && c.reason == ReasonCode::Success && version != ProtocolVersion::V3_1;
    let flags = u8::from(session_present);
    if !version.is_v5() {
        let code = reason::connack_return_code(c.reason).ok_or(EncodeError::InvalidReasonCode {
            packet: "CONNACK",
            code: c.reason,
        })?;
        header(out, 0x20, 2)?;
        out.put_u8(flags);
        out.put_u8(code);
        return Ok(());
    }
    check_reason(Carrier::ConnAck, c.reason)?;
    let props = size_of(|s| props::put_connack(&c.properties, s))?;
    header(out, 0x20, 2 + with_len(props))?;
    out.put_u8(flags);
    out.put_u8(c.reason.code());
    put_varint(out, props);
    props::put_connack(&c.properties, &mut Writer(out))
}

/// Sizes of a PUBLISH.
struct PublishLayout {
    remaining: usize,
    props: usize,
}

fn publish_layout(p: &Publish, v5: bool) -> Result<PublishLayout, EncodeError> {
    let topic = match &p.topic {
        Some(t) => 2 + t.as_str().len(),
        None if v5 && p.properties.topic_alias.is_some() => 2,
        None => {
            return Err(EncodeError::InvalidValue(
                "PUBLISH without topic name needs a Topic Alias (MQTT 5 only)",
            ));
        }
    };
    let id = if p.qos == PublishQoS::AtMostOnce {
        0
    } else {
        2
    };
    let props = if v5 {
        size_of(|s| props::put_publish(&p.properties, s))?
    } else {
        0
    };
    let remaining = topic + id + if v5 { with_len(props) } else { 0 } + p.payload.len();
    if remaining > MAX_REMAINING_LENGTH {
        return Err(EncodeError::PacketTooLarge { len: remaining });
    }
    Ok(PublishLayout { remaining, props })
}

/// PUBLISH (MQTT 3.1.1 §3.3, MQTT 5 §3.3). DUP is never set at QoS 0 (MQTT-3.3.1-2).
fn publish(p: &Publish, v5: bool, out: &mut BytesMut) -> Result<(), EncodeError> {
    // Room for the whole packet at once: a large payload is copied once, not again as the
    // buffer grows around it.
    publish_head(p, v5, out, p.payload.len())?;
    out.put_slice(&p.payload);
    Ok(())
}

/// Encodes a PUBLISH for a peer speaking `version` without its payload, which the caller
/// sends right after these bytes (from the shared message, not copied).
pub fn encode_publish_head(
    p: &Publish,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    publish_head(p, version.is_v5(), out, 0)
}

/// Everything of a PUBLISH before its payload, into room for `more` bytes after it.
fn publish_head(p: &Publish, v5: bool, out: &mut BytesMut, more: usize) -> Result<(), EncodeError> {
    let layout = publish_layout(p, v5)?;
    out.reserve(5 + layout.remaining - p.payload.len() + more);
    let mut first = 0x30 | (p.qos.qos().bits() << 1);
    if p.dup && p.qos != PublishQoS::AtMostOnce {
        first |= 0x08;
    }
    if p.retain {
        first |= 0x01;
    }
    header(out, first, layout.remaining)?;
    match &p.topic {
        Some(t) => put_prefixed(out, t.as_str().as_bytes()),
        None => out.put_u16(0),
    }
    if let Some(id) = p.qos.packet_id() {
        out.put_u16(id.get());
    }
    if v5 {
        put_varint(out, layout.props);
        props::put_publish(&p.properties, &mut Writer(out))?;
    }
    Ok(())
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP. MQTT 5 uses the short forms where allowed: remaining
/// length 2 for Success without properties, 3 for a reason code without properties.
fn ack(
    a: &Ack,
    first: u8,
    carrier: Carrier,
    v5: bool,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    if !v5 {
        header(out, first, 2)?;
        out.put_u16(a.packet_id.get());
        return Ok(());
    }
    check_reason(carrier, a.reason)?;
    let props = size_of(|s| props::put_ack(&a.properties, s))?;
    if props == 0 {
        if a.reason == ReasonCode::Success {
            header(out, first, 2)?;
            out.put_u16(a.packet_id.get());
        } else {
            header(out, first, 3)?;
            out.put_u16(a.packet_id.get());
            out.put_u8(a.reason.code());
        }
        return Ok(());
    }
    header(out, first, 3 + with_len(props))?;
    out.put_u16(a.packet_id.get());
    out.put_u8(a.reason.code());
    put_varint(out, props);
    props::put_ack(&a.properties, &mut Writer(out))
}

/// The options byte of one subscription: MQTT 5 §3.8.3.1, or the bare QoS for 3.x.
fn options_byte(o: &SubscriptionOptions, v5: bool) -> u8 {
    let mut b = o.qos.bits();
    if v5 {
        if o.no_local {
            b |= 0b0100;
        }
        if o.retain_as_published {
            b |= 0b1000;
        }
        b |= match o.retain_handling {
            RetainHandling::SendAtSubscribe => 0,
            RetainHandling::SendIfNew => 1 << 4,
            RetainHandling::DoNotSend => 2 << 4,
        };
    }
    b
}

/// SUBSCRIBE (MQTT 3.1.1 §3.8, MQTT 5 §3.8).
fn subscribe(s: &Subscribe, v5: bool, out: &mut BytesMut) -> Result<(), EncodeError> {
    if s.filters.is_empty() {
        return Err(EncodeError::InvalidValue("SUBSCRIBE without topic filters"));
    }
    let mut remaining = 2;
    for (filter, options) in &s.filters {
        if v5 && options.no_local && filter.share_group().is_some() {
            return Err(EncodeError::InvalidValue(
                "No Local on a shared subscription",
            ));
        }
        remaining += 2 + filter.as_str().len() + 1;
    }
    let props = if v5 {
        let n = size_of(|sink| props::put_subscribe(&s.properties, sink))?;
        remaining += with_len(n);
        n
    } else {
        0
    };
    header(out, 0x82, remaining)?;
    out.put_u16(s.packet_id.get());
    if v5 {
        put_varint(out, props);
        props::put_subscribe(&s.properties, &mut Writer(out))?;
    }
    for (filter, options) in &s.filters {
        put_prefixed(out, filter.as_str().as_bytes());
        out.put_u8(options_byte(options, v5));
    }
    Ok(())
}

/// SUBACK (MQTT 3.1.1 §3.9, MQTT 5 §3.9). 3.x gets 0x80 for every error code.
fn suback(s: &SubAck, v5: bool, out: &mut BytesMut) -> Result<(), EncodeError> {
    let bad = |code| EncodeError::InvalidReasonCode {
        packet: "SUBACK",
        code,
    };
    let mut remaining = 2 + s.reasons.len();
    let props = if v5 {
        for &code in &s.reasons {
            check_reason(Carrier::SubAck, code)?;
        }
        let n = size_of(|sink| props::put_ack(&s.properties, sink))?;
        remaining += with_len(n);
        n
    } else {
        for &code in &s.reasons {
            reason::suback_return_code(code).ok_or(bad(code))?;
        }
        0
    };
    header(out, 0x90, remaining)?;
    out.put_u16(s.packet_id.get());
    if v5 {
        put_varint(out, props);
        props::put_ack(&s.properties, &mut Writer(out))?;
        for code in &s.reasons {
            out.put_u8(code.code());
        }
    } else {
        for &code in &s.reasons {
            out.put_u8(reason::suback_return_code(code).unwrap_or(0x80));
        }
    }
    Ok(())
}

/// UNSUBSCRIBE (MQTT 3.1.1 §3.10, MQTT 5 §3.10).
fn unsubscribe(u: &Unsubscribe, v5: bool, out: &mut BytesMut) -> Result<(), EncodeError> {
    if u.filters.is_empty() {
        return Err(EncodeError::InvalidValue(
            "UNSUBSCRIBE without topic filters",
        ));
    }
    let mut remaining = 2;
    for filter in &u.filters {
        remaining += 2 + filter.as_str().len();
    }
    let props = if v5 {
        let n = size_of(|sink| props::put_unsubscribe(&u.user_properties, sink))?;
        remaining += with_len(n);
        n
    } else {
        0
    };
    header(out, 0xA2, remaining)?;
    out.put_u16(u.packet_id.get());
    if v5 {
        put_varint(out, props);
        props::put_unsubscribe(&u.user_properties, &mut Writer(out))?;
    }
    for filter in &u.filters {
        put_prefixed(out, filter.as_str().as_bytes());
    }
    Ok(())
}

/// UNSUBACK (MQTT 3.1.1 §3.11: packet identifier only; MQTT 5 §3.11).
fn unsuback(u: &UnsubAck, v5: bool, out: &mut BytesMut) -> Result<(), EncodeError> {
    if !v5 {
        header(out, 0xB0, 2)?;
        out.put_u16(u.packet_id.get());
        return Ok(());
    }
    for &code in &u.reasons {
        check_reason(Carrier::UnsubAck, code)?;
    }
    let props = size_of(|sink| props::put_ack(&u.properties, sink))?;
    header(out, 0xB0, 2 + with_len(props) + u.reasons.len())?;
    out.put_u16(u.packet_id.get());
    put_varint(out, props);
    props::put_ack(&u.properties, &mut Writer(out))?;
    for code in &u.reasons {
        out.put_u8(code.code());
    }
    Ok(())
}

/// DISCONNECT (MQTT 3.1.1 §3.14: empty; MQTT 5 §3.14: the shortest form that says it all).
fn disconnect(d: &Disconnect, v5: bool, out: &mut BytesMut) -> Result<(), EncodeError> {
    if !v5 {
        return header(out, 0xE0, 0);
    }
    check_reason(Carrier::Disconnect, d.reason)?;
    let props = size_of(|s| props::put_disconnect(&d.properties, s))?;
    if props == 0 {
        if d.reason == ReasonCode::Success {
            return header(out, 0xE0, 0);
        }
        header(out, 0xE0, 1)?;
        out.put_u8(d.reason.code());
        return Ok(());
    }
    header(out, 0xE0, 1 + with_len(props))?;
    out.put_u8(d.reason.code());
    put_varint(out, props);
    props::put_disconnect(&d.properties, &mut Writer(out))
}

/// AUTH (MQTT 5 §3.15): remaining length 0 for Success without properties, else the reason
/// code and the property section.
fn auth(a: &Auth, out: &mut BytesMut) -> Result<(), EncodeError> {
    check_reason(Carrier::Auth, a.reason)?;
    let props = size_of(|s| props::put_auth(&a.properties, s))?;
    if props == 0 && a.reason == ReasonCode::Success {
        return header(out, 0xF0, 0);
    }
    header(out, 0xF0, 1 + with_len(props))?;
    out.put_u8(a.reason.code());
    put_varint(out, props);
    props::put_auth(&a.properties, &mut Writer(out))
}
