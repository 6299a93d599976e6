//! The `$SYS` tree: the broker's own figures, published every `[sys] interval` seconds
//! under Mosquitto's names where Mosquitto has one. They are the broker's status, not
//! client data: they skip the transform and sink hooks, and they are retained in memory
//! only (a new subscriber gets the latest at once; nothing is written to the store).
//! Subscribing needs `authorize` like any topic, and `#` never matches `$SYS` (MQTT
//! 4.7.2).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;

use crate::broker::Broker;
use crate::codec::{MessageProperties, QoS, TopicName};
use crate::message::Draft;
use crate::metrics::{self, C};

/// One exponentially weighted moving average of a per-minute rate.
#[derive(Debug, Clone, Copy, Default)]
struct Load {
    value: f64,
    primed: bool,
}

impl Load {
    /// Folds in the rate of the last `dt` over a window of `window`.
    fn update(&mut self, per_minute: f64, dt: Duration, window: Duration) {
        if !self.primed {
            self.value = per_minute;
            self.primed = true;
            return;
        }
        let k = 1.0 - (-dt.as_secs_f64() / window.as_secs_f64()).exp();
        self.value += k * (per_minute - self.value);
    }
}

const WINDOWS: [(&str, Duration); 3] = [
    ("1min", Duration::from_secs(60)),
    ("5min", Duration::from_secs(300)),
    ("15min", Duration::from_secs(900)),
];

/// The loads Mosquitto publishes: (name under `load/`, counters summed).
const LOADS: [(&str, &[C]); 4] = [
    (
        "messages/received",
        &[C::ReceivedQos0, C::ReceivedQos1, C::ReceivedQos2],
    ),
    ("messages/sent", &[C::SentQos0, C::SentQos1, C::SentQos2]),
    ("bytes/received", RECEIVED_BYTES),
    ("bytes/sent", SENT_BYTES),
];

/// Payload bytes received and sent (every QoS).
const RECEIVED_BYTES: &[C] = &[
    C::ReceivedBytesQos0,
    C::ReceivedBytesQos1,
    C::ReceivedBytesQos2,
];
const SENT_BYTES: &[C] = &[C::SentBytesQos0, C::SentBytesQos1, C::SentBytesQos2];

fn sum(counters: &[C]) -> u64 {
    counters.iter().map(|c| metrics::get(*c)).sum()
}

/// Publishes the tree every `[sys] interval` seconds in force until shutdown (nothing
/// while it is zero).
pub fn spawn(broker: Arc<Broker>) {
    tokio::spawn(async move {
        let mut loads = [[Load::default(); WINDOWS.len()]; LOADS.len()];
        let mut last: [u64; LOADS.len()] = LOADS.map(|(_, c)| sum(c));
        let mut last_at = tokio::time::Instant::now();
        let mut first = true;
        loop {
            // The interval in force now: a reload changes it from the next publication on;
            // while it is 0, nothing is published and the tree is looked at every second.
            let secs = broker.current().sys.interval;
            let wait = match (secs, first) {
                (0, _) => Duration::from_secs(1),
                (_, true) => Duration::ZERO,
                (s, false) => Duration::from_secs(s),
            };
            tokio::select! {
                _ = broker.shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            if broker.current().sys.interval == 0 {
                first = true;
                continue;
            }
            first = false;
            let now = tokio::time::Instant::now();
            let dt = now.duration_since(last_at).max(Duration::from_millis(1));
            last_at = now;
            let mut out: Vec<(String, String)> = Vec::with_capacity(32);
            for (i, (name, counters)) in LOADS.iter().enumerate() {
                let total = sum(counters);
                let prev = last.get(i).copied().unwrap_or(total);
                let per_minute = total.saturating_sub(prev) as f64 * 60.0 / dt.as_secs_f64();
                if let Some(l) = last.get_mut(i) {
                    *l = total;
                }
                if let Some(row) = loads.get_mut(i) {
                    for ((window, span), load) in WINDOWS.iter().zip(row.iter_mut()) {
                        load.update(per_minute, dt, *span);
                        out.push((
                            format!("load/{name}/{window}"),
                            format!("{:.2}", load.value),
                        ));
                    }
                }
            }
            figures(&broker, &mut out);
            for (topic, value) in out {
                publish(&broker, &topic, value);
            }
        }
    });
}

/// The figures other than the loads: (topic under `$SYS/broker/`, value).
fn figures(broker: &Broker, out: &mut Vec<(String, String)>) {
    let (online, offline) = broker.sessions.counts();
    let (connected, maximum) = metrics::connected();
    let received = sum(&[C::ReceivedQos0, C::ReceivedQos1, C::ReceivedQos2]);
    let sent = sum(&[C::SentQos0, C::SentQos1, C::SentQos2]);
    let dropped = sum(&[
        C::DroppedQueueFull,
        C::DroppedExpired,
        C::DroppedTooLarge,
        C::DroppedPlugin,
    ]);
    let (retained, _) = broker.router.retained_size();
    let (subscriptions, _) = broker.router.subscription_counts();
    let rows: [(&str, String); 14] = [
        (
            "version",
            format!("sandpiper {}", env!("CARGO_PKG_VERSION")),
        ),
        ("uptime", format!("{} seconds", metrics::uptime().as_secs())),
        ("clients/connected", connected.to_string()),
        ("clients/active", connected.to_string()),
        ("clients/disconnected", offline.to_string()),
        ("clients/inactive", offline.to_string()),
        ("clients/total", (online + offline).to_string()),
        ("clients/maximum", maximum.to_string()),
        ("messages/received", received.to_string()),
        ("messages/sent", sent.to_string()),
        ("publish/messages/received", received.to_string()),
        ("publish/messages/sent", sent.to_string()),
        ("publish/messages/dropped", dropped.to_string()),
        ("subscriptions/count", subscriptions.to_string()),
    ];
    out.extend(rows.into_iter().map(|(t, v)| (t.to_owned(), v)));
    out.push(("retained messages/count".to_owned(), retained.to_string()));
    let queued = metrics::gauge(C::QueuedMessages).max(0);
    out.push((
        "store/messages/count".to_owned(),
        (retained as i64 + queued).to_string(),
    ));
    for b in broker.bridges.list() {
        let connected = b.stats.connected.load(Ordering::Relaxed);
        // Mosquitto's name for a bridge's state.
        out.push((
            format!("connection/{}/state", b.name()),
            u8::from(connected).to_string(),
        ));
        let figures = [
            ("queued", b.queued()),
            ("sent", b.stats.sent.load(Ordering::Relaxed)),
            ("received", b.stats.received.load(Ordering::Relaxed)),
            ("dropped", b.stats.dropped.load(Ordering::Relaxed)),
            ("reconnects", b.stats.reconnects.load(Ordering::Relaxed)),
        ];
        for (what, n) in figures {
            out.push((format!("bridge/{}/{what}", b.name()), n.to_string()));
        }
    }
    out.push(("bytes/received".to_owned(), sum(RECEIVED_BYTES).to_string()));
    out.push(("bytes/sent".to_owned(), sum(SENT_BYTES).to_string()));
}

/// Retains `value` on `$SYS/broker/<topic>` and routes it.
fn publish(broker: &Broker, topic: &str, value: String) {
    let Ok(topic) = TopicName::new(&format!("$SYS/broker/{topic}")) else {
        return;
    };
    let msg = Draft {
        topic,
        payload: Bytes::from(value),
        qos: QoS::AtMostOnce,
        retain: true,
        properties: MessageProperties::default(),
    }
    .into_message(None);
    broker.pipeline.publish_system(&msg);
}
