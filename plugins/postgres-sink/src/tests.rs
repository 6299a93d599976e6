//! The wire client and the writer against a real PostgreSQL (see [`crate::testdb`]),
//! and against fake servers that hang or misbehave.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly on purpose"
)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::row::{MAX_ROWS_PER_STATEMENT, Row};
use crate::testdb::{PASSWORD, TestDb, USER};
use crate::wire::{Client, Error, Params};
use crate::writer::Writer;

fn params(port: u16, user: &str, password: Option<&str>) -> Params {
    Params {
        host: "127.0.0.1".into(),
        port,
        user: user.into(),
        password: password.map(Into::into),
        database: "mqtt".into(),
    }
}

fn in_5s() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

fn row(i: usize) -> Row {
    Row {
        topic: format!("sensors/{i}"),
        payload: format!("payload-{i}").into_bytes(),
        qos: (i % 3) as u8,
        client_id: format!("client-{}", i % 7),
        received_at_ms: 1_700_000_000_000 + i as u64,
        user_properties: Vec::new(),
    }
}

#[test]
fn logs_in_with_scram_md5_and_cleartext_and_refuses_a_wrong_password() {
    let db = TestDb::start();
    for (user, password) in [
        (USER, PASSWORD),
        ("md5user", "md5-pw"),
        ("plain", "plain-pw"),
    ] {
        let mut c = Client::connect(&params(db.port, user, Some(password)), in_5s())
            .unwrap_or_else(|e| panic!("{user}: {e}"));
        c.simple_query("SELECT 1", in_5s()).unwrap();
        c.close();
    }
    // The server logged SCRAM for the superuser: its stored password is a SCRAM verifier.
    assert_eq!(
        db.psql("SELECT left(rolpassword, 14) FROM pg_authid WHERE rolname = 'sandpiper'"),
        "SCRAM-SHA-256$"
    );
    for user in [USER, "md5user", "plain"] {
        let e = Client::connect(&params(db.port, user, Some("wrong")), in_5s()).unwrap_err();
        assert_eq!(e.sqlstate(), Some("28P01"), "{user}: {e}");
        let e = Client::connect(&params(db.port, user, None), in_5s()).unwrap_err();
        assert!(matches!(e, Error::Auth(_)), "{user} without password: {e}");
    }
}

#[test]
fn a_batch_arrives_exactly_as_written() {
    let db = TestDb::start();
    let mut config = db.config("public.Messages");
    config.create_table = true;
    let mut w = Writer::new(config);
    let mut rows: Vec<Row> = (0..300).map(row).collect();
    rows[1].payload = vec![0, 0xff, 0x80, b'\\', b'\''];
    rows[2].client_id.clear();
    rows[3].user_properties = vec![
        ("unit".into(), "°C".into()),
        ("tag".into(), "a\"b".into()),
        ("tag".into(), "c".into()),
    ];
    rows[4].topic = "ünïcode/😀".into();
    let written = w.write(&rows).unwrap();
    assert_eq!(written.rows, 300);
    assert!(written.connected);
    // The table it made has the six exact types: batches go in by binary COPY.
    assert_eq!(w.uses_copy(), Some(true));
    // The next batch reuses the connection.
    assert!(!w.write(&[row(300)]).unwrap().connected);

    assert_eq!(db.psql("SELECT count(*) FROM \"Messages\""), "301");
    let got = db.psql(
        "SELECT topic, encode(payload, 'hex'), qos, coalesce(client_id, '<null>'), \
         (extract(epoch FROM received_at) * 1000)::bigint, user_properties::text \
         FROM \"Messages\" ORDER BY received_at",
    );
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(lines.len(), 301);
    for (i, line) in lines.iter().enumerate() {
        let r = if i < 300 { &rows[i] } else { &row(300) };
        let hex: String = r.payload.iter().map(|b| format!("{b:02x}")).collect();
        let client = if r.client_id.is_empty() {
            "<null>"
        } else {
            &r.client_id
        };
        let props = match i {
            3 => r#"{"tag": ["a\"b", "c"], "unit": "°C"}"#,
            _ => "{}",
        };
        assert_eq!(
            *line,
            format!(
                "{}|{hex}|{}|{client}|{}|{props}",
                r.topic, r.qos, r.received_at_ms
            ),
            "row {i}"
        );
    }
    assert_eq!(
        db.psql("SELECT user_properties->>'unit' FROM \"Messages\" WHERE topic = 'sensors/3'"),
        "°C"
    );
}

