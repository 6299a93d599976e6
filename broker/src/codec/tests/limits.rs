//! `DecodeLimits`: fields a packet may repeat as often as its size allows are bounded as
//! they are read, and answered with 0x97 Quota exceeded.

use bytes::BytesMut;

use super::super::{
    DecodeError, DecodeLimits, Packet, ProtocolVersion, ReasonCode, decode_connect_limited,
    decode_packet_limited,
};

const LIMITS: DecodeLimits = DecodeLimits {
    max_packet_size: 1 << 20,
    max_user_properties: 3,
    max_user_property_bytes: 10,
    max_filters: 2,
};

fn packet(first: u8, body: &[u8]) -> BytesMut {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut b = u8::try_from(len % 128).unwrap();
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    BytesMut::from(&out[..])
}

/// A v5 PUBLISH QoS 0 to "t" with these User Properties.
fn publish(users: &[(&str, &str)]) -> BytesMut {
    let mut props = Vec::new();
    for (k, v) in users {
        props.push(0x26);
        for s in [k, v] {
            props.extend_from_slice(&u16::try_from(s.len()).unwrap().to_be_bytes());
            props.extend_from_slice(s.as_bytes());
        }
    }
    let mut body = vec![0, 1, b't', u8::try_from(props.len()).unwrap()];
    body.extend_from_slice(&props);
    packet(0x30, &body)
}

fn decode(buf: &mut BytesMut, version: ProtocolVersion) -> Result<Packet, DecodeError> {
    decode_packet_limited(buf, version, &LIMITS).map(|p| p.expect("complete"))
}

#[test]
fn user_properties_are_bounded_in_count_and_bytes() {
    let v5 = ProtocolVersion::V5;
    assert!(decode(&mut publish(&[("a", "b"), ("", ""), ("c", "")]), v5).is_ok());
    let e = decode(&mut publish(&[("", ""); 4]), v5).unwrap_err();
    assert_eq!(e.reason_code(), ReasonCode::QuotaExceeded, "{e}");
    let e = decode(&mut publish(&[("abcdef", "ghijk")]), v5).unwrap_err();
    assert!(matches!(e, DecodeError::OverLimit(_)), "{e}");
}

#[test]
fn filters_per_subscribe_and_unsubscribe_are_bounded() {
    for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
        let props: &[u8] = if version.is_v5() { &[0] } else { &[] };
        let sub = |n: usize| {
            let mut body = vec![0, 1];
            body.extend_from_slice(props);
            for _ in 0..n {
                body.extend_from_slice(&[0, 1, b'#', 0]);
            }
            packet(0x82, &body)
        };
        let unsub = |n: usize| {
            let mut body = vec![0, 1];
            body.extend_from_slice(props);
            for _ in 0..n {
                body.extend_from_slice(&[0, 1, b'#']);
            }
            packet(0xA2, &body)
        };
        assert!(decode(&mut sub(2), version).is_ok());
        assert!(decode(&mut unsub(2), version).is_ok());
        for mut p in [sub(3), unsub(3)] {
            let e = decode(&mut p, version).unwrap_err();
            assert_eq!(e.reason_code(), ReasonCode::QuotaExceeded, "{e}");
        }
    }
}

#[test]
fn a_connect_has_the_limits_too() {
    // CONNECT v5, clean start, keep alive 30, four empty User Properties.
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 30, 20];
    for _ in 0..4 {
        body.extend_from_slice(&[0x26, 0, 0, 0, 0]);
    }
    body.extend_from_slice(&[0, 1, b'c']);
    let e = decode_connect_limited(&mut packet(0x10, &body), &LIMITS).unwrap_err();
    assert_eq!(e.error.reason_code(), ReasonCode::QuotaExceeded);
    assert_eq!(
        e.version,
        Some(ProtocolVersion::V5),
        "answered in its version"
    );
}
