//! Writing MQTT 5 properties (MQTT 5 §2.2.2), and the field encodings packets share.
//!
//! Encoding goes through [`Sink`], so every property list is written down once and walked
//! twice: by [`Sizer`] to validate and measure, then by [`Writer`] to put the bytes.

use bytes::{BufMut, BytesMut};

use super::error::EncodeError;
use super::packet::{
    AckProperties, AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties,
    MessageProperties, PublishProperties, SubscribeProperties, UserProperties, WillProperties,
};
use super::properties::{
    ASSIGNED_CLIENT_IDENTIFIER, AUTHENTICATION_DATA, AUTHENTICATION_METHOD, CONTENT_TYPE,
    CORRELATION_DATA, MAXIMUM_PACKET_SIZE, MAXIMUM_QOS, MESSAGE_EXPIRY_INTERVAL,
    PAYLOAD_FORMAT_INDICATOR, REASON_STRING, RECEIVE_MAXIMUM, REQUEST_PROBLEM_INFORMATION,
    REQUEST_RESPONSE_INFORMATION, RESPONSE_INFORMATION, RESPONSE_TOPIC, RETAIN_AVAILABLE,
    SERVER_KEEP_ALIVE, SERVER_REFERENCE, SESSION_EXPIRY_INTERVAL, SHARED_SUBSCRIPTION_AVAILABLE,
    SUBSCRIPTION_IDENTIFIER, SUBSCRIPTION_IDENTIFIER_AVAILABLE, TOPIC_ALIAS, TOPIC_ALIAS_MAXIMUM,
    USER_PROPERTY, VARINT_MAX, WILDCARD_SUBSCRIPTION_AVAILABLE, WILL_DELAY_INTERVAL,
};
use super::types::QoS;

/// Bytes a Variable Byte Integer takes.
pub(super) fn varint_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Writes a Variable Byte Integer; the caller has checked `v ≤ VARINT_MAX`.
pub(super) fn put_varint(out: &mut BytesMut, mut v: usize) {
    loop {
        let low = u8::try_from(v & 0x7F).unwrap_or(0);
        v >>= 7;
        if v == 0 {
            out.put_u8(low);
            return;
        }
        out.put_u8(low | 0x80);
    }
}

/// Writes a two-byte length then the bytes; the caller has checked the length.
pub(super) fn put_prefixed(out: &mut BytesMut, b: &[u8]) {
    out.put_u16(u16::try_from(b.len()).unwrap_or(u16::MAX));
    out.put_slice(b);
}

/// Size of a UTF-8 string field with its length prefix, checking what the decoder checks.
pub(super) fn str_len(s: &str, field: &'static str) -> Result<usize, EncodeError> {
    if s.len() > usize::from(u16::MAX) {
        return Err(EncodeError::FieldTooLong {
            field,
            len: s.len(),
        });
    }
    if s.as_bytes().contains(&0) {
        return Err(EncodeError::InvalidValue("string contains U+0000"));
    }
    Ok(2 + s.len())
}

/// Size of a binary field with its length prefix.
pub(super) fn bin_len(b: &[u8], field: &'static str) -> Result<usize, EncodeError> {
    if b.len() > usize::from(u16::MAX) {
        return Err(EncodeError::FieldTooLong {
            field,
            len: b.len(),
        });
    }
    Ok(2 + b.len())
}

