//! Message flows: publishers and subscribers over real sockets, for fan-in, fan-out,
//! point-to-point and latency. One task per connection owns its socket and selects over
//! reading and writing, like the broker's own connection task, so acknowledgements are read
//! while publishes are written.
//!
//! Publishers write pre-encoded PUBLISHes in batches (one `write` per batch), keep a window
//! of unacknowledged QoS 1/2 messages, and report which sequence numbers were never
//! acknowledged. Subscribers acknowledge, record one bit per sequence number and a latency
//! histogram, never the messages. After the run those bits and the publishers' lists give
//! messages lost (acknowledged by the broker but never delivered), duplicated and
//! reordered.
//!
//! Timeline: connect and subscribe, settle, then `warmup` unmeasured, then the measurement
//! window (`duration`, or until `count` messages per publisher are sent), then publishers
//! stop and wait for their last acknowledgements, then subscribers wait until everything
//! expected arrived or nothing arrived for a while. Each phase has a deadline.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::BytesMut;
use sandpiper::codec::{self, Packet, PacketId, Publish, PublishQoS, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Settings;
use crate::hist::Histogram;
use crate::mqtt::{Client, MAX_PACKET, READ_CHUNK, Template, put_ack};
use crate::report::{MESSAGE_LATENCY, Record};
use crate::track::{Stamp, Tracker};

/// Pause between the last SUBACK and the first PUBLISH, so brokers that install
/// subscriptions asynchronously have them in place.
const SETTLE: Duration = Duration::from_millis(300);
/// How long publishers wait for their last acknowledgements once told to stop.
const DRAIN: Duration = Duration::from_secs(10);
/// How long subscribers may stay silent before the run is declared over.
const QUIET_QOS0: Duration = Duration::from_secs(1);
const QUIET_ACKED: Duration = Duration::from_secs(3);
/// How long subscribers may keep receiving after the publishers finished.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(20);

/// Nanoseconds since the first call: the clock of payload time stamps, shared by every
/// task of this process.
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    let epoch = EPOCH.get_or_init(std::time::Instant::now);
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Who publishes where and who subscribes to what.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Scenario name for the report.
    pub scenario: &'static str,
    /// Topic of each publisher; its index is its publisher id.
    pub publishers: Vec<String>,
    /// Filter of each subscriber and the publishers whose messages it must receive.
    pub subscribers: Vec<(String, Vec<u32>)>,
    /// QoS of publishes and subscriptions.
    pub qos: QoS,
    /// Unacknowledged messages per publisher (QoS 1/2).
    pub window: usize,
    /// Messages per second per publisher; `None` for as fast as possible.
    pub rate: Option<f64>,
}

/// Measurement window in nanoseconds of [`now_ns`]: [from, to).
#[derive(Debug, Clone, Copy)]
struct Window {
    from: u64,
    to: u64,
}

