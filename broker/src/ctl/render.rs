//! How answers print: aligned tables, `key: value` lines, escaped text.

use super::*;

/// A table of rows, one column per field named in `columns` (space-separated).
pub(super) fn table(columns: &str, rows: &[Value]) -> String {
    let mut lines = vec![columns.split(' ').map(header).collect::<Vec<_>>()];
    lines.extend(
        rows.iter()
            .map(|r| columns.split(' ').map(|c| field(r, c)).collect()),
    );
    align(&lines)
}

pub(super) fn header(field: &str) -> String {
    match field {
        "protocol" => "PROTO".to_owned(),
        "keep_alive" => "KEEPALIVE".to_owned(),
        "subscriptions" => "SUBS".to_owned(),
        "retain_as_published" => "RAP".to_owned(),
        "retain_handling" => "RH".to_owned(),
        _ => field.replace('_', " ").to_uppercase(),
    }
}

/// A row's field as a table cell.
pub(super) fn field(row: &Value, name: &str) -> String {
    let v = row.get(name).unwrap_or(&NULL);
    match name {
        "payload" if v.is_null() => format!("<{} bytes binary>", field(row, "size")),
        "payload" => truncate(&text(name, v), 40),
        "last_error" => truncate(&text(name, v), 60),
        // A plugin's `calls` holds {calls, mean_us} per hook.
        "calls" => match row.get("calls").and_then(Value::as_object) {
            Some(hooks) => hooks
                .values()
                .filter_map(|h| h.get("calls")?.as_u64())
                .fold(0, u64::saturating_add)
                .to_string(),
            None => "-".to_owned(),
        },
        _ => text(name, v),
    }
}

