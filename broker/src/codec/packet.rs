//! The control packets of MQTT 3.1, 3.1.1 and 5.0 as plain data.
//!
//! One model serves all versions: MQTT 3.x packets are MQTT 5 packets with empty properties
//! and reason codes limited to what 3.x can express. The encoder drops what a 3.x peer cannot
//! receive, and the decoder rejects what a 3.x peer may not send (AUTH, properties), so no
//! version-specific branch needs an `unreachable!`.

use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;

use bytes::Bytes;

use super::types::{PacketId, ProtocolVersion, QoS, ReasonCode, TopicFilter, TopicName};

/// Any MQTT control packet.
#[derive(Debug, Clone, PartialEq)]
pub enum Packet {
    /// CONNECT (client → server).
    Connect(Box<Connect>),
    /// CONNACK (server → client).
    ConnAck(ConnAck),
    /// PUBLISH (both ways).
    Publish(Publish),
    /// PUBACK (both ways).
    PubAck(Ack),
    /// PUBREC (both ways).
    PubRec(Ack),
    /// PUBREL (both ways).
    PubRel(Ack),
    /// PUBCOMP (both ways).
    PubComp(Ack),
    /// SUBSCRIBE (client → server).
    Subscribe(Subscribe),
    /// SUBACK (server → client).
    SubAck(SubAck),
    /// UNSUBSCRIBE (client → server).
    Unsubscribe(Unsubscribe),
    /// UNSUBACK (server → client).
    UnsubAck(UnsubAck),
    /// PINGREQ (client → server).
    PingReq,
    /// PINGRESP (server → client).
    PingResp,
    /// DISCONNECT (client → server; server → client in MQTT 5 only).
    Disconnect(Disconnect),
    /// AUTH (MQTT 5 only, both ways).
    Auth(Auth),
}

impl Packet {
    /// The packet's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck(_) => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck(_) => "PUBACK",
            Packet::PubRec(_) => "PUBREC",
            Packet::PubRel(_) => "PUBREL",
            Packet::PubComp(_) => "PUBCOMP",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::SubAck(_) => "SUBACK",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::UnsubAck(_) => "UNSUBACK",
            Packet::PingReq => "PINGREQ",
            Packet::PingResp => "PINGRESP",
            Packet::Disconnect(_) => "DISCONNECT",
            Packet::Auth(_) => "AUTH",
        }
    }
}

/// A user property (MQTT 5 property 0x26): a name/value pair, order preserved, repeats allowed.
pub type UserProperty = (Arc<str>, Arc<str>);

/// The user properties of a packet. Shared, so that forwarding a PUBLISH to many subscribers
/// does not copy them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserProperties(Option<Arc<[UserProperty]>>);

impl UserProperties {
    /// Builds from pairs; an empty list allocates nothing.
    pub fn new(pairs: Vec<UserProperty>) -> UserProperties {
        if pairs.is_empty() {
            UserProperties(None)
        } else {
            UserProperties(Some(pairs.into()))
        }
    }

