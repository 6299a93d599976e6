//! Hand-made packets, one per rule, asserting the exact error (and so the reason code) the
//! decoder gives. Valid edge cases the rules must not reject sit beside them.

use bytes::BytesMut;

use super::{NO_LIMIT, cat, connect_err, decode_err, decode_one, frame, s};
use crate::codec::{
    ConnectError, DecodeError, Packet, ProtocolVersion, PublishQoS, QoS, ReasonCode,
    decode_connect, decode_packet,
};

use ProtocolVersion::{V3_1, V3_1_1, V5};

fn malformed(e: &DecodeError) {
    assert!(matches!(e, DecodeError::Malformed(_)), "{e:?}");
    assert_eq!(e.reason_code(), ReasonCode::MalformedPacket);
}

fn protocol(e: &DecodeError) {
    assert!(matches!(e, DecodeError::Protocol(_)), "{e:?}");
    assert_eq!(e.reason_code(), ReasonCode::ProtocolError);
}

/// A CONNECT body: protocol name, level, flags, keep alive 60, then `rest`.
fn connect_body(name: &[u8], level: u8, flags: u8, rest: &[u8]) -> Vec<u8> {
    cat(&[&s(name), &[level, flags, 0, 60], rest])
}

/// A v5 CONNECT with the given properties (already length-prefixed) and client id "c".
fn v5_connect_with_props(props: &[u8]) -> Vec<u8> {
    frame(
        0x10,
        &connect_body(b"MQTT", 5, 0x02, &cat(&[props, &s(b"c")])),
    )
}

/// A v5 PUBLISH QoS 0 to "t" with the given properties (already length-prefixed).
fn v5_publish_with_props(props: &[u8]) -> Vec<u8> {
    frame(0x30, &cat(&[&s(b"t"), props, b"payload"]))
}

// ---- fixed header --------------------------------------------------------------------

#[test]
fn packet_type_0_is_malformed() {
    malformed(&decode_err(&[0x00, 0x00], V5));
}

#[test]
fn auth_in_v311_is_malformed() {
    malformed(&decode_err(&[0xF0, 0x00], V3_1_1));
    malformed(&decode_err(&[0xF0, 0x00], V3_1));
}

#[test]
fn publish_qos3_is_malformed() {
    malformed(&decode_err(
        &frame(0x36, &cat(&[&s(b"t"), &[0, 1]])),
        V3_1_1,
    ));
}

#[test]
fn publish_qos3_rejected_from_first_byte() {
    let mut buf = BytesMut::from(&[0x36u8][..]);
    malformed(&decode_packet(&mut buf, V5, NO_LIMIT).unwrap_err());
}

#[test]
fn publish_dup_at_qos0_is_malformed() {
    malformed(&decode_err(&frame(0x38, &s(b"t")), V5));
}

#[test]
fn pubrel_wrong_flags() {
    malformed(&decode_err(&[0x60, 0x02, 0x00, 0x01], V3_1_1));
}

#[test]
fn subscribe_wrong_flags() {
    malformed(&decode_err(
        &frame(0x80, &cat(&[&[0, 1], &s(b"a"), &[0]])),
        V3_1_1,
    ));
}

#[test]
fn unsubscribe_wrong_flags() {
    malformed(&decode_err(
        &frame(0xA3, &cat(&[&[0, 1], &s(b"a")])),
        V3_1_1,
    ));
}

#[test]
fn puback_reserved_flags_set() {
    malformed(&decode_err(&[0x41, 0x02, 0x00, 0x01], V3_1_1));
}

#[test]
fn pingreq_reserved_flags_set() {
    malformed(&decode_err(&[0xC1, 0x00], V5));
}

#[test]
fn remaining_length_5_bytes() {
    malformed(&decode_err(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], V5));
}

#[test]
fn remaining_length_5_bytes_rejected_before_body() {
    let mut buf = BytesMut::from(&[0x30u8, 0x80, 0x80, 0x80, 0x80][..]);
    malformed(&decode_packet(&mut buf, V3_1_1, NO_LIMIT).unwrap_err());
}

