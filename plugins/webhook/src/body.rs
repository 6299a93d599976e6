//! What a batch becomes: one JSON document,
//!
//! ```json
//! {"messages": [{"topic": "sensors/1/temp", "payload": "21.5", "payload_encoding": "utf8",
//!   "qos": 1, "retain": false, "publisher": "sensor-1", "received_at": 1767225600000,
//!   "user_properties": {"unit": "C"}, "content_type": "text/plain"}]}
//! ```
//!
//! in the order the broker handed the records over (oldest first). A payload that is
//! valid UTF-8 is sent as text (`"payload_encoding": "utf8"`), any other as standard
//! base64 with padding (`"base64"`). `publisher` is `null` for messages published by
//! plugins; `received_at` is Unix time in milliseconds; a user property name that
//! repeats maps to an array of its values, in order; `content_type` is present only
//! when the publisher set one.

use base64::Engine as _;
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use std::borrow::Cow;

use sandpiper_plugin::sink::SinkRecord;
use sandpiper_plugin::types::{Qos, UserProperty};

#[derive(Serialize)]
struct Document<'a> {
    messages: Vec<Entry<'a>>,
}

#[derive(Serialize)]
struct Entry<'a> {
    topic: &'a str,
    payload: Cow<'a, str>,
    payload_encoding: &'static str,
    qos: u8,
    retain: bool,
    publisher: Option<&'a str>,
    received_at: u64,
    user_properties: Properties<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<&'a str>,
}

/// User properties as one JSON object, first-seen order, repeated names as arrays.
struct Properties<'a>(&'a [UserProperty]);

impl Serialize for Properties<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut names: Vec<(&str, Vec<&str>)> = Vec::new();
        for p in self.0 {
            match names.iter_mut().find(|(n, _)| *n == p.name) {
                Some((_, values)) => values.push(&p.value),
                None => names.push((&p.name, vec![&p.value])),
            }
        }
        let mut map = s.serialize_map(Some(names.len()))?;
        for (name, values) in &names {
            match values.as_slice() {
                [one] => map.serialize_entry(name, one)?,
                many => map.serialize_entry(name, many)?,
            }
        }
        map.end()
    }
}

/// The JSON document for `batch`.
pub fn document(batch: &[SinkRecord]) -> Result<Vec<u8>, String> {
    let messages = batch
        .iter()
        .map(|r| {
            let m = &r.message;
            let (payload, payload_encoding) = match std::str::from_utf8(&m.payload) {
                Ok(text) => (Cow::Borrowed(text), "utf8"),
                Err(_) => (
                    Cow::Owned(base64::engine::general_purpose::STANDARD.encode(&m.payload)),
                    "base64",
                ),
            };
            Entry {
                topic: &m.topic,
                payload,
                payload_encoding,
                qos: match m.qos {
                    Qos::AtMostOnce => 0,
                    Qos::AtLeastOnce => 1,
                    Qos::ExactlyOnce => 2,
                },
                retain: m.retain,
                publisher: (!r.publisher.is_empty()).then_some(r.publisher.as_str()),
                received_at: r.received_at,
                user_properties: Properties(&m.properties.user_properties),
                content_type: m.properties.content_type.as_deref(),
            }
        })
        .collect();
    serde_json::to_vec(&Document { messages }).map_err(|e| format!("JSON: {e}"))
}
