//! Which partition a record goes to.
//!
//! With a key, the same choice as the Java client's default partitioner: the 32-bit
//! MurmurHash2 of the key bytes (seed `0x9747b28c`), made positive by clearing the sign
//! bit, modulo the topic's partition count. So a key lands where a Java (or librdkafka
//! `murmur2_random`) producer would put it, and every message of one MQTT topic (key =
//! topic) stays in one partition, in order. Without a key, partition 0.

/// MurmurHash2, 32-bit, as Kafka's `Utils.murmur2`.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    // Kafka hashes the length as a Java int; keys never reach 2^31 bytes (MQTT caps
    // topics at 64 KiB and client ids likewise).
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let mut h = SEED ^ len;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        for (i, &b) in tail.iter().enumerate().rev() {
            h ^= u32::from(b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition for `key` among `partitions` (at least 1).
pub fn choose(key: Option<&[u8]>, partitions: usize) -> usize {
    match key {
        Some(k) if partitions > 1 => {
            // `usize` is at least 32 bits on every target this builds for.
            usize::try_from(murmur2(k) & 0x7fff_ffff).unwrap_or(0) % partitions
        }
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_kafkas_murmur2() {
        // Values of Kafka's `Utils.murmur2` (checked against kafka-python's port).
        let cases: [(&[u8], u32); 7] = [
            (b"21", 3_321_034_988),
            (b"foobar", 3_504_634_814),
            (b"a-little-bit-long-string", 3_308_985_760),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                4_236_069_325,
            ),
            (b"abc", 479_470_107),
            (b"", 275_646_681),
            (b"sensors/room1/temp", 1_263_728_998),
        ];
        for (data, want) in cases {
            assert_eq!(murmur2(data), want, "{:?}", String::from_utf8_lossy(data));
        }
    }

    #[test]
    fn chooses_like_the_java_partitioner() {
        assert_eq!(choose(Some(b"sensors/room1/temp"), 3), 1);
        assert_eq!(choose(Some(b"a-little-bit-long-string"), 3), 2);
        assert_eq!(choose(Some(b"abc"), 1), 0);
        assert_eq!(choose(None, 7), 0);
    }
}