#[test]
fn a_batch_is_all_or_nothing_even_across_statements() {
    let db = TestDb::start();
    db.psql(
        "CREATE TABLE t (topic text CHECK (topic <> 'bad'), payload bytea, qos integer, \
         client_id text, received_at timestamptz, user_properties json)",
    );
    let mut w = Writer::new(db.config("t"));
    // One statement: the last row breaks it.
    let mut rows: Vec<Row> = (0..10).map(row).collect();
    rows[9].topic = "bad".into();
    let e = w.write(&rows).unwrap_err();
    assert_eq!(e.sqlstate(), Some("23514"), "{e}");
    assert!(e.connection_usable());
    assert_eq!(db.psql("SELECT count(*) FROM t"), "0");
    // Two statements in one transaction: the second fails, the first is rolled back.
    let mut rows: Vec<Row> = (0..MAX_ROWS_PER_STATEMENT + 3).map(row).collect();
    rows[MAX_ROWS_PER_STATEMENT + 1].topic = "bad".into();
    assert_eq!(w.write(&rows).unwrap_err().sqlstate(), Some("23514"));
    assert_eq!(db.psql("SELECT count(*) FROM t"), "0");
    // The connection is still good, and the columns of other types (integer, json)
    // take the parameters through assignment casts (INSERT: a binary COPY would not cast).
    rows[MAX_ROWS_PER_STATEMENT + 1].topic = "good".into();
    let w2 = w.write(&rows).unwrap();
    assert_eq!(w.uses_copy(), Some(false));
    assert_eq!(w2.rows, (MAX_ROWS_PER_STATEMENT + 3) as u64);
    assert!(!w2.connected);
    assert_eq!(
        db.psql("SELECT count(*) FROM t"),
        (MAX_ROWS_PER_STATEMENT + 3).to_string()
    );
}

#[test]
fn a_copy_is_all_or_nothing_and_a_changed_table_falls_back_to_insert() {
    let db = TestDb::start();
    db.psql(
        "CREATE TABLE c (id bigserial, topic text CHECK (topic <> 'bad'), payload bytea NOT NULL, \
         qos smallint NOT NULL, client_id text, received_at timestamptz NOT NULL, \
         user_properties jsonb NOT NULL)",
    );
    let mut w = Writer::new(db.config("c"));
    // A refused row deep in a large COPY: nothing is kept, the connection stays good.
    let mut rows: Vec<Row> = (0..20_000).map(row).collect();
    rows[19_000].topic = "bad".into();
    let e = w.write(&rows).unwrap_err();
    assert_eq!(e.sqlstate(), Some("23514"), "{e}");
    assert!(e.connection_usable());
    assert_eq!(db.psql("SELECT count(*) FROM c"), "0");
    rows[19_000].topic = "good".into();
    let written = w.write(&rows).unwrap();
    assert_eq!((written.rows, written.connected), (20_000, false));
    assert_eq!(w.uses_copy(), Some(true));
    // Columns the table fills itself (id) are left to it, and rows keep their order.
    assert_eq!(
        db.psql("SELECT topic FROM c WHERE id = (SELECT max(id) FROM c)"),
        "sensors/19999"
    );
    // A column changed to another type behind its back: the COPY is refused, and the same
    // call inserts the batch with casts; so do the next ones on this connection.
    db.psql("ALTER TABLE c ALTER COLUMN qos TYPE integer");
    assert_eq!(w.write(&[row(1)]).unwrap().rows, 1);
    assert_eq!(w.uses_copy(), Some(false));
    assert_eq!(w.write(&[row(2)]).unwrap().rows, 1);
    assert_eq!(db.psql("SELECT count(*) FROM c"), "20002");
}

