//! Kafka's record batch, format v2 ("magic 2", Kafka 0.11 and later): the bytes a Produce
//! request carries for one partition. Encoding only, no I/O.
//!
//! Encoded here rather than with `kafka_protocol::records` because that crate keeps headers
//! in a map, which would merge MQTT user properties that repeat a name; Kafka headers, like
//! user properties, may repeat.
//!
//! Layout (Kafka protocol guide, "Record Batch"): a 61-byte header, then the records, each
//! with variable-length (zig-zag varint) lengths and deltas. The CRC-32C covers everything
//! from the attributes to the end of the batch.

use super::Error;

/// One record to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Key bytes; `None` is a null key.
    pub key: Option<Vec<u8>>,
    /// Value bytes (never null here: an empty MQTT payload is an empty value, not a
    /// tombstone).
    pub value: Vec<u8>,
    /// Headers in order; names may repeat.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Create time, Unix milliseconds.
    pub timestamp_ms: i64,
}

/// Bytes of the batch header before the first record.
const HEADER_LEN: usize = 61;
/// Offset of the attributes field, where the CRC's coverage starts.
const CRC_START: usize = 21;

/// Encodes `records` (at least one) as one uncompressed, non-transactional batch with base
/// offset 0 (the partition leader assigns the real offsets).
pub fn encode_batch(records: &[&Record]) -> Result<Vec<u8>, Error> {
    let (Some(first_ts), Some(max_ts)) = (
        records.iter().map(|r| r.timestamp_ms).min(),
        records.iter().map(|r| r.timestamp_ms).max(),
    ) else {
        return Err(Error::Encode("empty record batch".into()));
    };
    let count = to_i32(records.len(), "record count")?;
    let mut out =
        Vec::with_capacity(HEADER_LEN + records.iter().map(|r| encoded_hint(r)).sum::<usize>());
    out.extend_from_slice(&0i64.to_be_bytes()); // base offset
    out.extend_from_slice(&0i32.to_be_bytes()); // batch length, patched below
    out.extend_from_slice(&(-1i32).to_be_bytes()); // partition leader epoch
    out.push(2); // magic
    out.extend_from_slice(&0u32.to_be_bytes()); // crc, patched below
    out.extend_from_slice(&0i16.to_be_bytes()); // attributes: no compression, create time
    out.extend_from_slice(&(count - 1).to_be_bytes()); // last offset delta
    out.extend_from_slice(&first_ts.to_be_bytes()); // base timestamp
    out.extend_from_slice(&max_ts.to_be_bytes()); // max timestamp
    out.extend_from_slice(&(-1i64).to_be_bytes()); // producer id: none
    out.extend_from_slice(&(-1i16).to_be_bytes()); // producer epoch
    out.extend_from_slice(&(-1i32).to_be_bytes()); // base sequence
    out.extend_from_slice(&count.to_be_bytes());
    debug_assert_eq!(out.len(), HEADER_LEN);

    let mut body = Vec::new();
    for (delta, record) in records.iter().enumerate() {
        body.clear();
        body.push(0); // record attributes (unused)
        put_varlong(&mut body, record.timestamp_ms.saturating_sub(first_ts));
        put_varint(&mut body, to_i32(delta, "offset delta")?);
        put_bytes(&mut body, record.key.as_deref())?;
        put_bytes(&mut body, Some(&record.value))?;
        put_varint(&mut body, to_i32(record.headers.len(), "header count")?);
        for (name, value) in &record.headers {
            put_bytes(&mut body, Some(name.as_bytes()))?;
            put_bytes(&mut body, Some(value))?;
        }
        put_varint(&mut out, to_i32(body.len(), "record length")?);
        out.extend_from_slice(&body);
    }

    // Batch length counts the bytes after the length field itself.
    let batch_len = to_i32(out.len() - 12, "batch length")?;
    out[8..12].copy_from_slice(&batch_len.to_be_bytes());
    let crc = crc32c::crc32c(&out[CRC_START..]);
    out[17..21].copy_from_slice(&crc.to_be_bytes());
    Ok(out)
}

/// About how many bytes `record` takes in a batch (for chunking and allocation).
pub fn encoded_hint(record: &Record) -> usize {
    let headers: usize = record
        .headers
        .iter()
        .map(|(n, v)| n.len() + v.len() + 10)
        .sum();
    record.key.as_ref().map_or(0, Vec::len) + record.value.len() + headers + 25
}

fn to_i32(n: usize, what: &str) -> Result<i32, Error> {
    i32::try_from(n).map_err(|_| Error::Encode(format!("{what} {n} does not fit a record batch")))
}

/// A length-prefixed byte string (`-1` for null), the length as a zig-zag varint.
fn put_bytes(out: &mut Vec<u8>, bytes: Option<&[u8]>) -> Result<(), Error> {
    match bytes {
        None => put_varint(out, -1),
        Some(b) => {
            put_varint(out, to_i32(b.len(), "field length")?);
            out.extend_from_slice(b);
        }
    }
    Ok(())
}

