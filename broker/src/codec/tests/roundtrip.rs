//! encode → decode gives back the packet, for every packet type and version; partial input
//! is "need more bytes" and consumes nothing; random input never panics.

use bytes::{BufMut, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;

use super::strategies::{packet, publish, version, versioned_packet};
use super::{NO_LIMIT, encode};
use crate::codec::{
    Packet, ProtocolVersion, decode_connect, decode_packet, encode_packet, publish_len,
};

/// Decodes `bytes` feeding one more byte at a time: `None` (and nothing consumed) until
/// the last byte, then the packet.
fn decode_bytewise(bytes: &[u8], version: ProtocolVersion, first: bool) -> Packet {
    let mut buf = BytesMut::new();
    for (i, &b) in bytes.iter().enumerate() {
        buf.put_u8(b);
        let got = if first {
            decode_connect(&mut buf, NO_LIMIT)
                .map(|c| c.map(Packet::Connect))
                .map_err(|e| e.error)
        } else {
            decode_packet(&mut buf, version, NO_LIMIT)
        };
        let got = got.unwrap_or_else(|e| panic!("error {e:?} after {} bytes", i + 1));
        if i + 1 < bytes.len() {
            assert_eq!(got, None, "decoded before the last byte");
            assert_eq!(buf.len(), i + 1, "consumed bytes of an incomplete packet");
        } else {
            assert!(buf.is_empty());
            return got.expect("complete packet not decoded");
        }
    }
    panic!("empty encoding")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_packet_round_trips((version, p) in versioned_packet()) {
        let bytes = encode(&p, version);
        let mut buf = bytes.clone();
        let decoded = decode_packet(&mut buf, version, NO_LIMIT).unwrap().unwrap();
        prop_assert_eq!(&decoded, &p);
        prop_assert!(buf.is_empty());
        // Encoding what was decoded gives the same bytes.
        prop_assert_eq!(encode(&decoded, version), bytes);
    }

    #[test]
    fn decoding_byte_by_byte_waits_for_the_whole_packet((version, p) in versioned_packet()) {
        let bytes = encode(&p, version);
        prop_assert_eq!(decode_bytewise(&bytes, version, false), p);
    }

    #[test]
    fn packets_back_to_back_decode_in_order(
        (version, ps) in version().prop_flat_map(|v| (Just(v), vec(packet(v), 1..6)))
    ) {
        let mut buf = BytesMut::new();
        for p in &ps {
            encode_packet(p, version, &mut buf).unwrap();
        }
        for p in &ps {
            let got = decode_packet(&mut buf, version, NO_LIMIT).unwrap();
            prop_assert_eq!(got.as_ref(), Some(p));
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(decode_packet(&mut buf, version, NO_LIMIT).unwrap(), None);
    }

    #[test]
    fn connect_round_trips_as_first_packet((version, p) in versioned_packet()) {
        if let Packet::Connect(c) = &p {
            let bytes = encode(&p, version);
            let mut buf = bytes.clone();
            let decoded = decode_connect(&mut buf, NO_LIMIT).unwrap().unwrap();
            prop_assert_eq!(&decoded, c);
            prop_assert_eq!(decoded.protocol, version);
            prop_assert_eq!(decode_bytewise(&bytes, version, true), p);
        }
    }

    #[test]
    fn publish_len_is_the_encoded_size(
        (version, p) in version().prop_flat_map(|v| (Just(v), publish(v)))
    ) {
        let bytes = encode(&Packet::Publish(p.clone()), version);
        prop_assert_eq!(publish_len(&p, version), bytes.len());
    }

    #[test]
    fn max_packet_size_is_exact((version, p) in versioned_packet()) {
        let bytes = encode(&p, version);
        let size = u32::try_from(bytes.len()).unwrap();
        let mut buf = bytes.clone();
        prop_assert!(decode_packet(&mut buf, version, size).unwrap().is_some());
        let mut buf = bytes.clone();
        let err = decode_packet(&mut buf, version, size - 1).unwrap_err();
        prop_assert_eq!(
            err,
            crate::codec::DecodeError::PacketTooLarge { size: bytes.len(), max: size - 1 }
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5000))]

    #[test]
    fn random_bytes_never_panic(bytes in vec(any::<u8>(), 0..300)) {
        for version in [ProtocolVersion::V3_1, ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode_packet(&mut buf, version, NO_LIMIT) {}
        }
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = decode_connect(&mut buf, NO_LIMIT);
    }

    /// Random bodies behind a valid fixed header get past framing into the packet parsers.
    #[test]
    fn random_bodies_never_panic(
        kind in 0u8..16,
        flags in 0u8..16,
        body in vec(any::<u8>(), 0..200),
    ) {
        let bytes = super::frame((kind << 4) | flags, &body);
        for version in [ProtocolVersion::V3_1, ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode_packet(&mut buf, version, NO_LIMIT);
        }
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = decode_connect(&mut buf, NO_LIMIT);
    }

    /// Valid packets with one byte changed: decoding must not panic, and whatever still
    /// decodes must re-encode to something that decodes to the same packet.
    #[test]
    fn mutated_packets_never_panic(
        (version, p) in versioned_packet(),
        at in any::<prop::sample::Index>(),
        xor in 1u8..,
    ) {
        let mut bytes = encode(&p, version).to_vec();
        let i = at.index(bytes.len());
        if let Some(b) = bytes.get_mut(i) {
            *b ^= xor;
        }
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(decoded)) = decode_packet(&mut buf, version, NO_LIMIT) {
            let mut again = BytesMut::new();
            if encode_packet(&decoded, version, &mut again).is_ok() {
                let redecoded = decode_packet(&mut again, version, NO_LIMIT).unwrap();
                prop_assert_eq!(redecoded, Some(decoded));
            }
        }
    }
}

/// The fuzzer's seed inputs are valid streams: each decodes to the end without error.
#[test]
fn fuzz_seeds_decode_completely() {
    use ProtocolVersion::{V3_1_1, V5};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode");
    let seeds = [
        ("connect_v31", None, 3),
        ("connect_v311", None, 1),
        ("connect_v5", None, 1),
        ("stream_v311", None, 7),
        ("stream_v5", None, 7),
        ("server_v5", Some(V5), 4),
        ("publish_v311", Some(V3_1_1), 1),
        ("subscribe_v311", Some(V3_1_1), 1),
    ];
    for (name, stream_version, count) in seeds {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let mut buf = BytesMut::from(&bytes[..]);
        let (version, mut decoded) = match stream_version {
            Some(v) => (v, 0),
            None => {
                let c = decode_connect(&mut buf, NO_LIMIT).unwrap().unwrap();
                (c.protocol, 1)
            }
        };
        while let Some(p) = decode_packet(&mut buf, version, NO_LIMIT).unwrap() {
            let again = encode(&p, version);
            let mut again = again.clone();
            assert_eq!(
                decode_packet(&mut again, version, NO_LIMIT).unwrap(),
                Some(p)
            );
            decoded += 1;
        }
        assert!(buf.is_empty(), "{name}: {} bytes left", buf.len());
        assert_eq!(decoded, count, "{name}");
    }
}
