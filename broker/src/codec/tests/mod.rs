//! Codec tests: property-based round trips for every packet and version, malformed-packet
//! fixtures named by the rule they break, encoder refusals, and "never panics" on random
//! input.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
#![allow(clippy::expect_used, reason = "tests fail loudly on purpose")]

mod encode_rules;
mod limits;
mod malformed;
mod roundtrip;
pub(super) mod strategies;

use bytes::BytesMut;

use super::{
    ConnectError, DecodeError, Packet, ProtocolVersion, decode_connect, decode_packet,
    encode_packet,
};

/// No limit on packet size.
const NO_LIMIT: u32 = u32::MAX;

/// Decodes exactly one packet from `bytes`, which must be consumed entirely.
fn decode_one(bytes: &[u8], version: ProtocolVersion) -> Result<Packet, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let packet = decode_packet(&mut buf, version, NO_LIMIT)?.expect("packet is incomplete");
    assert!(buf.is_empty(), "{} bytes left after the packet", buf.len());
    Ok(packet)
}

/// The error decoding `bytes` must give.
fn decode_err(bytes: &[u8], version: ProtocolVersion) -> DecodeError {
    match decode_one(bytes, version) {
        Ok(p) => panic!("decoded {p:?}, expected an error"),
        Err(e) => e,
    }
}

/// The error decoding `bytes` as the first packet must give.
fn connect_err(bytes: &[u8]) -> ConnectError {
    let mut buf = BytesMut::from(bytes);
    match decode_connect(&mut buf, NO_LIMIT) {
        Ok(p) => panic!("decoded {p:?}, expected an error"),
        Err(e) => e,
    }
}

/// Encodes for `version`.
fn encode(packet: &Packet, version: ProtocolVersion) -> BytesMut {
    let mut out = BytesMut::new();
    encode_packet(packet, version, &mut out).expect("encodable");
    out
}

/// Builds a packet from its first byte and body, computing the remaining length.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut b = u8::try_from(len & 0x7F).unwrap();
        len >>= 7;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// A two-byte-length-prefixed field.
fn s(text: &[u8]) -> Vec<u8> {
    let mut out = u16::try_from(text.len()).unwrap().to_be_bytes().to_vec();
    out.extend_from_slice(text);
    out
}

/// Concatenates fields.
fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}
