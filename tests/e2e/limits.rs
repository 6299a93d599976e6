//! Limits end to end: connections (global and per listener), connection rate per source
//! address, subscriptions per client, topic length and levels, the deadline of a started
//! packet, and a flood of malformed packets next to a healthy client.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{Broker, WAIT, raw, v3};

const LOG: &str = "[log]\nlevel = \"info\"\n";

async fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s
}

/// Sends a CONNECT of protocol `level` and returns the CONNACK's reason / return code.
async fn connack(s: &mut TcpStream, level: u8, id: &str) -> u8 {
    let name = if level == 3 { "MQIsdp" } else { "MQTT" };
    raw::send(s, &raw::connect(name, level, id, true, 30, None)).await;
    let (first, body) = raw::expect_packet(s).await;
    assert_eq!(first, 0x20, "CONNACK expected");
    body[1]
}

#[tokio::test]
async fn max_connections_global_and_per_listener() {
    let config = format!(
        "[[listener]]\nname = \"small\"\nbind = \"127.0.0.1:0\"\nmax_connections = 1\n\n\
         [[listener]]\nname = \"big\"\nbind = \"127.0.0.1:0\"\n\n\
         [mqtt]\nmax_connections = 3\n\n{LOG}"
    );
    let broker = Broker::start_config_in(Broker::temp_dir(), &config);
    let small = broker.listener_addr("small");
    let big = broker.listener_addr("big");

    let mut s1 = tcp(small).await;
    assert_eq!(connack(&mut s1, 5, "s1").await, 0x00);
    // The listener's limit: MQTT 5 gets 0x97 quota exceeded, 3.1.1 return code 3.
    let mut s2 = tcp(small).await;
    assert_eq!(connack(&mut s2, 5, "s2").await, 0x97);
    let mut s3 = tcp(small).await;
    assert_eq!(connack(&mut s3, 4, "s3").await, 3);
    raw::expect_close(&mut s3, WAIT, |_| false).await;

    let mut b1 = tcp(big).await;
    assert_eq!(connack(&mut b1, 4, "b1").await, 0);
    let mut b2 = tcp(big).await;
    assert_eq!(connack(&mut b2, 3, "b2").await, 0);
    // Three open over both listeners: the global limit.
    let mut b3 = tcp(big).await;
    assert_eq!(connack(&mut b3, 5, "b3").await, 0x97);
    let mut b4 = tcp(big).await;
    assert_eq!(
        connack(&mut b4, 3, "b4").await,
        3,
        "MQTT 3.1: server unavailable"
    );

    // A connection that closes frees its place.
    drop(b1);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut again = tcp(big).await;
        if connack(&mut again, 5, "again").await == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "place not freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(s1);
}

#[tokio::test]
async fn connection_rate_per_source_address() {
    let config = format!(
        "[[listener]]\nname = \"rated\"\nbind = \"127.0.0.1:0\"\nmax_connection_rate = 3\n\n{LOG}"
    );
    let broker = Broker::start_config_in(Broker::temp_dir(), &config);
    let addr = broker.listener_addr("rated");
    let (mut ok, mut refused) = (0, 0);
    let mut open = Vec::new();
    // Ten attempts within a few milliseconds span at most two one-second windows, so at
    // most six get in.
    for i in 0..10 {
        let mut s = tcp(addr).await;
        match connack(&mut s, 5, &format!("r{i}")).await {
            0x00 => ok += 1,
            0x9F => refused += 1,
            other => panic!("unexpected CONNACK reason {other:#x}"),
        }
        open.push(s);
    }
    assert!((3..=6).contains(&ok), "{ok} admitted");
    assert_eq!(ok + refused, 10);
    // 3.x learns it as server unavailable.
    let mut s = tcp(addr).await;
    let code = connack(&mut s, 4, "r-v4").await;
    assert!(code == 3 || code == 0, "return code {code}");
    // The next second admits again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut s = tcp(addr).await;
    assert_eq!(connack(&mut s, 5, "later").await, 0x00);
}

/// The reason codes of the next SUBACK.
async fn suback(s: &mut TcpStream, v5: bool) -> Vec<u8> {
    let (first, body) = raw::expect_packet(s).await;
    assert_eq!(first, 0x90, "SUBACK expected");
    if v5 {
        let props = usize::from(body[2]);
        body[3 + props..].to_vec()
    } else {
        body[2..].to_vec()
    }
}

