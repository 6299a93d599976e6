//! Messages as the admin API shows them (retained messages) and takes them (`POST
//! /publish`): JSON with the payload as text or base64 and the MQTT 5 properties by name.

use std::time::Instant;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hyper::body::Bytes;
use serde_json::{Map, Value, json};

use crate::codec::{MessageProperties, QoS, TopicName, UserProperties};
use crate::message::{Draft, Message};

pub(super) fn properties_json(p: &MessageProperties, m: &Message, now: Instant) -> Value {
    let mut o = Map::new();
    if let Some(v) = p.payload_format_indicator {
        o.insert("payload_format_indicator".into(), u8::from(v).into());
    }
    if let Some(v) = m.remaining_expiry(now) {
        o.insert("message_expiry_interval".into(), v.into());
    }
    if let Some(v) = &p.content_type {
        o.insert("content_type".into(), (**v).into());
    }
    if let Some(v) = &p.response_topic {
        o.insert("response_topic".into(), v.as_str().into());
    }
    if let Some(v) = &p.correlation_data {
        o.insert("correlation_data_base64".into(), B64.encode(v).into());
    }
    if !p.user_properties.is_empty() {
        let pairs: Vec<Value> = (p.user_properties.as_slice().iter())
            .map(|(k, v)| json!([&**k, &**v]))
            .collect();
        o.insert("user_properties".into(), Value::Array(pairs));
    }
    Value::Object(o)
}

pub(super) fn message_json(m: &Message, now: Instant) -> Value {
    let text = std::str::from_utf8(&m.payload).ok();
    json!({
        "topic": m.topic.as_str(),
        "qos": m.qos as u8,
        "payload": text,
        "payload_base64": if text.is_none() { Some(B64.encode(&m.payload)) } else { None },
        "size": m.payload.len(),
        "properties": properties_json(&m.properties, m, now),
    })
}