#[test]
fn non_minimal_varint() {
    // PINGREQ with remaining length 0 written in two bytes.
    malformed(&decode_err(&[0xC0, 0x80, 0x00], V3_1_1));
}

#[test]
fn non_minimal_property_length() {
    malformed(&decode_err(&[0x40, 0x05, 0x00, 0x01, 0x00, 0x80, 0x00], V5));
}

#[test]
fn maximum_remaining_length_is_accepted_as_header() {
    // 268,435,455 in four bytes: the header is fine, the body is just not there yet.
    let mut buf = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0xFF, 0x7F][..]);
    assert_eq!(decode_packet(&mut buf, V5, NO_LIMIT).unwrap(), None);
    assert_eq!(buf.len(), 5);
}

#[test]
fn too_large_rejected_before_body_arrives() {
    // PUBLISH announcing 16,383 bytes of body; only the fixed header is here.
    let mut buf = BytesMut::from(&[0x30u8, 0xFF, 0x7F][..]);
    let e = decode_packet(&mut buf, V3_1_1, 1024).unwrap_err();
    assert_eq!(
        e,
        DecodeError::PacketTooLarge {
            size: 3 + 16_383,
            max: 1024
        }
    );
    assert_eq!(e.reason_code(), ReasonCode::PacketTooLarge);
}

#[test]
fn too_large_connect_reports_the_requested_version() {
    let body = connect_body(b"MQTT", 5, 0x02, &[]);
    let mut bytes = vec![0x10, 0xFF, 0x7F];
    bytes.extend_from_slice(&body);
    let mut buf = BytesMut::from(&bytes[..]);
    let e = decode_connect(&mut buf, 100).unwrap_err();
    assert_eq!(e.version, Some(V5));
    assert!(matches!(e.error, DecodeError::PacketTooLarge { .. }));
}

#[test]
fn incomplete_packet_consumes_nothing() {
    let bytes = frame(0x30, &cat(&[&s(b"a/b"), b"hello"]));
    let mut buf = BytesMut::from(&bytes[..bytes.len() - 1]);
    assert_eq!(decode_packet(&mut buf, V3_1_1, NO_LIMIT).unwrap(), None);
    assert_eq!(buf.len(), bytes.len() - 1);
}

#[test]
fn pingreq_with_body_is_malformed() {
    malformed(&decode_err(&[0xC0, 0x01, 0x00], V5));
}

// ---- strings and lengths -------------------------------------------------------------

#[test]
fn utf8_surrogate_in_topic() {
    malformed(&decode_err(
        &frame(0x30, &s(&[b'a', 0xED, 0xA0, 0x80])),
        V3_1_1,
    ));
}

#[test]
fn overlong_utf8_in_topic() {
    malformed(&decode_err(&frame(0x30, &s(&[0xC0, 0xAF])), V3_1_1));
}

#[test]
fn nul_in_topic() {
    malformed(&decode_err(&frame(0x30, &s(b"a\0b")), V3_1_1));
}

#[test]
fn nul_in_client_id() {
    let e = connect_err(&frame(0x10, &connect_body(b"MQTT", 4, 0x02, &s(b"a\0b"))));
    assert_eq!(e.version, Some(V3_1_1));
    malformed(&e.error);
}

#[test]
fn nul_in_user_property() {
    let props = cat(&[&[11, 0x26], &s(b"k\0"), &s(b"vv")]);
    malformed(&decode_err(&v5_publish_with_props(&props), V5));
}

#[test]
fn string_longer_than_packet() {
    malformed(&decode_err(&frame(0x30, &cat(&[&[0, 10], b"abc"])), V3_1_1));
}

#[test]
fn binary_longer_than_packet() {
    // Password flag set; password length 9 with 2 bytes present.
    let rest = cat(&[&s(b"c"), &s(b"u"), &[0, 9, 1, 2]]);
    malformed(&connect_err(&frame(0x10, &connect_body(b"MQTT", 4, 0xC2, &rest))).error);
}

