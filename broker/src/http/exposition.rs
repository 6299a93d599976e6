//! `/metrics`: the broker's counters and gauges in the Prometheus text exposition format
//! (version 0.0.4), names and units by Prometheus conventions.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use crate::broker::Broker;
use crate::metrics::{self, BOUNDS, C, Histogram, REFUSALS};

/// Writes one family's HELP and TYPE lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// One unlabelled sample.
fn sample(out: &mut String, name: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "{name} {value}");
}

/// A label value, escaped (backslash, double quote, new line).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn counter(out: &mut String, name: &str, help: &str, c: C) {
    family(out, name, "counter", help);
    sample(out, name, metrics::get(c));
}

fn gauge(out: &mut String, name: &str, help: &str, v: impl std::fmt::Display) {
    single(out, name, "gauge", help, v);
}

/// A family of one unlabelled sample.
fn single(out: &mut String, name: &str, kind: &str, help: &str, v: impl std::fmt::Display) {
    family(out, name, kind, help);
    sample(out, name, v);
}

fn by_label(out: &mut String, name: &str, kind: &str, help: &str, key: &str, rows: &[(&str, u64)]) {
    family(out, name, kind, help);
    for (v, n) in rows {
        let _ = writeln!(out, "{name}{{{key}=\"{}\"}} {n}", label(v));
    }
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    family(out, name, "histogram", help);
    let (buckets, count, sum) = h.snapshot();
    for (bound, n) in BOUNDS.iter().zip(buckets) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum {sum}");
    let _ = writeln!(out, "{name}_count {count}");
}