/// Receives the properties of a packet one by one: [`Sizer`] measures and validates,
/// [`Writer`] writes. Both see the same calls, so sizes and bytes cannot disagree.
pub(super) trait Sink {
    /// A Byte property.
    fn byte(&mut self, id: u8, v: u8);
    /// A Two Byte Integer property.
    fn u16(&mut self, id: u8, v: u16);
    /// A Four Byte Integer property.
    fn u32(&mut self, id: u8, v: u32);
    /// A Variable Byte Integer property.
    fn varint(&mut self, id: u8, v: u32) -> Result<(), EncodeError>;
    /// A UTF-8 Encoded String property.
    fn str(&mut self, id: u8, s: &str, field: &'static str) -> Result<(), EncodeError>;
    /// A Binary Data property.
    fn bin(&mut self, id: u8, b: &[u8], field: &'static str) -> Result<(), EncodeError>;
    /// A User Property.
    fn pair(&mut self, name: &str, value: &str) -> Result<(), EncodeError>;
}

/// Measures a property section and checks every value the decoder would check.
pub(super) struct Sizer(pub(super) usize);

impl Sink for Sizer {
    fn byte(&mut self, _id: u8, _v: u8) {
        self.0 += 2;
    }
    fn u16(&mut self, _id: u8, _v: u16) {
        self.0 += 3;
    }
    fn u32(&mut self, _id: u8, _v: u32) {
        self.0 += 5;
    }
    fn varint(&mut self, _id: u8, v: u32) -> Result<(), EncodeError> {
        if v == 0 || v > VARINT_MAX {
            return Err(EncodeError::InvalidValue(
                "Subscription Identifier outside 1..=268435455",
            ));
        }
        self.0 += 1 + varint_len(usize::try_from(v).unwrap_or(usize::MAX));
        Ok(())
    }
    fn str(&mut self, _id: u8, s: &str, field: &'static str) -> Result<(), EncodeError> {
        self.0 += 1 + str_len(s, field)?;
        Ok(())
    }
    fn bin(&mut self, _id: u8, b: &[u8], field: &'static str) -> Result<(), EncodeError> {
        self.0 += 1 + bin_len(b, field)?;
        Ok(())
    }
    fn pair(&mut self, name: &str, value: &str) -> Result<(), EncodeError> {
        self.0 += 1 + str_len(name, "User Property name")? + str_len(value, "User Property value")?;
        Ok(())
    }
}

/// Writes a property section already validated by [`Sizer`].
pub(super) struct Writer<'a>(pub(super) &'a mut BytesMut);

impl Sink for Writer<'_> {
    fn byte(&mut self, id: u8, v: u8) {
        self.0.put_u8(id);
        self.0.put_u8(v);
    }
    fn u16(&mut self, id: u8, v: u16) {
        self.0.put_u8(id);
        self.0.put_u16(v);
    }
    fn u32(&mut self, id: u8, v: u32) {
        self.0.put_u8(id);
        self.0.put_u32(v);
    }
    fn varint(&mut self, id: u8, v: u32) -> Result<(), EncodeError> {
        self.0.put_u8(id);
        put_varint(self.0, usize::try_from(v).unwrap_or(0));
        Ok(())
    }
    fn str(&mut self, id: u8, s: &str, _field: &'static str) -> Result<(), EncodeError> {
        self.0.put_u8(id);
        put_prefixed(self.0, s.as_bytes());
        Ok(())
    }
    fn bin(&mut self, id: u8, b: &[u8], _field: &'static str) -> Result<(), EncodeError> {
        self.0.put_u8(id);
        put_prefixed(self.0, b);
        Ok(())
    }
    fn pair(&mut self, name: &str, value: &str) -> Result<(), EncodeError> {
        self.0.put_u8(USER_PROPERTY);
        put_prefixed(self.0, name.as_bytes());
        put_prefixed(self.0, value.as_bytes());
        Ok(())
    }
}

/// Measures a property section (without its length prefix), validating it.
pub(super) fn size_of(
    props: impl FnOnce(&mut Sizer) -> Result<(), EncodeError>,
) -> Result<usize, EncodeError> {
    let mut s = Sizer(0);
    props(&mut s)?;
    Ok(s.0)
}

fn user_properties<S: Sink>(u: &UserProperties, s: &mut S) -> Result<(), EncodeError> {
    for (name, value) in u.as_slice() {
        s.pair(name, value)?;
    }
    Ok(())
}

