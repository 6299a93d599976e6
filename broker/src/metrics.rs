//! Process-wide counters, cheap enough for the hot path: each thread adds to a row of its
//! own (cache-line aligned) with a plain load and store, and a scrape sums the rows. No
//! lock, no locked instruction and no cache line shared between worker threads on the way
//! of a message.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};

use crate::codec::ProtocolVersion;

/// Every counter the broker keeps. Labelled series are separate counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum C {
    /// PUBLISH packets received from clients, by QoS.
    ReceivedQos0,
    /// See [`C::ReceivedQos0`].
    ReceivedQos1,
    /// See [`C::ReceivedQos0`].
    ReceivedQos2,
    /// Payload bytes of the PUBLISH packets received, by QoS.
    ReceivedBytesQos0,
    /// See [`C::ReceivedBytesQos0`].
    ReceivedBytesQos1,
    /// See [`C::ReceivedBytesQos0`].
    ReceivedBytesQos2,
    /// PUBLISH packets sent to clients, by QoS.
    SentQos0,
    /// See [`C::SentQos0`].
    SentQos1,
    /// See [`C::SentQos0`].
    SentQos2,
    /// Payload bytes of the PUBLISH packets sent, by QoS.
    SentBytesQos0,
    /// See [`C::SentBytesQos0`].
    SentBytesQos1,
    /// See [`C::SentBytesQos0`].
    SentBytesQos2,
    /// Messages dropped for a session whose queue was full.
    DroppedQueueFull,
    /// Messages dropped because they expired before delivery.
    DroppedExpired,
    /// Messages dropped because they exceeded a client's Maximum Packet Size.
    DroppedTooLarge,
    /// Messages a plugin dropped (transform or deliver).
    DroppedPlugin,
    /// Messages routed to no subscriber (and not retained).
    DroppedNoSubscriber,
    /// TCP connections accepted.
    Accepted,
    /// Clients whose CONNECT was accepted (CONNACK 0).
    Connected,
    /// Authentications a plugin or a certificate accepted.
    AuthSuccess,
    /// Authentications refused (bad user name or password, not authorized).
    AuthFailure,
    /// TLS handshakes that failed.
    TlsFailures,
    /// Connections closed for their keep alive.
    KeepAliveTimeouts,
    /// Connections refused before or at CONNACK, by reason (see [`REFUSALS`]).
    RefusedProtocol,
    /// See [`C::RefusedProtocol`].
    RefusedIdentifier,
    /// See [`C::RefusedProtocol`].
    RefusedUnavailable,
    /// See [`C::RefusedProtocol`].
    RefusedAuthentication,
    /// See [`C::RefusedProtocol`].
    RefusedNotAuthorized,
    /// See [`C::RefusedProtocol`].
    RefusedLimits,
    /// See [`C::RefusedProtocol`].
    RefusedOther,
    /// Times a publisher was held back for a congested subscriber.
    BackpressureWaits,
    /// Subscribers marked slow (their queue stayed full past the back-pressure timeout).
    SlowSubscribers,
    /// Store commits.
    StoreCommits,
    /// Store operations (records) committed.
    StoreRecords,
    /// Commits that failed (and are retried).
    StoreWriteErrors,
    /// Messages queued for sessions (a gauge: the sum of signed changes).
    QueuedMessages,
    /// Bytes of the messages queued for sessions (a gauge, as above).
    QueuedBytes,
    /// QoS 1/2 messages sent to clients and not yet acknowledged (a gauge, as above).
    InFlight,
    /// Plugin events dropped because the events queue was full.
    PluginEventsDropped,
    /// Messages published by plugins dropped because their queue was full.
    PluginPublishDropped,
}

/// How many counters there are.
const COUNT: usize = C::PluginPublishDropped as usize + 1;

/// The refusal counters with the `reason` label they carry.
pub const REFUSALS: [(C, &str); 7] = [
    (C::RefusedProtocol, "protocol"),
    (C::RefusedIdentifier, "client_identifier"),
    (C::RefusedUnavailable, "server_unavailable"),
    (C::RefusedAuthentication, "bad_credentials"),
    (C::RefusedNotAuthorized, "not_authorized"),
    (C::RefusedLimits, "limits"),
    (C::RefusedOther, "other"),
];

/// Rows of counters. A thread that counts takes a row of its own while one is free and
/// adds to it with a plain load and store (no locked instruction on the way of a message);
/// it gives the row back when it ends, and the next thread to take it goes on from its
/// sums. Threads that find no row free share the last one, with atomic adds.
const SHARDS: usize = 16;

/// The row shared by threads that found none free.
const SHARED: usize = SHARDS - 1;

/// One row of counters, on cache lines of its own.
#[repr(align(128))]
struct Shard([AtomicU64; COUNT]);

static ROWS: [Shard; SHARDS] = [const { Shard([const { AtomicU64::new(0) }; COUNT]) }; SHARDS];

/// The rows no thread owns, as bits (row `i` is bit `i`; the shared row has none).
static FREE: AtomicU32 = AtomicU32::new((1 << SHARED) - 1);

