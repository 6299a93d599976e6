//! The rules: parsing and validating them, and rewriting one topic. Pure logic, no host
//! calls, so it is tested on the host.

use sandpiper_plugin::topic;

/// The `[config]` table.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Tried in order; the first whose `from` matches decides.
    #[serde(default)]
    pub rules: Vec<RawRule>,
}

/// One `[[config.rules]]` entry as written.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// A topic filter; each `+` and `#` captures the text it matches.
    pub from: String,
    /// The new topic: text with `{n}` (the n-th wildcard's text, from 1), `%u` (the
    /// publisher's user name) and `%c` (its client id).
    pub to: String,
}

/// One piece of a `to` template.
#[derive(Debug, PartialEq)]
enum Part {
    Text(String),
    /// Index into the captures (0-based).
    Capture(usize),
    Username,
    ClientId,
}

/// A validated rule.
#[derive(Debug)]
pub struct Rule {
    from: String,
    to: Vec<Part>,
    uses_username: bool,
}

/// What the rules make of one topic.
#[derive(Debug, PartialEq)]
pub enum Rewrite {
    /// No rule matches (or the matching rule yields the same topic).
    Unchanged,
    /// The new topic.
    To(String),
    /// The first matching rule yields an invalid topic name: the original is kept.
    Invalid {
        /// The rule's `from`.
        rule: String,
        /// The rejected topic, cut to 200 bytes for the log.
        topic: String,
        /// Why it is invalid.
        why: topic::Invalid,
    },
}

impl Rule {
    /// Validates `from` (a topic filter) and `to` (every `{n}` within the number of
    /// wildcards of `from`; no `+` or `#` in its text).
    pub fn new(raw: &RawRule) -> Result<Rule, String> {
        topic::check_filter(&raw.from).map_err(|e| format!("from = {:?}: {e}", raw.from))?;
        let wildcards = raw
            .from
            .split('/')
            .filter(|l| matches!(*l, "+" | "#"))
            .count();
        let to =
            parse_template(&raw.to, wildcards).map_err(|e| format!("to = {:?}: {e}", raw.to))?;
        if to.is_empty() {
            return Err(format!("to = {:?}: empty", raw.to));
        }
        let uses_username = to.contains(&Part::Username);
        Ok(Rule {
            from: raw.from.clone(),
            to,
            uses_username,
        })
    }

    /// The topic this rule makes of `name`, or `None` when it does not apply: `from`
    /// does not match, or `to` uses `%u` and the publisher has no user name.
    fn apply(&self, name: &str, username: Option<&str>, client_id: &str) -> Option<String> {
        if self.uses_username && username.is_none() {
            return None;
        }
        let captures = captures(&self.from, name)?;
        let mut out = String::with_capacity(name.len() + 16);
        for part in &self.to {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Capture(i) => out.push_str(captures.get(*i).copied().unwrap_or_default()),
                Part::Username => out.push_str(username.unwrap_or_default()),
                Part::ClientId => out.push_str(client_id),
            }
        }
        Some(out)
    }
}

/// Validates every rule of `config`.
pub fn compile(config: &Config) -> Result<Vec<Rule>, String> {
    config
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| Rule::new(r).map_err(|e| format!("rule {}: {e}", i + 1)))
        .collect()
}

/// Applies the first rule that applies to `name`.
pub fn rewrite(rules: &[Rule], name: &str, username: Option<&str>, client_id: &str) -> Rewrite {
    let Some((rule, new)) = rules
        .iter()
        .find_map(|r| r.apply(name, username, client_id).map(|t| (r, t)))
    else {
        return Rewrite::Unchanged;
    };
    match topic::check_name(&new) {
        Ok(()) if new == name => Rewrite::Unchanged,
        Ok(()) => Rewrite::To(new),
        Err(why) => Rewrite::Invalid {
            rule: rule.from.clone(),
            topic: truncate(new, 200),
            why,
        },
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// The text each wildcard of `filter` matches in `name`, in order, or `None` when it
/// does not match. `#` captures the remaining levels joined by `/` (empty when it
/// matches the parent level: `a/#` on `a`).
fn captures<'a>(filter: &str, name: &'a str) -> Option<Vec<&'a str>> {
    if name.starts_with('$') && filter.starts_with(['+', '#']) {
        return None;
    }
    let mut caps = Vec::new();
    let mut rest = Some(name);
    for level in filter.split('/') {
        if level == "#" {
            caps.push(rest.unwrap_or(""));
            return Some(caps);
        }
        let current = rest?;
        let (head, tail) = match current.split_once('/') {
            Some((h, t)) => (h, Some(t)),
            None => (current, None),
        };
        match level {
            "+" => caps.push(head),
            l if l == head => {}
            _ => return None,
        }
        rest = tail;
    }
    rest.is_none().then_some(caps)
}