#[test]
fn trailing_bytes_after_puback() {
    malformed(&decode_err(&[0x40, 0x03, 0x00, 0x01, 0x00], V3_1_1));
}

#[test]
fn trailing_bytes_after_connect() {
    let rest = cat(&[&s(b"c"), &[0xAA]]);
    malformed(&connect_err(&frame(0x10, &connect_body(b"MQTT", 4, 0x02, &rest))).error);
}

// ---- CONNECT -------------------------------------------------------------------------

#[test]
fn first_packet_not_connect() {
    let e = connect_err(&[0xC0, 0x00]);
    assert_eq!(
        e,
        ConnectError {
            version: None,
            error: DecodeError::NotConnect
        }
    );
}

#[test]
fn first_packet_not_connect_detected_from_first_byte() {
    let mut buf = BytesMut::from(&[0x30u8][..]);
    assert_eq!(
        decode_connect(&mut buf, NO_LIMIT).unwrap_err().error,
        DecodeError::NotConnect
    );
}

#[test]
fn connect_fixed_header_flags_set() {
    let e = connect_err(&frame(0x11, &connect_body(b"MQTT", 4, 0x02, &s(b"c"))));
    malformed(&e.error);
}

#[test]
fn unsupported_protocol_level() {
    let e = connect_err(&frame(0x10, &connect_body(b"MQTT", 6, 0x02, &s(b"c"))));
    assert_eq!(
        e.error,
        DecodeError::UnsupportedProtocolVersion { level: 6 }
    );
    assert_eq!(e.version, None);
    assert_eq!(
        e.error.reason_code(),
        ReasonCode::UnsupportedProtocolVersion
    );
}

#[test]
fn mqisdp_with_level_4_is_unsupported() {
    let e = connect_err(&frame(0x10, &connect_body(b"MQIsdp", 4, 0x02, &s(b"c"))));
    assert_eq!(
        e.error,
        DecodeError::UnsupportedProtocolVersion { level: 4 }
    );
}

#[test]
fn unknown_protocol_name() {
    let e = connect_err(&frame(0x10, &connect_body(b"MQTX", 4, 0x02, &s(b"c"))));
    assert_eq!(e.version, None);
    malformed(&e.error);
}

#[test]
fn mqtt_3_1_connect_is_accepted() {
    let mut buf = BytesMut::from(&frame(0x10, &connect_body(b"MQIsdp", 3, 0x02, &s(b"c")))[..]);
    let c = decode_connect(&mut buf, NO_LIMIT).unwrap().unwrap();
    assert_eq!(c.protocol, V3_1);
    assert_eq!(c.client_id, "c");
    assert_eq!(c.keep_alive, 60);
}

#[test]
fn connect_reserved_flag_set() {
    let e = connect_err(&frame(0x10, &connect_body(b"MQTT", 4, 0x03, &s(b"c"))));
    assert_eq!(e.version, Some(V3_1_1));
    malformed(&e.error);
}

#[test]
fn will_qos_without_will_flag() {
    let e = connect_err(&frame(0x10, &connect_body(b"MQTT", 4, 0x0A, &s(b"c"))));
    malformed(&e.error);
}

#[test]
fn will_retain_without_will_flag() {
    let e = connect_err(&frame(0x10, &connect_body(b"MQTT", 4, 0x22, &s(b"c"))));
    malformed(&e.error);
}

#[test]
fn will_qos3_is_malformed() {
    let rest = cat(&[&s(b"c"), &s(b"w"), &s(b"bye")]);
    let e = connect_err(&frame(0x10, &connect_body(b"MQTT", 4, 0x1E, &rest)));
    malformed(&e.error);
}