/// The whole exposition.
pub(super) fn render(broker: &Broker) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let o = &mut out;

    // Connections.
    family(
        o,
        "sandpiper_connections_open",
        "gauge",
        "Client connections past CONNACK, by listener and protocol version.",
    );
    for (listener, protocol, n) in metrics::open_connections() {
        let _ = writeln!(
            o,
            "sandpiper_connections_open{{listener=\"{}\",protocol=\"{protocol}\"}} {n}",
            label(&listener)
        );
    }
    family(
        o,
        "sandpiper_connections_parked",
        "gauge",
        "Idle plain TCP connections waiting without a task (in the park's epoll set).",
    );
    let _ = writeln!(
        o,
        "sandpiper_connections_parked {}",
        crate::connection::park::parked()
    );
    counter(
        o,
        "sandpiper_connections_accepted_total",
        "TCP connections accepted, on every listener.",
        C::Accepted,
    );
    counter(
        o,
        "sandpiper_connections_connected_total",
        "Clients whose CONNECT was accepted.",
        C::Connected,
    );
    let refused: Vec<(&str, u64)> = REFUSALS
        .iter()
        .map(|(c, r)| (*r, metrics::get(*c)))
        .collect();
    by_label(
        o,
        "sandpiper_connections_refused_total",
        "counter",
        "Connections refused before or at CONNACK, by reason.",
        "reason",
        &refused,
    );
    by_label(
        o,
        "sandpiper_authentications_total",
        "counter",
        "Authentications by a plugin or a client certificate, by result.",
        "result",
        &[
            ("success", metrics::get(C::AuthSuccess)),
            ("failure", metrics::get(C::AuthFailure)),
        ],
    );
    counter(
        o,
        "sandpiper_tls_handshake_failures_total",
        "TLS handshakes that failed or timed out.",
        C::TlsFailures,
    );
    counter(
        o,
        "sandpiper_keepalive_timeouts_total",
        "Connections closed because the client was silent past its keep alive.",
        C::KeepAliveTimeouts,
    );

    // Messages.
    let qos = |a: C, b: C, c: C| {
        [
            ("0", metrics::get(a)),
            ("1", metrics::get(b)),
            ("2", metrics::get(c)),
        ]
    };
    by_label(
        o,
        "sandpiper_messages_received_total",
        "counter",
        "PUBLISH packets received from clients, by QoS.",
        "qos",
        &qos(C::ReceivedQos0, C::ReceivedQos1, C::ReceivedQos2),
    );
    by_label(
        o,
        "sandpiper_messages_sent_total",
        "counter",
        "PUBLISH packets sent to clients, by QoS.",
        "qos",
        &qos(C::SentQos0, C::SentQos1, C::SentQos2),
    );
    by_label(
        o,
        "sandpiper_received_payload_bytes_total",
        "counter",
        "Payload bytes of the PUBLISH packets received, by QoS.",
        "qos",
        &qos(
            C::ReceivedBytesQos0,
            C::ReceivedBytesQos1,
            C::ReceivedBytesQos2,
        ),
    );
    by_label(
        o,
        "sandpiper_sent_payload_bytes_total",
        "counter",
        "Payload bytes of the PUBLISH packets sent, by QoS.",
        "qos",
        &qos(C::SentBytesQos0, C::SentBytesQos1, C::SentBytesQos2),
    );
    by_label(
        o,
        "sandpiper_messages_dropped_total",
        "counter",
        "Messages dropped, by reason.",
        "reason",
        &[
            ("queue_full", metrics::get(C::DroppedQueueFull)),
            ("expired", metrics::get(C::DroppedExpired)),
            ("too_large", metrics::get(C::DroppedTooLarge)),
            ("plugin", metrics::get(C::DroppedPlugin)),
            ("no_subscriber", metrics::get(C::DroppedNoSubscriber)),
        ],
    );
    let (retained, retained_bytes) = broker.router.retained_size();
    gauge(
        o,
        "sandpiper_retained_messages",
        "Retained messages held.",
        retained,
    );
    gauge(
        o,
        "sandpiper_retained_bytes",
        "Topic and payload bytes of the retained messages held.",
        retained_bytes,
    );
    let (subscriptions, groups) = broker.router.subscription_counts();
    gauge(
        o,
        "sandpiper_subscriptions",
        "Subscriptions held (a shared subscription once per member).",
        subscriptions,
    );
    gauge(
        o,
        "sandpiper_shared_groups",
        "Shared subscription groups.",
        groups,
    );

    // Sessions.
    let (online, offline) = broker.sessions.counts();
    by_label(
        o,
        "sandpiper_sessions",
        "gauge",
        "Sessions, with a connection (online) or kept for a client that is away (offline).",
        "state",
        &[("online", online as u64), ("offline", offline as u64)],
    );
    gauge(
        o,
        "sandpiper_queued_messages",
        "Messages queued for sessions, online and offline (on disk too), not yet in flight.",
        metrics::gauge(C::QueuedMessages),
    );
    gauge(
        o,
        "sandpiper_queued_bytes",
        "Topic and payload bytes of the queued messages.",
        metrics::gauge(C::QueuedBytes),
    );
    gauge(
        o,
        "sandpiper_inflight_messages",
        "QoS 1/2 messages sent to clients (or owed to offline sessions) and not yet acknowledged.",
        metrics::gauge(C::InFlight),
    );
    counter(
        o,
        "sandpiper_backpressure_waits_total",
        "Times a publisher was held back for a congested subscriber.",
        C::BackpressureWaits,
    );
    counter(
        o,
        "sandpiper_slow_subscribers_total",
        "Subscribers marked slow: their queue stayed full past the back-pressure timeout.",
        C::SlowSubscribers,
    );

    // Store.
    counter(
        o,
        "sandpiper_store_commits_total",
        "Store commits.",
        C::StoreCommits,
    );
    counter(
        o,
        "sandpiper_store_records_total",
        "Records (operations) committed to the store.",
        C::StoreRecords,
    );
    counter(
        o,
        "sandpiper_store_write_errors_total",
        "Store commits that failed (each is retried).",
        C::StoreWriteErrors,
    );
    histogram(
        o,
        "sandpiper_store_commit_duration_seconds",
        "Time each store commit took, its fsync included.",
        &metrics::STORE_COMMIT,
    );
    let db = broker.config.store.data_dir.join("sandpiper.redb");
    let size = std::fs::metadata(db).map(|m| m.len()).unwrap_or(0);
    gauge(
        o,
        "sandpiper_store_size_bytes",
        "Size of the database file.",
        size,
    );

    // Plugins.
    plugins(o, broker);
    counter(
        o,
        "sandpiper_plugin_events_dropped_total",
        "Plugin events dropped because the events queue was full.",
        C::PluginEventsDropped,
    );
    counter(
        o,
        "sandpiper_plugin_publish_dropped_total",
        "Messages published by plugins dropped because their queue was full.",
        C::PluginPublishDropped,
    );

    single(
        o,
        "sandpiper_log_lines_dropped_total",
        "counter",
        "Log lines dropped because standard error was not read fast enough.",
        metrics::log_lines_dropped() as f64,
    );
    let ready = u8::from(broker.ready().is_empty());
    gauge(
        o,
        "sandpiper_ready",
        "1 while /readyz answers 200 (the store writes, every listener is bound, every required plugin serves), else 0.",
        ready,
    );
    process(o);
    out
}