fn flag<S: Sink>(s: &mut S, id: u8, v: Option<bool>) {
    if let Some(v) = v {
        s.byte(id, u8::from(v));
    }
}

fn message<S: Sink>(m: &MessageProperties, s: &mut S) -> Result<(), EncodeError> {
    flag(s, PAYLOAD_FORMAT_INDICATOR, m.payload_format_indicator);
    if let Some(v) = m.message_expiry_interval {
        s.u32(MESSAGE_EXPIRY_INTERVAL, v);
    }
    if let Some(v) = &m.content_type {
        s.str(CONTENT_TYPE, v, "Content Type")?;
    }
    if let Some(v) = &m.response_topic {
        s.str(RESPONSE_TOPIC, v.as_str(), "Response Topic")?;
    }
    if let Some(v) = &m.correlation_data {
        s.bin(CORRELATION_DATA, v, "Correlation Data")?;
    }
    user_properties(&m.user_properties, s)
}

/// Walks CONNECT properties.
pub(super) fn put_connect<S: Sink>(p: &ConnectProperties, s: &mut S) -> Result<(), EncodeError> {
    if p.authentication_data.is_some() && p.authentication_method.is_none() {
        return Err(EncodeError::InvalidValue(
            "Authentication Data without Authentication Method",
        ));
    }
    if let Some(v) = p.session_expiry_interval {
        s.u32(SESSION_EXPIRY_INTERVAL, v);
    }
    if let Some(v) = p.receive_maximum {
        s.u16(RECEIVE_MAXIMUM, v.get());
    }
    if let Some(v) = p.maximum_packet_size {
        s.u32(MAXIMUM_PACKET_SIZE, v.get());
    }
    if let Some(v) = p.topic_alias_maximum {
        s.u16(TOPIC_ALIAS_MAXIMUM, v);
    }
    flag(
        s,
        REQUEST_RESPONSE_INFORMATION,
        p.request_response_information,
    );
    flag(
        s,
        REQUEST_PROBLEM_INFORMATION,
        p.request_problem_information,
    );
    if let Some(v) = &p.authentication_method {
        s.str(AUTHENTICATION_METHOD, v, "Authentication Method")?;
    }
    if let Some(v) = &p.authentication_data {
        s.bin(AUTHENTICATION_DATA, v, "Authentication Data")?;
    }
    user_properties(&p.user_properties, s)
}

/// Walks will properties.
pub(super) fn put_will<S: Sink>(p: &WillProperties, s: &mut S) -> Result<(), EncodeError> {
    if let Some(v) = p.will_delay_interval {
        s.u32(WILL_DELAY_INTERVAL, v);
    }
    message(&p.message, s)
}

