//! proptest generators for every packet, limited to what each protocol version can carry,
//! so that encode → decode must give back the same value.

use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;

use bytes::Bytes;
use proptest::collection::vec;
use proptest::option::of;
use proptest::prelude::*;

use super::super::reason::Carrier;
use super::super::{
    Ack, AckProperties, Auth, AuthProperties, ConnAck, ConnAckProperties, Connect,
    ConnectProperties, Disconnect, DisconnectProperties, MessageProperties, Packet, PacketId,
    ProtocolVersion, Publish, PublishProperties, PublishQoS, QoS, ReasonCode, RetainHandling,
    SubAck, Subscribe, SubscribeProperties, SubscriptionOptions, TopicFilter, TopicName, UnsubAck,
    Unsubscribe, UserProperties, Will, WillProperties,
};

/// Any of the three versions.
pub(in super::super) fn version() -> impl Strategy<Value = ProtocolVersion> {
    prop_oneof![
        Just(ProtocolVersion::V3_1),
        Just(ProtocolVersion::V3_1_1),
        Just(ProtocolVersion::V5),
    ]
}

/// Text without U+0000, including multi-byte characters.
fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[a-zA-Z0-9 _./-]{0,12}", "\\PC{0,8}"]
}

fn arc_text() -> impl Strategy<Value = Arc<str>> {
    text().prop_map(Arc::from)
}

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn packet_id() -> impl Strategy<Value = PacketId> {
    (1u16..).prop_map(|v| PacketId::new(v).unwrap())
}

fn nz16() -> impl Strategy<Value = NonZeroU16> {
    (1u16..).prop_map(|v| NonZeroU16::new(v).unwrap())
}

fn nz32() -> impl Strategy<Value = NonZeroU32> {
    (1u32..).prop_map(|v| NonZeroU32::new(v).unwrap())
}

fn subscription_id() -> impl Strategy<Value = NonZeroU32> {
    (1u32..=268_435_455).prop_map(|v| NonZeroU32::new(v).unwrap())
}

fn user_properties() -> impl Strategy<Value = UserProperties> {
    vec((arc_text(), arc_text()), 0..3).prop_map(UserProperties::new)
}

/// One topic level without wildcards; may be empty, may start with `$`.
fn level() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9]{1,6}",
        1 => Just(String::new()),
        1 => "\\$[A-Z]{1,4}",
        1 => "[é中 ]{1,3}",
    ]
}

/// Valid topic names.
pub(in super::super) fn topic_name() -> impl Strategy<Value = TopicName> {
    vec(level(), 1..5).prop_filter_map("not a topic name", |levels| {
        TopicName::new(&levels.join("/")).ok()
    })
}

/// Valid topic filters, with wildcards and shared subscriptions.
pub(in super::super) fn topic_filter() -> impl Strategy<Value = TopicFilter> {
    let lvl = prop_oneof![3 => level(), 1 => Just("+".to_owned())];
    (of("[a-z]{1,5}"), vec(lvl, 1..5), any::<bool>()).prop_filter_map(
        "not a topic filter",
        |(share, mut levels, hash)| {
            if hash {
                levels.push("#".to_owned());
            }
            let filter = levels.join("/");
            let full = match share {
                Some(group) => format!("$share/{group}/{filter}"),
                None => filter,
            };
            TopicFilter::new(&full).ok()
        },
    )
}

fn message_properties() -> impl Strategy<Value = MessageProperties> {
    (
        of(any::<bool>()),
        of(any::<u32>()),
        of(arc_text()),
        of(topic_name()),
        of(bytes(16)),
        user_properties(),
    )
        .prop_map(
            |(
                payload_format_indicator,
                message_expiry_interval,
                content_type,
                response_topic,
                correlation_data,
                user_properties,
            )| MessageProperties {
                payload_format_indicator,
                message_expiry_interval,
                content_type,
                response_topic,
                correlation_data,
                user_properties,
            },
        )
}

