//! MQTT 5 properties (MQTT 5 §2.2.2): reading a property section into the typed property
//! struct of one packet, and writing one back. Which identifiers a packet may carry, how
//! often, and which values are legal is decided here; packet layout is not.
//!
//! Decoding: a property not allowed in the packet is a Malformed Packet (§2.2.2.2), a repeat
//! of a property other than User Property (and Subscription Identifier in PUBLISH) is a
//! Protocol Error, and so are the out-of-range values the spec names per property.
//!
//! Encoding goes through [`Sink`], so every property list is written down once and walked
//! twice: by [`Sizer`] to validate and measure, then by [`Writer`] to put the bytes.

use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use super::error::{DecodeError, EncodeError};
use super::packet::{
    AckProperties, AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties,
    MessageProperties, PublishProperties, SubscribeProperties, UserProperties, UserProperty,
    WillProperties,
};
use super::reader::Reader;
use super::types::{QoS, TopicName};

pub(super) const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
pub(super) const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
pub(super) const CONTENT_TYPE: u8 = 0x03;
pub(super) const RESPONSE_TOPIC: u8 = 0x08;
pub(super) const CORRELATION_DATA: u8 = 0x09;
pub(super) const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
pub(super) const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
pub(super) const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
pub(super) const SERVER_KEEP_ALIVE: u8 = 0x13;
pub(super) const AUTHENTICATION_METHOD: u8 = 0x15;
pub(super) const AUTHENTICATION_DATA: u8 = 0x16;
pub(super) const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
pub(super) const WILL_DELAY_INTERVAL: u8 = 0x18;
pub(super) const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
pub(super) const RESPONSE_INFORMATION: u8 = 0x1A;
pub(super) const SERVER_REFERENCE: u8 = 0x1C;
pub(super) const REASON_STRING: u8 = 0x1F;
pub(super) const RECEIVE_MAXIMUM: u8 = 0x21;
pub(super) const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
pub(super) const TOPIC_ALIAS: u8 = 0x23;
pub(super) const MAXIMUM_QOS: u8 = 0x24;
pub(super) const RETAIN_AVAILABLE: u8 = 0x25;
pub(super) const USER_PROPERTY: u8 = 0x26;
pub(super) const MAXIMUM_PACKET_SIZE: u8 = 0x27;
pub(super) const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
pub(super) const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
pub(super) const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;

/// The largest value a Variable Byte Integer can hold (MQTT 5 §1.5.5).
pub(super) const VARINT_MAX: u32 = 268_435_455;

// ---------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------