    /// The pairs in order.
    pub fn as_slice(&self) -> &[UserProperty] {
        self.0.as_deref().unwrap_or(&[])
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

/// CONNECT (MQTT 3.1.1 §3.1, MQTT 5 §3.1).
#[derive(Debug, Clone, PartialEq)]
pub struct Connect {
    /// Protocol name and level.
    pub protocol: ProtocolVersion,
    /// Clean Session (3.x) / Clean Start (5).
    pub clean_start: bool,
    /// Keep alive in seconds; 0 disables it.
    pub keep_alive: u16,
    /// The client identifier as sent; may be empty.
    pub client_id: String,
    /// The will message, if the Will Flag is set.
    pub will: Option<Will>,
    /// User Name, if its flag is set.
    pub username: Option<String>,
    /// Password, if its flag is set.
    pub password: Option<Bytes>,
    /// MQTT 5 properties (empty for 3.x).
    pub properties: ConnectProperties,
    /// MQTT 3.x: the protocol level's top bit (0x84 for 3.1.1), which Mosquitto's bridges
    /// set (`try_private`): the client is another broker's bridge and gets none of its
    /// own messages back. Never set for MQTT 5 (No Local does that there).
    pub bridge: bool,
}

/// CONNECT properties (MQTT 5 §3.1.2.11).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnectProperties {
    /// 0x11 Session Expiry Interval, seconds.
    pub session_expiry_interval: Option<u32>,
    /// 0x21 Receive Maximum.
    pub receive_maximum: Option<NonZeroU16>,
    /// 0x27 Maximum Packet Size.
    pub maximum_packet_size: Option<NonZeroU32>,
    /// 0x22 Topic Alias Maximum.
    pub topic_alias_maximum: Option<u16>,
    /// 0x19 Request Response Information.
    pub request_response_information: Option<bool>,
    /// 0x17 Request Problem Information.
    pub request_problem_information: Option<bool>,
    /// 0x26 User Property.
    pub user_properties: UserProperties,
    /// 0x15 Authentication Method.
    pub authentication_method: Option<String>,
    /// 0x16 Authentication Data.
    pub authentication_data: Option<Bytes>,
}

/// The will message of a CONNECT.
#[derive(Debug, Clone, PartialEq)]
pub struct Will {
    /// Will Topic.
    pub topic: TopicName,
    /// Will Payload.
    pub payload: Bytes,
    /// Will QoS.
    pub qos: QoS,
    /// Will Retain.
    pub retain: bool,
    /// MQTT 5 will properties (empty for 3.x).
    pub properties: WillProperties,
}

/// Will properties (MQTT 5 §3.1.3.2).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WillProperties {
    /// 0x18 Will Delay Interval, seconds.
    pub will_delay_interval: Option<u32>,
    /// 0x01 Payload Format Indicator, 0x02 Message Expiry Interval, 0x03 Content Type,
    /// 0x08 Response Topic, 0x09 Correlation Data, 0x26 User Property: as in PUBLISH.
    pub message: MessageProperties,
}

/// The properties that travel with an application message from publisher to subscriber
/// unchanged (MQTT 5 §3.3.2.3), shared by PUBLISH and the will.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MessageProperties {
    /// 0x01 Payload Format Indicator: true when the payload is UTF-8 text.
    pub payload_format_indicator: Option<bool>,
    /// 0x02 Message Expiry Interval, seconds.
    pub message_expiry_interval: Option<u32>,
    /// 0x03 Content Type.
    pub content_type: Option<Arc<str>>,
    /// 0x08 Response Topic (a topic name, no wildcards).
    pub response_topic: Option<TopicName>,
    /// 0x09 Correlation Data.
    pub correlation_data: Option<Bytes>,
    /// 0x26 User Property.
    pub user_properties: UserProperties,
}

/// CONNACK (MQTT 3.1.1 §3.2, MQTT 5 §3.2).
#[derive(Debug, Clone, PartialEq)]
pub struct ConnAck {
    /// Session Present.
    pub session_present: bool,
    /// The MQTT 5 reason code; the encoder maps it to a 3.x return code for 3.x clients.
    pub reason: ReasonCode,
    /// MQTT 5 properties (not sent to 3.x clients).
    pub properties: ConnAckProperties,
}

/// CONNACK properties (MQTT 5 §3.2.2.3).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnAckProperties {
    /// 0x11 Session Expiry Interval.
    pub session_expiry_interval: Option<u32>,
    /// 0x21 Receive Maximum.
    pub receive_maximum: Option<NonZeroU16>,
    /// 0x24 Maximum QoS (only 0 or 1 may be sent).
    pub maximum_qos: Option<QoS>,
    /// 0x25 Retain Available.
    pub retain_available: Option<bool>,
    /// 0x27 Maximum Packet Size.
    pub maximum_packet_size: Option<NonZeroU32>,
    /// 0x12 Assigned Client Identifier.
    pub assigned_client_identifier: Option<String>,
    /// 0x22 Topic Alias Maximum.
    pub topic_alias_maximum: Option<u16>,
    /// 0x1F Reason String.
    pub reason_string: Option<String>,
    /// 0x26 User Property.
    pub user_properties: UserProperties,
    /// 0x28 Wildcard Subscription Available.
    pub wildcard_subscription_available: Option<bool>,
    /// 0x29 Subscription Identifiers Available.
    pub subscription_identifiers_available: Option<bool>,
    /// 0x2A Shared Subscription Available.
    pub shared_subscription_available: Option<bool>,
    /// 0x13 Server Keep Alive.
    pub server_keep_alive: Option<u16>,
    /// 0x1A Response Information.
    pub response_information: Option<String>,
    /// 0x1C Server Reference.
    pub server_reference: Option<String>,
    /// 0x15 Authentication Method.
    pub authentication_method: Option<String>,
    /// 0x16 Authentication Data.
    pub authentication_data: Option<Bytes>,
}