#[test]
fn will_topic_with_wildcard() {
    let rest = cat(&[&s(b"c"), &s(b"w/#"), &s(b"bye")]);
    let e = connect_err(&frame(0x10, &connect_body(b"MQTT", 4, 0x06, &rest)));
    malformed(&e.error);
}

#[test]
fn v311_password_without_username() {
    let rest = cat(&[&s(b"c"), &s(b"pw")]);
    let e = connect_err(&frame(0x10, &connect_body(b"MQTT", 4, 0x42, &rest)));
    malformed(&e.error);
}

#[test]
fn v5_password_without_username_is_accepted() {
    let rest = cat(&[&[0], &s(b"c"), &s(b"pw")]);
    let mut buf = BytesMut::from(&frame(0x10, &connect_body(b"MQTT", 5, 0x42, &rest))[..]);
    let c = decode_connect(&mut buf, NO_LIMIT).unwrap().unwrap();
    assert_eq!(c.username, None);
    assert_eq!(c.password.as_deref(), Some(&b"pw"[..]));
}

#[test]
fn connect_error_after_level_carries_v5() {
    // Property 0x23 (Topic Alias) is not allowed in CONNECT.
    let e = connect_err(&v5_connect_with_props(&[3, 0x23, 0, 1]));
    assert_eq!(e.version, Some(V5));
    malformed(&e.error);
}

#[test]
fn connect_in_the_packet_stream_decodes() {
    let bytes = frame(0x10, &connect_body(b"MQTT", 4, 0x02, &s(b"c")));
    assert!(matches!(
        decode_one(&bytes, V5).unwrap(),
        Packet::Connect(_)
    ));
}

// ---- MQTT 5 properties ---------------------------------------------------------------

#[test]
fn topic_alias_in_connect_is_malformed() {
    malformed(&connect_err(&v5_connect_with_props(&[3, 0x23, 0, 1])).error);
}

#[test]
fn will_delay_in_publish_is_malformed() {
    malformed(&decode_err(
        &v5_publish_with_props(&[5, 0x18, 0, 0, 0, 1]),
        V5,
    ));
}

#[test]
fn unknown_property_identifier() {
    malformed(&decode_err(&v5_publish_with_props(&[2, 0x7F, 0]), V5));
}

#[test]
fn duplicate_session_expiry_property() {
    let props = [10, 0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2];
    protocol(&connect_err(&v5_connect_with_props(&props)).error);
}

#[test]
fn duplicate_topic_alias_property() {
    protocol(&decode_err(
        &v5_publish_with_props(&[6, 0x23, 0, 1, 0x23, 0, 2]),
        V5,
    ));
}

#[test]
fn repeated_user_property_is_allowed() {
    let pair = cat(&[&[0x26], &s(b"k"), &s(b"v")]);
    let props = cat(&[&[14], &pair, &pair]);
    let Packet::Publish(p) = decode_one(&v5_publish_with_props(&props), V5).unwrap() else {
        panic!("not a PUBLISH");
    };
    assert_eq!(p.properties.message.user_properties.as_slice().len(), 2);
}

#[test]
fn several_subscription_identifiers_in_publish_are_allowed() {
    let props = [4, 0x0B, 1, 0x0B, 2];
    let Packet::Publish(p) = decode_one(&v5_publish_with_props(&props), V5).unwrap() else {
        panic!("not a PUBLISH");
    };
    let ids: Vec<u32> = p
        .properties
        .subscription_identifiers
        .iter()
        .map(|v| v.get())
        .collect();
    assert_eq!(ids, [1, 2]);
}

#[test]
fn duplicate_subscription_identifier_in_subscribe() {
    let body = cat(&[&[0, 1], &[4, 0x0B, 1, 0x0B, 2], &s(b"a"), &[0]]);
    protocol(&decode_err(&frame(0x82, &body), V5));
}

#[test]
fn subscription_identifier_zero() {
    let body = cat(&[&[0, 1], &[2, 0x0B, 0], &s(b"a"), &[0]]);
    protocol(&decode_err(&frame(0x82, &body), V5));
}

