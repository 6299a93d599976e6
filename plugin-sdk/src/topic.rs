//! MQTT topic names and filters (MQTT 5 §4.7), as the broker checks them: what a plugin
//! needs to validate a rewritten topic or a filter from its configuration, to put a
//! client's identity into a rule's filter safely ([`substitute`]), and to decide whether
//! one filter grants everything another asks for ([`covers`], [`overlaps`]).

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

/// Whether `v` may stand for a placeholder: not empty, and without `/`, `+` or `#`. A
/// client id or user name holding them would change the shape of the filter it is put
/// into: a client named `+` would be granted `devices/+/#`, everyone's devices (the class
/// of Mosquitto's CVE-2017-7650).
pub fn safe_placeholder_value(v: &str) -> bool {
    !v.is_empty() && !v.contains(['/', '+', '#'])
}

/// `filter` with `%u` replaced by the user name and `%c` by the client id, or `None` when
/// a placeholder it holds has no value (no user name) or an unsafe one
/// ([`safe_placeholder_value`]). A rule that cannot be substituted must not match:
/// allow rules are skipped; deny rules should use [`substitute_widened`].
pub fn substitute(filter: &str, username: Option<&str>, client_id: &str) -> Option<String> {
    let mut out = filter.to_owned();
    if out.contains("%u") {
        let user = username.filter(|u| safe_placeholder_value(u))?;
        out = out.replace("%u", user);
    }
    if out.contains("%c") {
        if !safe_placeholder_value(client_id) {
            return None;
        }
        out = out.replace("%c", client_id);
    }
    Some(out)
}

/// For deny rules: [`substitute`], or, where a placeholder has no safe value, the filter
/// with every level holding a placeholder widened to `+`, so that an unusual client id
/// or user name makes a deny rule stricter, never weaker.
pub fn substitute_widened(filter: &str, username: Option<&str>, client_id: &str) -> String {
    if let Some(s) = substitute(filter, username, client_id) {
        return s;
    }
    filter
        .split('/')
        .map(|level| {
            if level.contains("%u") || level.contains("%c") {
                "+"
            } else {
                level
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Every topic that `requested` (a topic name or a filter) can match is matched by
/// `allowed`. For a topic name this is plain matching; for a filter it is coverage:
/// `a/#` covers `a/+/b` and `a`, `a/+` does not cover `a/#`, `+/x` does not cover
/// `$SYS/x` (wildcards in the first level never match `$` topics, MQTT-4.7.2-1).
pub fn covers(allowed: &str, requested: &str) -> bool {
    if requested.starts_with('$') && allowed.starts_with(['+', '#']) {
        return false;
    }
    let mut a = allowed.split('/');
    let mut r = requested.split('/');
    loop {
        match (a.next(), r.next()) {
            // `#` matches the rest, including the parent level itself.
            (Some("#"), _) => return true,
            (Some("+"), Some(level)) => {
                if level == "#" {
                    return false;
                }
            }
            (Some(x), Some(y)) => {
                // A literal level covers only the same literal (not `+` or `#`).
                if x != y || y == "+" || y == "#" {
                    return false;
                }
            }
            (None, None) => return true,
            // `requested` is shorter: covered only when `allowed` continues with a
            // final `#` (handled above); longer: not covered.
            (Some(_), None) | (None, Some(_)) => return false,
        }
    }
}

/// Some topic matches both `a` and `b` (topic names or filters).
pub fn overlaps(a: &str, b: &str) -> bool {
    let dollar = |f: &str| f.starts_with('$');
    let wild = |f: &str| f.starts_with(['+', '#']);
    // A leading wildcard never matches a `$` topic.
    if (dollar(a) && wild(b)) || (dollar(b) && wild(a)) {
        return false;
    }
    let (mut x, mut y) = (a.split('/'), b.split('/'));
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(p), Some(q)) if p == q => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly on purpose"
)]
mod tests {
    use super::*;

    #[test]
    fn substitution() {
        assert_eq!(
            substitute("d/%u/%c/#", Some("alice"), "dev1").as_deref(),
            Some("d/alice/dev1/#")
        );
        assert_eq!(substitute("plain/#", None, "x").as_deref(), Some("plain/#"));
        assert_eq!(substitute("d/%u", None, "x"), None, "no user name");
        for bad in ["a/b", "+", "#", "x+", ""] {
            assert_eq!(substitute("d/%u", Some(bad), "c"), None, "user {bad:?}");
            assert_eq!(substitute("d/%c", Some("u"), bad), None, "client {bad:?}");
        }
        assert_eq!(substitute_widened("d/%c/x", None, "+"), "d/+/x");
        assert_eq!(substitute_widened("d/dev-%c/x", None, "a/b"), "d/+/x");
        assert_eq!(substitute_widened("d/%c/x", None, "ok"), "d/ok/x");
    }

    #[test]
    fn coverage() {
        assert!(covers("a/b", "a/b"));
        assert!(!covers("a/b", "a/c"));
        assert!(covers("a/+", "a/b"));
        assert!(!covers("a/+", "a/b/c"));
        assert!(covers("a/#", "a"));
        assert!(covers("a/#", "a/+/b"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("a/+/#", "a/#"), "a/# matches a, a/+/# does not");
        assert!(!covers("#", "$SYS/x"));
        assert!(covers("$SYS/#", "$SYS/x"));
        assert!(!covers("devices/+/#", "devices/#"));
    }

    #[test]
    fn overlap() {
        assert!(overlaps("a/+", "a/b"));
        assert!(overlaps("a/#", "+/b/c"));
        assert!(overlaps("+/x", "y/+"));
        assert!(!overlaps("a/b", "a/c"));
        assert!(!overlaps("#", "$SYS/x"));
        assert!(overlaps("$SYS/#", "$SYS/x"));
        assert!(!overlaps("a/b/c", "a/b"));
    }

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