/// QoS of a PUBLISH, carrying the packet identifier that QoS 1 and 2 require.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishQoS {
    /// QoS 0: no packet identifier.
    AtMostOnce,
    /// QoS 1 with its packet identifier.
    AtLeastOnce(PacketId),
    /// QoS 2 with its packet identifier.
    ExactlyOnce(PacketId),
}

impl PublishQoS {
    /// The QoS level.
    pub fn qos(self) -> QoS {
        match self {
            PublishQoS::AtMostOnce => QoS::AtMostOnce,
            PublishQoS::AtLeastOnce(_) => QoS::AtLeastOnce,
            PublishQoS::ExactlyOnce(_) => QoS::ExactlyOnce,
        }
    }

    /// The packet identifier, for QoS 1 and 2.
    pub fn packet_id(self) -> Option<PacketId> {
        match self {
            PublishQoS::AtMostOnce => None,
            PublishQoS::AtLeastOnce(id) | PublishQoS::ExactlyOnce(id) => Some(id),
        }
    }

    /// Combines a QoS level with an identifier (ignored for QoS 0).
    pub fn with_id(qos: QoS, id: PacketId) -> PublishQoS {
        match qos {
            QoS::AtMostOnce => PublishQoS::AtMostOnce,
            QoS::AtLeastOnce => PublishQoS::AtLeastOnce(id),
            QoS::ExactlyOnce => PublishQoS::ExactlyOnce(id),
        }
    }
}

/// PUBLISH (MQTT 3.1.1 §3.3, MQTT 5 §3.3).
#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    /// DUP flag (always false for QoS 0).
    pub dup: bool,
    /// QoS and packet identifier.
    pub qos: PublishQoS,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic name. `None` only for an MQTT 5 PUBLISH that names its topic by alias alone
    /// (zero-length topic with a Topic Alias property).
    pub topic: Option<TopicName>,
    /// Application payload.
    pub payload: Bytes,
    /// MQTT 5 properties (empty for 3.x).
    pub properties: PublishProperties,
}

/// PUBLISH properties (MQTT 5 §3.3.2.3).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PublishProperties {
    /// 0x23 Topic Alias.
    pub topic_alias: Option<NonZeroU16>,
    /// 0x0B Subscription Identifier, one per matching subscription (server → client only).
    pub subscription_identifiers: Vec<NonZeroU32>,
    /// The properties forwarded unchanged to subscribers.
    pub message: MessageProperties,
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP share one layout (MQTT 5 §3.4–3.7).
#[derive(Debug, Clone, PartialEq)]
pub struct Ack {
    /// Packet identifier.
    pub packet_id: PacketId,
    /// MQTT 5 reason code (Success for 3.x).
    pub reason: ReasonCode,
    /// 0x1F Reason String and 0x26 User Property.
    pub properties: AckProperties,
}

impl Ack {
    /// A successful acknowledgement without properties.
    pub fn success(packet_id: PacketId) -> Ack {
        Ack {
            packet_id,
            reason: ReasonCode::Success,
            properties: AckProperties::default(),
        }
    }
}

/// Reason String and User Property, the properties of acks (MQTT 5 §3.4.2.2 and others).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AckProperties {
    /// 0x1F Reason String.
    pub reason_string: Option<String>,
    /// 0x26 User Property.
    pub user_properties: UserProperties,
}

/// Retain Handling subscription option (MQTT 5 §3.8.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetainHandling {
    /// 0: send retained messages at the time of the subscribe.
    #[default]
    SendAtSubscribe = 0,
    /// 1: send retained messages only if the subscription did not exist.
    SendIfNew = 1,
    /// 2: do not send retained messages.
    DoNotSend = 2,
}

/// The options of one subscription (MQTT 5 §3.8.3.1; 3.x uses only `qos`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionOptions {
    /// Maximum QoS.
    pub qos: QoS,
    /// No Local.
    pub no_local: bool,
    /// Retain As Published.
    pub retain_as_published: bool,
    /// Retain Handling.
    pub retain_handling: RetainHandling,
}