fn connect_properties() -> impl Strategy<Value = ConnectProperties> {
    (
        of(any::<u32>()),
        of(nz16()),
        of(nz32()),
        of(any::<u16>()),
        of(any::<bool>()),
        of(any::<bool>()),
        user_properties(),
        of(text()),
        of(bytes(16)),
    )
        .prop_map(
            |(se, rm, mps, tam, rri, rpi, user_properties, method, data)| {
                // Authentication Data requires Authentication Method (MQTT 5 §3.1.2.11.10).
                let authentication_data = if method.is_some() { data } else { None };
                ConnectProperties {
                    session_expiry_interval: se,
                    receive_maximum: rm,
                    maximum_packet_size: mps,
                    topic_alias_maximum: tam,
                    request_response_information: rri,
                    request_problem_information: rpi,
                    user_properties,
                    authentication_method: method,
                    authentication_data,
                }
            },
        )
}

fn will(v5: bool) -> impl Strategy<Value = Will> {
    (
        topic_name(),
        bytes(32),
        qos(),
        any::<bool>(),
        of(any::<u32>()),
        message_properties(),
    )
        .prop_map(move |(topic, payload, qos, retain, delay, message)| Will {
            topic,
            payload,
            qos,
            retain,
            properties: if v5 {
                WillProperties {
                    will_delay_interval: delay,
                    message,
                }
            } else {
                WillProperties::default()
            },
        })
}

fn connect(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let v5 = version.is_v5();
    (
        any::<bool>(),
        any::<u16>(),
        text(),
        of(will(v5)),
        of(text()),
        of(bytes(16)),
        (connect_properties(), any::<bool>()),
    )
        .prop_map(
            move |(
                clean_start,
                keep_alive,
                client_id,
                will,
                username,
                password,
                (props, bridge),
            )| {
                // MQTT 3.x: no password without a user name (MQTT-3.1.2-22).
                let password = if v5 || username.is_some() {
                    password
                } else {
                    None
                };
                Packet::Connect(Box::new(Connect {
                    protocol: version,
                    clean_start,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                    properties: if v5 {
                        props
                    } else {
                        ConnectProperties::default()
                    },
                    bridge: bridge && !v5,
                }))
            },
        )
}

/// A reason code allowed in `carrier` by MQTT 5.
fn reason(carrier: Carrier) -> impl Strategy<Value = ReasonCode> {
    let allowed: Vec<ReasonCode> = (0..=u8::MAX)
        .filter_map(ReasonCode::from_u8)
        .filter(|c| carrier.allows(*c))
        .collect();
    proptest::sample::select(allowed)
}

fn connack_properties() -> impl Strategy<Value = ConnAckProperties> {
    (
        (
            of(any::<u32>()),
            of(nz16()),
            of(prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce)]),
            of(any::<bool>()),
            of(nz32()),
            of(text()),
            of(any::<u16>()),
            of(text()),
            user_properties(),
        ),
        (
            of(any::<bool>()),
            of(any::<bool>()),
            of(any::<bool>()),
            of(any::<u16>()),
            of(text()),
            of(text()),
            of(text()),
            of(bytes(16)),
        ),
    )
        .prop_map(
            |((se, rm, mq, ra, mps, aci, tam, rs, up), (wsa, sia, ssa, ska, ri, sr, am, ad))| {
                ConnAckProperties {
                    session_expiry_interval: se,
                    receive_maximum: rm,
                    maximum_qos: mq,
                    retain_available: ra,
                    maximum_packet_size: mps,
                    assigned_client_identifier: aci,
                    topic_alias_maximum: tam,
                    reason_string: rs,
                    user_properties: up,
                    wildcard_subscription_available: wsa,
                    subscription_identifiers_available: sia,
                    shared_subscription_available: ssa,
                    server_keep_alive: ska,
                    response_information: ri,
                    server_reference: sr,
                    authentication_method: am,
                    authentication_data: ad,
                }
            },
        )
}