/// Splits a `to` template into parts; `{n}` must be within `1..=wildcards`.
fn parse_template(to: &str, wildcards: usize) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut chars = to.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '%' if matches!(chars.peek(), Some((_, 'u' | 'c'))) => {
                let part = match chars.next() {
                    Some((_, 'u')) => Part::Username,
                    _ => Part::ClientId,
                };
                push_text(&mut parts, &mut text);
                parts.push(part);
            }
            '{' => {
                let close = to[i..].find('}').ok_or("`{` without `}`")?;
                let inner = &to[i + 1..i + close];
                let n: usize = inner
                    .parse()
                    .map_err(|_| format!("`{{{inner}}}` is not a wildcard number"))?;
                if n == 0 || n > wildcards {
                    return Err(format!(
                        "`{{{n}}}`: `from` has {wildcards} wildcard(s), numbered from 1"
                    ));
                }
                // Skip to the closing brace.
                for (j, _) in chars.by_ref() {
                    if j == i + close {
                        break;
                    }
                }
                push_text(&mut parts, &mut text);
                parts.push(Part::Capture(n - 1));
            }
            '+' | '#' => return Err("contains a wildcard".to_owned()),
            c => text.push(c),
        }
    }
    push_text(&mut parts, &mut text);
    Ok(parts)
}

fn push_text(parts: &mut Vec<Part>, text: &mut String) {
    if !text.is_empty() {
        parts.push(Part::Text(std::mem::take(text)));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn rules(pairs: &[(&str, &str)]) -> Vec<Rule> {
        pairs
            .iter()
            .map(|(f, t)| {
                Rule::new(&RawRule {
                    from: (*f).to_owned(),
                    to: (*t).to_owned(),
                })
                .unwrap()
            })
            .collect()
    }

    fn to(s: &str) -> Rewrite {
        Rewrite::To(s.to_owned())
    }

    #[test]
    fn captures_by_wildcard() {
        assert_eq!(captures("a/+/c/#", "a/b/c/d/e"), Some(vec!["b", "d/e"]));
        assert_eq!(captures("a/+/c/#", "a/b/c"), Some(vec!["b", ""]));
        assert_eq!(captures("#", "x/y"), Some(vec!["x/y"]));
        assert_eq!(captures("+/+", "/x"), Some(vec!["", "x"]));
        assert_eq!(captures("a/+", "a/b/c"), None);
        assert_eq!(captures("a/b", "a"), None);
        assert_eq!(captures("a/b", "a/b"), Some(vec![]));
        assert_eq!(captures("+/x", "$SYS/x"), None);
    }

    #[test]
    fn the_documented_example() {
        let r = rules(&[("devices/+/data/#", "tenants/%u/devices/{1}/{2}")]);
        assert_eq!(
            rewrite(&r, "devices/d1/data/temp/c", Some("acme"), "c1"),
            to("tenants/acme/devices/d1/temp/c")
        );
        // %u without a user name: the rule does not apply.
        assert_eq!(
            rewrite(&r, "devices/d1/data/temp", None, "c1"),
            Rewrite::Unchanged
        );
        assert_eq!(
            rewrite(&r, "other/d1", Some("acme"), "c1"),
            Rewrite::Unchanged
        );
    }

    #[test]
    fn first_matching_rule_wins() {
        let r = rules(&[
            ("a/+", "first/{1}/%c"),
            ("a/#", "second/{1}"),
            ("#", "third/{1}"),
        ]);
        assert_eq!(rewrite(&r, "a/b", None, "cid"), to("first/b/cid"));
        assert_eq!(rewrite(&r, "a/b/c", None, "cid"), to("second/b/c"));
        assert_eq!(rewrite(&r, "z", None, "cid"), to("third/z"));
    }

    #[test]
    fn an_invalid_result_keeps_the_original() {
        let r = rules(&[("u/+", "users/%u/{1}")]);
        assert_eq!(
            rewrite(&r, "u/x", Some("a+b"), "c"),
            Rewrite::Invalid {
                rule: "u/+".to_owned(),
                topic: "users/a+b/x".to_owned(),
                why: topic::Invalid::Wildcard,
            }
        );
        let r = rules(&[("a/#", "{1}")]);
        assert!(matches!(
            rewrite(&r, "a", None, "c"),
            Rewrite::Invalid {
                why: topic::Invalid::Empty,
                ..
            }
        ));
        let r = rules(&[("+", "{1}/{1}")]);
        let long = "x".repeat(40_000);
        assert!(matches!(
            rewrite(&r, &long, None, "c"),
            Rewrite::Invalid {
                why: topic::Invalid::TooLong,
                ..
            }
        ));
    }

    #[test]
    fn templates_are_validated() {
        let bad = |from: &str, to: &str| {
            Rule::new(&RawRule {
                from: from.to_owned(),
                to: to.to_owned(),
            })
            .unwrap_err()
        };
        assert!(bad("a/+", "b/{2}").contains("1 wildcard"));
        assert!(bad("a/+", "b/{0}").contains("numbered from 1"));
        assert!(bad("a/+", "b/{x}").contains("not a wildcard number"));
        assert!(bad("a/+", "b/{1").contains("without"));
        assert!(bad("a/+", "b/#").contains("wildcard"));
        assert!(bad("a/#/b", "x").contains("from"));
        assert!(bad("a", "").contains("empty"));
        // Other % and } are text.
        let r = rules(&[("p/+", "q/%x}/{1}%")]);
        assert_eq!(rewrite(&r, "p/v", None, "c"), to("q/%x}/v%"));
    }

    #[test]
    fn the_example_sidecar_is_valid() {
        let config: Config =
            sandpiper_plugin::config::from_sidecar(include_str!("../topic-rewrite.example.toml"))
                .unwrap();
        assert!(!compile(&config).unwrap().is_empty());
    }
}
