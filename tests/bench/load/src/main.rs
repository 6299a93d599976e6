//! `sandpiper-bench`: a load generator for MQTT brokers on loopback.
//!
//! It speaks MQTT 3.1.1 or 5.0 itself through `sandpiper::codec`, pre-encodes its PUBLISHes
//! and writes them in batches over `TCP_NODELAY` sockets, so it costs the machine little
//! next to the broker it measures. Scenarios: `fan-in`, `fan-out`, `p2p`, `latency`,
//! `connections` and `subscriptions` (see `--help`). Each run is bounded in time and in
//! messages and stops by itself; results are a table, or one JSON object per line with
//! `--json`.
//!
//! `flow` runs publishers and subscribers, `connections` idle connections, `subscriptions`
//! a large subscription table, `mqtt` the client side of the protocol, `track` and `hist`
//! what is counted, `report` the output.

mod connections;
mod flow;
mod hist;
mod mqtt;
mod report;
mod subscriptions;
mod track;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use sandpiper::codec::{ProtocolVersion, QoS};

use crate::connections::ConnPlan;
use crate::flow::Plan;
use crate::report::Record;
use crate::subscriptions::SubsPlan;

/// Load generator for MQTT brokers: throughput, latency and connection scenarios, on
/// loopback only.
#[derive(Debug, Parser)]
#[command(name = "sandpiper-bench", version)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Protocol {
    /// MQTT 3.1.1
    #[value(name = "311", alias = "3.1.1")]
    V311,
    /// MQTT 5.0
    #[value(name = "5", alias = "5.0")]
    V5,
}

#[derive(Debug, Args)]
struct Common {
    /// Broker host (must resolve to a loopback address).
    #[arg(long, global = true, default_value = "127.0.0.1")]
    host: String,
    /// Broker port.
    #[arg(long, global = true, default_value_t = 1883)]
    port: u16,
    /// Port the subscribers connect to, when not `--port`: another broker that receives
    /// the publishers' messages through a bridge (same host).
    #[arg(long, global = true)]
    sub_port: Option<u16>,
    /// MQTT version to speak.
    #[arg(long, global = true, value_enum, default_value = "311")]
    protocol: Protocol,
    /// Payload bytes per message (at least 20: publisher id, sequence number, send time).
    #[arg(long, global = true, default_value_t = 64)]
    payload: usize,
    /// Seconds measured after the warm-up (ignored with --count).
    #[arg(long, global = true, default_value_t = 10.0)]
    duration: f64,
    /// Messages per publisher instead of a duration (the run still stops at --max-time).
    #[arg(long, global = true)]
    count: Option<u64>,
    /// Seconds of load before measuring starts.
    #[arg(long, global = true, default_value_t = 2.0)]
    warmup: f64,
    /// Hard cap on the sending phase in seconds with --count.
    #[arg(long, global = true, default_value_t = 120.0)]
    max_time: f64,
    /// Messages per write call (throughput scenarios).
    #[arg(long, global = true, default_value_t = 128)]
    batch: usize,
    /// Seconds allowed for each TCP connect + CONNACK and each SUBACK.
    #[arg(long, global = true, default_value_t = 10.0)]
    connect_timeout: f64,
    /// Broker name in the output.
    #[arg(long, global = true, default_value = "broker")]
    label: String,
    /// Worker threads of the load generator (1 leaves the other core to the broker).
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    /// Print one JSON object per line instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Subscribers use persistent sessions (to measure a broker's durable path).
    #[arg(long, global = true)]
    persistent_subscribers: bool,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// P publishers → 1 subscriber on a wildcard filter (bench/#).
    FanIn {
        /// Publishers.
        #[arg(short = 'p', long, default_value_t = 4)]
        publishers: usize,
        #[command(flatten)]
        flow: FlowArgs,
    },
    /// 1 publisher → S subscribers on the same topic.
    FanOut {
        /// Subscribers.
        #[arg(short = 's', long, default_value_t = 16)]
        subscribers: usize,
        #[command(flatten)]
        flow: FlowArgs,
    },
    /// N publisher/subscriber pairs, each on its own topic.
    P2p {
        /// Pairs.
        #[arg(short = 'n', long, default_value_t = 16)]
        pairs: usize,
        #[command(flatten)]
        flow: FlowArgs,
    },
    /// One publisher at a fixed rate → one subscriber: latency percentiles.
    Latency {
        /// Messages per second.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// QoS 0 or 1.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
        qos: u8,
    },
    /// C idle connections opened at R per second; connect rate, failures, broker RSS.
    Connections {
        /// Connections to open.
        #[arg(short = 'c', long, default_value_t = 10_000)]
        connections: usize,
        /// Connections started per second.
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
        /// The broker's pid, to read its VmRSS from /proc.
        #[arg(long)]
        broker_pid: Option<u32>,
        /// Seconds the connections stay idle before the broker's memory is read.
        #[arg(long, default_value_t = 2.0)]
        hold: f64,
        /// Keep alive each connection asks for, in seconds (0: off); while held, every
        /// connection sends PINGREQ every half of it and counts the PINGRESPs.
        #[arg(long, default_value_t = 0)]
        keep_alive: u16,
    },
    /// C clients hold N subscriptions in all, then one QoS 0 publisher sends to topics at
    /// random, each matching one subscription: subscribe rate, broker RSS per
    /// subscription, routing rate.
    Subscriptions {
        /// Subscriptions in all.
        #[arg(short = 'n', long, default_value_t = 1_000_000)]
        subscriptions: usize,
        /// Subscribing clients.
        #[arg(short = 'c', long, default_value_t = 1000)]
        clients: usize,
        /// Wildcard filters (`bench/w/A/+/B/#`) instead of topic names.
        #[arg(long)]
        wildcard: bool,
        /// Filters per SUBSCRIBE packet.
        #[arg(long, default_value_t = 100)]
        per_packet: usize,
        /// The broker's pid, to read its VmRSS from /proc.
        #[arg(long)]
        broker_pid: Option<u32>,
    },
}