#[tokio::test]
async fn max_subscriptions_per_client() {
    let broker = Broker::start_with("max_subscriptions = 2");
    let mut v5 = raw::connect_v5(&broker, "subs-v5").await;
    raw::send(&mut v5, &raw::subscribe(1, ["a", "b", "c"], true)).await;
    assert_eq!(suback(&mut v5, true).await, vec![0x00, 0x00, 0x97]);
    // Replacing a subscription the client holds is no new one.
    raw::send(&mut v5, &raw::subscribe(2, ["a", "d"], true)).await;
    assert_eq!(suback(&mut v5, true).await, vec![0x00, 0x97]);

    let mut v4 = raw::connect_tcp(&broker).await;
    assert_eq!(connack(&mut v4, 4, "subs-v4").await, 0);
    raw::send(&mut v4, &raw::subscribe(1, ["a", "b", "c"], false)).await;
    assert_eq!(suback(&mut v4, false).await, vec![0x00, 0x00, 0x80]);
}

#[tokio::test]
async fn topic_length_and_levels() {
    let broker = Broker::start_with("max_topic_length = 16\nmax_topic_levels = 3");
    let mut sub = v3::Client::connect(v3::options(&broker, "topic-watch")).await;
    sub.subscribe_ok("#", v3::QoS::AtLeastOnce).await;

    let long = "t/0123456789abcdef"; // 18 bytes
    let deep = "t/a/b/c"; // 4 levels
    let mut p = raw::connect_v5(&broker, "topic-pub").await;
    // QoS 1 and 2 over the limits: refused with 0x90 in the acknowledgement, connection kept.
    raw::send(&mut p, &raw::publish(long, 1, false, 1, b"x", true)).await;
    assert_eq!(raw::expect_packet(&mut p).await, (0x40, vec![0, 1, 0x90]));
    raw::send(&mut p, &raw::publish(deep, 2, false, 2, b"x", true)).await;
    assert_eq!(raw::expect_packet(&mut p).await, (0x50, vec![0, 2, 0x90]));
    // Within the limits: delivered.
    raw::send(&mut p, &raw::publish("t/a/b", 1, false, 3, b"fine", true)).await;
    assert_eq!(raw::expect_packet(&mut p).await.0, 0x40);
    assert_eq!(sub.recv().await.payload.as_ref(), b"fine");
    // Filters over the limits: 0x8F (3.x: 0x80).
    raw::send(&mut p, &raw::subscribe(4, ["a/b/c/#", "x"], true)).await;
    assert_eq!(suback(&mut p, true).await, vec![0x8F, 0x00]);
    // QoS 0 has no acknowledgement to refuse it with: DISCONNECT 0x90.
    raw::send(&mut p, &raw::publish(deep, 0, false, 0, b"x", true)).await;
    assert_eq!(raw::disconnect_codes(&mut p).await, vec![0x90]);

    let mut v4 = raw::connect_tcp(&broker).await;
    assert_eq!(connack(&mut v4, 4, "topic-v4").await, 0);
    raw::send(&mut v4, &raw::subscribe(1, [long], false)).await;
    assert_eq!(suback(&mut v4, false).await, vec![0x80]);
    raw::send(&mut v4, &raw::publish(long, 1, false, 2, b"x", false)).await;
    raw::expect_close(&mut v4, WAIT, |_| false).await;
    sub.expect_silence().await;
}

#[tokio::test]
async fn stalled_partial_packet_is_dropped_at_the_deadline() {
    let broker = Broker::start_with("packet_timeout = 1");
    // Packets that each complete within the deadline keep a connection for longer than it,
    // even when every read ends in the middle of one.
    let mut busy = raw::connect_v5(&broker, "busy").await;
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_millis(2500) {
        raw::send(&mut busy, &[0xc0]).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        raw::send(&mut busy, &[0x00]).await;
        assert_eq!(raw::expect_packet(&mut busy).await.0, 0xd0, "PINGRESP");
        pings += 1;
    }
    assert!(pings > 5);

    // Half a PUBLISH, then nothing: closed after about a second, keep alive (30 s)
    // notwithstanding.
    let mut stalled = raw::connect_v5(&broker, "stalled").await;
    let publish = raw::publish("stall/t", 1, false, 1, b"never finished", true);
    stalled.write_all(&publish[..6]).await.unwrap();
    let t = Instant::now();
    raw::expect_close(&mut stalled, Duration::from_secs(5), |_| false).await;
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "closed after {took:?}"
    );
}

