//! What the encoder refuses, how it maps reason codes for 3.x peers, and the exact bytes of
//! the short forms.

use std::num::{NonZeroU16, NonZeroU32};

use bytes::{Bytes, BytesMut};

use super::{decode_one, encode};
use crate::codec::{
    Ack, AckProperties, Auth, AuthProperties, ConnAck, ConnAckProperties, Connect,
    ConnectProperties, Disconnect, EncodeError, Packet, PacketId, ProtocolVersion, Publish,
    PublishProperties, PublishQoS, QoS, ReasonCode, SubAck, Subscribe, SubscriptionOptions,
    TopicFilter, TopicName, UnsubAck, encode_packet, publish_len,
};

use ProtocolVersion::{V3_1, V3_1_1, V5};

fn id(v: u16) -> PacketId {
    PacketId::new(v).unwrap()
}

fn encode_err(packet: &Packet, version: ProtocolVersion) -> EncodeError {
    let mut out = BytesMut::new();
    let e = encode_packet(packet, version, &mut out).unwrap_err();
    assert!(out.is_empty(), "bytes written before the error");
    e
}

fn publish(topic: &str, payload: Bytes) -> Publish {
    Publish {
        dup: false,
        qos: PublishQoS::AtMostOnce,
        retain: false,
        topic: Some(TopicName::new(topic).unwrap()),
        payload,
        properties: PublishProperties::default(),
    }
}

fn connect(version: ProtocolVersion) -> Connect {
    Connect {
        protocol: version,
        clean_start: true,
        keep_alive: 30,
        client_id: "c".to_owned(),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
        bridge: false,
    }
}

fn connack(reason: ReasonCode, session_present: bool) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present,
        reason,
        properties: ConnAckProperties::default(),
    })
}

#[test]
fn auth_to_v311_is_refused() {
    let auth = Packet::Auth(Auth {
        reason: ReasonCode::Success,
        properties: AuthProperties::default(),
    });
    assert_eq!(
        encode_err(&auth, V3_1_1),
        EncodeError::NotInVersion {
            packet: "AUTH",
            version: V3_1_1
        }
    );
    assert!(matches!(
        encode_err(&auth, V3_1),
        EncodeError::NotInVersion { .. }
    ));
}

#[test]
fn string_longer_than_65535_is_refused() {
    let mut c = connect(V5);
    c.client_id = "x".repeat(65_536);
    assert!(matches!(
        encode_err(&Packet::Connect(Box::new(c)), V5),
        EncodeError::FieldTooLong { len: 65_536, .. }
    ));
}

#[test]
fn remaining_length_over_maximum_is_refused() {
    // calloc'd zero pages: nothing is touched, the size check fails first.
    let p = publish("t", Bytes::from(vec![0u8; 268_435_455]));
    assert!(matches!(
        encode_err(&Packet::Publish(p.clone()), V3_1_1),
        EncodeError::PacketTooLarge { .. }
    ));
    assert_eq!(publish_len(&p, V3_1_1), usize::MAX);
}

#[test]
fn nul_in_client_id_is_refused() {
    let mut c = connect(V3_1_1);
    c.client_id = "a\0b".to_owned();
    assert!(matches!(
        encode_err(&Packet::Connect(Box::new(c)), V3_1_1),
        EncodeError::InvalidValue(_)
    ));
}

#[test]
fn v311_password_without_username_is_refused() {
    let mut c = connect(V3_1_1);
    c.password = Some(Bytes::from_static(b"pw"));
    assert!(matches!(
        encode_err(&Packet::Connect(Box::new(c)), V3_1_1),
        EncodeError::InvalidValue(_)
    ));
}

#[test]
fn publish_without_topic_needs_v5_and_alias() {
    let mut p = publish("t", Bytes::new());
    p.topic = None;
    assert!(matches!(
        encode_err(&Packet::Publish(p.clone()), V5),
        EncodeError::InvalidValue(_)
    ));
    p.properties.topic_alias = NonZeroU16::new(3);
    assert!(matches!(
        encode_err(&Packet::Publish(p.clone()), V3_1_1),
        EncodeError::InvalidValue(_)
    ));
    assert_eq!(
        &encode(&Packet::Publish(p), V5)[..],
        &[0x30, 0x06, 0, 0, 3, 0x23, 0, 3]
    );
}