/// The draft a `POST /publish` body describes, or why it does not.
pub(super) fn draft_of(body: &[u8]) -> Result<Draft, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let o = v.as_object().ok_or("the body is a JSON object")?;
    let topic = o
        .get("topic")
        .and_then(Value::as_str)
        .ok_or("`topic` (text) is needed")?;
    let topic = TopicName::new(topic).map_err(|e| format!("`topic`: {e}"))?;
    let payload = match (o.get("payload"), o.get("payload_base64")) {
        (Some(Value::String(s)), None) => Bytes::from(s.clone().into_bytes()),
        (None, Some(Value::String(s))) => Bytes::from(
            B64.decode(s)
                .map_err(|e| format!("`payload_base64`: {e}"))?,
        ),
        (None, None) => Bytes::new(),
        _ => return Err("one of `payload` (text) or `payload_base64`".into()),
    };
    let qos = match o.get("qos").map(Value::as_u64) {
        None | Some(Some(0)) => QoS::AtMostOnce,
        Some(Some(1)) => QoS::AtLeastOnce,
        Some(Some(2)) => QoS::ExactlyOnce,
        _ => return Err("`qos` is 0, 1 or 2".into()),
    };
    let retain = match o.get("retain") {
        None => false,
        Some(Value::Bool(b)) => *b,
        _ => return Err("`retain` is true or false".into()),
    };
    let mut properties = MessageProperties::default();
    if let Some(p) = o.get("properties") {
        let p = p.as_object().ok_or("`properties` is an object")?;
        for (k, v) in p {
            let text = || v.as_str().ok_or(format!("`{k}` is text"));
            match k.as_str() {
                "payload_format_indicator" => {
                    properties.payload_format_indicator = Some(match v.as_u64() {
                        Some(0) => false,
                        Some(1) => true,
                        _ => return Err("`payload_format_indicator` is 0 or 1".into()),
                    })
                }
                "message_expiry_interval" => {
                    let s = (v.as_u64().and_then(|s| u32::try_from(s).ok()))
                        .filter(|s| *s > 0)
                        .ok_or("`message_expiry_interval` is seconds (1 to 4294967295)")?;
                    properties.message_expiry_interval = Some(s);
                }
                "content_type" => properties.content_type = Some(text()?.into()),
                "response_topic" => {
                    let t =
                        TopicName::new(text()?).map_err(|e| format!("`response_topic`: {e}"))?;
                    properties.response_topic = Some(t);
                }
                "correlation_data_base64" => {
                    let d = B64.decode(text()?).map_err(|e| format!("`{k}`: {e}"))?;
                    properties.correlation_data = Some(Bytes::from(d));
                }
                "user_properties" => {
                    let list = v
                        .as_array()
                        .ok_or("`user_properties` is a list of [name, value]")?;
                    let mut pairs = Vec::with_capacity(list.len());
                    for pair in list {
                        match pair.as_array().map(Vec::as_slice) {
                            Some([Value::String(n), Value::String(v)]) => {
                                pairs.push((n.as_str().into(), v.as_str().into()));
                            }
                            _ => return Err("`user_properties` is a list of [name, value]".into()),
                        }
                    }
                    properties.user_properties = UserProperties::new(pairs);
                }
                other => return Err(format!("unknown property `{other}`")),
            }
        }
    }
    if properties.payload_format_indicator == Some(true) && std::str::from_utf8(&payload).is_err() {
        return Err("the payload is not UTF-8 but `payload_format_indicator` is 1".into());
    }
    Ok(Draft {
        topic,
        payload,
        qos,
        retain,
        properties,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]

    use super::*;

    #[test]
    fn publish_bodies() {
        let d = draft_of(
            br#"{"topic":"a/b","payload":"hi","qos":1,"retain":true,
            "properties":{"content_type":"text/plain","user_properties":[["k","v"]],
            "message_expiry_interval":60,"correlation_data_base64":"AAE="}}"#,
        )
        .unwrap();
        assert_eq!(d.topic.as_str(), "a/b");
        assert_eq!(&d.payload[..], b"hi");
        assert_eq!((d.qos, d.retain), (QoS::AtLeastOnce, true));
        assert_eq!(d.properties.message_expiry_interval, Some(60));
        assert_eq!(
            d.properties.correlation_data.as_deref(),
            Some(&[0u8, 1][..])
        );
        assert_eq!(d.properties.user_properties.as_slice().len(), 1);
        for bad in [
            &b"nope"[..],
            br#"[]"#,
            br#"{"payload":"x"}"#,
            br#"{"topic":"a/+"}"#,
            br#"{"topic":"a","qos":3}"#,
            br#"{"topic":"a","payload":"x","payload_base64":"eA=="}"#,
            br#"{"topic":"a","payload_base64":"!"}"#,
            br#"{"topic":"a","properties":{"bogus":1}}"#,
            br#"{"topic":"a","properties":{"user_properties":[["k"]]}}"#,
            br#"{"topic":"a","payload_base64":"/w==","properties":{"payload_format_indicator":1}}"#,
        ] {
            assert!(draft_of(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    proptest::proptest! {
        /// A body is the client's: any bytes, and any JSON object of the right keys with
        /// values of any kind, are a draft or a reason, never a panic.
        #[test]
        fn any_body_is_a_draft_or_a_reason(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            topic in ".{0,20}",
            qos in proptest::prelude::any::<i64>(),
            key in "payload_format_indicator|message_expiry_interval|content_type|response_topic|correlation_data_base64|user_properties|x",
            n in proptest::prelude::any::<i64>(),
        ) {
            let _ = draft_of(&raw);
            let body = json!({"topic": topic, "qos": qos, "payload_base64": "AAE=",
                "properties": {key.clone(): n}});
            let _ = draft_of(body.to_string().as_bytes());
            let body = json!({"topic": topic, "properties": {key: [[n, "v"], ["k"]]}});
            let _ = draft_of(body.to_string().as_bytes());
        }
    }
}
