//! What a message becomes in the table: one row of six columns, the SQL that inserts a
//! batch of them, and the parameter encodings (timestamps, JSON of user properties).
//! Pure functions, no I/O.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use postgres_protocol::Oid;

use crate::wire::{Param, Statement};

/// The columns, in the order of every INSERT's parameters.
pub const COLUMNS: &str = "topic, payload, qos, client_id, received_at, user_properties";

/// PostgreSQL type OIDs of the six parameters: text, bytea, int2, text, timestamptz,
/// jsonb. Declared in Parse, so the server casts them to the table's column types where
/// an assignment cast exists (a `qos integer` or `user_properties json` column works).
const TYPES: [Oid; 6] = [25, 17, 21, 25, 1184, 3802];

/// PostgreSQL accepts at most 65,535 parameters per statement: 10,922 rows of six.
/// Batches larger than this (`[sink] batch` above it) take several statements in the
/// same transaction.
pub const MAX_ROWS_PER_STATEMENT: usize = 10_000;

/// A statement also ends once its parameters reach this many bytes (large payloads),
/// well below PostgreSQL's 1 GiB message limit.
pub const MAX_BYTES_PER_STATEMENT: usize = 64 << 20;

/// One message as a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// MQTT topic name.
    pub topic: String,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// QoS 0, 1 or 2.
    pub qos: u8,
    /// Publisher's client id; empty (stored as NULL) for messages published by plugins.
    pub client_id: String,
    /// When the broker received it, Unix time in milliseconds.
    pub received_at_ms: u64,
    /// MQTT 5 user properties, in order (names may repeat).
    pub user_properties: Vec<(String, String)>,
}

/// A row's text and JSON parameters made ready to borrow from (NUL characters replaced,
/// JSON rendered), so that a statement's `Param`s can point into them.
#[derive(Debug)]
pub struct Encoded<'a> {
    row: &'a Row,
    topic: std::borrow::Cow<'a, str>,
    client_id: std::borrow::Cow<'a, str>,
    user_properties: String,
}

impl<'a> Encoded<'a> {
    /// Prepares `row`.
    pub fn new(row: &'a Row) -> Self {
        Encoded {
            row,
            topic: without_nul(&row.topic),
            client_id: without_nul(&row.client_id),
            user_properties: user_properties_json(&row.user_properties),
        }
    }

    fn params(&self) -> [Param<'_>; 6] {
        [
            Param::Text(&self.topic),
            Param::Bytea(&self.row.payload),
            Param::Int2(i16::from(self.row.qos)),
            if self.client_id.is_empty() {
                Param::Null
            } else {
                Param::Text(&self.client_id)
            },
            Param::Timestamptz(pg_timestamp(self.row.received_at_ms)),
            Param::Jsonb(&self.user_properties),
        ]
    }

    /// Bytes this row adds to a statement, roughly (for splitting huge batches).
    fn size(&self) -> usize {
        self.topic.len()
            + self.row.payload.len()
            + self.client_id.len()
            + self.user_properties.len()
            + 64
    }
}

/// `name` as an SQL identifier: each dot-separated part double-quoted (so used exactly
/// as written, case included), with embedded quotes doubled. `public.mqtt` becomes
/// `"public"."mqtt"`.
pub fn quote_table(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, part) in name.split('.').enumerate() {
        if i > 0 {
            out.push('.');
        }
        out.push('"');
        out.push_str(&part.replace('"', "\"\""));
        out.push('"');
    }
    out
}

/// Why `name` cannot be a table name: empty, more than `schema.table`, an empty part, a
/// NUL character, or a part longer than PostgreSQL's 63-byte identifiers.
pub fn check_table(name: &str) -> Result<(), String> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 2 {
        return Err(format!("table {name:?}: at most schema.table"));
    }
    for p in parts {
        if p.is_empty() {
            return Err(format!("table {name:?}: empty name"));
        }
        if p.contains('\0') {
            return Err(format!("table {name:?}: NUL character"));
        }
        if p.len() > 63 {
            return Err(format!("table {name:?}: a name is longer than 63 bytes"));
        }
    }
    Ok(())
}