#[test]
fn a_view_or_a_table_with_row_security_or_rules_gets_inserts() {
    let db = TestDb::start();
    db.psql(
        "CREATE TABLE base (topic text, payload bytea, qos smallint, client_id text, \
         received_at timestamptz, user_properties jsonb); \
         CREATE VIEW v AS SELECT * FROM base; \
         CREATE TABLE secured (LIKE base); ALTER TABLE secured ENABLE ROW LEVEL SECURITY; \
         CREATE POLICY anyone ON secured USING (true) WITH CHECK (true); \
         ALTER TABLE secured FORCE ROW LEVEL SECURITY; \
         CREATE TABLE ruled (LIKE base); \
         CREATE RULE also AS ON INSERT TO ruled DO ALSO INSERT INTO base VALUES (NEW.*);",
    );
    for table in ["v", "secured", "ruled"] {
        let mut w = Writer::new(db.config(table));
        assert_eq!(w.write(&[row(1), row(2)]).unwrap().rows, 2, "{table}");
        assert_eq!(w.uses_copy(), Some(false), "{table}");
    }
    // Through the view and the rule: 2 + 2 rows in the base table.
    assert_eq!(db.psql("SELECT count(*) FROM base"), "4");
    assert_eq!(db.psql("SELECT count(*) FROM secured"), "2");
    // A name with a quote and a backslash is a literal, not SQL.
    db.psql(r#"CREATE TABLE "o'k\" (LIKE base)"#);
    let mut w = Writer::new(db.config(r"o'k\\"));
    assert_eq!(w.write(&[row(3)]).unwrap().rows, 1);
    assert_eq!(w.uses_copy(), Some(true));
}

#[test]
fn on_rejected_drop_keeps_the_rows_the_table_accepts() {
    let db = TestDb::start();
    db.psql(
        "CREATE TABLE r (topic text CHECK (topic <> 'bad'), payload bytea UNIQUE, qos smallint, \
         client_id text, received_at timestamptz, user_properties jsonb)",
    );
    let mut config = db.config("r");
    let mut rows: Vec<Row> = (0..6).map(row).collect();
    rows[2].topic = "bad".into();
    rows[4].topic = "bad".into();
    // Default: the batch is refused as a whole, again and again.
    let mut w = Writer::new(config.clone());
    assert_eq!(w.write(&rows).unwrap_err().sqlstate(), Some("23514"));
    assert_eq!(w.write(&rows).unwrap_err().sqlstate(), Some("23514"));
    assert_eq!(db.psql("SELECT count(*) FROM r"), "0");

    config.on_rejected = crate::config::OnRejected::Drop;
    let mut w = Writer::new(config);
    let written = w.write(&rows).unwrap();
    assert_eq!((written.rows, written.dropped), (4, 2));
    assert!(written.rejected.unwrap().contains("23514"));
    assert_eq!(
        db.psql("SELECT string_agg(topic, ',' ORDER BY topic) FROM r"),
        "sensors/0,sensors/1,sensors/3,sensors/5"
    );
    // The same batch again (a retry whose first commit went through): a unique index
    // turns the repeats into dropped rows instead of duplicates.
    let again = w.write(&rows).unwrap();
    assert_eq!((again.rows, again.dropped), (0, 6));
    assert_eq!(db.psql("SELECT count(*) FROM r"), "4");
    // Large batches go row by row in rounds of a thousand.
    let mut many: Vec<Row> = (100..2600).map(row).collect();
    many[5].topic = "bad".into();
    many[2400].topic = "bad".into();
    let w3 = w.write(&many).unwrap();
    assert_eq!((w3.rows, w3.dropped), (2498, 2));
    assert_eq!(db.psql("SELECT count(*) FROM r"), "2502");
    // Other errors are not the data's fault: retried, nothing dropped.
    db.psql("ALTER TABLE r RENAME TO r2");
    let e = w.write(&[row(9)]).unwrap_err();
    assert_eq!(e.sqlstate(), Some("42P01"), "{e}");
}

#[test]
fn a_restarted_server_is_reconnected_and_a_dropped_table_recreated() {
    let db = TestDb::start();
    let mut config = db.config("m");
    config.create_table = true;
    config.connect_timeout_ms = 1000;
    let mut w = Writer::new(config);
    w.write(&[row(0)]).unwrap();

    // Down: the write fails fast with a connection error.
    db.stop();
    let t = Instant::now();
    let e = w.write(&[row(1)]).unwrap_err();
    assert!(matches!(e, Error::Connect { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // Back: the same rows go in on a new connection.
    db.resume();
    assert!(w.write(&[row(1)]).unwrap().connected);

    // Restarted between two writes: the kept connection is dead, and the write
    // reconnects within the call instead of failing once.
    db.stop();
    db.resume();
    let again = w.write(&[row(2)]).unwrap();
    assert!(again.connected);

    // The table dropped behind its back: created again, the batch kept.
    db.psql("DROP TABLE m");
    assert_eq!(w.write(&[row(3)]).unwrap().rows, 1);
    assert_eq!(db.psql("SELECT topic FROM m"), "sensors/3");
    assert_eq!(
        db.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'sandpiper-postgres-sink'"),
        "1",
        "one connection at a time"
    );
}

#[test]
fn a_slow_statement_is_cut_at_the_io_timeout() {
    let db = TestDb::start();
    db.psql(
        "CREATE TABLE slow (topic text, payload bytea, qos smallint, client_id text, \
         received_at timestamptz, user_properties jsonb); \
         CREATE FUNCTION nap() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep(3); RETURN NEW; END $$; \
         CREATE TRIGGER nap BEFORE INSERT ON slow FOR EACH STATEMENT EXECUTE FUNCTION nap();",
    );
    let mut config: Config = db.config("slow");
    config.io_timeout_ms = 500;
    let mut w = Writer::new(config);
    let t = Instant::now();
    let e = w.write(&[row(0)]).unwrap_err();
    assert!(matches!(e, Error::Timeout(_)), "{e}");
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
}

/// A server that accepts connections and runs `answer` on each, in a thread.
fn fake_server(answer: fn(std::net::TcpStream)) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || answer(s));
        }
    });
    port
}