impl Window {
    fn contains(self, ns: u64) -> bool {
        (self.from..self.to).contains(&ns)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
/// What an outbound QoS 1/2 message waits for.
enum Awaiting {
    Ack,
    Rec,
    Comp,
}

/// Outbound QoS 1/2 messages by packet id.
struct Inflight {
    slots: Vec<Option<(u64, Awaiting)>>,
    len: usize,
    next: u16,
}

impl Inflight {
    fn new() -> Inflight {
        Inflight {
            slots: vec![None; 65536],
            len: 0,
            next: 0,
        }
    }

    /// A free packet id for `seq`; `None` only when all 65535 are in use.
    fn insert(&mut self, seq: u64, stage: Awaiting) -> Option<u16> {
        for _ in 0..u16::MAX {
            self.next = self.next.wrapping_add(1).max(1);
            if let Some(slot @ None) = self.slots.get_mut(usize::from(self.next)) {
                *slot = Some((seq, stage));
                self.len += 1;
                return Some(self.next);
            }
        }
        None
    }

    fn get_mut(&mut self, id: PacketId) -> Option<&mut Option<(u64, Awaiting)>> {
        self.slots.get_mut(usize::from(id.get()))
    }

    fn take(&mut self, id: PacketId) -> Option<(u64, Awaiting)> {
        let v = self.get_mut(id)?.take();
        if v.is_some() {
            self.len -= 1;
        }
        v
    }

    fn remaining(&self) -> Vec<u64> {
        self.slots.iter().flatten().map(|(seq, _)| *seq).collect()
    }
}

struct PubCtx {
    id: u32,
    template: Template,
    qos: QoS,
    window: usize,
    batch: usize,
    rate: Option<f64>,
    count: Option<u64>,
    start: Instant,
    measure: Window,
    stop: CancellationToken,
}

struct PubOutcome {
    sent: u64,
    sent_in_window: u64,
    /// Sequence numbers never acknowledged (or refused) by the broker.
    unacked: Vec<u64>,
    /// Acknowledgements for packet ids we had not used, or in the wrong stage.
    stray: u64,
    error: Option<String>,
    /// Kept open until every subscriber is done: some brokers treat a publisher's
    /// disconnect as a reason to drop what it sent.
    _client: Client,
}

async fn publish_loop(mut c: Client, ctx: PubCtx) -> PubOutcome {
    let mut inflight = Inflight::new();
    let mut out = BytesMut::with_capacity(ctx.batch * ctx.template.len() + 1024);
    let mut seq: u64 = 0;
    let mut sent_in_window = 0;
    let mut stray = 0;
    let mut refused = Vec::new();
    let mut stop_at: Option<Instant> = None;
    let mut error = None;
    let acked = ctx.qos != QoS::AtMostOnce;
    let version = c.version;
    let (mut rd, mut wr) = c.stream.split();
    let inbuf = &mut c.inbuf;

    loop {
        if stop_at.is_none() && out.is_empty() {
            let mut n = ctx.batch;
            if acked {
                n = n.min(ctx.window.saturating_sub(inflight.len));
            }
            if let Some(count) = ctx.count {
                n = n.min(usize::try_from(count - seq).unwrap_or(usize::MAX));
            }
            if let Some(rate) = ctx.rate {
                // `as` saturates: the number of messages due by now at this rate.
                let due = (ctx.start.elapsed().as_secs_f64() * rate) as u64;
                n = n.min(usize::try_from(due.saturating_sub(seq)).unwrap_or(usize::MAX));
            }
            let now = now_ns();
            for _ in 0..n {
                let id = if acked {
                    let stage = match ctx.qos {
                        QoS::ExactlyOnce => Awaiting::Rec,
                        _ => Awaiting::Ack,
                    };
                    match inflight.insert(seq, stage) {
                        Some(id) => id,
                        None => break,
                    }
                } else {
                    0
                };
                let stamp = Stamp {
                    publisher: ctx.id,
                    seq,
                    sent_ns: now,
                };
                ctx.template.put(&mut out, id, stamp);
                seq += 1;
                if ctx.measure.contains(now) {
                    sent_in_window += 1;
                }
            }
            if ctx.count.is_some_and(|c| seq >= c) {
                stop_at = Some(Instant::now() + DRAIN);
            }
        }
        if let Some(at) = stop_at
            && out.is_empty()
            && (inflight.len == 0 || Instant::now() >= at)
        {
            break;
        }
        let has_credit = !acked || inflight.len < ctx.window;
        let rate_wait = match ctx.rate {
            Some(rate) if stop_at.is_none() && out.is_empty() && has_credit => {
                Some(ctx.start + Duration::from_secs_f64((seq + 1) as f64 / rate))
            }
            _ => None,
        };
        if inbuf.capacity() - inbuf.len() < 4096 {
            inbuf.reserve(READ_CHUNK);
        }
        tokio::select! {
            biased;
            _ = ctx.stop.cancelled(), if stop_at.is_none() => {
                stop_at = Some(Instant::now() + DRAIN);
            }
            _ = tokio::time::sleep_until(stop_at.unwrap_or_else(Instant::now)), if stop_at.is_some() => {
                break;
            }
            r = rd.read_buf(inbuf) => match r {
                Ok(0) => { error = Some("broker closed the connection".to_owned()); break; }
                Err(e) => { error = Some(format!("read: {e}")); break; }
                Ok(_) => {
                    let r = on_acks(inbuf, version, &mut inflight, &mut out, &mut refused, &mut stray);
                    if let Err(e) = r {
                        error = Some(format!("{e:#}"));
                        break;
                    }
                }
            },
            r = wr.write_buf(&mut out), if !out.is_empty() => match r {
                Ok(0) => { error = Some("write: connection closed".to_owned()); break; }
                Err(e) => { error = Some(format!("write: {e}")); break; }
                Ok(_) => {}
            },
            _ = tokio::time::sleep_until(rate_wait.unwrap_or_else(Instant::now)), if rate_wait.is_some() => {}
        }
    }
    let mut unacked = inflight.remaining();
    unacked.extend(refused);
    PubOutcome {
        sent: seq,
        sent_in_window,
        unacked,
        stray,
        error,
        _client: c,
    }
}

/// Handles what a publisher receives: PUBACK, PUBREC (answered with PUBREL), PUBCOMP.
fn on_acks(
    inbuf: &mut BytesMut,
    version: codec::ProtocolVersion,
    inflight: &mut Inflight,
    out: &mut BytesMut,
    refused: &mut Vec<u64>,
    stray: &mut u64,
) -> anyhow::Result<()> {
    while let Some(p) = codec::decode_packet(inbuf, version, MAX_PACKET)? {
        match p {
            Packet::PubAck(a) => complete(inflight, &a, Awaiting::Ack, refused, stray),
            Packet::PubComp(a) => complete(inflight, &a, Awaiting::Comp, refused, stray),
            Packet::PubRec(a) => match inflight.get_mut(a.packet_id) {
                Some(Some((seq, stage @ Awaiting::Rec))) => {
                    if a.reason.is_error() {
                        refused.push(*seq);
                        inflight.take(a.packet_id);
                    } else {
                        *stage = Awaiting::Comp;
                        put_ack(out, Packet::PubRel, a.packet_id, version)?;
                    }
                }
                _ => *stray += 1,
            },
            Packet::PingResp => {}
            Packet::Disconnect(d) => bail!("broker sent DISCONNECT {:?}", d.reason),
            other => bail!("unexpected {} from the broker", other.name()),
        }
    }
    Ok(())
}

/// Ends the flow of one QoS 1/2 message on its PUBACK or PUBCOMP, if it was at `want`.
fn complete(
    inflight: &mut Inflight,
    a: &codec::Ack,
    want: Awaiting,
    refused: &mut Vec<u64>,
    stray: &mut u64,
) {
    match inflight.get_mut(a.packet_id) {
        Some(Some((seq, stage))) if *stage == want => {
            if a.reason.is_error() {
                refused.push(*seq);
            }
            inflight.take(a.packet_id);
        }
        _ => *stray += 1,
    }
}

struct SubCtx {
    stop: CancellationToken,
    received: Arc<AtomicU64>,
    measure: Window,
}

struct SubOutcome {
    tracker: Tracker,
    hist: Histogram,
    received: u64,
    in_window: u64,
    last_ns: u64,
    error: Option<String>,
    _client: Client,
}

/// What a subscriber keeps between reads.
struct SubState {
    tracker: Tracker,
    hist: Histogram,
    /// QoS 2 packet ids answered with PUBREC and awaiting PUBREL.
    awaiting_rel: Vec<bool>,
    in_window: u64,
    measure: Window,
}

async fn subscribe_loop(mut c: Client, ctx: SubCtx, tracker: Tracker) -> SubOutcome {
    let mut st = SubState {
        tracker,
        hist: Histogram::default(),
        awaiting_rel: vec![false; 65536],
        in_window: 0,
        measure: ctx.measure,
    };
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut received: u64 = 0;
    let mut last_ns = 0;
    let mut error = None;
    let version = c.version;
    let (mut rd, mut wr) = c.stream.split();
    let inbuf = &mut c.inbuf;
    // Packets that arrived with the SUBACK.
    match on_publishes(inbuf, version, &mut st, &mut out, now_ns()) {
        Ok(n) => received += n,
        Err(e) => error = Some(format!("{e:#}")),
    }
    while error.is_none() {
        if inbuf.capacity() - inbuf.len() < 4096 {
            inbuf.reserve(READ_CHUNK);
        }
        tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => break,
            r = wr.write_buf(&mut out), if !out.is_empty() => match r {
                Ok(0) => error = Some("write: connection closed".to_owned()),
                Err(e) => error = Some(format!("write: {e}")),
                Ok(_) => {}
            },
            r = rd.read_buf(inbuf) => match r {
                Ok(0) => error = Some("broker closed the connection".to_owned()),
                Err(e) => error = Some(format!("read: {e}")),
                Ok(_) => {
                    let now = now_ns();
                    match on_publishes(inbuf, version, &mut st, &mut out, now) {
                        Ok(n) => {
                            if n > 0 {
                                received += n;
                                last_ns = now;
                                ctx.received.fetch_add(n, Ordering::Relaxed);
                            }
                        }
                        Err(e) => error = Some(format!("{e:#}")),
                    }
                }
            },
        }
    }
    // Best effort: our last acknowledgements, so the broker's books are balanced.
    if !out.is_empty() {
        let _ = tokio::time::timeout(Duration::from_millis(200), wr.write_all(&out)).await;
    }
    SubOutcome {
        tracker: st.tracker,
        hist: st.hist,
        received,
        in_window: st.in_window,
        last_ns,
        error,
        _client: c,
    }
}

/// Decodes every whole packet in `inbuf`; records PUBLISHes and queues their
/// acknowledgements. Returns the number of PUBLISHes counted.
fn on_publishes(
    inbuf: &mut BytesMut,
    version: codec::ProtocolVersion,
    st: &mut SubState,
    out: &mut BytesMut,
    now: u64,
) -> anyhow::Result<u64> {
    let mut n = 0;
    while let Some(p) = codec::decode_packet(inbuf, version, MAX_PACKET)? {
        match p {
            Packet::Publish(p) => {
                if record(st, &p, now) {
                    n += 1;
                }
                match p.qos {
                    PublishQoS::AtMostOnce => {}
                    PublishQoS::AtLeastOnce(id) => put_ack(out, Packet::PubAck, id, version)?,
                    PublishQoS::ExactlyOnce(id) => put_ack(out, Packet::PubRec, id, version)?,
                }
            }
            Packet::PubRel(a) => {
                if let Some(w) = st.awaiting_rel.get_mut(usize::from(a.packet_id.get())) {
                    *w = false;
                }
                put_ack(out, Packet::PubComp, a.packet_id, version)?;
            }
            Packet::PingResp => {}
            Packet::Disconnect(d) => bail!("broker sent DISCONNECT {:?}", d.reason),
            other => bail!("unexpected {} from the broker", other.name()),
        }
    }
    Ok(n)
}

/// Records one received PUBLISH; false for a QoS 2 resend of a message still awaiting
/// PUBREL, which is the same delivery (MQTT-4.3.3).
fn record(st: &mut SubState, p: &Publish, now: u64) -> bool {
    if let PublishQoS::ExactlyOnce(id) = p.qos
        && let Some(w) = st.awaiting_rel.get_mut(usize::from(id.get()))
    {
        if *w && p.dup {
            return false;
        }
        *w = true;
    }
    match Stamp::read(&p.payload) {
        Some(stamp) => {
            if st.measure.contains(stamp.sent_ns) {
                st.hist.record(now.saturating_sub(stamp.sent_ns));
            }
            if st.measure.contains(now) {
                st.in_window += 1;
            }
            st.tracker.record(stamp);
        }
        None => st.tracker.unexpected += 1,
    }
    true
}

/// Runs one flow scenario and reports it.
pub async fn run(plan: &Plan, s: &Settings) -> anyhow::Result<Record> {
    let tag = std::process::id();
    let mut templates = Vec::new();
    for topic in &plan.publishers {
        templates.push(Template::new(topic, plan.qos, s.payload, s.version)?);
    }

    let mut subs = Vec::new();
    for (i, (filter, _)) in plan.subscribers.iter().enumerate() {
        let id = format!("spb-{tag}-s{i}");
        let mut c = Client::connect(
            s.sub_addr,
            s.version,
            &id,
            s.persistent_subscribers,
            s.connect_timeout,
        )
        .await
        .with_context(|| format!("subscriber {i}"))?;
        let granted = c
            .subscribe(filter, plan.qos, s.connect_timeout)
            .await
            .with_context(|| format!("subscriber {i}"))?;
        if granted < plan.qos {
            bail!(
                "the broker granted QoS {} for a QoS {} subscription",
                granted.bits(),
                plan.qos.bits()
            );
        }
        subs.push(c);
    }
    let mut pubs = Vec::new();
    for i in 0..plan.publishers.len() {
        let id = format!("spb-{tag}-p{i}");
        let c = Client::connect(s.addr, s.version, &id, false, s.connect_timeout)
            .await
            .with_context(|| format!("publisher {i}"))?;
        pubs.push(c);
    }
    tokio::time::sleep(SETTLE).await;

    let start = Instant::now();
    let start_ns = now_ns();
    let warmup_ns = u64::try_from(s.warmup.as_nanos()).unwrap_or(u64::MAX);
    let measure = Window {
        from: start_ns.saturating_add(warmup_ns),
        to: match s.count {
            Some(_) => u64::MAX,
            None => start_ns
                .saturating_add(warmup_ns)
                .saturating_add(u64::try_from(s.duration.as_nanos()).unwrap_or(u64::MAX)),
        },
    };
    let stop_pub = CancellationToken::new();
    let stop_sub = CancellationToken::new();
    let received = Arc::new(AtomicU64::new(0));

    let mut sub_tasks = Vec::new();
    for (c, (_, expected)) in subs.into_iter().zip(&plan.subscribers) {
        let tracker = Tracker::new(plan.publishers.len(), expected);
        let ctx = SubCtx {
            stop: stop_sub.clone(),
            received: received.clone(),
            measure,
        };
        sub_tasks.push(tokio::spawn(subscribe_loop(c, ctx, tracker)));
    }
    let mut pub_tasks = Vec::new();
    for (i, (c, template)) in pubs.into_iter().zip(templates).enumerate() {
        let ctx = PubCtx {
            id: u32::try_from(i).context("too many publishers")?,
            template,
            qos: plan.qos,
            window: plan.window,
            batch: s.batch,
            rate: plan.rate,
            count: s.count,
            start,
            measure,
            stop: stop_pub.clone(),
        };
        pub_tasks.push(tokio::spawn(publish_loop(c, ctx)));
    }

    // Publishers stop at the end of the window, or at the time cap in count mode.
    let stop_after = match s.count {
        Some(_) => s.max_time,
        None => s.warmup + s.duration,
    };
    let timer = {
        let stop = stop_pub.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(start + stop_after).await;
            stop.cancel();
        })
    };
    let mut pub_out = Vec::new();
    for t in pub_tasks {
        pub_out.push(t.await.context("publisher task")?);
    }
    timer.abort();
    let publishers_done = Instant::now();

    // Wait for deliveries: all expected, or silence, or the deadline.
    let fanout: Vec<u64> = (0..plan.publishers.len())
        .map(|p| {
            let n = plan
                .subscribers
                .iter()
                .filter(|(_, e)| e.iter().any(|&x| usize::try_from(x).ok() == Some(p)))
                .count();
            u64::try_from(n).unwrap_or(u64::MAX)
        })
        .collect();
    let expected: u64 = pub_out
        .iter()
        .zip(&fanout)
        .map(|(o, f)| o.sent.saturating_mul(*f))
        .sum();
    let quiet = if plan.qos == QoS::AtMostOnce {
        QUIET_QOS0
    } else {
        QUIET_ACKED
    };
    let mut last_seen = received.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    loop {
        let now_received = received.load(Ordering::Relaxed);
        if now_received >= expected {
            break;
        }
        if now_received != last_seen {
            last_seen = now_received;
            last_change = Instant::now();
        }
        if last_change.elapsed() >= quiet || publishers_done.elapsed() >= DELIVERY_DEADLINE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_sub.cancel();
    let mut sub_out = Vec::new();
    for t in sub_tasks {
        sub_out.push(t.await.context("subscriber task")?);
    }
    Ok(summarise(plan, s, &pub_out, &sub_out, measure, expected))
}