/// The row a thread counts in, given back when the thread ends.
struct Owned(usize);

impl Owned {
    fn claim() -> Owned {
        let mut free = FREE.load(Ordering::Relaxed);
        while free != 0 {
            let i = free.trailing_zeros();
            // Acquire: what the row's previous owner stored is seen before adding to it.
            match FREE.compare_exchange_weak(
                free,
                free & !(1 << i),
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Owned(i as usize),
                Err(now) => free = now,
            }
        }
        Owned(SHARED)
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        if self.0 < SHARED {
            // Release: the next owner sees this thread's last stores.
            FREE.fetch_or(1 << self.0, Ordering::Release);
        }
    }
}

thread_local! {
    static MY_SHARD: Owned = Owned::claim();
}

static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Time since the process started counting (the first call, made at start).
pub fn uptime() -> std::time::Duration {
    STARTED.get_or_init(std::time::Instant::now).elapsed()
}

/// Adds `n` to counter `c`.
#[inline]
pub fn add(c: C, n: u64) {
    // A thread whose row is gone (its thread-locals being destroyed) counts in the shared one.
    let shard = MY_SHARD.try_with(|s| s.0).unwrap_or(SHARED);
    let Some(cell) = ROWS.get(shard).and_then(|row| row.0.get(c as usize)) else {
        return;
    };
    if shard == SHARED {
        cell.fetch_add(n, Ordering::Relaxed);
    } else {
        // This thread alone writes its row: a plain load and store cannot lose an add.
        cell.store(
            cell.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }
}

/// Adds one to counter `c`.
#[inline]
pub fn inc(c: C) {
    add(c, 1);
}

/// The value of gauge `c`, kept as wrapping signed changes (see [`C::QueuedMessages`]).
pub fn gauge(c: C) -> i64 {
    get(c) as i64
}

/// The value of counter `c` (the sum of its shards).
pub fn get(c: C) -> u64 {
    ROWS.iter()
        .filter_map(|row| row.0.get(c as usize))
        .fold(0u64, |sum, cell| {
            sum.wrapping_add(cell.load(Ordering::Relaxed))
        })
}

/// The received-messages counter for a QoS.
pub fn received(qos: crate::codec::QoS) -> C {
    match qos {
        crate::codec::QoS::AtMostOnce => C::ReceivedQos0,
        crate::codec::QoS::AtLeastOnce => C::ReceivedQos1,
        crate::codec::QoS::ExactlyOnce => C::ReceivedQos2,
    }
}

/// The sent-messages counter for a QoS.
pub fn sent(qos: crate::codec::QoS) -> C {
    match qos {
        crate::codec::QoS::AtMostOnce => C::SentQos0,
        crate::codec::QoS::AtLeastOnce => C::SentQos1,
        crate::codec::QoS::ExactlyOnce => C::SentQos2,
    }
}

/// The received-payload-bytes counter for a QoS.
pub fn received_bytes(qos: crate::codec::QoS) -> C {
    match qos {
        crate::codec::QoS::AtMostOnce => C::ReceivedBytesQos0,
        crate::codec::QoS::AtLeastOnce => C::ReceivedBytesQos1,
        crate::codec::QoS::ExactlyOnce => C::ReceivedBytesQos2,
    }
}

/// The sent-payload-bytes counter for a QoS.
pub fn sent_bytes(qos: crate::codec::QoS) -> C {
    match qos {
        crate::codec::QoS::AtMostOnce => C::SentBytesQos0,
        crate::codec::QoS::AtLeastOnce => C::SentBytesQos1,
        crate::codec::QoS::ExactlyOnce => C::SentBytesQos2,
    }
}

/// The refusal counter for a CONNACK reason code.
pub fn refusal(code: crate::codec::ReasonCode) -> C {
    use crate::codec::ReasonCode as R;
    match code {
        R::UnsupportedProtocolVersion | R::ProtocolError | R::MalformedPacket => C::RefusedProtocol,
        R::ClientIdentifierNotValid => C::RefusedIdentifier,
        R::ServerUnavailable | R::ServerBusy | R::ServerShuttingDown => C::RefusedUnavailable,
        R::BadUserNameOrPassword | R::BadAuthenticationMethod => C::RefusedAuthentication,
        R::NotAuthorized | R::Banned => C::RefusedNotAuthorized,
        R::QuotaExceeded | R::ConnectionRateExceeded | R::PacketTooLarge => C::RefusedLimits,
        _ => C::RefusedOther,
    }
}

/// A histogram of durations with fixed buckets (seconds), for one writer at a time or a
/// few (the store's writer thread, plugin calls).
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

/// Upper bounds of the buckets, in seconds.
pub const BOUNDS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

impl Histogram {
    /// An empty histogram.
    pub const fn new() -> Histogram {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; BOUNDS.len()],
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Counts one duration.
    pub fn observe(&self, d: std::time::Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BOUNDS.iter().position(|b| s <= *b)
            && let Some(b) = self.buckets.get(i)
        {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Cumulative bucket counts (one per bound), the count and the sum in seconds.
    pub fn snapshot(&self) -> (Vec<u64>, u64, f64) {
        let mut acc = 0;
        let cumulative = (self.buckets.iter())
            .map(|b| {
                acc += b.load(Ordering::Relaxed);
                acc
            })
            .collect();
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (cumulative, self.count.load(Ordering::Relaxed), sum)
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

/// How long each store commit took (the fsync included, with `durability = "sync"`).
pub static STORE_COMMIT: Histogram = Histogram::new();

static LOG_DROPS: std::sync::OnceLock<tracing_appender::non_blocking::ErrorCounter> =
    std::sync::OnceLock::new();

/// Where the log writer counts the lines it dropped.
pub fn set_log_drops(counter: tracing_appender::non_blocking::ErrorCounter) {
    let _ = LOG_DROPS.set(counter);
}

/// Log lines dropped because standard error was not read fast enough.
pub fn log_lines_dropped() -> u64 {
    LOG_DROPS.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Plugin loads, replacements, refusals and removals, by plugin and result.
static RELOADS: std::sync::Mutex<BTreeMap<(String, &'static str), u64>> =
    std::sync::Mutex::new(BTreeMap::new());

/// Counts a plugin reload with `result` (loaded, replaced, refused, removed).
pub fn reloaded(plugin: &str, result: &'static str) {
    let mut m = RELOADS.lock().unwrap_or_else(|p| p.into_inner());
    *m.entry((plugin.to_owned(), result)).or_insert(0) += 1;
}

/// The reload counts: (plugin, result, count).
pub fn reloads() -> Vec<(String, &'static str, u64)> {
    let m = RELOADS.lock().unwrap_or_else(|p| p.into_inner());
    m.iter().map(|((p, r), n)| (p.clone(), *r, *n)).collect()
}

/// Connections open, by listener and protocol version. Changed once per connection and
/// close, never per packet.
/// The open connections' gauges by (listener, protocol).
type OpenGauges = BTreeMap<(Arc<str>, &'static str), Arc<AtomicI64>>;

static OPEN: std::sync::Mutex<OpenGauges> = std::sync::Mutex::new(BTreeMap::new());

fn open_map() -> std::sync::MutexGuard<'static, OpenGauges> {
    // Each critical section is one map update: a poisoned lock is still sound.
    OPEN.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts one open connection until dropped: a pointer to its (listener, protocol)
/// gauge, 8 bytes in every connection.
#[derive(Debug)]
pub struct OpenConnection {
    gauge: Arc<AtomicI64>,
}

/// Makes the series of `listener` and `version` exist (at 0) before any client connects.
pub fn expect_connections(listener: &Arc<str>, version: ProtocolVersion) {
    open_map()
        .entry((listener.clone(), protocol_label(version)))
        .or_default();
}

/// Counts a connection open on `listener` with `version`, until the guard is dropped.
pub fn open(listener: &Arc<str>, version: ProtocolVersion) -> OpenConnection {
    let gauge = open_map()
        .entry((listener.clone(), protocol_label(version)))
        .or_default()
        .clone();
    gauge.fetch_add(1, Ordering::Relaxed);
    let now = CONNECTED.fetch_add(1, Ordering::Relaxed) + 1;
    MAX_CONNECTED.fetch_max(now, Ordering::Relaxed);
    OpenConnection { gauge }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.gauge.fetch_sub(1, Ordering::Relaxed);
        CONNECTED.fetch_sub(1, Ordering::Relaxed);
    }
}

static CONNECTED: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
static MAX_CONNECTED: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// Clients connected now, and the most connected at once since start.
pub fn connected() -> (i64, i64) {
    (
        CONNECTED.load(Ordering::Relaxed),
        MAX_CONNECTED.load(Ordering::Relaxed),
    )
}

/// The open connections by (listener, protocol).
pub fn open_connections() -> Vec<(Arc<str>, &'static str, i64)> {
    open_map()
        .iter()
        .map(|((l, p), n)| (l.clone(), *p, n.load(Ordering::Relaxed)))
        .collect()
}

/// The `protocol` label of a version.
pub fn protocol_label(v: ProtocolVersion) -> &'static str {
    match v {
        ProtocolVersion::V3_1 => "3.1",
        ProtocolVersion::V3_1_1 => "3.1.1",
        ProtocolVersion::V5 => "5.0",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_many_threads_add_up() {
        // More threads at once than rows (some share the last one), then as many again
        // taking over the rows the first ones gave back: no add is lost. No other test
        // counts plugin publishes dropped.
        let before = get(C::PluginPublishDropped);
        for _wave in 0..2 {
            let start = std::sync::Arc::new(std::sync::Barrier::new(24));
            let threads: Vec<_> = (0..24)
                .map(|_| {
                    let start = start.clone();
                    std::thread::spawn(move || {
                        start.wait();
                        for _ in 0..10_000 {
                            inc(C::PluginPublishDropped);
                        }
                    })
                })
                .collect();
            for t in threads {
                assert!(t.join().is_ok());
            }
        }
        assert_eq!(get(C::PluginPublishDropped) - before, 480_000);
    }
}
