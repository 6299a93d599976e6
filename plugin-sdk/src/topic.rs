//! MQTT topic names and filters (MQTT 5 §4.7), as the broker checks them: what a plugin
//! needs to validate a rewritten topic or a filter from its configuration.

/// Longest topic in bytes (a UTF-8 string's two-byte length prefix).
pub const MAX_LEN: usize = 65535;

/// Why a topic is not a valid topic name or filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// Empty.
    Empty,
    /// Longer than [`MAX_LEN`] bytes.
    TooLong,
    /// Contains U+0000.
    NullCharacter,
    /// A topic name contains `+` or `#`.
    Wildcard,
    /// In a filter, `+` not alone in its level or `#` not alone in the last level.
    MisplacedWildcard,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Invalid::Empty => "empty topic",
            Invalid::TooLong => "topic longer than 65535 bytes",
            Invalid::NullCharacter => "topic contains U+0000",
            Invalid::Wildcard => "topic name contains + or #",
            Invalid::MisplacedWildcard => "wildcard not alone in its level, or # not last",
        })
    }
}

impl std::error::Error for Invalid {}

fn common(s: &str) -> Result<(), Invalid> {
    if s.is_empty() {
        Err(Invalid::Empty)
    } else if s.len() > MAX_LEN {
        Err(Invalid::TooLong)
    } else if s.contains('\0') {
        Err(Invalid::NullCharacter)
    } else {
        Ok(())
    }
}

/// Checks `s` as a topic name (what a PUBLISH is addressed to): not empty, at most
/// 65535 bytes, no U+0000, no wildcard.
pub fn check_name(s: &str) -> Result<(), Invalid> {
    common(s)?;
    if s.contains(['+', '#']) {
        return Err(Invalid::Wildcard);
    }
    Ok(())
}

/// Checks `s` as a topic filter (without a `$share/{group}/` prefix): a topic name in
/// which `+` may stand alone in any level and `#` alone in the last one.
pub fn check_filter(s: &str) -> Result<(), Invalid> {
    common(s)?;
    let mut levels = s.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        let ok = match level {
            "+" => true,
            "#" => last,
            l => !l.contains(['+', '#']),
        };
        if !ok {
            return Err(Invalid::MisplacedWildcard);
        }
    }
    Ok(())
}

/// Whether the valid filter `filter` matches the topic name `topic`. A filter starting
/// with a wildcard does not match topics starting with `$` (MQTT-4.7.2-1).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let (mut f, mut t) = (filter.split('/'), topic.split('/'));
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(check_name("a/b"), Ok(()));
        assert_eq!(check_name("/"), Ok(()));
        assert_eq!(check_name(""), Err(Invalid::Empty));
        assert_eq!(check_name("a/+"), Err(Invalid::Wildcard));
        assert_eq!(check_name("a#"), Err(Invalid::Wildcard));
        assert_eq!(check_name("a\0"), Err(Invalid::NullCharacter));
        assert_eq!(check_name(&"x".repeat(MAX_LEN)), Ok(()));
        assert_eq!(check_name(&"x".repeat(MAX_LEN + 1)), Err(Invalid::TooLong));
    }

    #[test]
    fn filters() {
        for ok in ["#", "+", "a/+/b", "a/#", "+/+", "/+"] {
            assert_eq!(check_filter(ok), Ok(()), "{ok}");
        }
        for bad in ["a/#/b", "a+", "a/b#", "#/"] {
            assert_eq!(check_filter(bad), Err(Invalid::MisplacedWildcard), "{bad}");
        }
        assert_eq!(check_filter(""), Err(Invalid::Empty));
    }

    #[test]
    fn matching() {
        assert!(matches("a/+/c", "a/b/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(!matches("#", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
    }
}
