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
    /// Keep alive asked for in CONNECT, in seconds (0: off); connections ping every half
    /// of it while held.
    pub keep_alive: u16,
}

/// PINGREQ, the same in every version.
const PINGREQ: [u8; 2] = [0xC0, 0x00];

/// Pings each open connection every `every`, from when it opened (each at its own phase,
/// as clients do: a keep alive counts from the client's last packet), through the hold,
/// and counts the PINGRESPs.
struct Pinger {
    every: Duration,
    due: Vec<Instant>,
    sent: Vec<u64>,
    got: Vec<u64>,
}

impl Pinger {
    fn new(keep_alive: u16) -> Option<Pinger> {
        (keep_alive > 0).then(|| Pinger {
            every: Duration::from_millis(u64::from(keep_alive) * 500),
            due: Vec::new(),
            sent: Vec::new(),
            got: Vec::new(),
        })
    }

    /// Pings the connections whose turn it is; reads what came back. `ping`: false only
    /// reads.
    fn tick(&mut self, conns: &[TcpStream], ping: bool) {
        let now = Instant::now();
        self.due.resize(conns.len(), now + self.every);
        self.sent.resize(conns.len(), 0);
        self.got.resize(conns.len(), 0);
        let mut buf = [0u8; 256];
        for (i, c) in conns.iter().enumerate() {
            while let Ok(k) = c.try_read(&mut buf) {
                if k == 0 {
                    break;
                }
                self.got[i] += k as u64;
            }
            if ping && self.due[i] <= now {
                self.due[i] += self.every;
                if c.try_write(&PINGREQ).is_ok_and(|k| k == PINGREQ.len()) {
                    self.sent[i] += 1;
                }
            }
        }
    }

    /// (pings sent, connections that got fewer PINGRESPs than they sent PINGREQs).
    fn outcome(&self) -> (u64, u64) {
        let missed = (self.sent.iter().zip(&self.got))
            .filter(|(s, g)| **g < **s * 2)
            .count();
        (self.sent.iter().sum(), missed as u64)
    }
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
    let mut pinger = Pinger::new(plan.keep_alive);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    while started < plan.connections {
        tick.tick().await;
        // `as` saturates: connections due by now at this rate.
        let due = ((start.elapsed().as_secs_f64() * plan.rate) as usize).min(plan.connections);
        while started < due {
            let id = format!("spb-{tag}-c{started}");
            let (addr, version, deadline) = (s.addr, s.version, s.connect_timeout);
            let keep_alive = plan.keep_alive;
            set.spawn(async move {
                let t = Instant::now();
                let r =
                    Client::connect_keeping_alive(addr, version, &id, false, keep_alive, deadline)
                        .await;
                (r.map(|c| c.stream), t.elapsed(), Instant::now())
            });
            started += 1;
        }
        while let Some(r) = set.try_join_next() {
            reap(r, &mut conns, &mut hist, &mut failures, &mut last_ok);
        }
        if let Some(p) = &mut pinger {
            p.tick(&conns, true);
        }
    }
    loop {
        let r = match &mut pinger {
            None => set.join_next().await,
            Some(p) => match tokio::time::timeout(Duration::from_millis(10), set.join_next()).await
            {
                Ok(r) => r,
                Err(_) => {
                    p.tick(&conns, true);
                    continue;
                }
            },
        };
        let Some(r) = r else { break };
        reap(r, &mut conns, &mut hist, &mut failures, &mut last_ok);
    }
    let ok = u64::try_from(conns.len()).unwrap_or(u64::MAX);
    let open_secs = last_ok.map_or(0.0, |t| t.duration_since(start).as_secs_f64());

    let (pings, missed) = match &mut pinger {
        None => {
            tokio::time::sleep(plan.hold).await;
            (0, 0)
        }
        Some(p) => {
            let end = Instant::now() + plan.hold;
            while Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(10)).await;
                p.tick(&conns, true);
            }
            // The last answers.
            tokio::time::sleep(Duration::from_millis(500)).await;
            p.tick(&conns, false);
            p.outcome()
        }
    };
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
    r.int("keep_alive", u64::from(plan.keep_alive));
    r.int("pings", pings);
    r.int("missed_pingresp", missed);
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
