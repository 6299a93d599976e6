//! MQTT 5 properties (MQTT 5 §2.2.2): reading a property section into the typed property
//! struct of one packet, and writing one back. Which identifiers a packet may carry, how
//! often, and which values are legal is decided here; packet layout is not.
//!
//! Decoding: a property not allowed in the packet is a Malformed Packet (§2.2.2.2), a repeat
//! of a property other than User Property (and Subscription Identifier in PUBLISH) is a
//! Protocol Error, and so are the out-of-range values the spec names per property.
//!
//! Encoding is in `property_write`.

use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;

use bytes::Bytes;

use super::error::DecodeError;
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
