//! Adding members to a JSON object payload without disturbing the rest: every value of
//! the original object is copied byte for byte (numbers keep their exact text, members
//! their order); only whitespace between members is dropped. Pure logic, tested on the
//! host.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// What [`enrich`] makes of a payload.
#[derive(Debug, PartialEq)]
pub enum Enriched {
    /// Valid JSON that is not an object (array, number, string, ...): left alone.
    NotAnObject,
    /// The new payload.
    Payload(Vec<u8>),
    /// Not JSON (or not UTF-8).
    NotJson,
}

/// The members of a JSON object in order, values as their raw text.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((k, v)) = map.next_entry::<String, &'de RawValue>()? {
                    members.push((k, v));
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(V)
    }
}

/// `payload` with the members `add` (name, JSON text of the value) set: appended after
/// the object's own members, replacing any member of the same name (so a publisher
/// cannot forge them).
pub fn enrich(payload: &[u8], add: &[(&str, String)]) -> Enriched {
    let Ok(raw) = serde_json::from_slice::<&RawValue>(payload) else {
        return Enriched::NotJson;
    };
    let text = raw.get();
    if !text.starts_with('{') {
        return Enriched::NotAnObject;
    }
    let Ok(Members(members)) = serde_json::from_str::<Members>(text) else {
        return Enriched::NotJson;
    };
    let extra: usize = add.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
    let mut out = String::with_capacity(text.len() + extra);
    out.push('{');
    let kept = members
        .iter()
        .filter(|(k, _)| !add.iter().any(|(name, _)| name == k))
        .map(|(k, v)| (k.as_str(), v.get()));
    let added = add.iter().map(|(k, v)| (*k, v.as_str()));
    for (i, (k, v)) in kept.chain(added).enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_string(&mut out, k);
        out.push(':');
        out.push_str(v);
    }
    out.push('}');
    Enriched::Payload(out.into_bytes())
}

/// The JSON text of the string `s`.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    push_json_string(&mut out, s);
    out
}

/// Appends `s` as a JSON string (RFC 8259 §7 escapes).
fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn run(payload: &str, add: &[(&str, &str)]) -> Enriched {
        let add: Vec<(&str, String)> = add.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        enrich(payload.as_bytes(), &add)
    }

    fn text(e: Enriched) -> String {
        match e {
            Enriched::Payload(p) => String::from_utf8(p).unwrap(),
            other => panic!("expected a payload, got {other:?}"),
        }
    }

    #[test]
    fn adds_members_after_the_objects_own_keeping_values_exact() {
        let out = text(run(
            r#" { "t": 21.50, "big": 12345678901234567890123, "n": {"x": [1, 2]} } "#,
            &[("received_at", "1700000000000"), ("client_id", "\"dev-1\"")],
        ));
        assert_eq!(
            out,
            r#"{"t":21.50,"big":12345678901234567890123,"n":{"x": [1, 2]},"received_at":1700000000000,"client_id":"dev-1"}"#
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["client_id"], "dev-1");
    }

    #[test]
    fn replaces_members_of_the_same_name() {
        let out = text(run(
            r#"{"client_id":"forged","a":1,"client_id":"again"}"#,
            &[("client_id", "\"real\"")],
        ));
        assert_eq!(out, r#"{"a":1,"client_id":"real"}"#);
    }

    #[test]
    fn empty_object_and_no_fields() {
        assert_eq!(text(run("{}", &[("u", "null")])), r#"{"u":null}"#);
        assert_eq!(text(run(r#"{"a" : true}"#, &[])), r#"{"a":true}"#);
    }

    #[test]
    fn non_objects_and_non_json() {
        for other in ["[1,2]", "3", "\"s\"", "null", "  true "] {
            assert_eq!(run(other, &[("a", "1")]), Enriched::NotAnObject, "{other}");
        }
        for bad in ["", "{", "{\"a\":}", "hello", "{} x", "{\"a\":1,}"] {
            assert_eq!(run(bad, &[("a", "1")]), Enriched::NotJson, "{bad:?}");
        }
        assert_eq!(enrich(b"{\"a\":\"\xff\"}", &[]), Enriched::NotJson);
    }

    #[test]
    fn keys_and_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\nd\u{1}é"), r#""a\"b\\c\nd\u0001é""#);
        let out = text(run(r#"{"k\"ey\u00e9":1}"#, &[]));
        assert_eq!(out, r#"{"k\"eyé":1}"#);
    }
}