#[derive(Debug, Args)]
struct FlowArgs {
    /// QoS of publishes and subscriptions.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Unacknowledged QoS 1/2 messages per publisher.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Messages per second per publisher (default: as fast as the broker takes them).
    #[arg(long)]
    rate: Option<f64>,
}

/// Resolved common options.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Broker address (loopback).
    pub addr: SocketAddr,
    /// Where the subscribers connect (`addr` unless `--sub-port`).
    pub sub_addr: SocketAddr,
    /// Version spoken.
    pub version: ProtocolVersion,
    /// Payload bytes.
    pub payload: usize,
    /// Measurement window.
    pub duration: Duration,
    /// Messages per publisher, instead of `duration`.
    pub count: Option<u64>,
    /// Unmeasured start.
    pub warmup: Duration,
    /// Cap on the sending phase with `count`.
    pub max_time: Duration,
    /// Messages per write.
    pub batch: usize,
    /// Deadline of each connect and subscribe.
    pub connect_timeout: Duration,
    /// Broker name in the output.
    pub label: String,
    /// Subscribers ask for persistent sessions (Clean Session 0 / Session Expiry 3600 s).
    pub persistent_subscribers: bool,
}

/// Bounds on every knob, so that no run can go on for ever or exhaust the machine.
const MAX_SECONDS: f64 = 3600.0;
const MAX_CLIENTS: usize = 1000;
const MAX_CONNECTIONS: usize = 100_000;
const MAX_SUBSCRIPTIONS: usize = 2_000_000;
const MAX_PAYLOAD: usize = 1 << 20;
const MAX_COUNT: u64 = 1_000_000_000;

fn seconds(name: &str, v: f64, allow_zero: bool) -> anyhow::Result<Duration> {
    if !v.is_finite() || v < 0.0 || (v == 0.0 && !allow_zero) || v > MAX_SECONDS {
        bail!("--{name} must be within (0, {MAX_SECONDS}] seconds");
    }
    Ok(Duration::from_secs_f64(v))
}

fn clients(name: &str, n: usize, max: usize) -> anyhow::Result<usize> {
    if n == 0 || n > max {
        bail!("--{name} must be within 1..={max}");
    }
    Ok(n)
}

fn qos(q: u8) -> anyhow::Result<QoS> {
    QoS::from_bits(q).context("QoS must be 0, 1 or 2")
}

fn rate(r: Option<f64>) -> anyhow::Result<Option<f64>> {
    match r {
        Some(r) if !r.is_finite() || r <= 0.0 || r > 1e9 => bail!("--rate must be in (0, 1e9]"),
        r => Ok(r),
    }
}

async fn settings(c: &Common) -> anyhow::Result<Settings> {
    let addr = tokio::net::lookup_host((c.host.as_str(), c.port))
        .await
        .with_context(|| format!("resolving {}", c.host))?
        .next()
        .with_context(|| format!("{} has no address", c.host))?;
    if !addr.ip().is_loopback() {
        bail!("{addr} is not a loopback address: sandpiper-bench only loads local brokers");
    }
    if !(track::HEADER_LEN..=MAX_PAYLOAD).contains(&c.payload) {
        bail!(
            "--payload must be within {}..={MAX_PAYLOAD}",
            track::HEADER_LEN
        );
    }
    if c.count.is_some_and(|n| n == 0 || n > MAX_COUNT) {
        bail!("--count must be within 1..={MAX_COUNT}");
    }
    if c.batch == 0 || c.batch > 65_535 {
        bail!("--batch must be within 1..=65535");
    }
    let mut sub_addr = addr;
    if let Some(p) = c.sub_port {
        sub_addr.set_port(p);
    }
    Ok(Settings {
        addr,
        sub_addr,
        version: match c.protocol {
            Protocol::V311 => ProtocolVersion::V3_1_1,
            Protocol::V5 => ProtocolVersion::V5,
        },
        payload: c.payload,
        duration: seconds("duration", c.duration, false)?,
        count: c.count,
        warmup: seconds("warmup", c.warmup, true)?,
        max_time: seconds("max-time", c.max_time, false)?,
        batch: c.batch,
        connect_timeout: seconds("connect-timeout", c.connect_timeout, false)?,
        label: c.label.clone(),
        persistent_subscribers: c.persistent_subscribers,
    })
}