fn connack(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    if version.is_v5() {
        (
            any::<bool>(),
            reason(Carrier::ConnAck),
            connack_properties(),
        )
            .prop_map(|(sp, reason, properties)| {
                Packet::ConnAck(ConnAck {
                    session_present: sp && reason == ReasonCode::Success,
                    reason,
                    properties,
                })
            })
            .boxed()
    } else {
        (any::<bool>(), 0u8..=5)
            .prop_map(move |(sp, rc)| {
                let reason = super::super::reason::from_connack_return_code(rc).unwrap();
                Packet::ConnAck(ConnAck {
                    // MQTT 3.1 has no Session Present flag.
                    session_present: sp
                        && reason == ReasonCode::Success
                        && version == ProtocolVersion::V3_1_1,
                    reason,
                    properties: ConnAckProperties::default(),
                })
            })
            .boxed()
    }
}

fn publish_properties() -> impl Strategy<Value = PublishProperties> {
    (
        of(nz16()),
        vec(subscription_id(), 0..3),
        message_properties(),
    )
        .prop_map(
            |(topic_alias, subscription_identifiers, message)| PublishProperties {
                topic_alias,
                subscription_identifiers,
                message,
            },
        )
}

/// A PUBLISH the version can carry.
pub(in super::super) fn publish(version: ProtocolVersion) -> impl Strategy<Value = Publish> {
    let v5 = version.is_v5();
    (
        any::<bool>(),
        qos(),
        packet_id(),
        any::<bool>(),
        topic_name(),
        any::<bool>(),
        bytes(64),
        publish_properties(),
    )
        .prop_map(
            move |(dup, qos, id, retain, topic, alias_only, payload, props)| {
                let properties = if v5 {
                    props
                } else {
                    PublishProperties::default()
                };
                let topic = if alias_only && properties.topic_alias.is_some() {
                    None
                } else {
                    Some(topic)
                };
                Publish {
                    dup: dup && qos != QoS::AtMostOnce,
                    qos: PublishQoS::with_id(qos, id),
                    retain,
                    topic,
                    payload,
                    properties,
                }
            },
        )
}

fn ack_properties(v5: bool) -> BoxedStrategy<AckProperties> {
    if v5 {
        (of(text()), user_properties())
            .prop_map(|(reason_string, user_properties)| AckProperties {
                reason_string,
                user_properties,
            })
            .boxed()
    } else {
        Just(AckProperties::default()).boxed()
    }
}

fn ack(version: ProtocolVersion, carrier: Carrier) -> BoxedStrategy<Ack> {
    if version.is_v5() {
        (packet_id(), reason(carrier), ack_properties(true))
            .prop_map(|(packet_id, reason, properties)| Ack {
                packet_id,
                reason,
                properties,
            })
            .boxed()
    } else {
        packet_id().prop_map(Ack::success).boxed()
    }
}

fn subscription_options(v5: bool) -> impl Strategy<Value = SubscriptionOptions> {
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![
            Just(RetainHandling::SendAtSubscribe),
            Just(RetainHandling::SendIfNew),
            Just(RetainHandling::DoNotSend)
        ],
    )
        .prop_map(
            move |(qos, no_local, retain_as_published, retain_handling)| {
                if v5 {
                    SubscriptionOptions {
                        qos,
                        no_local,
                        retain_as_published,
                        retain_handling,
                    }
                } else {
                    SubscriptionOptions::qos(qos)
                }
            },
        )
}

fn subscribe(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let v5 = version.is_v5();
    (
        packet_id(),
        vec((topic_filter(), subscription_options(v5)), 1..4),
        of(subscription_id()),
        user_properties(),
    )
        .prop_map(move |(packet_id, mut filters, sub_id, user_properties)| {
            // No Local may not be set on a shared subscription (MQTT-3.8.3-4).
            for (filter, options) in &mut filters {
                if filter.share_group().is_some() {
                    options.no_local = false;
                }
            }
            Packet::Subscribe(Subscribe {
                packet_id,
                filters,
                properties: if v5 {
                    SubscribeProperties {
                        subscription_identifier: sub_id,
                        user_properties,
                    }
                } else {
                    SubscribeProperties::default()
                },
            })
        })
}