#[test]
fn a_server_that_never_answers_is_given_up_on_in_time() {
    let port = fake_server(|mut s| {
        // Read the startup message, answer nothing, hold the connection.
        let mut b = [0u8; 1024];
        let _ = s.read(&mut b);
        std::thread::sleep(Duration::from_secs(10));
    });
    let t = Instant::now();
    let e = Client::connect(
        &params(port, "u", Some("p")),
        t + Duration::from_millis(300),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Timeout("authentication")), "{e}");
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "{:?}",
        t.elapsed()
    );

    // A whole write call ends within connect_timeout_ms + io_timeout_ms.
    let config: Config = sandpiper_plugin::config::from_str(&format!(
        "port = {port}\nuser = \"u\"\npassword = \"p\"\nconnect_timeout_ms = 300\nio_timeout_ms = 300\n"
    ))
    .unwrap();
    let mut w = Writer::new(config);
    let t = Instant::now();
    assert!(matches!(w.write(&[row(0)]), Err(Error::Timeout(_))));
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn hostile_answers_are_errors_not_panics_or_huge_allocations() {
    // A header announcing a 2 GiB message.
    let port = fake_server(|mut s| {
        let _ = s.write_all(&[b'R', 0x7f, 0xff, 0xff, 0xff, 0, 0]);
        std::thread::sleep(Duration::from_secs(2));
    });
    let e = Client::connect(&params(port, "u", Some("p")), in_5s()).unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e}");
    // GSSAPI, which this client does not do.
    let port = fake_server(|mut s| {
        let _ = s.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 7]);
        std::thread::sleep(Duration::from_secs(2));
    });
    let e = Client::connect(&params(port, "u", Some("p")), in_5s()).unwrap_err();
    assert!(matches!(e, Error::Auth(_)), "{e}");
    // SCRAM whose server-first message is garbage.
    let port = fake_server(|mut s| {
        let mut b = [0u8; 1024];
        let _ = s.read(&mut b);
        let mut m = vec![b'R', 0, 0, 0, 23, 0, 0, 0, 10];
        m.extend_from_slice(b"SCRAM-SHA-256\0\0");
        let _ = s.write_all(&m);
        let _ = s.read(&mut b);
        let _ = s.write_all(&[b'R', 0, 0, 0, 11, 0, 0, 0, 11, b'x', b'y', b'z']);
        std::thread::sleep(Duration::from_secs(2));
    });
    let e = Client::connect(&params(port, "u", Some("p")), in_5s()).unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e}");
    // A connection closed mid-message.
    let port = fake_server(|mut s| {
        let _ = s.write_all(&[b'R', 0, 0]);
    });
    let e = Client::connect(&params(port, "u", Some("p")), in_5s()).unwrap_err();
    assert!(matches!(e, Error::Closed | Error::Io(_)), "{e}");
}

#[test]
fn nothing_listening_is_a_connect_error() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = Client::connect(&params(port, "u", Some("p")), in_5s()).unwrap_err();
    assert!(matches!(e, Error::Connect { .. }), "{e}");
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
}