/// Walks CONNACK properties. A Maximum QoS of 2 is left out: absence means 2, and the
/// property may only carry 0 or 1 (MQTT 5 §3.2.2.3.4).
pub(super) fn put_connack<S: Sink>(p: &ConnAckProperties, s: &mut S) -> Result<(), EncodeError> {
    if let Some(v) = p.session_expiry_interval {
        s.u32(SESSION_EXPIRY_INTERVAL, v);
    }
    if let Some(v) = p.receive_maximum {
        s.u16(RECEIVE_MAXIMUM, v.get());
    }
    match p.maximum_qos {
        Some(QoS::AtMostOnce) => s.byte(MAXIMUM_QOS, 0),
        Some(QoS::AtLeastOnce) => s.byte(MAXIMUM_QOS, 1),
        Some(QoS::ExactlyOnce) | None => {}
    }
    flag(s, RETAIN_AVAILABLE, p.retain_available);
    if let Some(v) = p.maximum_packet_size {
        s.u32(MAXIMUM_PACKET_SIZE, v.get());
    }
    if let Some(v) = &p.assigned_client_identifier {
        s.str(ASSIGNED_CLIENT_IDENTIFIER, v, "Assigned Client Identifier")?;
    }
    if let Some(v) = p.topic_alias_maximum {
        s.u16(TOPIC_ALIAS_MAXIMUM, v);
    }
    if let Some(v) = &p.reason_string {
        s.str(REASON_STRING, v, "Reason String")?;
    }
    flag(
        s,
        WILDCARD_SUBSCRIPTION_AVAILABLE,
        p.wildcard_subscription_available,
    );
    flag(
        s,
        SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        p.subscription_identifiers_available,
    );
    flag(
        s,
        SHARED_SUBSCRIPTION_AVAILABLE,
        p.shared_subscription_available,
    );
    if let Some(v) = p.server_keep_alive {
        s.u16(SERVER_KEEP_ALIVE, v);
    }
    if let Some(v) = &p.response_information {
        s.str(RESPONSE_INFORMATION, v, "Response Information")?;
    }
    if let Some(v) = &p.server_reference {
        s.str(SERVER_REFERENCE, v, "Server Reference")?;
    }
    if let Some(v) = &p.authentication_method {
        s.str(AUTHENTICATION_METHOD, v, "Authentication Method")?;
    }
    if let Some(v) = &p.authentication_data {
        s.bin(AUTHENTICATION_DATA, v, "Authentication Data")?;
    }
    user_properties(&p.user_properties, s)
}

/// Walks PUBLISH properties.
pub(super) fn put_publish<S: Sink>(p: &PublishProperties, s: &mut S) -> Result<(), EncodeError> {
    if let Some(v) = p.topic_alias {
        s.u16(TOPIC_ALIAS, v.get());
    }
    for id in &p.subscription_identifiers {
        s.varint(SUBSCRIPTION_IDENTIFIER, id.get())?;
    }
    message(&p.message, s)
}

/// Walks the Reason String / User Property of acks.
pub(super) fn put_ack<S: Sink>(p: &AckProperties, s: &mut S) -> Result<(), EncodeError> {
    if let Some(v) = &p.reason_string {
        s.str(REASON_STRING, v, "Reason String")?;
    }
    user_properties(&p.user_properties, s)
}

/// Walks SUBSCRIBE properties.
pub(super) fn put_subscribe<S: Sink>(
    p: &SubscribeProperties,
    s: &mut S,
) -> Result<(), EncodeError> {
    if let Some(v) = p.subscription_identifier {
        s.varint(SUBSCRIPTION_IDENTIFIER, v.get())?;
    }
    user_properties(&p.user_properties, s)
}

/// Walks UNSUBSCRIBE properties.
pub(super) fn put_unsubscribe<S: Sink>(u: &UserProperties, s: &mut S) -> Result<(), EncodeError> {
    user_properties(u, s)
}

/// Walks DISCONNECT properties.
pub(super) fn put_disconnect<S: Sink>(
    p: &DisconnectProperties,
    s: &mut S,
) -> Result<(), EncodeError> {
    if let Some(v) = p.session_expiry_interval {
        s.u32(SESSION_EXPIRY_INTERVAL, v);
    }
    if let Some(v) = &p.reason_string {
        s.str(REASON_STRING, v, "Reason String")?;
    }
    if let Some(v) = &p.server_reference {
        s.str(SERVER_REFERENCE, v, "Server Reference")?;
    }
    user_properties(&p.user_properties, s)
}

/// Walks AUTH properties.
pub(super) fn put_auth<S: Sink>(p: &AuthProperties, s: &mut S) -> Result<(), EncodeError> {
    if let Some(v) = &p.authentication_method {
        s.str(AUTHENTICATION_METHOD, v, "Authentication Method")?;
    }
    if let Some(v) = &p.authentication_data {
        s.bin(AUTHENTICATION_DATA, v, "Authentication Data")?;
    }
    if let Some(v) = &p.reason_string {
        s.str(REASON_STRING, v, "Reason String")?;
    }
    user_properties(&p.user_properties, s)
}