/// `CREATE TABLE IF NOT EXISTS` with the six columns.
pub fn create_table_sql(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (\
         topic text NOT NULL, \
         payload bytea NOT NULL, \
         qos smallint NOT NULL, \
         client_id text, \
         received_at timestamptz NOT NULL, \
         user_properties jsonb NOT NULL)",
        quote_table(table)
    )
}

/// `COPY table (columns) FROM STDIN (FORMAT binary)`: how a batch goes in when the table's
/// six columns have exactly the parameters' types ([`copy_check_sql`]).
pub fn copy_sql(quoted_table: &str) -> String {
    format!("COPY {quoted_table} ({COLUMNS}) FROM STDIN (FORMAT binary)")
}

/// A query answering how many of the table's columns have the name and exact type of one
/// of the six, counted only for a plain or partitioned table without row security or
/// rules (`6`: a binary COPY does what the INSERT would; anything else, such as a view, a
/// table with rules or columns of other types, needs the INSERT). Fails with
/// `undefined_table` when there is no such table.
pub fn copy_check_sql(quoted_table: &str) -> String {
    format!(
        "SELECT count(*) FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
         WHERE a.attrelid = E'{}'::regclass AND c.relkind IN ('r', 'p') \
         AND NOT c.relrowsecurity AND NOT c.relhasrules \
         AND a.attnum > 0 AND NOT a.attisdropped \
         AND (a.attname::text, a.atttypid::regtype::text) IN \
         (('topic', 'text'), ('payload', 'bytea'), ('qos', 'smallint'), ('client_id', 'text'), \
         ('received_at', 'timestamp with time zone'), ('user_properties', 'jsonb'))",
        quoted_table.replace('\\', "\\\\").replace('\'', "''")
    )
}

/// `rows` as the data of a [`copy_sql`] (`crate::wire::copy_binary`).
pub fn copy_data(rows: &[Encoded<'_>]) -> bytes::BytesMut {
    crate::wire::copy_binary(rows.iter().map(Encoded::params))
}

/// `INSERT INTO table (columns) VALUES ($1, ...), ...` for `rows` rows.
pub fn insert_sql(quoted_table: &str, rows: usize) -> String {
    let mut sql = format!("INSERT INTO {quoted_table} ({COLUMNS}) VALUES ");
    for r in 0..rows {
        if r > 0 {
            sql.push(',');
        }
        let b = r * TYPES.len();
        let _ = write!(
            sql,
            "(${},${},${},${},${},${})",
            b + 1,
            b + 2,
            b + 3,
            b + 4,
            b + 5,
            b + 6
        );
    }
    sql
}

/// The SQL of each statement that inserts `rows` (row ranges split by count and size),
/// with the row range it covers: one statement for any batch of up to
/// [`MAX_ROWS_PER_STATEMENT`] rows of ordinary size.
pub fn plan(quoted_table: &str, rows: &[Encoded<'_>]) -> Vec<(String, std::ops::Range<usize>)> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0usize;
    for (i, r) in rows.iter().enumerate() {
        let size = r.size();
        let full = i - start >= MAX_ROWS_PER_STATEMENT
            || (i > start && bytes.saturating_add(size) > MAX_BYTES_PER_STATEMENT);
        if full {
            out.push((insert_sql(quoted_table, i - start), start..i));
            start = i;
            bytes = 0;
        }
        bytes = bytes.saturating_add(size);
    }
    if start < rows.len() {
        out.push((
            insert_sql(quoted_table, rows.len() - start),
            start..rows.len(),
        ));
    }
    out
}

/// The statements for `plan`'s output over `rows`.
pub fn statements<'a>(
    plan: &'a [(String, std::ops::Range<usize>)],
    rows: &'a [Encoded<'a>],
) -> Vec<Statement<'a>> {
    plan.iter()
        .map(|(sql, range)| Statement {
            sql,
            types: &TYPES,
            params: rows
                .get(range.clone())
                .unwrap_or_default()
                .iter()
                .flat_map(|r| r.params())
                .collect(),
        })
        .collect()
}

/// One statement per row, each `sql` (an [`insert_sql`] of one row): for inserting row
/// by row when a batch was refused.
pub fn one_per_row<'a>(sql: &'a str, rows: &'a [Encoded<'a>]) -> Vec<Statement<'a>> {
    rows.iter()
        .map(|r| Statement {
            sql,
            types: &TYPES,
            params: r.params().to_vec(),
        })
        .collect()
}