#[test]
fn subscription_identifier_over_maximum_is_refused() {
    let mut p = publish("t", Bytes::new());
    p.properties.subscription_identifiers = vec![NonZeroU32::new(268_435_456).unwrap()];
    assert!(matches!(
        encode_err(&Packet::Publish(p.clone()), V5),
        EncodeError::InvalidValue(_)
    ));
    // 3.x drops properties, so there is nothing to refuse.
    encode(&Packet::Publish(p), V3_1_1);
}

#[test]
fn subscribe_without_filters_is_refused() {
    let s = Packet::Subscribe(Subscribe {
        packet_id: id(1),
        filters: Vec::new(),
        properties: Default::default(),
    });
    assert!(matches!(encode_err(&s, V5), EncodeError::InvalidValue(_)));
}

#[test]
fn no_local_on_shared_subscription_is_refused_in_v5_only() {
    let mut options = SubscriptionOptions::qos(QoS::AtLeastOnce);
    options.no_local = true;
    let s = Packet::Subscribe(Subscribe {
        packet_id: id(1),
        filters: vec![(TopicFilter::new("$share/g/a").unwrap(), options)],
        properties: Default::default(),
    });
    assert!(matches!(encode_err(&s, V5), EncodeError::InvalidValue(_)));
    assert_eq!(
        &encode(&s, V3_1_1)[..],
        &[
            0x82, 15, 0, 1, 0, 10, b'$', b's', b'h', b'a', b'r', b'e', b'/', b'g', b'/', b'a', 1
        ]
    );
}

#[test]
fn reason_code_not_allowed_in_v5_packet_is_refused() {
    let ack = Packet::PubAck(Ack {
        packet_id: id(1),
        reason: ReasonCode::PacketIdentifierNotFound,
        properties: AckProperties::default(),
    });
    assert_eq!(
        encode_err(&ack, V5),
        EncodeError::InvalidReasonCode {
            packet: "PUBACK",
            code: ReasonCode::PacketIdentifierNotFound
        }
    );
    assert!(matches!(
        encode_err(&connack(ReasonCode::GrantedQoS1, false), V5),
        EncodeError::InvalidReasonCode { .. }
    ));
    assert!(matches!(
        encode_err(
            &Packet::Disconnect(Disconnect::new(ReasonCode::GrantedQoS2)),
            V5
        ),
        EncodeError::InvalidReasonCode { .. }
    ));
}

#[test]
fn v3_connack_return_codes() {
    let cases = [
        (ReasonCode::Success, 0),
        (ReasonCode::UnsupportedProtocolVersion, 1),
        (ReasonCode::ClientIdentifierNotValid, 2),
        (ReasonCode::ServerUnavailable, 3),
        (ReasonCode::BadUserNameOrPassword, 4),
        (ReasonCode::NotAuthorized, 5),
        (ReasonCode::ServerBusy, 3),
        (ReasonCode::Banned, 5),
        (ReasonCode::BadAuthenticationMethod, 4),
        (ReasonCode::QuotaExceeded, 3),
        (ReasonCode::MalformedPacket, 3),
    ];
    for (reason, rc) in cases {
        assert_eq!(
            &encode(&connack(reason, false), V3_1_1)[..],
            &[0x20, 2, 0, rc]
        );
    }
    assert!(matches!(
        encode_err(&connack(ReasonCode::GrantedQoS1, false), V3_1_1),
        EncodeError::InvalidReasonCode { .. }
    ));
}

#[test]
fn session_present_only_on_success_and_not_in_v31() {
    assert_eq!(
        &encode(&connack(ReasonCode::Success, true), V3_1_1)[..],
        &[0x20, 2, 1, 0]
    );
    assert_eq!(
        &encode(&connack(ReasonCode::Success, true), V3_1)[..],
        &[0x20, 2, 0, 0]
    );
    assert_eq!(
        &encode(&connack(ReasonCode::Banned, true), V3_1_1)[..],
        &[0x20, 2, 0, 5]
    );
    assert_eq!(
        &encode(&connack(ReasonCode::Banned, true), V5)[..],
        &[0x20, 3, 0, 0x8A, 0]
    );
}