fn suback(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let v5 = version.is_v5();
    let code = if v5 {
        reason(Carrier::SubAck).boxed()
    } else {
        prop_oneof![
            Just(ReasonCode::Success),
            Just(ReasonCode::GrantedQoS1),
            Just(ReasonCode::GrantedQoS2),
            Just(ReasonCode::UnspecifiedError),
        ]
        .boxed()
    };
    (packet_id(), vec(code, 0..5), ack_properties(v5)).prop_map(
        |(packet_id, reasons, properties)| {
            Packet::SubAck(SubAck {
                packet_id,
                reasons,
                properties,
            })
        },
    )
}

fn unsubscribe(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let v5 = version.is_v5();
    (packet_id(), vec(topic_filter(), 1..4), user_properties()).prop_map(
        move |(packet_id, filters, user_properties)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                filters,
                user_properties: if v5 {
                    user_properties
                } else {
                    UserProperties::default()
                },
            })
        },
    )
}

fn unsuback(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    if version.is_v5() {
        (
            packet_id(),
            vec(reason(Carrier::UnsubAck), 0..5),
            ack_properties(true),
        )
            .prop_map(|(packet_id, reasons, properties)| {
                Packet::UnsubAck(UnsubAck {
                    packet_id,
                    reasons,
                    properties,
                })
            })
            .boxed()
    } else {
        packet_id()
            .prop_map(|packet_id| {
                Packet::UnsubAck(UnsubAck {
                    packet_id,
                    reasons: Vec::new(),
                    properties: AckProperties::default(),
                })
            })
            .boxed()
    }
}

fn disconnect(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    if version.is_v5() {
        (
            reason(Carrier::Disconnect),
            of(any::<u32>()),
            of(text()),
            user_properties(),
            of(text()),
        )
            .prop_map(|(reason, se, rs, user_properties, sr)| {
                Packet::Disconnect(Disconnect {
                    reason,
                    properties: DisconnectProperties {
                        session_expiry_interval: se,
                        reason_string: rs,
                        user_properties,
                        server_reference: sr,
                    },
                })
            })
            .boxed()
    } else {
        Just(Packet::Disconnect(Disconnect::new(ReasonCode::Success))).boxed()
    }
}

fn auth() -> impl Strategy<Value = Packet> {
    (
        reason(Carrier::Auth),
        of(text()),
        of(bytes(16)),
        of(text()),
        user_properties(),
    )
        .prop_map(|(reason, am, ad, rs, user_properties)| {
            Packet::Auth(Auth {
                reason,
                properties: AuthProperties {
                    authentication_method: am,
                    authentication_data: ad,
                    reason_string: rs,
                    user_properties,
                },
            })
        })
}

/// Any packet `version` can carry, in either direction.
pub(in super::super) fn packet(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    let common = prop_oneof![
        connect(version),
        connack(version),
        publish(version).prop_map(Packet::Publish),
        ack(version, Carrier::PubAck).prop_map(Packet::PubAck),
        ack(version, Carrier::PubRec).prop_map(Packet::PubRec),
        ack(version, Carrier::PubRel).prop_map(Packet::PubRel),
        ack(version, Carrier::PubComp).prop_map(Packet::PubComp),
        subscribe(version),
        suback(version),
        unsubscribe(version),
        unsuback(version),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        disconnect(version),
    ];
    if version.is_v5() {
        prop_oneof![14 => common, 1 => auth()].boxed()
    } else {
        common.boxed()
    }
}

/// A version and a packet it can carry.
pub(in super::super) fn versioned_packet() -> impl Strategy<Value = (ProtocolVersion, Packet)> {
    version().prop_flat_map(|v| (Just(v), packet(v)))
}