/// Unix milliseconds as a PostgreSQL `timestamptz`: microseconds since
/// 2000-01-01 00:00 UTC, clamped to the range PostgreSQL accepts (so a bogus time is
/// stored as the far future rather than refused forever).
pub fn pg_timestamp(unix_ms: u64) -> i64 {
    /// 2000-01-01 00:00 UTC in Unix milliseconds.
    const PG_EPOCH_MS: i128 = 946_684_800_000;
    /// The last microsecond PostgreSQL accepts (294276-12-31 23:59:59.999999 UTC).
    const PG_MAX: i128 = 9_224_318_015_999_999_999 - 946_684_800_000_000;
    let us = (i128::from(unix_ms) - PG_EPOCH_MS) * 1000;
    i64::try_from(us.min(PG_MAX)).unwrap_or(i64::MAX)
}

/// User properties as a JSON object: `{"name": "value"}`; a name that repeats maps to
/// the array of its values in order (`{"tag": ["a", "b"]}`); no properties is `{}`.
/// Names keep their first-appearance order.
pub fn user_properties_json(props: &[(String, String)]) -> String {
    let mut order: Vec<(&str, Vec<&str>)> = Vec::new();
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    for (name, value) in props {
        match index.get(name.as_str()) {
            Some(&i) => {
                if let Some(e) = order.get_mut(i) {
                    e.1.push(value);
                }
            }
            None => {
                index.insert(name, order.len());
                order.push((name, vec![value]));
            }
        }
    }
    let mut out = String::from("{");
    for (i, (name, values)) in order.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        json_string(&mut out, name);
        out.push(':');
        match values.as_slice() {
            [one] => json_string(&mut out, one),
            many => {
                out.push('[');
                for (j, v) in many.iter().enumerate() {
                    if j > 0 {
                        out.push(',');
                    }
                    json_string(&mut out, v);
                }
                out.push(']');
            }
        }
    }
    out.push('}');
    out
}