/// Aligned columns two spaces apart, the first line the header; no trailing blanks.
pub(super) fn align(lines: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for line in lines {
        for (i, cell) in line.iter().enumerate() {
            let n = cell.chars().count();
            match widths.get_mut(i) {
                Some(w) => *w = (*w).max(n),
                None => widths.push(n),
            }
        }
    }
    let mut out = String::new();
    for line in lines {
        let mut text = String::new();
        for (cell, w) in line.iter().zip(&widths) {
            text.push_str(cell);
            text.extend(std::iter::repeat_n(
                ' ',
                w.saturating_sub(cell.chars().count()) + 2,
            ));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

/// `key: value` lines of an object, nested keys dotted (`sessions.online`), the keys of
/// `order` first; a client's `subscriptions` as a table after them.
pub(super) fn fields(v: &Value, order: &[&str]) -> String {
    fn flatten(path: &str, v: &Value, out: &mut Vec<(String, String)>) {
        match v {
            // serde_json caps nesting at 128 levels, and so this recursion.
            Value::Object(map) => {
                for (k, x) in map {
                    let k = clean(k);
                    let path = if path.is_empty() {
                        k
                    } else {
                        format!("{path}.{k}")
                    };
                    flatten(&path, x, out);
                }
            }
            Value::Array(subs) if path == "subscriptions" && !subs.is_empty() => {}
            _ => out.push((path.to_owned(), text(path, v))),
        }
    }
    let mut pairs = Vec::new();
    flatten("", v, &mut pairs);
    let rank = |k: &str| {
        let at = |o: &&str| {
            k.strip_prefix(*o)
                .is_some_and(|r| r.is_empty() || r.starts_with('.'))
        };
        order.iter().position(at).unwrap_or(order.len())
    };
    pairs.sort_by_key(|(k, _)| rank(k));
    let width = pairs
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0)
        + 1;
    let mut out = String::new();
    for (k, x) in pairs {
        let key = format!("{k}:");
        out.push_str(format!("{key:<width$} {x}").trim_end());
        out.push('\n');
    }
    let subs = v.get("subscriptions").and_then(Value::as_array);
    if let Some(subs) = subs.filter(|s| !s.is_empty()) {
        out.push('\n');
        out.push_str(&table(SUB_COLUMNS.trim_start_matches("client_id "), subs));
    }
    out
}

/// A value as printable text: `-` for null, booleans as yes or no, lists of plain values
/// joined with commas; a duration or time in words when its key (`name`) says it is one.
pub(super) fn text(name: &str, v: &Value) -> String {
    let name = name.rsplit('.').next().unwrap_or(name);
    match v {
        Value::Null => "-".to_owned(),
        Value::Bool(true) => "yes".to_owned(),
        Value::Bool(false) => "no".to_owned(),
        Value::String(s) => clean(s),
        Value::Array(items) if items.is_empty() => "-".to_owned(),
        Value::Array(items) if items.iter().all(|i| !i.is_array() && !i.is_object()) => items
            .iter()
            .map(|i| text("", i))
            .collect::<Vec<_>>()
            .join(", "),
        _ => match (name, v.as_u64()) {
            // MQTT 5 §3.1.2.11.2: 0xFFFFFFFF is a session that does not expire.
            ("expiry" | "session_expiry", Some(s)) if s >= u64::from(u32::MAX) => {
                "never".to_owned()
            }
            (
                "expiry" | "session_expiry" | "uptime_seconds" | "message_expiry_interval",
                Some(s),
            ) => duration(s),
            ("connected_at", Some(ms)) => {
                let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH);
                let now = now.map_or(0, |d| d.as_secs());
                format!("{} ago", duration(now.saturating_sub(ms / 1000)))
            }
            _ => clean(&v.to_string()),
        },
    }
}

/// Text from the server as it may be printed: control characters (which could move the
/// cursor or recolour the terminal) escaped.
pub(super) fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// At most `n` characters, the last an ellipsis when cut.
pub(super) fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(n.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Seconds in at most two units: `45s`, `1m30s`, `2h`, `3d4h`.
pub(super) fn duration(secs: u64) -> String {
    let parts = [
        (secs / 86_400, 'd'),
        (secs / 3600 % 24, 'h'),
        (secs / 60 % 60, 'm'),
        (secs % 60, 's'),
    ];
    let first = parts.iter().position(|(n, _)| *n > 0).unwrap_or(3);
    let mut out = String::new();
    for (i, (n, unit)) in parts.iter().enumerate().skip(first).take(2) {
        if *n > 0 || i == first {
            out += &format!("{n}{unit}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]

    use super::*;

    #[test]
    fn tables() {
        let rows = [
            json!({"client_id": "c1", "user": "alice", "protocol": "5", "keep_alive": 60}),
            json!({"client_id": "long-client", "user": null, "protocol": "3.1.1"}),
        ];
        assert_eq!(
            table("client_id user protocol keep_alive", &rows),
            "CLIENT ID    USER   PROTO  KEEPALIVE\n\
             c1           alice  5      60\n\
             long-client  -      3.1.1  -\n"
        );
        assert_eq!(table("name state", &[]), "NAME  STATE\n");
        let r = json!({"topic": "a", "qos": 0, "payload": null, "size": 2});
        assert_eq!(field(&r, "payload"), "<2 bytes binary>");
        let r = json!({"payload": "x".repeat(50)});
        assert_eq!(field(&r, "payload"), format!("{}…", "x".repeat(39)));
        let s = json!({"online": false, "expiry": 4_294_967_295u64, "subscriptions": null});
        assert_eq!(
            table(SESSION_COLUMNS, &[s]).lines().nth(1),
            Some("-          no      never   -     -")
        );
        let p = json!({"hooks": ["authorize", "publish"], "failures": 1,
            "calls": {"authorize": {"calls": 10}, "publish": {"calls": 5}}});
        let cells = ["hooks", "calls", "failures"].map(|c| field(&p, c));
        assert_eq!(cells, ["authorize, publish", "15", "1"]);
        assert_eq!(clean("a\u{1b}[31mb\n"), "a\\u{1b}[31mb\\n");
    }

    #[test]
    fn key_value_lines() {
        let v = json!({"version": "0.1.0", "uptime_seconds": 3700, "sessions": {"online": 3},
            "store": {"failing": false}, "zzz": [1, 2]});
        assert_eq!(
            fields(&v, OVERVIEW_ORDER),
            "version:         0.1.0\nuptime_seconds:  1h1m\nsessions.online: 3\n\
             store.failing:   no\nzzz:             1, 2\n"
        );
        let v = json!({"client_id": "c1", "inflight": 0,
            "subscriptions": [{"filter": "a/#", "qos": 1, "no_local": false}]});
        assert_eq!(
            fields(&v, CLIENT_ORDER),
            "client_id: c1\ninflight:  0\n\nFILTER  QOS  NO LOCAL  RAP  RH  ID\n\
             a/#     1    no        -    -   -\n"
        );
    }

    #[test]
    fn durations() {
        let cases = [
            (0, "0s"),
            (59, "59s"),
            (90, "1m30s"),
            (7200, "2h"),
            (90_061, "1d1h"),
        ];
        for (secs, text) in cases {
            assert_eq!(duration(secs), text);
        }
    }
}