#[test]
fn receive_maximum_zero() {
    protocol(&connect_err(&v5_connect_with_props(&[3, 0x21, 0, 0])).error);
}

#[test]
fn maximum_packet_size_zero() {
    protocol(&connect_err(&v5_connect_with_props(&[5, 0x27, 0, 0, 0, 0])).error);
}

#[test]
fn topic_alias_zero() {
    let e = decode_err(&v5_publish_with_props(&[3, 0x23, 0, 0]), V5);
    assert_eq!(e, DecodeError::TopicAliasZero);
    assert_eq!(e.reason_code(), ReasonCode::TopicAliasInvalid);
}

#[test]
fn payload_format_indicator_2() {
    protocol(&decode_err(&v5_publish_with_props(&[2, 0x01, 2]), V5));
}

#[test]
fn request_problem_information_2() {
    protocol(&connect_err(&v5_connect_with_props(&[2, 0x17, 2])).error);
}

#[test]
fn maximum_qos_2_in_connack() {
    protocol(&decode_err(&frame(0x20, &[0, 0, 2, 0x24, 2]), V5));
}

#[test]
fn retain_available_2_in_connack() {
    protocol(&decode_err(&frame(0x20, &[0, 0, 2, 0x25, 2]), V5));
}

#[test]
fn authentication_data_without_method() {
    protocol(&connect_err(&v5_connect_with_props(&[4, 0x16, 0, 1, 9])).error);
}

#[test]
fn property_length_overruns_packet() {
    malformed(&decode_err(
        &frame(0x30, &cat(&[&s(b"t"), &[20, 0x01, 0]])),
        V5,
    ));
}

#[test]
fn property_value_overruns_property_length() {
    // Property length 3, but the Message Expiry Interval needs 4 bytes after its id.
    let body = cat(&[&s(b"t"), &[3, 0x02, 0, 0, 0, 1]]);
    malformed(&decode_err(&frame(0x30, &body), V5));
}

#[test]
fn response_topic_with_wildcard() {
    let props = cat(&[&[5, 0x08], &s(b"r/+")]);
    malformed(&decode_err(&v5_publish_with_props(&props), V5));
}

#[test]
fn v311_publish_has_no_properties() {
    // In 3.1.1 the would-be property length is payload.
    let bytes = frame(0x30, &cat(&[&s(b"t"), &[0, 1, 2]]));
    let Packet::Publish(p) = decode_one(&bytes, V3_1_1).unwrap() else {
        panic!("not a PUBLISH");
    };
    assert_eq!(&p.payload[..], &[0, 1, 2]);
}

// ---- PUBLISH -------------------------------------------------------------------------

#[test]
fn wildcard_in_publish_topic() {
    malformed(&decode_err(&frame(0x30, &s(b"a/+")), V3_1_1));
    malformed(&decode_err(&frame(0x30, &s(b"a/#")), V5));
}

#[test]
fn empty_topic_in_v311_publish() {
    malformed(&decode_err(&frame(0x30, &s(b"")), V3_1_1));
}

#[test]
fn empty_topic_without_alias_in_v5() {
    protocol(&decode_err(&frame(0x30, &cat(&[&s(b""), &[0]])), V5));
}

#[test]
fn empty_topic_with_alias_in_v5_has_no_topic() {
    let bytes = frame(0x30, &cat(&[&s(b""), &[3, 0x23, 0, 7], b"x"]));
    let Packet::Publish(p) = decode_one(&bytes, V5).unwrap() else {
        panic!("not a PUBLISH");
    };
    assert_eq!(p.topic, None);
    assert_eq!(p.properties.topic_alias.map(|a| a.get()), Some(7));
}

#[test]
fn packet_id_zero_in_publish() {
    malformed(&decode_err(
        &frame(0x32, &cat(&[&s(b"t"), &[0, 0]])),
        V3_1_1,
    ));
}