fn summarise(
    plan: &Plan,
    s: &Settings,
    pubs: &[PubOutcome],
    subs: &[SubOutcome],
    measure: Window,
    expected: u64,
) -> Record {
    let sent: u64 = pubs.iter().map(|p| p.sent).sum();
    let sent_in_window: u64 = pubs.iter().map(|p| p.sent_in_window).sum();
    let received: u64 = subs.iter().map(|s| s.received).sum();
    let in_window: u64 = subs.iter().map(|s| s.in_window).sum();
    let unacked: u64 = pubs
        .iter()
        .map(|p| u64::try_from(p.unacked.len()).unwrap_or(u64::MAX))
        .sum();
    let stray: u64 = pubs.iter().map(|p| p.stray).sum();
    let mut hist = Histogram::default();
    let (mut dup, mut reordered, mut unique, mut lost, mut unexpected) = (0, 0, 0, 0, 0);
    for sub in subs {
        hist.merge(&sub.hist);
        unexpected += sub.tracker.unexpected;
        for (p, po) in pubs.iter().enumerate() {
            let Some(pair) = sub.tracker.pair(p) else {
                continue;
            };
            dup += pair.dup;
            reordered += pair.reordered;
            let seen = pair.seen.count_below(po.sent);
            unique += seen;
            let missing = po.sent - seen;
            let missing_unacked = po
                .unacked
                .iter()
                .filter(|&&q| !pair.seen.contains(q))
                .count();
            lost += missing.saturating_sub(u64::try_from(missing_unacked).unwrap_or(0));
        }
    }
    let secs = match s.count {
        None => s.duration.as_secs_f64(),
        Some(_) => {
            let last = subs.iter().map(|s| s.last_ns).max().unwrap_or(0);
            last.saturating_sub(measure.from) as f64 / 1e9
        }
    };
    let per_s = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    let msgs_per_s = per_s(in_window);
    let mut errors: Vec<String> = Vec::new();
    for (i, p) in pubs.iter().enumerate() {
        if let Some(e) = &p.error {
            errors.push(format!("publisher {i}: {e}"));
        }
    }
    for (i, sub) in subs.iter().enumerate() {
        if let Some(e) = &sub.error {
            errors.push(format!("subscriber {i}: {e}"));
        }
    }

    let mut r = Record::new(plan.scenario, &s.label);
    r.str("protocol", s.version.to_string());
    r.int("qos", u64::from(plan.qos.bits()));
    r.int("publishers", plan.publishers.len() as u64);
    r.int("subscribers", plan.subscribers.len() as u64);
    r.int("payload", s.payload as u64);
    if plan.qos != QoS::AtMostOnce {
        r.int("window", plan.window as u64);
    }
    match plan.rate {
        Some(rate) => r.float("rate", rate),
        None => r.str("rate", "max".to_owned()),
    }
    r.float("seconds", secs);
    r.float("msgs_per_s", msgs_per_s);
    r.float("mb_per_s", msgs_per_s * s.payload as f64 / 1e6);
    r.float("sent_per_s", per_s(sent_in_window));
    r.int("sent", sent);
    r.int("expected", expected);
    r.int("received", received);
    r.int("missing", expected.saturating_sub(unique));
    if plan.qos == QoS::AtMostOnce {
        r.null("lost");
    } else {
        r.int("lost", lost);
    }
    r.int("dup", dup);
    r.int("reordered", reordered);
    r.int("unacked", unacked);
    r.int("stray_acks", stray);
    r.int("unexpected", unexpected);
    r.latency(&MESSAGE_LATENCY, &hist);
    if errors.is_empty() {
        r.null("error");
    } else {
        r.str("error", errors.join("; "));
    }
    r
}
