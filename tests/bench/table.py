#!/usr/bin/env python3
"""Turns the JSON lines of tests/bench/compare into Markdown tables: a summary with the
issue-6 targets, then every figure of every run with the ratios Sandpiper/Mosquitto (S/M)
and Sandpiper/NATS (S/N).

    python3 tests/bench/table.py results.jsonl
"""

import json
import sys

BROKERS = ["sandpiper", "mosquitto", "nats"]

TITLES = {
    "fan-in-q0": "fan-in QoS 0, 4 publishers → 1 wildcard subscriber",
    "fan-in-q1": "fan-in QoS 1, P=4, window 64",
    "fan-in-q2": "fan-in QoS 2, P=4, window 64",
    "fan-out-q0": "fan-out QoS 0, 1 publisher → 16 subscribers",
    "p2p-q1": "point-to-point QoS 1, 16 pairs, window 64",
    "p2p-q1-16k": "point-to-point QoS 1, 16 pairs, window 16, 16 KiB payloads",
    "fan-in-q1-1m": "fan-in QoS 1, P=4, window 4, 1 MiB payloads",
    "fan-in-q1-persistent": "fan-in QoS 1, P=4, window 64, to a persistent session",
    "latency-q0": "latency QoS 0 at 1,000 msg/s",
    "latency-q1": "latency QoS 1 at 1,000 msg/s",
    "connections": "idle connections opened at 2,000/s",
    "subscriptions-1m": "1,000,000 subscriptions (topic names), 1,000 clients; QoS 0 to random topics",
    "subscriptions-1m-wild": "1,000,000 wildcard subscriptions (a/+/b/#), 1,000 clients; QoS 0 to random topics",
}

FLOW = [
    ("msgs_per_s", "delivered msg/s"),
    ("mb_per_s", "delivered payload MB/s"),
    ("sent_per_s", "published msg/s"),
    ("expected", "deliveries expected"),
    ("received", "deliveries received"),
    ("missing", "never delivered"),
    ("lost", "lost (acknowledged, never delivered)"),
    ("dup", "duplicates"),
    ("reordered", "out of order"),
    ("unacked", "unacknowledged at the end"),
    ("lat_p50_us", "latency p50 µs"),
    ("lat_p99_us", "latency p99 µs"),
    ("lat_p999_us", "latency p99.9 µs"),
    ("lat_max_us", "latency max µs"),
]

CONNECTIONS = [
    ("connections", "connections tried"),
    ("ok", "connected"),
    ("failed", "failed"),
    ("closed_while_idle", "closed by the broker while idle"),
    ("connects_per_s", "connects/s achieved"),
    ("connect_p50_us", "CONNECT→CONNACK p50 µs"),
    ("connect_p99_us", "CONNECT→CONNACK p99 µs"),
    ("connect_max_us", "CONNECT→CONNACK max µs"),
    ("rss_before_kib", "broker RSS before, KiB"),
    ("rss_after_kib", "broker RSS with connections, KiB"),
    ("rss_per_conn_bytes", "broker RSS per connection, bytes"),
]

SUBSCRIPTIONS = [
    ("subscriptions", "subscriptions"),
    ("refused", "refused"),
    ("subscribes_per_s", "subscriptions made per second"),
    ("rss_before_kib", "broker RSS before, KiB"),
    ("rss_after_kib", "broker RSS with the subscriptions, KiB"),
    ("rss_per_sub_bytes", "broker RSS per subscription, bytes (connections included)"),
    ("sent_per_s", "published msg/s"),
    ("msgs_per_s", "routed (delivered) msg/s"),
]

# Issue 6, point 4: (figure, sandpiper/mosquitto at least, sandpiper/nats at least, zero
# counts required). Latency targets compare p99 the other way round.
TARGETS = {
    "fan-in-q0": ("msgs_per_s", 4.0, 1.0, []),
    "fan-in-q1": ("msgs_per_s", 3.5, None, ["lost"]),
    "fan-in-q2": ("msgs_per_s", 3.0, None, ["lost", "dup"]),
    "fan-out-q0": ("msgs_per_s", 8.0, None, []),
    "p2p-q1": ("msgs_per_s", 5.0, None, []),
}


def num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt(v, key=""):
    if v is None:
        return "–"
    if not num(v):
        return str(v)
    if key.endswith("_us") or key == "mb_per_s":
        return f"{v:,.1f}".replace(",", " ")
    return f"{v:,.0f}".replace(",", " ")


def ratio(a, b):
    if num(a) and num(b) and b != 0:
        return f"{a / b:.2f}"
    return "–"


def cell(run, key):
    if run is None:
        return "–"
    if run.get("unsupported"):
        return "n/a"
    if run.get("error") and key not in run:
        return "error"
    return fmt(run.get(key), key)