#[test]
fn publish_payload_is_a_slice_of_the_read_buffer() {
    let bytes = frame(0x34, &cat(&[&s(b"a/b"), &[0, 9], b"payload"]));
    let mut buf = BytesMut::from(&bytes[..]);
    let start = buf.as_ptr() as usize;
    let end = start + buf.len();
    let Some(Packet::Publish(p)) = decode_packet(&mut buf, V3_1_1, NO_LIMIT).unwrap() else {
        panic!("not a PUBLISH");
    };
    let at = p.payload.as_ptr() as usize;
    assert!(start <= at && at < end, "payload was copied");
    assert_eq!(
        p.qos,
        PublishQoS::ExactlyOnce(crate::codec::PacketId::new(9).unwrap())
    );
}

// ---- acks ----------------------------------------------------------------------------

#[test]
fn packet_id_zero_in_puback() {
    malformed(&decode_err(&[0x40, 0x02, 0x00, 0x00], V3_1_1));
}

#[test]
fn puback_too_short() {
    malformed(&decode_err(&[0x40, 0x01, 0x00], V5));
}

#[test]
fn puback_reason_not_allowed() {
    // 0x92 Packet Identifier not found belongs to PUBREL/PUBCOMP.
    malformed(&decode_err(&[0x40, 0x03, 0x00, 0x01, 0x92], V5));
}

#[test]
fn pubrel_reason_not_allowed() {
    malformed(&decode_err(&[0x62, 0x03, 0x00, 0x01, 0x10], V5));
}

#[test]
fn undefined_reason_code_in_pubcomp() {
    malformed(&decode_err(&[0x70, 0x03, 0x00, 0x01, 0x05], V5));
}

#[test]
fn v5_ack_short_forms() {
    let Packet::PubAck(a) = decode_one(&[0x40, 0x02, 0x00, 0x05], V5).unwrap() else {
        panic!("not a PUBACK");
    };
    assert_eq!(a.reason, ReasonCode::Success);
    let Packet::PubRec(a) = decode_one(&[0x50, 0x03, 0x00, 0x05, 0x10], V5).unwrap() else {
        panic!("not a PUBREC");
    };
    assert_eq!(a.reason, ReasonCode::NoMatchingSubscribers);
    assert!(a.properties.user_properties.is_empty());
}

#[test]
fn reason_string_twice_in_puback() {
    let body = cat(&[&[0, 1, 0x80, 8, 0x1F], &s(b"a"), &[0x1F], &s(b"b")]);
    protocol(&decode_err(&frame(0x40, &body), V5));
}

// ---- SUBSCRIBE / UNSUBSCRIBE ---------------------------------------------------------

#[test]
fn packet_id_zero_in_subscribe() {
    malformed(&decode_err(
        &frame(0x82, &cat(&[&[0, 0], &s(b"a"), &[1]])),
        V3_1_1,
    ));
}

#[test]
fn packet_id_zero_in_unsubscribe() {
    malformed(&decode_err(
        &frame(0xA2, &cat(&[&[0, 0], &s(b"a")])),
        V3_1_1,
    ));
}

#[test]
fn subscribe_without_filters() {
    protocol(&decode_err(&frame(0x82, &[0, 1]), V3_1_1));
    protocol(&decode_err(&frame(0x82, &[0, 1, 0]), V5));
}

#[test]
fn unsubscribe_without_filters() {
    protocol(&decode_err(&frame(0xA2, &[0, 1]), V3_1_1));
    protocol(&decode_err(&frame(0xA2, &[0, 1, 0]), V5));
}

#[test]
fn subscribe_filter_without_options_byte() {
    malformed(&decode_err(
        &frame(0x82, &cat(&[&[0, 1], &s(b"a")])),
        V3_1_1,
    ));
}

#[test]
fn v311_subscribe_reserved_option_bits() {
    malformed(&decode_err(
        &frame(0x82, &cat(&[&[0, 1], &s(b"a"), &[0x04]])),
        V3_1_1,
    ));
}

