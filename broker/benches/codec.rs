//! Criterion benchmarks of the codec's hot path: encoding one PUBLISH and decoding a stream
//! of them, 64-byte payloads, MQTT 3.1.1 and 5.0.
//!
//! `cargo bench -p sandpiper --bench codec`

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use sandpiper::codec::{
    Packet, PacketId, ProtocolVersion, Publish, PublishProperties, PublishQoS, TopicName,
    decode_packet, encode_packet,
};

const PAYLOAD: usize = 64;
/// Packets per decoded buffer.
const STREAM: usize = 1000;

fn publish(qos: PublishQoS) -> Packet {
    let topic = match TopicName::new("sensors/plant-7/line-3/temperature") {
        Ok(t) => t,
        Err(e) => panic!("bench topic: {e}"),
    };
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: Some(topic),
        payload: Bytes::from(vec![0x5A; PAYLOAD]),
        properties: PublishProperties::default(),
    })
}

fn cases() -> Vec<(&'static str, ProtocolVersion, PublishQoS)> {
    let id = PacketId::new(4242).unwrap_or(PacketId::FIRST);
    vec![
        ("v311_qos0", ProtocolVersion::V3_1_1, PublishQoS::AtMostOnce),
        (
            "v311_qos1",
            ProtocolVersion::V3_1_1,
            PublishQoS::AtLeastOnce(id),
        ),
        ("v5_qos0", ProtocolVersion::V5, PublishQoS::AtMostOnce),
        ("v5_qos2", ProtocolVersion::V5, PublishQoS::ExactlyOnce(id)),
    ]
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode_publish");
    g.throughput(Throughput::Elements(1));
    for (name, version, qos) in cases() {
        let p = publish(qos);
        let mut out = BytesMut::with_capacity(64 * 1024);
        g.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                let r = encode_packet(black_box(&p), version, &mut out);
                black_box(r.is_ok())
            })
        });
    }
    g.finish();
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_publish");
    g.throughput(Throughput::Elements(STREAM as u64));
    for (name, version, qos) in cases() {
        let p = publish(qos);
        let mut stream = BytesMut::new();
        for _ in 0..STREAM {
            if let Err(e) = encode_packet(&p, version, &mut stream) {
                panic!("bench packet does not encode: {e}");
            }
        }
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || stream.clone(),
                |buf| {
                    let mut n = 0;
                    while let Ok(Some(p)) = decode_packet(buf, version, 1 << 20) {
                        black_box(&p);
                        n += 1;
                    }
                    assert_eq!(n, STREAM, "every packet decodes");
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, encode, decode);
criterion_main!(benches);
