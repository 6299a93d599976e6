//! Feeds arbitrary bytes to the decoder as a connection would: first `decode_connect`, then
//! `decode_packet` in a loop, and independently the whole input as a packet stream of each
//! protocol version, with and without the broker's default limits on repeated fields.
//! Every decoded packet must encode again, and decode back to itself.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sandpiper::codec::{
    DecodeLimits, Packet, ProtocolVersion, decode_connect, decode_packet, decode_packet_limited,
    encode_packet,
};

const MAX_PACKET_SIZE: u32 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    if let Ok(Some(connect)) = decode_connect(&mut buf, MAX_PACKET_SIZE) {
        let version = connect.protocol;
        round_trip(&Packet::Connect(connect), version);
        drain(&mut buf, version);
    }
    for version in [
        ProtocolVersion::V3_1,
        ProtocolVersion::V3_1_1,
        ProtocolVersion::V5,
    ] {
        drain(&mut BytesMut::from(data), version);
        let limits: DecodeLimits = sandpiper::config::MqttConfig::default().decode_limits();
        let mut buf = BytesMut::from(data);
        while let Ok(Some(packet)) = decode_packet_limited(&mut buf, version, &limits) {
            round_trip(&packet, version);
        }
    }
});

/// Decodes packets until more bytes are needed or an error.
fn drain(buf: &mut BytesMut, version: ProtocolVersion) {
    while let Ok(Some(packet)) = decode_packet(buf, version, MAX_PACKET_SIZE) {
        round_trip(&packet, version);
    }
}

/// Whatever the decoder accepts, the encoder must write, and the decoder must read back.
fn round_trip(packet: &Packet, version: ProtocolVersion) {
    let mut out = BytesMut::new();
    if let Err(e) = encode_packet(packet, version, &mut out) {
        panic!("decoded packet does not encode: {e}: {packet:?}");
    }
    let len = out.len();
    let again = match packet {
        Packet::Connect(_) => decode_connect(&mut out, u32::MAX)
            .map(|c| c.map(Packet::Connect))
            .map_err(|e| e.error),
        _ => decode_packet(&mut out, version, u32::MAX),
    };
    match again {
        Ok(Some(decoded)) => assert_eq!(&decoded, packet, "re-decoded packet differs"),
        other => panic!("re-encoded packet ({len} bytes) does not decode: {other:?}: {packet:?}"),
    }
    assert!(
        out.is_empty(),
        "re-encoded packet has {} bytes left over",
        out.len()
    );
}