#[test]
fn v311_subscribe_qos3() {
    malformed(&decode_err(
        &frame(0x82, &cat(&[&[0, 1], &s(b"a"), &[0x03]])),
        V3_1_1,
    ));
}

#[test]
fn v5_subscribe_reserved_option_bits() {
    malformed(&decode_err(
        &frame(0x82, &cat(&[&[0, 1, 0], &s(b"a"), &[0x40]])),
        V5,
    ));
}

#[test]
fn v5_subscribe_qos3() {
    protocol(&decode_err(
        &frame(0x82, &cat(&[&[0, 1, 0], &s(b"a"), &[0x03]])),
        V5,
    ));
}

#[test]
fn v5_subscribe_retain_handling_3() {
    protocol(&decode_err(
        &frame(0x82, &cat(&[&[0, 1, 0], &s(b"a"), &[0x30]])),
        V5,
    ));
}

#[test]
fn no_local_on_shared_subscription() {
    let body = cat(&[&[0, 1, 0], &s(b"$share/g/a"), &[0x04]]);
    protocol(&decode_err(&frame(0x82, &body), V5));
}

#[test]
fn shared_subscription_in_v311_is_accepted() {
    let body = cat(&[&[0, 1], &s(b"$share/g/a/+"), &[0x01]]);
    let Packet::Subscribe(sub) = decode_one(&frame(0x82, &body), V3_1_1).unwrap() else {
        panic!("not a SUBSCRIBE");
    };
    let (filter, options) = &sub.filters[0];
    assert_eq!(filter.share_group(), Some("g"));
    assert_eq!(filter.filter(), "a/+");
    assert_eq!(options.qos, QoS::AtLeastOnce);
}

#[test]
fn misplaced_hash_in_filter() {
    malformed(&decode_err(
        &frame(0x82, &cat(&[&[0, 1], &s(b"a/#/b"), &[0]])),
        V3_1_1,
    ));
}

#[test]
fn partial_level_plus_in_filter() {
    malformed(&decode_err(
        &frame(0xA2, &cat(&[&[0, 1], &s(b"a+")])),
        V3_1_1,
    ));
}

#[test]
fn empty_filter() {
    malformed(&decode_err(
        &frame(0x82, &cat(&[&[0, 1], &s(b""), &[0]])),
        V3_1_1,
    ));
}

#[test]
fn share_without_filter() {
    malformed(&decode_err(
        &frame(0x82, &cat(&[&[0, 1], &s(b"$share/g"), &[0]])),
        V3_1_1,
    ));
}

// ---- CONNACK / SUBACK / UNSUBACK -----------------------------------------------------

#[test]
fn connack_reserved_flags() {
    malformed(&decode_err(&[0x20, 0x02, 0x02, 0x00], V3_1_1));
}

#[test]
fn connack_session_present_with_error() {
    protocol(&decode_err(&[0x20, 0x02, 0x01, 0x05], V3_1_1));
    protocol(&decode_err(&[0x20, 0x03, 0x01, 0x87, 0x00], V5));
}

/// Found by the fuzzer: MQTT 3.1 CONNACK has no Session Present flag, so a set bit 0 must
/// not decode to something the encoder cannot write back.
#[test]
fn fuzz_v31_connack_session_present_bit_is_ignored() {
    let mut buf = BytesMut::from(&[0x20u8, 0x02, 0x01, 0x00, 0xFF, 0xD9, 0x34, 0x20][..]);
    let Some(Packet::ConnAck(c)) = decode_packet(&mut buf, V3_1, NO_LIMIT).unwrap() else {
        panic!("not a CONNACK");
    };
    assert!(!c.session_present);
    let Packet::ConnAck(c) = decode_one(&[0x20, 0x02, 0x01, 0x00], V3_1_1).unwrap() else {
        panic!("not a CONNACK");
    };
    assert!(c.session_present);
}

#[test]
fn v311_connack_return_code_6() {
    malformed(&decode_err(&[0x20, 0x02, 0x00, 0x06], V3_1_1));
}