/// Appends `s` as a JSON string. U+0000 becomes U+FFFD: `jsonb` refuses `\u0000`.
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push('\u{FFFD}'),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `s` with NUL characters replaced by U+FFFD: `text` cannot hold them, and a row the
/// server refuses would be retried forever. (MQTT forbids U+0000 in topics, client ids
/// and properties; this is the belt to those braces.)
fn without_nul(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(topic: &str, payload: &[u8]) -> Row {
        Row {
            topic: topic.into(),
            payload: payload.to_vec(),
            qos: 1,
            client_id: "c1".into(),
            received_at_ms: 1_700_000_000_123,
            user_properties: Vec::new(),
        }
    }

    #[test]
    fn table_names_are_quoted_part_by_part() {
        assert_eq!(quote_table("mqtt"), "\"mqtt\"");
        assert_eq!(quote_table("public.Mqtt"), "\"public\".\"Mqtt\"");
        assert_eq!(quote_table("we\"ird"), "\"we\"\"ird\"");
        assert!(check_table("public.mqtt").is_ok());
        assert!(check_table("a.b.c").is_err());
        assert!(check_table("").is_err());
        assert!(check_table("a.").is_err());
        assert!(check_table("a\0b").is_err());
        assert!(check_table(&"x".repeat(64)).is_err());
        assert!(check_table(&"x".repeat(63)).is_ok());
    }

    #[test]
    fn insert_sql_numbers_parameters_row_by_row() {
        assert_eq!(
            insert_sql("\"t\"", 2),
            format!(
                "INSERT INTO \"t\" ({COLUMNS}) VALUES ($1,$2,$3,$4,$5,$6),($7,$8,$9,$10,$11,$12)"
            )
        );
        assert!(create_table_sql("s.t").starts_with("CREATE TABLE IF NOT EXISTS \"s\".\"t\" ("));
    }

    #[test]
    fn a_normal_batch_is_one_statement() {
        let rows: Vec<Row> = (0..256).map(|i| row(&format!("t/{i}"), b"x")).collect();
        let enc: Vec<Encoded<'_>> = rows.iter().map(Encoded::new).collect();
        let p = plan("\"t\"", &enc);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].1, 0..256);
        let s = statements(&p, &enc);
        assert_eq!(s[0].params.len(), 256 * 6);
        assert_eq!(s[0].types, &TYPES);
        assert_eq!(s[0].params[6], Param::Text("t/1"));
    }

    #[test]
    fn huge_batches_split_by_rows_and_bytes() {
        let rows: Vec<Row> = (0..MAX_ROWS_PER_STATEMENT + 5)
            .map(|_| row("t", b""))
            .collect();
        let enc: Vec<Encoded<'_>> = rows.iter().map(Encoded::new).collect();
        let p = plan("\"t\"", &enc);
        let ranges: Vec<_> = p.iter().map(|(_, r)| r.clone()).collect();
        assert_eq!(
            ranges,
            vec![
                0..MAX_ROWS_PER_STATEMENT,
                MAX_ROWS_PER_STATEMENT..MAX_ROWS_PER_STATEMENT + 5
            ]
        );
        let s = statements(&p, &enc);
        assert_eq!(s[0].params.len(), 60_000);
        assert_eq!(s[1].params.len(), 30);

        let big = vec![0u8; MAX_BYTES_PER_STATEMENT / 2];
        let rows = [row("a", &big), row("b", &big), row("c", b"")];
        let enc: Vec<Encoded<'_>> = rows.iter().map(Encoded::new).collect();
        let ranges: Vec<_> = plan("\"t\"", &enc).into_iter().map(|(_, r)| r).collect();
        assert_eq!(ranges, vec![0..1, 1..3]);
        // A single row larger than the limit still goes, alone.
        let rows = [row("a", &vec![0u8; MAX_BYTES_PER_STATEMENT + 1])];
        let enc: Vec<Encoded<'_>> = rows.iter().map(Encoded::new).collect();
        assert_eq!(plan("\"t\"", &enc).len(), 1);
        assert!(plan("\"t\"", &[]).is_empty());
    }

    #[test]
    fn parameters_of_a_row() {
        let mut r = row("a/b", b"\x00\xff");
        r.user_properties = vec![("k".into(), "v".into())];
        let e = Encoded::new(&r);
        assert_eq!(
            e.params(),
            [
                Param::Text("a/b"),
                Param::Bytea(b"\x00\xff"),
                Param::Int2(1),
                Param::Text("c1"),
                Param::Timestamptz(pg_timestamp(1_700_000_000_123)),
                Param::Jsonb("{\"k\":\"v\"}"),
            ]
        );
        r.client_id.clear();
        r.topic = "nul\0here".into();
        let e = Encoded::new(&r);
        assert_eq!(
            e.params()[3],
            Param::Null,
            "plugin-published: NULL client id"
        );
        assert_eq!(e.params()[0], Param::Text("nul\u{FFFD}here"));
    }

    #[test]
    fn timestamps_count_microseconds_from_2000() {
        assert_eq!(pg_timestamp(946_684_800_000), 0);
        assert_eq!(pg_timestamp(946_684_800_001), 1000);
        assert_eq!(pg_timestamp(0), -946_684_800_000_000);
        assert_eq!(pg_timestamp(1_700_000_000_123), 753_315_200_123_000);
        let max = pg_timestamp(u64::MAX);
        assert!(max > 0 && max < i64::MAX, "clamped into PostgreSQL's range");
    }

    #[test]
    fn user_properties_become_a_json_object() {
        let p = |v: &[(&str, &str)]| {
            user_properties_json(
                &v.iter()
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(p(&[]), "{}");
        assert_eq!(
            p(&[("unit", "C"), ("site", "x")]),
            r#"{"unit":"C","site":"x"}"#
        );
        assert_eq!(
            p(&[("tag", "a"), ("unit", "C"), ("tag", "b")]),
            r#"{"tag":["a","b"],"unit":"C"}"#
        );
        assert_eq!(
            p(&[("q\"uote", "back\\slash\n\t\u{1}\0é")]),
            "{\"q\\\"uote\":\"back\\\\slash\\n\\t\\u0001\u{FFFD}é\"}"
        );
    }
}
