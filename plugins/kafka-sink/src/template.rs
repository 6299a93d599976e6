//! The Kafka topic template: which Kafka topic an MQTT message goes to.
//!
//! Syntax: literal text with placeholders.
//! - `{topic}`: the whole MQTT topic, its `/` separators turned into `.`
//!   (`sensors/room1/temp` → `sensors.room1.temp`);
//! - `{1}`, `{2}`, ...: one level of the MQTT topic, counted from 1 (`{2}` of
//!   `sensors/room1/temp` is `room1`); empty when the topic has fewer levels.
//!
//! Literal text may only hold what Kafka allows in a topic name: ASCII letters, digits,
//! `.`, `_` and `-` (checked when the configuration is loaded). In what a placeholder
//! puts in, `/` becomes `.` and any other character Kafka does not allow becomes `_`
//! (`$SYS/broker` → `_SYS.broker`). A name longer than 249 characters is cut to 249; an
//! empty name, `.` or `..` becomes `_`. So every MQTT topic maps to a valid Kafka topic.
//! A fixed name (`kafka_topic = "mqtt"`) sends everything to one topic.

use std::fmt;

/// Kafka's longest topic name.
const MAX_LEN: usize = 249;
/// Highest level number a placeholder may name.
const MAX_LEVEL: usize = 128;

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Topic,
    /// Level index, from 0.
    Level(usize),
}

/// Why a template was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl Template {
    /// Parses `text`.
    pub fn parse(text: &str) -> Result<Template, Error> {
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('{') {
                let Some(end) = after.find('}') else {
                    return Err(Error(format!("`{{` without `}}` in {text:?}")));
                };
                let name = after.get(..end).unwrap_or_default();
                parts.push(match name {
                    "topic" => Part::Topic,
                    n => match n.parse::<usize>() {
                        Ok(i) if (1..=MAX_LEVEL).contains(&i) => Part::Level(i - 1),
                        _ => {
                            return Err(Error(format!(
                                "unknown placeholder {{{n}}} in {text:?} (use {{topic}} or a level number 1 to {MAX_LEVEL})"
                            )));
                        }
                    },
                });
                rest = after.get(end + 1..).unwrap_or_default();
            } else {
                let end = rest.find('{').unwrap_or(rest.len());
                let literal = rest.get(..end).unwrap_or_default();
                if let Some(c) = literal.chars().find(|&c| !legal(c)) {
                    return Err(Error(format!(
                        "{c:?} in {text:?} is not allowed in a Kafka topic name (letters, digits, '.', '_', '-')"
                    )));
                }
                parts.push(Part::Literal(literal.to_owned()));
                rest = rest.get(end..).unwrap_or_default();
            }
        }
        if parts.is_empty() {
            return Err(Error("the Kafka topic template is empty".into()));
        }
        Ok(Template { parts })
    }

    /// The Kafka topic for the MQTT topic `mqtt`: always a valid Kafka topic name.
    pub fn render(&self, mqtt: &str) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Topic => out.extend(mqtt.chars().map(sanitize)),
                Part::Level(i) => {
                    let level = mqtt.split('/').nth(*i).unwrap_or_default();
                    out.extend(level.chars().map(sanitize));
                }
            }
        }
        // Every character is ASCII now, so cutting at a byte index is safe.
        out.truncate(MAX_LEN);
        if out.is_empty() || out == "." || out == ".." {
            return "_".to_owned();
        }
        out
    }

    /// Whether the template has no placeholder (one Kafka topic for everything).
    pub fn is_fixed(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Literal(_)))
    }
}

fn legal(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

fn sanitize(c: char) -> char {
    match c {
        '/' => '.',
        c if legal(c) => c,
        _ => '_',
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

    fn render(t: &str, topic: &str) -> String {
        Template::parse(t).unwrap().render(topic)
    }

    #[test]
    fn placeholders() {
        assert_eq!(
            render("{topic}", "sensors/room1/temp"),
            "sensors.room1.temp"
        );
        assert_eq!(render("mqtt.{1}", "sensors/room1/temp"), "mqtt.sensors");
        assert_eq!(render("{2}-{3}", "sensors/room1/temp"), "room1-temp");
        assert_eq!(render("x.{4}", "a/b"), "x.");
        assert_eq!(render("events", "a/b"), "events");
        assert!(Template::parse("events").unwrap().is_fixed());
        assert!(!Template::parse("e.{1}").unwrap().is_fixed());
    }

    #[test]
    fn output_is_always_a_valid_kafka_name() {
        assert_eq!(render("{topic}", "$SYS/broker/load"), "_SYS.broker.load");
        assert_eq!(render("{topic}", "a b/ü/+"), "a_b._._");
        assert_eq!(render("{topic}", "/"), "_");
        assert_eq!(render("{topic}", "//"), "_");
        assert_eq!(render("{topic}", "a//b"), "a..b");
        assert_eq!(render("{3}", "a"), "_");
        assert_eq!(render("{1}", "."), "_");
        let long = "x/".repeat(300);
        let r = render("{topic}", &long);
        assert_eq!(r.len(), 249);
        assert!(r.chars().all(legal));
    }

    #[test]
    fn refuses_bad_templates() {
        for bad in [
            "", "{", "a{1", "{0}", "{x}", "{-1}", "{129}", "a/b", "{1}/x", "a b",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Template::parse("{128}").is_ok());
    }
}
