//! Process-wide counters. Plain atomics: cheap enough to bump on the hot path.

use std::sync::atomic::AtomicU64;

/// The broker's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Messages dropped because a session queue was full.
    pub queue_dropped: AtomicU64,
    /// Messages dropped because they exceeded a client's Maximum Packet Size.
    pub too_large_dropped: AtomicU64,
    /// Messages dropped because they expired before delivery.
    pub expired_dropped: AtomicU64,
    /// PUBLISH packets received from clients.
    pub publish_received: AtomicU64,
    /// PUBLISH packets sent to clients.
    pub publish_sent: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Plugin calls that failed (trap, timeout, memory cap, wrong answer).
    pub plugin_failures: AtomicU64,
    /// Plugin events dropped because the events queue was full.
    pub plugin_events_dropped: AtomicU64,
    /// Messages published by plugins dropped because their queue was full.
    pub plugin_publish_dropped: AtomicU64,
}

/// The counters of this process.
pub static METRICS: Metrics = Metrics {
    queue_dropped: AtomicU64::new(0),
    too_large_dropped: AtomicU64::new(0),
    expired_dropped: AtomicU64::new(0),
    publish_received: AtomicU64::new(0),
    publish_sent: AtomicU64::new(0),
    connections: AtomicU64::new(0),
    plugin_failures: AtomicU64::new(0),
    plugin_events_dropped: AtomicU64::new(0),
    plugin_publish_dropped: AtomicU64::new(0),
};
