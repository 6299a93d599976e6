//! Idle connections: open C MQTT connections at a fixed rate, keep them idle, and read the
//! broker's resident memory before and after to get its cost per connection.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use crate::Settings;
use crate::hist::Histogram;
use crate::mqtt::Client;
use crate::report::{CONNECT_LATENCY, Record};

/// What to open and how fast.
#[derive(Debug, Clone)]
pub struct ConnPlan {
    /// Connections to open.
    pub connections: usize,
    /// Connections started per second.
    pub rate: f64,
    /// The broker's process id, to read its VmRSS.
    pub broker_pid: Option<u32>,
    /// How long the connections stay idle before memory is read.
    pub hold: Duration,
}

/// Resident set size of `pid` in KiB, from `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .with_context(|| format!("no VmRSS in {path}"))?;
    line.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("cannot parse {line:?}"))
}

/// Our soft limit on open files, from `/proc/self/limits`.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

type Attempt = (anyhow::Result<TcpStream>, Duration, Instant);

fn reap(
    r: Result<Attempt, tokio::task::JoinError>,
    conns: &mut Vec<TcpStream>,
    hist: &mut Histogram,
    failures: &mut BTreeMap<String, u64>,
    last_ok: &mut Option<Instant>,
) {
    match r {
        Ok((Ok(stream), took, at)) => {
            conns.push(stream);
            hist.record(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
            *last_ok = Some(last_ok.map_or(at, |l| l.max(at)));
        }
        Ok((Err(e), _, _)) => *failures.entry(format!("{e:#}")).or_default() += 1,
        Err(e) => *failures.entry(format!("task: {e}")).or_default() += 1,
    }
}

/// Runs the scenario.
pub async fn run(plan: &ConnPlan, s: &Settings) -> anyhow::Result<Record> {
    let want = u64::try_from(plan.connections).unwrap_or(u64::MAX);
    if let Some(limit) = open_files_limit()
        && limit < want + 64
    {
        bail!(
            "{} connections need more open files than our limit of {limit}: raise `ulimit -n`",
            plan.connections
        );
    }
    let rss_before = plan.broker_pid.map(rss_kib).transpose()?;
    let tag = std::process::id();
    let start = Instant::now();
    let mut set: JoinSet<Attempt> = JoinSet::new();
    let mut conns = Vec::with_capacity(plan.connections);
    let mut hist = Histogram::default();
    let mut failures = BTreeMap::new();
    let mut last_ok = None;
    let mut started = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    while started < plan.connections {
        tick.tick().await;
        // `as` saturates: connections due by now at this rate.
        let due = ((start.elapsed().as_secs_f64() * plan.rate) as usize).min(plan.connections);
        while started < due {
            let id = format!("spb-{tag}-c{started}");
            let (addr, version, deadline) = (s.addr, s.version, s.connect_timeout);
            set.spawn(async move {
                let t = Instant::now();
                let r = Client::connect(addr, version, &id, false, deadline).await;
                (r.map(|c| c.stream), t.elapsed(), Instant::now())
            });
            started += 1;
        }
        while let Some(r) = set.try_join_next() {
            reap(r, &mut conns, &mut hist, &mut failures, &mut last_ok);
        }
    }
    while let Some(r) = set.join_next().await {
        reap(r, &mut conns, &mut hist, &mut failures, &mut last_ok);
    }
    let ok = u64::try_from(conns.len()).unwrap_or(u64::MAX);
    let open_secs = last_ok.map_or(0.0, |t| t.duration_since(start).as_secs_f64());

    tokio::time::sleep(plan.hold).await;
    // A connection the broker closed while idle reads end-of-file now.
    let mut closed = 0u64;
    let mut probe = [0u8; 64];
    for c in &conns {
        match c.try_read(&mut probe) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Ok(n) if n > 0 => {}
            _ => closed += 1,
        }
    }
    let rss_after = plan.broker_pid.map(rss_kib).transpose()?;

    let mut r = Record::new("connections", &s.label);
    r.str("protocol", s.version.to_string());
    r.int("connections", want);
    r.float("rate", plan.rate);
    r.int("ok", ok);
    r.int("failed", want - ok);
    r.int("closed_while_idle", closed);
    r.float("seconds", open_secs);
    r.float(
        "connects_per_s",
        if open_secs > 0.0 {
            ok as f64 / open_secs
        } else {
            0.0
        },
    );
    r.latency(&CONNECT_LATENCY, &hist);
    match (rss_before, rss_after) {
        (Some(before), Some(after)) => {
            r.int("rss_before_kib", before);
            r.int("rss_after_kib", after);
            if ok > 0 {
                r.float(
                    "rss_per_conn_bytes",
                    after.saturating_sub(before) as f64 * 1024.0 / ok as f64,
                );
            } else {
                r.null("rss_per_conn_bytes");
            }
        }
        _ => {
            r.null("rss_before_kib");
            r.null("rss_after_kib");
            r.null("rss_per_conn_bytes");
        }
    }
    if failures.is_empty() {
        r.null("error");
    } else {
        let mut kinds: Vec<(String, u64)> = failures.into_iter().collect();
        kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
        let text: Vec<String> = kinds
            .iter()
            .take(3)
            .map(|(e, n)| format!("{n}× {e}"))
            .collect();
        r.str("error", text.join("; "));
    }
    drop(conns);
    Ok(r)
}
