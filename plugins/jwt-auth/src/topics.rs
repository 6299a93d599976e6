//! Topic filters from token claims: validation, and whether one of them grants a request,
//! on the SDK's `%u`/`%c` substitution and coverage (`sandpiper_plugin::topic`).
//!
//! Pure string logic (no host calls), so it is unit-tested on the host.

use sandpiper_plugin::topic;

/// `filter` is a valid MQTT topic filter (MQTT 5 §4.7.1): not empty, no NUL, `#` only as
/// the whole last level, `+` only as a whole level. `%u`/`%c` placeholders are plain text
/// here; what they become is checked by [`topic::substitute`].
pub(crate) fn is_valid_filter(filter: &str) -> bool {
    topic::check_filter(filter).is_ok()
}

/// Some filter in `allowed` (after substitution) covers `requested`. A filter whose
/// placeholder has no safe value (no user name, or one holding `/`, `+` or `#`) grants
/// nothing.
pub(crate) fn any_covers<'a>(
    allowed: impl IntoIterator<Item = &'a str>,
    requested: &str,
    username: Option<&str>,
    client_id: &str,
) -> bool {
    allowed.into_iter().any(|f| {
        topic::substitute(f, username, client_id)
            .is_some_and(|f| is_valid_filter(&f) && topic::covers(&f, requested))
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
    fn any_covers_substitutes_and_skips_invalid() {
        let allowed = ["devices/%c/#", "a/#/b", "public/+"];
        assert!(any_covers(allowed, "devices/dev1/t", None, "dev1"));
        assert!(!any_covers(allowed, "devices/dev2/t", None, "dev1"));
        assert!(!any_covers(allowed, "devices/victim/t", None, "+"));
        assert!(
            !any_covers(allowed, "a/x/b", None, "dev1"),
            "invalid filter never matches"
        );
        assert!(any_covers(allowed, "public/news", None, "dev1"));
        assert!(!any_covers(allowed, "public/#", None, "dev1"));
    }
}