def main(path):
    runs = {}
    order = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            name = r.get("run", r.get("scenario"))
            if name not in order:
                order.append(name)
            runs[(name, r.get("broker"))] = r

    def get(name, broker):
        return runs.get((name, broker))

    # Summary with targets.
    print("| scenario | headline | Sandpiper | Mosquitto | NATS | S/M | S/N | issue-6 target | holds |")
    print("|---|---|---:|---:|---:|---:|---:|---|---|")
    for name in order:
        s, m, n = (get(name, b) for b in BROKERS)
        title = TITLES.get(name, name)
        if name.startswith("latency"):
            key, label = "lat_p99_us", "p99 µs"
        elif name == "connections":
            key, label = "rss_per_conn_bytes", "RSS bytes/conn"
        elif name.startswith("subscriptions"):
            key, label = "msgs_per_s", "routed msg/s"
        else:
            key, label = "msgs_per_s", "delivered msg/s"
        sv, mv, nv = ((r or {}).get(key) for r in (s, m, n))
        target, verdict = describe_target(name, s, m, n)
        print(
            f"| {title} | {label} | {cell(s, key)} | {cell(m, key)} | {cell(n, key)} "
            f"| {ratio(sv, mv)} | {ratio(sv, nv)} | {target} | {verdict} |"
        )
    print()

    # Every figure.
    print("| scenario / figure | Sandpiper | Mosquitto | NATS | S/M | S/N |")
    print("|---|---:|---:|---:|---:|---:|")
    errors = []
    for name in order:
        print(f"| **{TITLES.get(name, name)}** | | | | | |")
        if name == "connections":
            figures = CONNECTIONS
        elif name.startswith("subscriptions"):
            figures = SUBSCRIPTIONS
        else:
            figures = FLOW
        for key, label in figures:
            rs = [get(name, b) for b in BROKERS]
            if all(r is None or key not in r for r in rs):
                continue
            vals = [(r or {}).get(key) for r in rs]
            print(
                f"| {label} | {cell(rs[0], key)} | {cell(rs[1], key)} | {cell(rs[2], key)} "
                f"| {ratio(vals[0], vals[1])} | {ratio(vals[0], vals[2])} |"
            )
        for b in BROKERS:
            r = get(name, b)
            if r and r.get("error"):
                errors.append(f"- {name}, {b}: {r['error']}")
    print()
    print("S/M and S/N divide Sandpiper's figure by the other broker's: above 1 is better for")
    print("throughput, below 1 is better for latency and memory. n/a: not supported by that broker.")
    if errors:
        print()
        print("Errors reported by the load generator:")
        print()
        for e in errors:
            print(e)


def describe_target(name, s, m, n):
    if s is None:
        return "", ""
    if name.startswith("latency"):
        target = "p99 ≤ Mosquitto's"
        sv, mv = s.get("lat_p99_us"), (m or {}).get("lat_p99_us")
        if not (num(sv) and num(mv)):
            return target, "?"
        ok = sv <= mv and s.get("lost") in (0, None)
        return target, "yes" if ok else f"no ({sv / mv:.2f}× Mosquitto's)"
    if name == "connections":
        target = "0 failures, ≤ 4 KiB RSS each"
        per, failed = s.get("rss_per_conn_bytes"), s.get("failed")
        if not num(per):
            return target, "?"
        ok = failed == 0 and per <= 4096
        why = []
        if failed:
            why.append(f"{failed} failed")
        if per > 4096:
            why.append(f"{per / 1024:.1f} KiB each")
        return target, "yes" if ok else "no (" + ", ".join(why) + ")"
    if name not in TARGETS:
        return "", ""
    key, vs_m, vs_n, zeros = TARGETS[name]
    parts = [f"≥ {vs_m:g}× Mosquitto"]
    if vs_n is not None:
        parts.append(f"≥ {vs_n:g}× NATS")
    parts += [f"0 {z}" for z in zeros]
    target = ", ".join(parts)
    sv = s.get(key)
    mv = (m or {}).get(key)
    nv = (n or {}).get(key)
    why = []
    if not (num(sv) and num(mv) and mv > 0):
        return target, "?"
    if sv / mv < vs_m:
        why.append(f"{sv / mv:.2f}× Mosquitto")
    if vs_n is not None and num(nv) and nv > 0 and sv / nv < vs_n:
        why.append(f"{sv / nv:.2f}× NATS")
    for z in zeros:
        if s.get(z):
            why.append(f"{s[z]:,} {z}".replace(",", " "))
    if why:
        return target, "no (" + ", ".join(why) + ")"
    # Loss the target does not name is still worth a word.
    notes = [f"{s[z]:,} {z}".replace(",", " ") for z in ("lost", "dup") if z not in zeros and s.get(z)]
    return target, "yes" if not notes else "yes, but " + ", ".join(notes)


if __name__ == "__main__":
    main(sys.argv[1])
