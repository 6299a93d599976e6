//! Many subscriptions: C clients subscribe to N filters in all (distinct topic names, or
//! wildcard filters), then one publisher sends QoS 0 messages to topics drawn at random,
//! each matching exactly one of the subscriptions. Figures: the subscribe rate, the
//! broker's resident memory per subscription, and how many messages per second it routes
//! through that table.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::BytesMut;
use sandpiper::codec::{
    self, Packet, PacketId, Publish, PublishProperties, PublishQoS, QoS, ReasonCode, Subscribe,
    SubscribeProperties, SubscriptionOptions, TopicFilter, TopicName,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::Settings;
use crate::connections::rss_kib;
use crate::mqtt::{Client, MAX_PACKET, READ_CHUNK, encode};
use crate::report::Record;

/// What to subscribe and how.
#[derive(Debug, Clone)]
pub struct SubsPlan {
    /// Subscriptions in all.
    pub subscriptions: usize,
    /// Subscribing clients (the subscriptions are spread evenly over them).
    pub clients: usize,
    /// Wildcard filters (`bench/w/A/+/B/#`) instead of topic names (`bench/s/A/B`).
    pub wildcard: bool,
    /// Filters per SUBSCRIBE packet.
    pub per_packet: usize,
    /// The broker's process id, to read its VmRSS.
    pub broker_pid: Option<u32>,
}

/// The filter of subscription `g`.
fn filter(g: usize, wildcard: bool) -> String {
    if wildcard {
        format!("bench/w/{}/+/{}/#", g / 1000, g % 1000)
    } else {
        format!("bench/s/{}/{}", g / 1000, g % 1000)
    }
}

/// A topic that only subscription `g` matches.
fn topic(g: usize, wildcard: bool) -> String {
    if wildcard {
        format!("bench/w/{}/x/{}/y", g / 1000, g % 1000)
    } else {
        format!("bench/s/{}/{}", g / 1000, g % 1000)
    }
}

/// A small deterministic generator (xorshift): the same topics in every run and broker.
struct Draw(u64);

impl Draw {
    fn next(&mut self, below: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        // `as`: the value is reduced below `below`, which is a usize.
        (self.0 % below.max(1) as u64) as usize
    }
}

/// Subscribes client `c` to its share `range` of the filters, SUBSCRIBEs pipelined;
/// returns the client and how many filters were refused.
async fn subscribe_share(
    mut client: Client,
    range: std::ops::Range<usize>,
    plan: SubsPlan,
    deadline: Duration,
) -> anyhow::Result<(Client, u64)> {
    let mut out = BytesMut::new();
    let mut packets = 0usize;
    let filters: Vec<usize> = range.collect();
    for (i, chunk) in filters.chunks(plan.per_packet.max(1)).enumerate() {
        let id = u16::try_from(i % 65_535 + 1).unwrap_or(1);
        let sub = Subscribe {
            packet_id: PacketId::new(id).context("packet id")?,
            filters: chunk
                .iter()
                .map(|&g| {
                    let f = filter(g, plan.wildcard);
                    TopicFilter::new(&f)
                        .with_context(|| format!("filter {f}"))
                        .map(|f| (f, SubscriptionOptions::qos(QoS::AtMostOnce)))
                })
                .collect::<anyhow::Result<_>>()?,
            properties: SubscribeProperties::default(),
        };
        encode(&Packet::Subscribe(sub), client.version, &mut out)?;
        packets += 1;
    }
    client
        .stream
        .write_all(&out)
        .await
        .context("sending SUBSCRIBE")?;
    let mut refused = 0u64;
    tokio::time::timeout(deadline, async {
        let mut acks = 0;
        while acks < packets {
            match client.next_packet().await? {
                Packet::SubAck(a) => {
                    acks += 1;
                    refused += a
                        .reasons
                        .iter()
                        .filter(|r| {
                            !matches!(
                                r,
                                ReasonCode::Success
                                    | ReasonCode::GrantedQoS1
                                    | ReasonCode::GrantedQoS2
                            )
                        })
                        .count() as u64;
                }
                Packet::Publish(_) | Packet::PingResp => {}
                other => bail!("expected SUBACK, got {}", other.name()),
            }
        }
        anyhow::Ok(())
    })
    .await
    .with_context(|| format!("SUBACKs not all within {deadline:?}"))??;
    Ok((client, refused))
}

/// Counts the PUBLISH packets a subscriber receives until the run ends.
async fn count_deliveries(mut client: Client, received: Arc<AtomicU64>) {
    let mut buf = std::mem::take(&mut client.inbuf);
    loop {
        loop {
            match codec::decode_packet(&mut buf, client.version, MAX_PACKET) {
                Ok(Some(Packet::Publish(_))) => {
                    received.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
        buf.reserve(READ_CHUNK);
        match client.stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Runs the scenario.
pub async fn run(plan: &SubsPlan, s: &Settings) -> anyhow::Result<Record> {
    if plan.subscriptions < plan.clients {
        bail!("fewer subscriptions than clients");
    }
    let rss_before = plan.broker_pid.map(rss_kib).transpose()?;
    let tag = std::process::id();
    // Connect every client first, so the subscribe rate is the broker's work on filters.
    let mut clients = Vec::with_capacity(plan.clients);
    for c in 0..plan.clients {
        let id = format!("spb-{tag}-s{c}");
        clients.push(Client::connect(s.sub_addr, s.version, &id, false, s.connect_timeout).await?);
    }
    let per = plan.subscriptions / plan.clients;
    let extra = plan.subscriptions % plan.clients;
    let start = Instant::now();
    let mut set = JoinSet::new();
    let mut from = 0;
    // Subscribing can take a while for a million filters: a generous deadline per client.
    let deadline = s.connect_timeout.max(Duration::from_secs(300));
    for (c, client) in clients.into_iter().enumerate() {
        let n = per + usize::from(c < extra);
        set.spawn(subscribe_share(
            client,
            from..from + n,
            plan.clone(),
            deadline,
        ));
        from += n;
    }
    let mut subscribed = Vec::with_capacity(plan.clients);
    let mut refused = 0;
    while let Some(r) = set.join_next().await {
        let (client, r) = r.context("subscriber task")??;
        refused += r;
        subscribed.push(client);
    }
    let subscribe_secs = start.elapsed().as_secs_f64();
    // Let the broker settle (store writes of the subscriptions, allocator) before reading.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = plan.broker_pid.map(rss_kib).transpose()?;

    // Routing: one QoS 0 publisher, topics at random among the subscriptions.
    let received = Arc::new(AtomicU64::new(0));
    let mut readers = JoinSet::new();
    for client in subscribed {
        readers.spawn(count_deliveries(client, received.clone()));
    }
    let mut publisher = Client::connect(
        s.addr,
        s.version,
        &format!("spb-{tag}-p"),
        false,
        s.connect_timeout,
    )
    .await?;
    // A ring of pre-encoded PUBLISH packets, written a batch at a time.
    const RING: usize = 1 << 16;
    let mut draw = Draw(0x9E37_79B9_7F4A_7C15);
    let mut ring = BytesMut::new();
    let mut offsets = Vec::with_capacity(RING + 1);
    for _ in 0..RING {
        offsets.push(ring.len());
        let t = topic(draw.next(plan.subscriptions), plan.wildcard);
        let p = Publish {
            dup: false,
            qos: PublishQoS::AtMostOnce,
            retain: false,
            topic: Some(TopicName::new(&t).with_context(|| format!("topic {t}"))?),
            payload: vec![0u8; s.payload].into(),
            properties: PublishProperties::default(),
        };
        encode(&Packet::Publish(p), s.version, &mut ring)?;
    }
    offsets.push(ring.len());
    let batch = s.batch.clamp(1, RING);
    let begin = Instant::now();
    let measure_from = begin + s.warmup;
    let end = measure_from + s.duration;
    let (mut sent, mut sent_at_start, mut received_at_start) = (0u64, None, 0);
    let mut at = 0usize;
    while Instant::now() < end {
        if sent_at_start.is_none() && Instant::now() >= measure_from {
            sent_at_start = Some(sent);
            received_at_start = received.load(Ordering::Relaxed);
        }
        let upto = (at + batch).min(RING);
        let (a, b) = (offsets[at], offsets[upto]);
        publisher
            .stream
            .write_all(&ring[a..b])
            .await
            .context("publishing")?;
        sent += (upto - at) as u64;
        at = if upto == RING { 0 } else { upto };
        // Drain what the broker sends the publisher (nothing expected at QoS 0).
        let _ = publisher.stream.try_read_buf(&mut publisher.inbuf);
        publisher.inbuf.clear();
    }
    let window = s.duration.as_secs_f64();
    let received_in_window = received
        .load(Ordering::Relaxed)
        .saturating_sub(received_at_start);
    let sent_in_window = sent.saturating_sub(sent_at_start.unwrap_or(0));
    drop(publisher);
    readers.abort_all();

    let mut r = Record::new("subscriptions", &s.label);
    r.str("protocol", s.version.to_string());
    r.str(
        "filters",
        if plan.wildcard {
            "wildcard"
        } else {
            "distinct"
        }
        .to_owned(),
    );
    r.int("subscriptions", plan.subscriptions as u64);
    r.int("clients", plan.clients as u64);
    r.int("refused", refused);
    r.float("subscribe_seconds", subscribe_secs);
    r.float(
        "subscribes_per_s",
        plan.subscriptions as f64 / subscribe_secs.max(1e-9),
    );
    match (rss_before, rss_after) {
        (Some(before), Some(after)) => {
            r.int("rss_before_kib", before);
            r.int("rss_after_kib", after);
            r.float(
                "rss_per_sub_bytes",
                after.saturating_sub(before) as f64 * 1024.0 / plan.subscriptions as f64,
            );
        }
        _ => {
            r.null("rss_before_kib");
            r.null("rss_after_kib");
            r.null("rss_per_sub_bytes");
        }
    }
    r.float("sent_per_s", sent_in_window as f64 / window);
    r.float("msgs_per_s", received_in_window as f64 / window);
    if refused > 0 {
        r.str("error", format!("{refused} subscriptions refused"));
    } else {
        r.null("error");
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_topic_matches_its_own_filter_only() {
        for wildcard in [false, true] {
            for g in [0, 1, 999, 1000, 123_456, 999_999] {
                let t = topic(g, wildcard);
                assert!(codec::filter_matches(&filter(g, wildcard), &t), "{t}");
                for other in [g + 1, g + 1000, g.saturating_sub(1)] {
                    if other != g {
                        assert!(!codec::filter_matches(&filter(other, wildcard), &t));
                    }
                }
            }
        }
    }
}