/// Reads until the peer closes, at most `within`.
async fn drain_until_close(s: &mut TcpStream, within: Duration) {
    let mut buf = [0u8; 1024];
    let _ = tokio::time::timeout(within, async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Two clients spray garbage, reconnecting in a loop, while a third measures publish →
/// receive round trips: they stay fast, and the broker's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_flood_does_not_slow_others() {
    let broker = Broker::start();
    let addr = broker.addr();
    let stop = Instant::now() + Duration::from_secs(3);
    let mut sprayers = Vec::new();
    for n in 0..2u32 {
        sprayers.push(tokio::spawn(async move {
            let mut seed = 0x9E37_79B9u32.wrapping_mul(n + 1);
            let mut rounds = 0u32;
            while Instant::now() < stop {
                let Ok(mut s) = TcpStream::connect(addr).await else {
                    continue;
                };
                let mut junk = vec![0u8; 2048];
                for b in &mut junk {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    *b = seed.to_le_bytes()[0];
                }
                if rounds.is_multiple_of(2) {
                    // A valid CONNECT first, so the garbage reaches the packet decoder.
                    let level = if rounds.is_multiple_of(4) { 5 } else { 4 };
                    let _ = s
                        .write_all(&raw::connect(
                            "MQTT",
                            level,
                            &format!("spray{n}"),
                            true,
                            30,
                            None,
                        ))
                        .await;
                }
                let _ = s.write_all(&junk).await;
                // Wait for the broker to close it (or give up quickly).
                drain_until_close(&mut s, Duration::from_millis(500)).await;
                rounds += 1;
            }
            rounds
        }));
    }
    let mut sub = v3::Client::connect(v3::options(&broker, "flood-sub")).await;
    sub.subscribe_ok("rtt", v3::QoS::AtMostOnce).await;
    let mut publisher = v3::Client::connect(v3::options(&broker, "flood-pub")).await;
    let mut rtts = Vec::new();
    while Instant::now() < stop {
        let t = Instant::now();
        publisher
            .publish("rtt", v3::QoS::AtMostOnce, false, b"ping")
            .await;
        sub.recv().await;
        rtts.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut rounds = 0;
    for s in sprayers {
        rounds += s.await.unwrap();
    }
    rtts.sort();
    eprintln!(
        "flood: {rounds} garbage connections, {} round trips, median {:?}, worst {:?}",
        rtts.len(),
        rtts[rtts.len() / 2],
        rtts[rtts.len() - 1]
    );
    let median = rtts[rtts.len() / 2];
    let worst = rtts[rtts.len() - 1];
    assert!(rounds > 20, "only {rounds} garbage connections");
    assert!(rtts.len() > 20, "only {} round trips", rtts.len());
    assert!(
        median < Duration::from_millis(50) && worst < Duration::from_millis(500),
        "round trips under the flood: median {median:?}, worst {worst:?} ({} garbage connections)",
        rounds
    );
    let rss_kib = std::fs::read_to_string(format!("/proc/{}/status", broker.pid()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        });
    if let Some(kib) = rss_kib {
        assert!(kib < 200 * 1024, "broker RSS {kib} KiB after the flood");
    }
}

/// A `/proc/<pid>/...` line's first number after `prefix`.
fn proc_number(pid: u32, file: &str, prefix: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    let line = text.lines().find(|l| l.starts_with(prefix))?;
    line[prefix.len()..].split_whitespace().next()?.parse().ok()
}

#[tokio::test]
async fn descriptor_table_is_sized_for_max_connections_at_start() {
    // Growing the table of a multi-threaded process waits for an RCU grace period inside
    // accept; the broker sizes it once at start instead, and raises the soft open-files
    // limit (within the hard one) to what max_connections needs.
    let config = format!(
        "[[listener]]\nname = \"default\"\nbind = \"127.0.0.1:0\"\n\n\
         [mqtt]\nmax_connections = 3000\n\n{LOG}"
    );
    let broker = Broker::start_config_in(Broker::temp_dir(), &config);
    let pid = broker.pid();
    // "Max open files  <soft>  <hard>  files"; "unlimited" reads as u64::MAX.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let fields: Vec<u64> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| {
            l.split_whitespace()
                .skip(3)
                .take(2)
                .map(|v| v.parse().unwrap_or(u64::MAX))
                .collect()
        })
        .unwrap_or_default();
    let (soft, hard) = match fields[..] {
        [soft, hard] => (soft, hard),
        _ => panic!("no open-files limit in /proc/{pid}/limits: {limits}"),
    };
    let want = 3000 + 1024;
    assert!(
        soft >= want.min(hard),
        "soft open-files limit {soft}, hard {hard}"
    );
    let table = proc_number(pid, "status", "FDSize:").unwrap_or(0);
    assert!(
        table >= want.min(soft),
        "descriptor table of {table} slots, soft limit {soft}"
    );
    // And the broker still serves.
    let mut s = tcp(broker.addr()).await;
    assert_eq!(connack(&mut s, 4, "fd-table").await, 0x00);
}
