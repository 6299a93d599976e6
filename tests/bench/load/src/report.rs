//! One scenario's result as an ordered list of named figures, printed either as a table for
//! people or as one JSON object on one line for scripts (`--json`).

use std::fmt::Write as _;

use crate::hist::Histogram;

/// A figure's value.
#[derive(Debug, Clone)]
pub enum Value {
    /// Text.
    Str(String),
    /// A count.
    Int(u64),
    /// A measurement.
    Float(f64),
    /// Not applicable or not measured.
    Null,
}

/// The names under which [`Record::latency`] reports a histogram.
#[derive(Debug)]
pub struct LatencyNames {
    p50: &'static str,
    p99: &'static str,
    p999: &'static str,
    max: &'static str,
    samples: &'static str,
}

/// Message latency, publisher write to subscriber read.
pub const MESSAGE_LATENCY: LatencyNames = LatencyNames {
    p50: "lat_p50_us",
    p99: "lat_p99_us",
    p999: "lat_p999_us",
    max: "lat_max_us",
    samples: "lat_samples",
};

/// Connection set-up time, TCP connect to CONNACK.
pub const CONNECT_LATENCY: LatencyNames = LatencyNames {
    p50: "connect_p50_us",
    p99: "connect_p99_us",
    p999: "connect_p999_us",
    max: "connect_max_us",
    samples: "connect_samples",
};

/// The figures of one scenario run, in print order.
#[derive(Debug, Clone)]
pub struct Record {
    fields: Vec<(&'static str, Value)>,
}

impl Record {
    /// A record starting with the scenario name and the broker label.
    pub fn new(scenario: &str, broker: &str) -> Record {
        Record {
            fields: vec![
                ("scenario", Value::Str(scenario.to_owned())),
                ("broker", Value::Str(broker.to_owned())),
            ],
        }
    }

    /// Adds a text figure.
    pub fn str(&mut self, name: &'static str, v: String) {
        self.fields.push((name, Value::Str(v)));
    }

    /// Adds a count.
    pub fn int(&mut self, name: &'static str, v: u64) {
        self.fields.push((name, Value::Int(v)));
    }

    /// Adds a measurement.
    pub fn float(&mut self, name: &'static str, v: f64) {
        self.fields.push((name, Value::Float(v)));
    }

    /// Adds a figure that does not apply.
    pub fn null(&mut self, name: &'static str) {
        self.fields.push((name, Value::Null));
    }

    /// Adds p50, p99, p99.9 and max (microseconds) and the sample count of a histogram of
    /// nanoseconds, under `names`.
    pub fn latency(&mut self, names: &LatencyNames, h: &Histogram) {
        for (name, q) in [(names.p50, 0.5), (names.p99, 0.99), (names.p999, 0.999)] {
            match h.percentile(q) {
                Some(ns) => self.float(name, ns as f64 / 1e3),
                None => self.null(name),
            }
        }
        if h.count() == 0 {
            self.null(names.max);
        } else {
            self.float(names.max, h.max() as f64 / 1e3);
        }
        self.int(names.samples, h.count());
    }

    /// The error figure, if the run failed.
    pub fn error(&self) -> Option<&str> {
        self.fields.iter().find_map(|(k, v)| match (k, v) {
            (&"error", Value::Str(s)) => Some(s.as_str()),
            _ => None,
        })
    }

    /// One JSON object on one line.
    pub fn to_json(&self) -> String {
        let mut s = String::from("{");
        for (i, (k, v)) in self.fields.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            json_str(&mut s, k);
            s.push(':');
            match v {
                Value::Str(t) => json_str(&mut s, t),
                Value::Int(n) => {
                    let _ = write!(s, "{n}");
                }
                Value::Float(f) if f.is_finite() => {
                    let _ = write!(s, "{}", (f * 1000.0).round() / 1000.0);
                }
                Value::Float(_) | Value::Null => s.push_str("null"),
            }
        }
        s.push('}');
        s
    }

    /// A two-column table.
    pub fn to_table(&self) -> String {
        let width = self.fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut s = String::new();
        for (k, v) in &self.fields {
            let text = match v {
                Value::Str(t) => t.clone(),
                Value::Int(n) => group(&n.to_string()),
                Value::Float(f) if f.abs() >= 1000.0 => group(&format!("{f:.0}")),
                Value::Float(f) => format!("{f:.2}"),
                Value::Null => "-".to_owned(),
            };
            let _ = writeln!(s, "{k:<width$}  {text}");
        }
        s
    }
}

/// Digits grouped by thousands: 1234567 → 1 234 567.
fn group(digits: &str) -> String {
    let (sign, digits) = match digits.strip_prefix('-') {
        Some(d) => ("-", d),
        None => ("", digits),
    };
    let mut out = String::from(sign);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line() {
        let mut r = Record::new("fan-in", "say \"hi\"");
        r.int("n", 3);
        r.float("x", 1.23456);
        r.null("lost");
        r.float("nan", f64::NAN);
        assert_eq!(
            r.to_json(),
            r#"{"scenario":"fan-in","broker":"say \"hi\"","n":3,"x":1.235,"lost":null,"nan":null}"#
        );
    }

    #[test]
    fn grouping() {
        assert_eq!(group("1234567"), "1 234 567");
        assert_eq!(group("123"), "123");
        assert_eq!(group("-1000"), "-1 000");
    }
}