impl SubscriptionOptions {
    /// Options with the given QoS and MQTT 3.x behaviour for the rest.
    pub fn qos(qos: QoS) -> SubscriptionOptions {
        SubscriptionOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainHandling::SendAtSubscribe,
        }
    }
}

/// SUBSCRIBE (MQTT 3.1.1 §3.8, MQTT 5 §3.8).
#[derive(Debug, Clone, PartialEq)]
pub struct Subscribe {
    /// Packet identifier.
    pub packet_id: PacketId,
    /// At least one filter with its options.
    pub filters: Vec<(TopicFilter, SubscriptionOptions)>,
    /// MQTT 5 properties.
    pub properties: SubscribeProperties,
}

/// SUBSCRIBE properties (MQTT 5 §3.8.2.1).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubscribeProperties {
    /// 0x0B Subscription Identifier (1..=268,435,455).
    pub subscription_identifier: Option<NonZeroU32>,
    /// 0x26 User Property.
    pub user_properties: UserProperties,
}

/// SUBACK (MQTT 3.1.1 §3.9, MQTT 5 §3.9).
#[derive(Debug, Clone, PartialEq)]
pub struct SubAck {
    /// Packet identifier of the SUBSCRIBE.
    pub packet_id: PacketId,
    /// One reason code per filter: a granted QoS or an error (3.x: any error becomes 0x80).
    pub reasons: Vec<ReasonCode>,
    /// MQTT 5 properties.
    pub properties: AckProperties,
}

/// UNSUBSCRIBE (MQTT 3.1.1 §3.10, MQTT 5 §3.10).
#[derive(Debug, Clone, PartialEq)]
pub struct Unsubscribe {
    /// Packet identifier.
    pub packet_id: PacketId,
    /// At least one filter.
    pub filters: Vec<TopicFilter>,
    /// 0x26 User Property.
    pub user_properties: UserProperties,
}

/// UNSUBACK (MQTT 3.1.1 §3.11, MQTT 5 §3.11).
#[derive(Debug, Clone, PartialEq)]
pub struct UnsubAck {
    /// Packet identifier of the UNSUBSCRIBE.
    pub packet_id: PacketId,
    /// MQTT 5: one reason code per filter. Not sent to 3.x clients.
    pub reasons: Vec<ReasonCode>,
    /// MQTT 5 properties.
    pub properties: AckProperties,
}

/// DISCONNECT (MQTT 3.1.1 §3.14, MQTT 5 §3.14).
#[derive(Debug, Clone, PartialEq)]
pub struct Disconnect {
    /// MQTT 5 reason code (Success = normal disconnection).
    pub reason: ReasonCode,
    /// MQTT 5 properties.
    pub properties: DisconnectProperties,
}

impl Disconnect {
    /// A DISCONNECT with a reason code and no properties.
    pub fn new(reason: ReasonCode) -> Disconnect {
        Disconnect {
            reason,
            properties: DisconnectProperties::default(),
        }
    }
}

/// DISCONNECT properties (MQTT 5 §3.14.2.2).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DisconnectProperties {
    /// 0x11 Session Expiry Interval (client → server only).
    pub session_expiry_interval: Option<u32>,
    /// 0x1F Reason String.
    pub reason_string: Option<String>,
    /// 0x26 User Property.
    pub user_properties: UserProperties,
    /// 0x1C Server Reference.
    pub server_reference: Option<String>,
}

/// AUTH (MQTT 5 §3.15).
#[derive(Debug, Clone, PartialEq)]
pub struct Auth {
    /// 0x00 Success, 0x18 Continue authentication or 0x19 Re-authenticate.
    pub reason: ReasonCode,
    /// AUTH properties.
    pub properties: AuthProperties,
}

/// AUTH properties (MQTT 5 §3.15.2.2).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuthProperties {
    /// 0x15 Authentication Method.
    pub authentication_method: Option<String>,
    /// 0x16 Authentication Data.
    pub authentication_data: Option<Bytes>,
    /// 0x1F Reason String.
    pub reason_string: Option<String>,
    /// 0x26 User Property.
    pub user_properties: UserProperties,
}