/// Per plugin: its version, calls and their duration per hook, failures by kind, idle
/// instances, reloads, sink queues, and what the plugin counts itself.
fn plugins(o: &mut String, broker: &Broker) {
    let chain = broker.plugins.chain();
    family(
        o,
        "sandpiper_plugin_info",
        "gauge",
        "A loaded plugin (always 1): its hooks and version (the SHA-256 of its component, first 12 hex digits).",
    );
    for p in &chain.plugins {
        let _ = writeln!(
            o,
            "sandpiper_plugin_info{{plugin=\"{}\",hooks=\"{}\",version=\"{}\"}} 1",
            label(&p.name),
            p.hooks.names().join(","),
            p.version
        );
    }
    family(
        o,
        "sandpiper_plugin_calls_total",
        "counter",
        "Calls of a plugin's hook, failed ones included.",
    );
    for p in &chain.plugins {
        for (hook, h) in p.stats.hooks(p.hooks) {
            let _ = writeln!(
                o,
                "sandpiper_plugin_calls_total{{plugin=\"{}\",hook=\"{hook}\"}} {}",
                label(&p.name),
                h.calls.load(Ordering::Relaxed)
            );
        }
    }
    let name = "sandpiper_plugin_call_duration_seconds";
    family(
        o,
        name,
        "histogram",
        "How long each call of a plugin's hook took.",
    );
    for p in &chain.plugins {
        for (hook, h) in p.stats.hooks(p.hooks) {
            let labels = format!("plugin=\"{}\",hook=\"{hook}\"", label(&p.name));
            let (buckets, count, sum) = h.duration.snapshot();
            for (bound, n) in BOUNDS.iter().zip(buckets) {
                let _ = writeln!(o, "{name}_bucket{{{labels},le=\"{bound}\"}} {n}");
            }
            let _ = writeln!(o, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
            let _ = writeln!(o, "{name}_sum{{{labels}}} {sum}");
            let _ = writeln!(o, "{name}_count{{{labels}}} {count}");
        }
    }
    family(
        o,
        "sandpiper_plugin_failures_total",
        "counter",
        "Calls of a plugin that failed, by reason: timeout (time budget), trap, memory, panic, answer (one the broker cannot use).",
    );
    for p in &chain.plugins {
        for (reason, n) in p.stats.failures() {
            let _ = writeln!(
                o,
                "sandpiper_plugin_failures_total{{plugin=\"{}\",reason=\"{reason}\"}} {n}",
                label(&p.name)
            );
        }
    }
    family(
        o,
        "sandpiper_plugin_instances",
        "gauge",
        "Idle instances of a plugin, ready for a call.",
    );
    for p in &chain.plugins {
        let _ = writeln!(
            o,
            "sandpiper_plugin_instances{{plugin=\"{}\"}} {}",
            label(&p.name),
            p.idle_instances()
        );
    }
    family(
        o,
        "sandpiper_plugin_memory_bytes",
        "gauge",
        "Linear memory the plugin's live instances hold.",
    );
    for p in &chain.plugins {
        let _ = writeln!(
            o,
            "sandpiper_plugin_memory_bytes{{plugin=\"{}\"}} {}",
            label(&p.name),
            p.memory_bytes()
        );
    }
    family(
        o,
        "sandpiper_plugin_reloads_total",
        "counter",
        "Plugin versions loaded, replaced, refused or removed, by plugin and result.",
    );
    for (plugin, result, n) in metrics::reloads() {
        let _ = writeln!(
            o,
            "sandpiper_plugin_reloads_total{{plugin=\"{}\",result=\"{result}\"}} {n}",
            label(&plugin)
        );
    }
    let sinks = broker.plugins.sink_queues();
    let per_sink = |o: &mut String,
                    name: &str,
                    kind: &str,
                    help: &str,
                    f: &dyn Fn(&crate::plugins::sink::SinkQueue) -> String| {
        family(o, name, kind, help);
        for q in &sinks {
            let _ = writeln!(o, "{name}{{plugin=\"{}\"}} {}", label(q.name()), f(q));
        }
    };
    per_sink(
        o,
        "sandpiper_sink_queue_records",
        "gauge",
        "Records waiting in a sink's durable queue.",
        &|q| q.stats.depth.load(Ordering::Relaxed).to_string(),
    );
    per_sink(
        o,
        "sandpiper_sink_oldest_record_age_seconds",
        "gauge",
        "How long the oldest record in a sink's queue has waited.",
        &|q| q.oldest_age().as_secs().to_string(),
    );
    per_sink(
        o,
        "sandpiper_sink_delivered_total",
        "counter",
        "Records a sink plugin accepted.",
        &|q| q.stats.delivered.load(Ordering::Relaxed).to_string(),
    );
    per_sink(
        o,
        "sandpiper_sink_retries_total",
        "counter",
        "Batches offered to a sink again after a failure.",
        &|q| q.stats.retried.load(Ordering::Relaxed).to_string(),
    );
    per_sink(
        o,
        "sandpiper_sink_dropped_total",
        "counter",
        "Records dropped because a sink's queue was full.",
        &|q| q.stats.dropped.load(Ordering::Relaxed).to_string(),
    );
    bridges(o, broker);
    cluster(o, broker);
    // What plugins count themselves (the `metrics` host import). A name that would repeat
    // a family already written (the broker's own, or another plugin's after `-` became
    // `_`) is left out: a repeated family fails the whole scrape.
    let mut written: std::collections::HashSet<String> = (o.lines())
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    for p in &chain.plugins {
        let mut own = p.metrics();
        own.sort();
        for (metric, v) in own {
            let name = format!(
                "sandpiper_plugin_{}_{}",
                metric_part(&p.name),
                metric_part(&metric)
            );
            let taken = ["_bucket", "_sum", "_count", "_total"]
                .iter()
                .any(|s| name.strip_suffix(s).is_some_and(|f| written.contains(f)));
            if taken || !written.insert(name.clone()) {
                tracing::debug!(plugin = %p.name, metric, "plugin metric not exported: its name is taken");
                continue;
            }
            family(o, &name, "untyped", "Counted by the plugin itself.");
            sample(o, &name, v);
        }
    }
}

/// A name made safe for a metric name: letters, digits and `_`.
fn metric_part(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// The standard process metrics, read from /proc (Linux).
fn process(o: &mut String) {
    let ticks = 100.0; // USER_HZ on Linux
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        && let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r)
    {
        // Fields after the command name: state is field 3; utime 14, stime 15, starttime 22.
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| {
            f.get(i - 3)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        single(
            o,
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent, in seconds.",
            (num(14) + num(15)) / ticks,
        );
        if let Some(boot) = boot_time() {
            single(
                o,
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since the Unix epoch, in seconds.",
                boot + num(22) / ticks,
            );
        }
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status")
        && let Some(kb) = (status.lines())
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    {
        gauge(
            o,
            "process_resident_memory_bytes",
            "Resident memory size, in bytes.",
            kb * 1024,
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        gauge(o, "process_open_fds", "Open file descriptors.", fds.count());
    }
}

/// The system's boot time (seconds since the epoch), from /proc/stat.
fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The cluster link's state and counters (a cluster node only).
fn cluster(o: &mut String, broker: &Broker) {
    let Some(c) = &broker.cluster else {
        return;
    };
    let (connected, nodes, filters) = c.summary();
    gauge(
        o,
        "sandpiper_cluster_connected",
        "1 while this node is connected to NATS, else 0.",
        u8::from(connected),
    );
    gauge(
        o,
        "sandpiper_cluster_nodes",
        "Other nodes of the cluster heard from within node_timeout_ms.",
        nodes,
    );
    gauge(
        o,
        "sandpiper_cluster_filters",
        "Distinct filters this node's clients subscribe to (what the other nodes send it).",
        filters,
    );
    family(
        o,
        "sandpiper_cluster_node_filters",
        "gauge",
        "Filters another node's clients subscribe to, as this node knows them.",
    );
    for (node, n) in c.nodes() {
        let _ = writeln!(
            o,
            "sandpiper_cluster_node_filters{{node=\"{}\"}} {n}",
            label(&node)
        );
    }
    let s = &c.stats;
    let rows = [
        (
            "sandpiper_cluster_sent_total",
            "Messages sent to other nodes (one per node that wants it; QoS 1/2 once JetStream holds them).",
            &s.sent,
        ),
        (
            "sandpiper_cluster_received_total",
            "Messages received from other nodes.",
            &s.received,
        ),
        (
            "sandpiper_cluster_dropped_total",
            "Messages for other nodes dropped (queue full, NATS away, refused by NATS as too large).",
            &s.dropped,
        ),
        (
            "sandpiper_cluster_damaged_total",
            "Messages from other nodes that could not be read.",
            &s.damaged,
        ),
        (
            "sandpiper_cluster_refused_total",
            "QoS 1/2 messages refused because JetStream could not hold them for other nodes (NATS away, its queue full).",
            &s.refused,
        ),
        (
            "sandpiper_cluster_claims_dropped_total",
            "Connections attached here that the other nodes were not told of (their queue full): an older connection with the same client id elsewhere stays open.",
            &s.claims_dropped,
        ),
    ];
    for (name, help, v) in rows {
        single(o, name, "counter", help, v.load(Ordering::Relaxed));
    }
}

/// Every bridge's state and counters, labelled by bridge name.
fn bridges(o: &mut String, broker: &Broker) {
    let list = broker.bridges.list();
    if list.is_empty() {
        return;
    }
    type Figure = fn(&crate::bridge::Bridge) -> u64;
    let rows: [(&str, &str, &str, Figure); 6] = [
        (
            "sandpiper_bridge_connected",
            "gauge",
            "1 while a bridge is connected to its remote, else 0.",
            |b| u64::from(b.stats.connected.load(Ordering::Relaxed)),
        ),
        (
            "sandpiper_bridge_queued_messages",
            "gauge",
            "QoS 1/2 messages in a bridge's durable outbound queue (in flight included).",
            |b| b.queued(),
        ),
        (
            "sandpiper_bridge_sent_total",
            "counter",
            "Messages a bridge sent to its remote (acknowledged, for QoS 1/2).",
            |b| b.stats.sent.load(Ordering::Relaxed),
        ),
        (
            "sandpiper_bridge_received_total",
            "counter",
            "Messages a bridge received from its remote.",
            |b| b.stats.received.load(Ordering::Relaxed),
        ),
        (
            "sandpiper_bridge_dropped_total",
            "counter",
            "Outbound messages a bridge dropped (queue full, QoS 0 while away, expired, too large).",
            |b| b.stats.dropped.load(Ordering::Relaxed),
        ),
        (
            "sandpiper_bridge_reconnects_total",
            "counter",
            "Connections of a bridge lost or refused.",
            |b| b.stats.reconnects.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, f) in rows {
        family(o, name, kind, help);
        for b in list {
            let _ = writeln!(o, "{name}{{bridge=\"{}\"}} {}", label(b.name()), f(b));
        }
    }
}
