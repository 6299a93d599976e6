//! Decodes arbitrary bytes as every kind of record the store keeps (what a damaged data
//! folder, or one written by another version, may hold): no decoder may panic, and
//! whatever decodes must encode again and decode back to the same fields.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sandpiper::store::record;

fuzz_target!(|data: &[u8]| {
    let _ = record::session_key(data);
    let _ = record::queued_in_flight(data);
    if let Ok(mut m) = record::decode_retained(data) {
        let mut again = record::encode_retained(&m)
            .and_then(|b| record::decode_retained(&b))
            .unwrap_or_else(|e| panic!("retained record does not round-trip: {e}"));
        // A retained record keeps its absolute deadline (`expires_at`), not the interval
        // property, which a record written by hand may still carry.
        m.properties.message_expiry_interval = None;
        again.properties.message_expiry_interval = None;
        assert_eq!(
            (again.topic, again.payload, again.qos, again.properties),
            (m.topic, m.payload, m.qos, m.properties)
        );
    }
    if let Ok(q) = record::decode_queued(data, 7) {
        let again = record::encode_queued(&q.delivery, q.inflight)
            .and_then(|b| record::decode_queued(&b, 7))
            .unwrap_or_else(|e| panic!("queue record does not round-trip: {e}"));
        assert_eq!(again.inflight, q.inflight);
        assert_eq!(again.delivery.sub_ids, q.delivery.sub_ids);
        assert_eq!(again.delivery.shared, q.delivery.shared);
        assert_eq!(again.delivery.msg.payload, q.delivery.msg.payload);
    }
    if let Ok((s, _subs)) = record::decode_session(data) {
        let bytes = record::encode_session(&s)
            .unwrap_or_else(|e| panic!("session record does not encode: {e}"));
        assert_eq!(record::session_key(&bytes), Some(s.key));
        let (again, subs) = record::decode_session(&bytes)
            .unwrap_or_else(|e| panic!("session record does not round-trip: {e}"));
        assert!(subs.is_empty());
        assert_eq!(
            (again.key, again.expiry, again.next_id, again.will),
            (s.key, s.expiry, s.next_id, s.will)
        );
    }
    let _ = record::decode_sink(data);
    // A subscription row: the key's filter, then the value.
    if let Some(at) = data.iter().position(|&b| b == 0)
        && let Ok(filter) = std::str::from_utf8(&data[..at])
        && let Ok((f, options, id)) = record::decode_subscription(filter, &data[at + 1..])
    {
        let bytes = record::encode_subscription(options, id);
        let again = record::decode_subscription(f.as_str(), &bytes)
            .unwrap_or_else(|e| panic!("subscription row does not round-trip: {e}"));
        assert_eq!(again, (f, options, id));
    }
});
