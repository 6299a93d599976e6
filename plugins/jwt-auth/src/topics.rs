//! Topic filters from token claims: validation, `%u`/`%c` substitution, and the coverage
//! test that decides publish, subscribe and retained delivery.
//!
//! Pure string logic (no host calls), so it is unit-tested on the host.

/// `filter` is a valid MQTT topic filter (MQTT 5 §4.7.1): not empty, no NUL, `#` only as
/// the whole last level, `+` only as a whole level. `%u`/`%c` placeholders are plain text
/// here; what they become is checked by [`substitute`].
pub(crate) fn is_valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == last,
        "+" => true,
        l => !l.contains(['#', '+']),
    })
}

/// `filter` with `%u` replaced by the user name and `%c` by the client id, or `None`
/// when a placeholder has no value (no user name) or its value would change the
/// filter's shape: a value holding `/`, `+` or `#` would let a client named `x/+` (or
/// `x/secret`) reach other clients' topics.
pub(crate) fn substitute(filter: &str, username: Option<&str>, client_id: &str) -> Option<String> {
    let safe = |v: &str| !v.is_empty() && !v.contains(['/', '+', '#']);
    let mut out = filter.to_owned();
    if out.contains("%u") {
        let user = username.filter(|u| safe(u))?;
        out = out.replace("%u", user);
    }
    if out.contains("%c") {
        if !safe(client_id) {
            return None;
        }
        out = out.replace("%c", client_id);
    }
    Some(out)
}

/// Every topic that `requested` (a topic name or a filter) can match is matched by
/// `allowed`. For a topic name this is plain matching; for a filter it is coverage:
/// `a/#` covers `a/+/b` and `a`, `a/+` does not cover `a/#`, `+/x` does not cover
/// `$SYS/x` (wildcards in the first level never match `$` topics, MQTT 5 §4.7.2).
pub(crate) fn covers(allowed: &str, requested: &str) -> bool {
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
            // final `#` ("a/#" matches "a").
            (Some(_), None) | (None, Some(_)) => return false,
        }
    }
}

/// Some filter in `allowed` (after substitution) covers `requested`.
pub(crate) fn any_covers<'a>(
    allowed: impl IntoIterator<Item = &'a str>,
    requested: &str,
    username: Option<&str>,
    client_id: &str,
) -> bool {
    allowed.into_iter().any(|f| {
        substitute(f, username, client_id)
            .is_some_and(|f| is_valid_filter(&f) && covers(&f, requested))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_filters() {
        for f in [
            "a", "a/b", "#", "+", "a/+/b", "a/#", "+/+", "/", "a//b", "$SYS/#", "d/%u/#",
        ] {
            assert!(is_valid_filter(f), "{f}");
        }
        for f in ["", "a/#/b", "a#", "a/b+", "#/a", "a/+x", "a\0b"] {
            assert!(!is_valid_filter(f), "{f:?}");
        }
    }

    #[test]
    fn topic_names_match() {
        assert!(covers("a/b", "a/b"));
        assert!(!covers("a/b", "a/c"));
        assert!(covers("a/+", "a/b"));
        assert!(!covers("a/+", "a/b/c"));
        assert!(!covers("a/+", "a"));
        assert!(covers("a/#", "a"));
        assert!(covers("a/#", "a/b/c"));
        assert!(covers("#", "x/y"));
        assert!(covers("+/+", "/x"));
        assert!(!covers("a/b/c", "a/b"));
        assert!(!covers("a/b", "a/b/c"));
    }

    #[test]
    fn dollar_topics_need_a_literal_first_level() {
        assert!(!covers("#", "$SYS/x"));
        assert!(!covers("+/x", "$SYS/x"));
        assert!(covers("$SYS/#", "$SYS/x"));
        assert!(covers("$SYS/+", "$SYS/x"));
    }

    #[test]
    fn filter_coverage() {
        // Wider covers narrower.
        assert!(covers("a/#", "a/+/b"));
        assert!(covers("a/#", "a/#"));
        assert!(covers("a/#", "a/b/#"));
        assert!(covers("#", "#"));
        assert!(covers("#", "+/x/#"));
        assert!(covers("a/+", "a/+"));
        assert!(covers("a/+/c", "a/+/c"));
        assert!(covers("+/b", "+/b"));
        // Narrower does not cover wider.
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("a/b", "a/#"));
        assert!(!covers("a/+/#", "a/#"), "a/# matches a, a/+/# does not");
        assert!(!covers("a/b/#", "a/#"));
        assert!(!covers("+/b", "#"));
        assert!(!covers("a/+", "+/+"));
    }

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
    }

    #[test]
    fn any_covers_substitutes_and_skips_invalid() {
        let allowed = ["devices/%c/#", "a/#/b", "public/+"];
        assert!(any_covers(allowed, "devices/dev1/t", None, "dev1"));
        assert!(!any_covers(allowed, "devices/dev2/t", None, "dev1"));
        assert!(
            !any_covers(allowed, "a/x/b", None, "dev1"),
            "invalid filter never matches"
        );
        assert!(any_covers(allowed, "public/news", None, "dev1"));
        assert!(!any_covers(allowed, "public/#", None, "dev1"));
    }
}