/// One property as read from the wire, with its value already range-checked.
enum Property<'a> {
    PayloadFormatIndicator(bool),
    MessageExpiryInterval(u32),
    ContentType(&'a str),
    ResponseTopic(&'a str),
    CorrelationData(Bytes),
    SubscriptionIdentifier(NonZeroU32),
    SessionExpiryInterval(u32),
    AssignedClientIdentifier(&'a str),
    ServerKeepAlive(u16),
    AuthenticationMethod(&'a str),
    AuthenticationData(Bytes),
    RequestProblemInformation(bool),
    WillDelayInterval(u32),
    RequestResponseInformation(bool),
    ResponseInformation(&'a str),
    ServerReference(&'a str),
    ReasonString(&'a str),
    ReceiveMaximum(NonZeroU16),
    TopicAliasMaximum(u16),
    TopicAlias(NonZeroU16),
    MaximumQoS(QoS),
    RetainAvailable(bool),
    User(&'a str, &'a str),
    MaximumPacketSize(NonZeroU32),
    WildcardSubscriptionAvailable(bool),
    SubscriptionIdentifiersAvailable(bool),
    SharedSubscriptionAvailable(bool),
}

/// The properties of one packet: the Property Length, then properties until it is used up.
struct Properties<'a> {
    r: Reader<'a>,
    /// User Properties still allowed in this section, and their bytes.
    users_left: usize,
    user_bytes_left: usize,
}

impl<'a> Properties<'a> {
    /// Reads the Property Length; the section must fit in the packet.
    fn read(r: &mut Reader<'a>) -> Result<Properties<'a>, DecodeError> {
        let len = r.varint()?;
        let len = usize::try_from(len)
            .map_err(|_| DecodeError::Malformed("property length exceeds the packet"))?;
        if len > r.remaining() {
            return Err(DecodeError::Malformed("property length exceeds the packet"));
        }
        Ok(Properties {
            users_left: r.limits.max_user_properties,
            user_bytes_left: r.limits.max_user_property_bytes,
            r: r.sub(len)?,
        })
    }

    fn next(&mut self) -> Result<Option<Property<'a>>, DecodeError> {
        if self.r.is_empty() {
            return Ok(None);
        }
        // The identifier is a Variable Byte Integer, but every defined one is below 0x80, so
        // a first byte ≥ 0x80 can only start an unknown identifier.
        let id = self.r.u8()?;
        let r = &mut self.r;
        let p = match id {
            PAYLOAD_FORMAT_INDICATOR => Property::PayloadFormatIndicator(read_flag(
                r,
                "Payload Format Indicator other than 0 or 1",
            )?),
            MESSAGE_EXPIRY_INTERVAL => Property::MessageExpiryInterval(r.u32()?),
            CONTENT_TYPE => Property::ContentType(r.str()?),
            RESPONSE_TOPIC => Property::ResponseTopic(r.str()?),
            CORRELATION_DATA => Property::CorrelationData(r.binary()?),
            SUBSCRIPTION_IDENTIFIER => Property::SubscriptionIdentifier(
                NonZeroU32::new(r.varint()?)
                    .ok_or(DecodeError::Protocol("Subscription Identifier of 0"))?,
            ),
            SESSION_EXPIRY_INTERVAL => Property::SessionExpiryInterval(r.u32()?),
            ASSIGNED_CLIENT_IDENTIFIER => Property::AssignedClientIdentifier(r.str()?),
            SERVER_KEEP_ALIVE => Property::ServerKeepAlive(r.u16()?),
            AUTHENTICATION_METHOD => Property::AuthenticationMethod(r.str()?),
            AUTHENTICATION_DATA => Property::AuthenticationData(r.binary()?),
            REQUEST_PROBLEM_INFORMATION => Property::RequestProblemInformation(read_flag(
                r,
                "Request Problem Information other than 0 or 1",
            )?),
            WILL_DELAY_INTERVAL => Property::WillDelayInterval(r.u32()?),
            REQUEST_RESPONSE_INFORMATION => Property::RequestResponseInformation(read_flag(
                r,
                "Request Response Information other than 0 or 1",
            )?),
            RESPONSE_INFORMATION => Property::ResponseInformation(r.str()?),
            SERVER_REFERENCE => Property::ServerReference(r.str()?),
            REASON_STRING => Property::ReasonString(r.str()?),
            RECEIVE_MAXIMUM => Property::ReceiveMaximum(
                NonZeroU16::new(r.u16()?).ok_or(DecodeError::Protocol("Receive Maximum of 0"))?,
            ),
            TOPIC_ALIAS_MAXIMUM => Property::TopicAliasMaximum(r.u16()?),
            TOPIC_ALIAS => {
                Property::TopicAlias(NonZeroU16::new(r.u16()?).ok_or(DecodeError::TopicAliasZero)?)
            }
            MAXIMUM_QOS => Property::MaximumQoS(match r.u8()? {
                0 => QoS::AtMostOnce,
                1 => QoS::AtLeastOnce,
                _ => return Err(DecodeError::Protocol("Maximum QoS other than 0 or 1")),
            }),
            RETAIN_AVAILABLE => {
                Property::RetainAvailable(read_flag(r, "Retain Available other than 0 or 1")?)
            }
            USER_PROPERTY => {
                let name = r.str()?;
                let value = r.str()?;
                // Each pair costs far more memory than its bytes on the wire: bounded here,
                // before it is allocated.
                let bytes = name.len() + value.len();
                if self.users_left == 0 || bytes > self.user_bytes_left {
                    return Err(DecodeError::OverLimit("more User Properties in one packet"));
                }
                self.users_left -= 1;
                self.user_bytes_left -= bytes;
                Property::User(name, value)
            }
            MAXIMUM_PACKET_SIZE => Property::MaximumPacketSize(
                NonZeroU32::new(r.u32()?)
                    .ok_or(DecodeError::Protocol("Maximum Packet Size of 0"))?,
            ),
            WILDCARD_SUBSCRIPTION_AVAILABLE => Property::WildcardSubscriptionAvailable(read_flag(
                r,
                "Wildcard Subscription Available other than 0 or 1",
            )?),
            SUBSCRIPTION_IDENTIFIER_AVAILABLE => Property::SubscriptionIdentifiersAvailable(
                read_flag(r, "Subscription Identifier Available other than 0 or 1")?,
            ),
            SHARED_SUBSCRIPTION_AVAILABLE => Property::SharedSubscriptionAvailable(read_flag(
                r,
                "Shared Subscription Available other than 0 or 1",
            )?),
            _ => return Err(DecodeError::Malformed("unknown property identifier")),
        };
        Ok(Some(p))
    }
}

/// A Byte property that may only be 0 or 1; anything else is a Protocol Error.
fn read_flag(r: &mut Reader<'_>, bad: &'static str) -> Result<bool, DecodeError> {
    match r.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(DecodeError::Protocol(bad)),
    }
}

/// Stores a property that may appear at most once.
fn set<T>(slot: &mut Option<T>, value: T) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::Protocol("property included more than once"));
    }
    *slot = Some(value);
    Ok(())
}

fn pair(name: &str, value: &str) -> UserProperty {
    (Arc::from(name), Arc::from(value))
}

/// Response Topic is a topic name: no wildcards, not empty (MQTT 5 §3.3.2.3.5).
fn response_topic(s: &str) -> Result<TopicName, DecodeError> {
    TopicName::new(s).map_err(|_| DecodeError::Malformed("invalid Response Topic"))
}

/// Applies a property that belongs to an application message (PUBLISH or will), or rejects
/// it as misplaced with `misplaced`.
fn message_property(
    m: &mut MessageProperties,
    users: &mut Vec<UserProperty>,
    p: Property<'_>,
    misplaced: &'static str,
) -> Result<(), DecodeError> {
    match p {
        Property::PayloadFormatIndicator(v) => set(&mut m.payload_format_indicator, v),
        Property::MessageExpiryInterval(v) => set(&mut m.message_expiry_interval, v),
        Property::ContentType(v) => set(&mut m.content_type, Arc::from(v)),
        Property::ResponseTopic(v) => set(&mut m.response_topic, response_topic(v)?),
        Property::CorrelationData(v) => set(&mut m.correlation_data, v),
        Property::User(k, v) => {
            users.push(pair(k, v));
            Ok(())
        }
        _ => Err(DecodeError::Malformed(misplaced)),
    }
}

/// CONNECT properties (MQTT 5 §3.1.2.11).
pub(super) fn connect(r: &mut Reader<'_>) -> Result<ConnectProperties, DecodeError> {
    let mut props = Properties::read(r)?;
    let mut p = ConnectProperties::default();
    let mut users = Vec::new();
    while let Some(prop) = props.next()? {
        match prop {
            Property::SessionExpiryInterval(v) => set(&mut p.session_expiry_interval, v)?,
            Property::ReceiveMaximum(v) => set(&mut p.receive_maximum, v)?,
            Property::MaximumPacketSize(v) => set(&mut p.maximum_packet_size, v)?,
            Property::TopicAliasMaximum(v) => set(&mut p.topic_alias_maximum, v)?,
            Property::RequestResponseInformation(v) => set(&mut p.request_response_information, v)?,
            Property::RequestProblemInformation(v) => set(&mut p.request_problem_information, v)?,
            Property::User(k, v) => users.push(pair(k, v)),
            Property::AuthenticationMethod(v) => set(&mut p.authentication_method, v.into())?,
            Property::AuthenticationData(v) => set(&mut p.authentication_data, v)?,
            _ => return Err(DecodeError::Malformed("property not allowed in CONNECT")),
        }
    }
    // MQTT 5 §3.1.2.11.10.
    if p.authentication_data.is_some() && p.authentication_method.is_none() {
        return Err(DecodeError::Protocol(
            "Authentication Data without Authentication Method",
        ));
    }
    p.user_properties = UserProperties::new(users);
    Ok(p)
}

/// Will properties (MQTT 5 §3.1.3.2).
pub(super) fn will(r: &mut Reader<'_>) -> Result<WillProperties, DecodeError> {
    let mut props = Properties::read(r)?;
    let mut p = WillProperties::default();
    let mut users = Vec::new();
    while let Some(prop) = props.next()? {
        match prop {
            Property::WillDelayInterval(v) => set(&mut p.will_delay_interval, v)?,
            other => message_property(
                &mut p.message,
                &mut users,
                other,
                "property not allowed in Will Properties",
            )?,
        }
    }
    p.message.user_properties = UserProperties::new(users);
    Ok(p)
}

/// CONNACK properties (MQTT 5 §3.2.2.3).
pub(super) fn connack(r: &mut Reader<'_>) -> Result<ConnAckProperties, DecodeError> {
    let mut props = Properties::read(r)?;
    let mut p = ConnAckProperties::default();
    let mut users = Vec::new();
    while let Some(prop) = props.next()? {
        match prop {
            Property::SessionExpiryInterval(v) => set(&mut p.session_expiry_interval, v)?,
            Property::ReceiveMaximum(v) => set(&mut p.receive_maximum, v)?,
            Property::MaximumQoS(v) => set(&mut p.maximum_qos, v)?,
            Property::RetainAvailable(v) => set(&mut p.retain_available, v)?,
            Property::MaximumPacketSize(v) => set(&mut p.maximum_packet_size, v)?,
            Property::AssignedClientIdentifier(v) => {
                set(&mut p.assigned_client_identifier, v.into())?
            }
            Property::TopicAliasMaximum(v) => set(&mut p.topic_alias_maximum, v)?,
            Property::ReasonString(v) => set(&mut p.reason_string, v.into())?,
            Property::User(k, v) => users.push(pair(k, v)),
            Property::WildcardSubscriptionAvailable(v) => {
                set(&mut p.wildcard_subscription_available, v)?
            }
            Property::SubscriptionIdentifiersAvailable(v) => {
                set(&mut p.subscription_identifiers_available, v)?
            }
            Property::SharedSubscriptionAvailable(v) => {
                set(&mut p.shared_subscription_available, v)?
            }
            Property::ServerKeepAlive(v) => set(&mut p.server_keep_alive, v)?,
            Property::ResponseInformation(v) => set(&mut p.response_information, v.into())?,
            Property::ServerReference(v) => set(&mut p.server_reference, v.into())?,
            Property::AuthenticationMethod(v) => set(&mut p.authentication_method, v.into())?,
            Property::AuthenticationData(v) => set(&mut p.authentication_data, v)?,
            _ => return Err(DecodeError::Malformed("property not allowed in CONNACK")),
        }
    }
    p.user_properties = UserProperties::new(users);
    Ok(p)
}

/// PUBLISH properties (MQTT 5 §3.3.2.3). Subscription Identifier may repeat here, one per
/// matching subscription (§3.3.2.3.8).
pub(super) fn publish(r: &mut Reader<'_>) -> Result<PublishProperties, DecodeError> {
    let mut props = Properties::read(r)?;
    let mut p = PublishProperties::default();
    let mut users = Vec::new();
    while let Some(prop) = props.next()? {
        match prop {
            Property::TopicAlias(v) => set(&mut p.topic_alias, v)?,
            Property::SubscriptionIdentifier(v) => p.subscription_identifiers.push(v),
            other => message_property(
                &mut p.message,
                &mut users,
                other,
                "property not allowed in PUBLISH",
            )?,
        }
    }
    p.message.user_properties = UserProperties::new(users);
    Ok(p)
}

/// Reason String and User Property: the properties of PUBACK, PUBREC, PUBREL, PUBCOMP,
/// SUBACK and UNSUBACK. `misplaced` names the packet in the error.
pub(super) fn ack(
    r: &mut Reader<'_>,
    misplaced: &'static str,
) -> Result<AckProperties, DecodeError> {
    let mut props = Properties::read(r)?;
    let mut p = AckProperties::default();
    let mut users = Vec::new();
    while let Some(prop) = props.next()? {
        match prop {
            Property::ReasonString(v) => set(&mut p.reason_string, v.into())?,
            Property::User(k, v) => users.push(pair(k, v)),
            _ => return Err(DecodeError::Malformed(misplaced)),
        }
    }
    p.user_properties = UserProperties::new(users);
    Ok(p)
}

/// SUBSCRIBE properties (MQTT 5 §3.8.2.1); one Subscription Identifier at most.
pub(super) fn subscribe(r: &mut Reader<'_>) -> Result<SubscribeProperties, DecodeError> {
    let mut props = Properties::read(r)?;
    let mut p = SubscribeProperties::default();
    let mut users = Vec::new();
    while let Some(prop) = props.next()? {
        match prop {
            Property::SubscriptionIdentifier(v) => set(&mut p.subscription_identifier, v)?,
            Property::User(k, v) => users.push(pair(k, v)),
            _ => return Err(DecodeError::Malformed("property not allowed in SUBSCRIBE")),
        }
    }
    p.user_properties = UserProperties::new(users);
    Ok(p)
}

/// UNSUBSCRIBE properties (MQTT 5 §3.10.2.1): User Property only.
pub(super) fn unsubscribe(r: &mut Reader<'_>) -> Result<UserProperties, DecodeError> {
    let mut props = Properties::read(r)?;
    let mut users = Vec::new();
    while let Some(prop) = props.next()? {
        match prop {
            Property::User(k, v) => users.push(pair(k, v)),
            _ => {
                return Err(DecodeError::Malformed(
                    "property not allowed in UNSUBSCRIBE",
                ));
            }
        }
    }
    Ok(UserProperties::new(users))
}

/// DISCONNECT properties (MQTT 5 §3.14.2.2).
pub(super) fn disconnect(r: &mut Reader<'_>) -> Result<DisconnectProperties, DecodeError> {
    let mut props = Properties::read(r)?;
    let mut p = DisconnectProperties::default();
    let mut users = Vec::new();
    while let Some(prop) = props.next()? {
        match prop {
            Property::SessionExpiryInterval(v) => set(&mut p.session_expiry_interval, v)?,
            Property::ReasonString(v) => set(&mut p.reason_string, v.into())?,
            Property::User(k, v) => users.push(pair(k, v)),
            Property::ServerReference(v) => set(&mut p.server_reference, v.into())?,
            _ => return Err(DecodeError::Malformed("property not allowed in DISCONNECT")),
        }
    }
    p.user_properties = UserProperties::new(users);
    Ok(p)
}

/// AUTH properties (MQTT 5 §3.15.2.2).
pub(super) fn auth(r: &mut Reader<'_>) -> Result<AuthProperties, DecodeError> {
    let mut props = Properties::read(r)?;
    let mut p = AuthProperties::default();
    let mut users = Vec::new();
    while let Some(prop) = props.next()? {
        match prop {
            Property::AuthenticationMethod(v) => set(&mut p.authentication_method, v.into())?,
            Property::AuthenticationData(v) => set(&mut p.authentication_data, v)?,
            Property::ReasonString(v) => set(&mut p.reason_string, v.into())?,
            Property::User(k, v) => users.push(pair(k, v)),
            _ => return Err(DecodeError::Malformed("property not allowed in AUTH")),
        }
    }
    p.user_properties = UserProperties::new(users);
    Ok(p)
}

// ---------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------

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