/// Zig-zag varint (protobuf's encoding), as Kafka's `ByteUtils.writeVarint`.
fn put_varint(out: &mut Vec<u8>, v: i32) {
    put_unsigned(out, u64::from(((v << 1) ^ (v >> 31)) as u32));
}

/// Zig-zag varlong, as Kafka's `ByteUtils.writeVarlong`.
fn put_varlong(out: &mut Vec<u8>, v: i64) {
    put_unsigned(out, ((v << 1) ^ (v >> 63)) as u64);
}

fn put_unsigned(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly on purpose"
)]
mod tests {
    use super::*;

    /// Reads a zig-zag varint back (test decoder).
    fn varlong(b: &mut &[u8]) -> i64 {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = b[0];
            *b = &b[1..];
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
        }
        ((v >> 1) as i64) ^ -((v & 1) as i64)
    }

    fn take<'a>(b: &mut &'a [u8], n: usize) -> &'a [u8] {
        let (x, rest) = b.split_at(n);
        *b = rest;
        x
    }

    fn field(b: &mut &[u8]) -> Option<Vec<u8>> {
        let n = varlong(b);
        (n >= 0).then(|| take(b, n as usize).to_vec())
    }

    /// Decodes a batch produced by `encode_batch`, checking its header and CRC.
    fn decode(batch: &[u8]) -> Vec<Record> {
        let be = |r: std::ops::Range<usize>| &batch[r];
        assert_eq!(i64::from_be_bytes(be(0..8).try_into().unwrap()), 0);
        let len = i32::from_be_bytes(be(8..12).try_into().unwrap()) as usize;
        assert_eq!(len, batch.len() - 12);
        assert_eq!(batch[16], 2, "magic");
        let crc = u32::from_be_bytes(be(17..21).try_into().unwrap());
        assert_eq!(crc, crc32c::crc32c(&batch[21..]));
        let base_ts = i64::from_be_bytes(be(27..35).try_into().unwrap());
        let count = i32::from_be_bytes(be(57..61).try_into().unwrap());
        assert_eq!(
            i32::from_be_bytes(be(23..27).try_into().unwrap()),
            count - 1
        );
        let mut b = &batch[61..];
        let mut out = Vec::new();
        for i in 0..count {
            let len = varlong(&mut b) as usize;
            let mut r = take(&mut b, len);
            assert_eq!(take(&mut r, 1), [0]);
            let ts = base_ts + varlong(&mut r);
            assert_eq!(varlong(&mut r), i64::from(i));
            let key = field(&mut r);
            let value = field(&mut r).unwrap();
            let n = varlong(&mut r);
            let headers = (0..n)
                .map(|_| {
                    let name = String::from_utf8(field(&mut r).unwrap()).unwrap();
                    (name, field(&mut r).unwrap())
                })
                .collect();
            assert!(r.is_empty());
            out.push(Record {
                key,
                value,
                headers,
                timestamp_ms: ts,
            });
        }
        assert!(b.is_empty());
        out
    }

    #[test]
    fn round_trips_keys_values_repeated_headers_and_times() {
        let records = vec![
            Record {
                key: Some(b"a/b".to_vec()),
                value: b"hello".to_vec(),
                headers: vec![("k".into(), b"1".to_vec()), ("k".into(), b"2".to_vec())],
                timestamp_ms: 1_700_000_000_500,
            },
            Record {
                key: None,
                value: vec![],
                headers: vec![],
                timestamp_ms: 1_700_000_000_000,
            },
            Record {
                key: Some(vec![]),
                value: vec![0xff; 300],
                headers: vec![("big".into(), vec![7; 200])],
                timestamp_ms: 1_700_000_009_999,
            },
        ];
        let refs: Vec<&Record> = records.iter().collect();
        let batch = encode_batch(&refs).unwrap();
        assert_eq!(decode(&batch), records);
        // Base timestamp is the smallest, max timestamp the largest.
        assert_eq!(
            i64::from_be_bytes(batch[27..35].try_into().unwrap()),
            1_700_000_000_000
        );
        assert_eq!(
            i64::from_be_bytes(batch[35..43].try_into().unwrap()),
            1_700_000_009_999
        );
        assert!(encode_batch(&[]).is_err());
    }

    #[test]
    fn varints_match_kafkas_encoding() {
        let enc = |v: i32| {
            let mut o = Vec::new();
            put_varint(&mut o, v);
            o
        };
        assert_eq!(enc(0), [0]);
        assert_eq!(enc(-1), [1]);
        assert_eq!(enc(1), [2]);
        assert_eq!(enc(63), [0x7e]);
        assert_eq!(enc(64), [0x80, 0x01]);
        assert_eq!(enc(i32::MAX), [0xfe, 0xff, 0xff, 0xff, 0x0f]);
        assert_eq!(enc(i32::MIN), [0xff, 0xff, 0xff, 0xff, 0x0f]);
        let mut o = Vec::new();
        put_varlong(&mut o, i64::MIN);
        assert_eq!(varlong(&mut &o[..]), i64::MIN);
    }
}
