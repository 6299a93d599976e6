//! The cluster's retained messages: one JetStream key-value bucket (`sandpiper_retained`)
//! holds the newest retained message of every topic, whichever node accepted it. A node
//! puts (or, for an empty payload, deletes) the topic's key when it accepts a retained
//! message, and every node watches the bucket, from its last value per key on, into its
//! own retained store; the bucket's order per key is the same for every watcher, so every
//! node ends with the same message per topic.
//!
//! A key is the topic with each level escaped (`[A-Za-z0-9_-]` kept, any other byte as `=`
//! and two upper-case hex digits, an empty level as `=`) and the levels joined with `.`,
//! which NATS keys allow. A topic whose key would pass [`MAX_KEY`] bytes is keyed by its
//! SHA-256 (`=H.` and 64 hex digits; `H` is no hex digit, so no escaped topic starts so).

use sha2::Digest;

/// Longest key written as an escaped topic.
pub const MAX_KEY: usize = 1024;

/// The bucket.
pub const BUCKET: &str = "sandpiper_retained";

/// The key of `topic`.
pub fn key(topic: &str) -> String {
    let mut out = String::with_capacity(topic.len() + 8);
    for (i, level) in topic.split('/').enumerate() {
        if i > 0 {
            out.push('.');
        }
        if level.is_empty() {
            out.push('=');
        }
        for b in level.bytes() {
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
                out.push(char::from(b));
            } else {
                out.push('=');
                out.push_str(&format!("{b:02X}"));
            }
        }
    }
    if out.len() > MAX_KEY {
        let digest = sha2::Sha256::digest(topic.as_bytes());
        let mut hashed = String::from("=H.");
        for b in digest {
            hashed.push_str(&format!("{b:02x}"));
        }
        return hashed;
    }
    out
}

/// The topic of `key`, if it is an escaped topic (not a hashed one) and well formed.
pub fn topic(key: &str) -> Option<String> {
    if key.starts_with("=H.") {
        return None;
    }
    let mut bytes = Vec::with_capacity(key.len());
    for (i, level) in key.split('.').enumerate() {
        if i > 0 {
            bytes.push(b'/');
        }
        if level == "=" {
            continue;
        }
        let mut rest = level.as_bytes();
        while let Some((&b, tail)) = rest.split_first() {
            if b == b'=' {
                let (hex, tail) = tail.split_first_chunk::<2>()?;
                let hex = std::str::from_utf8(hex).ok()?;
                bytes.push(u8::from_str_radix(hex, 16).ok()?);
                rest = tail;
            } else {
                bytes.push(b);
                rest = tail;
            }
        }
    }
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nats_key_ok(k: &str) -> bool {
        !k.is_empty()
            && !k.starts_with('.')
            && !k.ends_with('.')
            && !k.contains("..")
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b))
    }

    #[test]
    fn keys_escape_what_nats_reserves() {
        assert_eq!(key("a/b"), "a.b");
        assert_eq!(key("/a//"), "=.a.=.=");
        assert_eq!(key("a.b c*>"), "a=2Eb=20c=2A=3E");
        assert_eq!(key("é"), "=C3=A9");
        assert_eq!(key("$SYS/x"), "=24SYS.x");
        let long = "x".repeat(2000);
        let k = key(&long);
        assert!(k.starts_with("=H.") && k.len() == 3 + 64 && nats_key_ok(&k));
        assert_eq!(topic(&k), None);
        assert_eq!(topic("a=2"), None);
        assert_eq!(topic("a=ZZ"), None);
    }

    proptest! {
        #[test]
        fn a_key_is_a_valid_nats_key_and_gives_its_topic_back(
            levels in prop::collection::vec("[a-z./ =%$\u{e9}-]{0,6}", 1..6)
        ) {
            let t = levels.join("/");
            let k = key(&t);
            prop_assert!(nats_key_ok(&k), "{:?} -> {:?}", t, k);
            prop_assert_eq!(topic(&k), Some(t));
        }
    }
}