#[test]
fn v311_connack_return_codes_map_to_reason_codes() {
    let expected = [
        ReasonCode::Success,
        ReasonCode::UnsupportedProtocolVersion,
        ReasonCode::ClientIdentifierNotValid,
        ReasonCode::ServerUnavailable,
        ReasonCode::BadUserNameOrPassword,
        ReasonCode::NotAuthorized,
    ];
    for (rc, want) in (0u8..).zip(expected) {
        let Packet::ConnAck(c) = decode_one(&[0x20, 0x02, 0x00, rc], V3_1_1).unwrap() else {
            panic!("not a CONNACK");
        };
        assert_eq!(c.reason, want);
    }
}

#[test]
fn v5_connack_reason_not_allowed() {
    // 0x04 Disconnect with Will Message is a DISCONNECT code.
    malformed(&decode_err(&[0x20, 0x03, 0x00, 0x04, 0x00], V5));
}

#[test]
fn v311_suback_return_codes() {
    let bytes = frame(0x90, &[0, 1, 0, 1, 2, 0x80]);
    let Packet::SubAck(s) = decode_one(&bytes, V3_1_1).unwrap() else {
        panic!("not a SUBACK");
    };
    assert_eq!(
        s.reasons,
        [
            ReasonCode::Success,
            ReasonCode::GrantedQoS1,
            ReasonCode::GrantedQoS2,
            ReasonCode::UnspecifiedError
        ]
    );
}

#[test]
fn v311_suback_invalid_return_code() {
    malformed(&decode_err(&frame(0x90, &[0, 1, 3]), V3_1_1));
    malformed(&decode_err(&frame(0x90, &[0, 1, 0x87]), V3_1_1));
}

#[test]
fn v5_suback_reason_not_allowed() {
    malformed(&decode_err(&frame(0x90, &[0, 1, 0, 0x11]), V5));
}

#[test]
fn v311_unsuback_with_payload() {
    malformed(&decode_err(&frame(0xB0, &[0, 1, 0]), V3_1_1));
}

#[test]
fn v5_unsuback_reason_not_allowed() {
    malformed(&decode_err(&frame(0xB0, &[0, 1, 0, 0x01]), V5));
}

// ---- DISCONNECT / AUTH ---------------------------------------------------------------

#[test]
fn v311_disconnect_with_body() {
    malformed(&decode_err(&[0xE0, 0x01, 0x00], V3_1_1));
}

#[test]
fn v5_disconnect_without_body_is_normal() {
    let Packet::Disconnect(d) = decode_one(&[0xE0, 0x00], V5).unwrap() else {
        panic!("not a DISCONNECT");
    };
    assert_eq!(d.reason, ReasonCode::Success);
}

#[test]
fn v5_disconnect_reason_not_allowed() {
    // 0x84 Unsupported Protocol Version is a CONNACK code.
    malformed(&decode_err(&[0xE0, 0x01, 0x84], V5));
}

#[test]
fn session_expiry_in_disconnect_is_allowed() {
    let Packet::Disconnect(d) = decode_one(&[0xE0, 0x07, 0x00, 5, 0x11, 0, 0, 0, 9], V5).unwrap()
    else {
        panic!("not a DISCONNECT");
    };
    assert_eq!(d.properties.session_expiry_interval, Some(9));
}

#[test]
fn v5_auth_without_body_is_success() {
    let Packet::Auth(a) = decode_one(&[0xF0, 0x00], V5).unwrap() else {
        panic!("not an AUTH");
    };
    assert_eq!(a.reason, ReasonCode::Success);
}

#[test]
fn v5_auth_reason_not_allowed() {
    malformed(&decode_err(&[0xF0, 0x02, 0x87, 0x00], V5));
}

#[test]
fn v5_auth_property_not_allowed() {
    malformed(&decode_err(&[0xF0, 0x04, 0x18, 0x02, 0x01, 0x01], V5));
}