#[test]
fn maximum_qos_2_is_left_out_of_connack() {
    let c = Packet::ConnAck(ConnAck {
        session_present: false,
        reason: ReasonCode::Success,
        properties: ConnAckProperties {
            maximum_qos: Some(QoS::ExactlyOnce),
            ..Default::default()
        },
    });
    assert_eq!(&encode(&c, V5)[..], &[0x20, 3, 0, 0, 0]);
}

#[test]
fn v3_suback_sends_0x80_for_every_error() {
    let s = Packet::SubAck(SubAck {
        packet_id: id(7),
        reasons: vec![
            ReasonCode::GrantedQoS2,
            ReasonCode::NotAuthorized,
            ReasonCode::QuotaExceeded,
        ],
        properties: AckProperties::default(),
    });
    assert_eq!(&encode(&s, V3_1_1)[..], &[0x90, 5, 0, 7, 2, 0x80, 0x80]);
}

#[test]
fn v3_unsuback_has_no_payload() {
    let u = Packet::UnsubAck(UnsubAck {
        packet_id: id(7),
        reasons: vec![ReasonCode::NoSubscriptionExisted],
        properties: AckProperties::default(),
    });
    assert_eq!(&encode(&u, V3_1_1)[..], &[0xB0, 2, 0, 7]);
    assert_eq!(&encode(&u, V5)[..], &[0xB0, 4, 0, 7, 0, 0x11]);
}

#[test]
fn v5_short_forms() {
    let ok = Packet::PubAck(Ack::success(id(1)));
    assert_eq!(&encode(&ok, V5)[..], &[0x40, 2, 0, 1]);
    let rec = Packet::PubRec(Ack {
        packet_id: id(1),
        reason: ReasonCode::NoMatchingSubscribers,
        properties: AckProperties::default(),
    });
    assert_eq!(&encode(&rec, V5)[..], &[0x50, 3, 0, 1, 0x10]);
    let rel = Packet::PubRel(Ack::success(id(1)));
    assert_eq!(&encode(&rel, V5)[..], &[0x62, 2, 0, 1]);
    let normal = Packet::Disconnect(Disconnect::new(ReasonCode::Success));
    assert_eq!(&encode(&normal, V5)[..], &[0xE0, 0]);
    let busy = Packet::Disconnect(Disconnect::new(ReasonCode::ServerBusy));
    assert_eq!(&encode(&busy, V5)[..], &[0xE0, 1, 0x89]);
    assert_eq!(&encode(&busy, V3_1_1)[..], &[0xE0, 0]);
    let auth = Packet::Auth(Auth {
        reason: ReasonCode::Success,
        properties: AuthProperties::default(),
    });
    assert_eq!(&encode(&auth, V5)[..], &[0xF0, 0]);
}

#[test]
fn v3_drops_properties_and_reasons() {
    let mut p = publish("a", Bytes::from_static(b"hi"));
    p.properties.message.payload_format_indicator = Some(true);
    assert_eq!(
        &encode(&Packet::Publish(p.clone()), V3_1_1)[..],
        &[0x30, 5, 0, 1, b'a', b'h', b'i']
    );
    assert_eq!(publish_len(&p, V3_1_1), 7);
    assert_eq!(publish_len(&p, V5), 10);
    let nack = Packet::PubAck(Ack {
        packet_id: id(2),
        reason: ReasonCode::QuotaExceeded,
        properties: AckProperties::default(),
    });
    assert_eq!(&encode(&nack, V3_1_1)[..], &[0x40, 2, 0, 2]);
}

#[test]
fn dup_is_never_set_at_qos0() {
    let mut p = publish("a", Bytes::new());
    p.dup = true;
    let bytes = encode(&Packet::Publish(p), V3_1_1);
    assert_eq!(bytes[0], 0x30);
    decode_one(&bytes, V3_1_1).unwrap();
}

#[test]
fn connect_encodes_in_its_own_version() {
    let c = Packet::Connect(Box::new(connect(V3_1)));
    let bytes = encode(&c, V5);
    assert_eq!(&bytes[2..10], b"\x00\x06MQIsdp");
    assert_eq!(bytes[10], 3);
}