fn window(w: usize) -> anyhow::Result<usize> {
    if w == 0 || w > 65_535 {
        bail!("--window must be within 1..=65535");
    }
    Ok(w)
}

fn topics(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}/{i}")).collect()
}

fn ids(range: std::ops::Range<usize>) -> Vec<u32> {
    range.filter_map(|i| u32::try_from(i).ok()).collect()
}

async fn run(cli: &Cli) -> anyhow::Result<Record> {
    let s = settings(&cli.common).await?;
    match &cli.scenario {
        Scenario::FanIn { publishers, flow } => {
            let p = clients("publishers", *publishers, MAX_CLIENTS)?;
            let plan = Plan {
                scenario: "fan-in",
                publishers: topics("bench/in", p),
                subscribers: vec![("bench/in/#".to_owned(), ids(0..p))],
                qos: qos(flow.qos)?,
                window: window(flow.window)?,
                rate: rate(flow.rate)?,
            };
            flow::run(&plan, &s).await
        }
        Scenario::FanOut { subscribers, flow } => {
            let n = clients("subscribers", *subscribers, MAX_CLIENTS)?;
            let plan = Plan {
                scenario: "fan-out",
                publishers: vec!["bench/out".to_owned()],
                subscribers: (0..n).map(|_| ("bench/out".to_owned(), vec![0])).collect(),
                qos: qos(flow.qos)?,
                window: window(flow.window)?,
                rate: rate(flow.rate)?,
            };
            flow::run(&plan, &s).await
        }
        Scenario::P2p { pairs, flow } => {
            let n = clients("pairs", *pairs, MAX_CLIENTS)?;
            let plan = Plan {
                scenario: "p2p",
                publishers: topics("bench/p2p", n),
                subscribers: topics("bench/p2p", n)
                    .into_iter()
                    .zip(ids(0..n))
                    .map(|(t, i)| (t, vec![i]))
                    .collect(),
                qos: qos(flow.qos)?,
                window: window(flow.window)?,
                rate: rate(flow.rate)?,
            };
            flow::run(&plan, &s).await
        }
        Scenario::Latency { rate: r, qos: q } => {
            let plan = Plan {
                scenario: "latency",
                publishers: vec!["bench/lat".to_owned()],
                subscribers: vec![("bench/lat".to_owned(), vec![0])],
                qos: qos(*q)?,
                window: 65_535,
                rate: rate(Some(*r))?,
            };
            flow::run(&plan, &s).await
        }
        Scenario::Connections {
            connections: c,
            rate: r,
            broker_pid,
            hold,
            keep_alive,
        } => {
            let plan = ConnPlan {
                connections: clients("connections", *c, MAX_CONNECTIONS)?,
                rate: rate(Some(*r))?.unwrap_or(1.0),
                broker_pid: *broker_pid,
                hold: seconds("hold", *hold, true)?,
                keep_alive: *keep_alive,
            };
            connections::run(&plan, &s).await
        }
        Scenario::Subscriptions {
            subscriptions: n,
            clients: c,
            wildcard,
            per_packet,
            broker_pid,
        } => {
            let plan = SubsPlan {
                subscriptions: clients("subscriptions", *n, MAX_SUBSCRIPTIONS)?,
                clients: clients("clients", *c, MAX_CLIENTS)?,
                wildcard: *wildcard,
                per_packet: clients("per-packet", *per_packet, 10_000)?,
                broker_pid: *broker_pid,
            };
            subscriptions::run(&plan, &s).await
        }
    }
}

fn scenario_name(s: &Scenario) -> &'static str {
    match s {
        Scenario::FanIn { .. } => "fan-in",
        Scenario::FanOut { .. } => "fan-out",
        Scenario::P2p { .. } => "p2p",
        Scenario::Latency { .. } => "latency",
        Scenario::Connections { .. } => "connections",
        Scenario::Subscriptions { .. } => "subscriptions",
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = cli.common.threads.clamp(1, 64);
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sandpiper-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Start the payload clock before any connection exists.
    flow::now_ns();
    let (record, failed) = match runtime.block_on(run(&cli)) {
        Ok(r) => {
            let failed = r.error().is_some();
            (r, failed)
        }
        Err(e) => {
            let mut r = Record::new(scenario_name(&cli.scenario), &cli.common.label);
            r.str("error", format!("{e:#}"));
            (r, true)
        }
    };
    if cli.common.json {
        println!("{}", record.to_json());
    } else {
        print!("{}", record.to_table());
    }
    // The sockets of a failed run may still hold tasks; do not wait for them.
    runtime.shutdown_background();
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
