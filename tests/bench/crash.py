#!/usr/bin/env python3
"""What a kill -9 costs: QoS 1 messages acknowledged to their publisher and never delivered.

For each broker: start it on a free loopback port with a fresh data folder; connect one
subscriber with a persistent session (Clean Session 0) to `bench/crash/#` at QoS 1, wait
2 s (Mosquitto saves its state every `autosave_interval`, here 1 s), then run P QoS 1
publishers (window W, 64-byte payloads carrying publisher and sequence number) for T
seconds, kill -9 the broker while they publish, start it again on the same port and data,
reconnect the subscriber to its session and read until nothing comes for 3 s. A message
counts as **lost** when its PUBACK reached the publisher and the subscriber never got it.
With `--offline` the subscriber leaves after subscribing, so every message waits in its
session's queue when the broker is killed.

Brokers: Sandpiper with `durability = "sync"` (its default: a PUBACK waits for the group
commit's fsync) and `"periodic"` (written every 100 ms), Mosquitto with `persistence true`,
`autosave_interval 1` and `max_queued_messages 0` (no queue limit, so that what it loses
is the crash's doing).

    python3 tests/bench/crash.py [--seconds 3] [--publishers 4] [--window 64]
        [--brokers "sandpiper-sync sandpiper-periodic mosquitto"] [--offline]

SANDPIPER_BIN names the sandpiper binary (default target/release/sandpiper). Bounded: each
phase has a timeout; traffic goes to 127.0.0.1 only.
"""

import argparse
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SANDPIPER = os.environ.get("SANDPIPER_BIN", os.path.join(ROOT, "target", "release", "sandpiper"))
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


# The raw MQTT 3.1.1 encoding the store benchmark already writes (same folder).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from store import connect as connect_packet  # noqa: E402
from store import mstr, packet  # noqa: E402


class Reader:
    """Splits a socket's bytes into MQTT packets (3.1.1)."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        # Packets split off but not handed out yet (those behind CONNACK).
        self.pending = []

    def packets(self):
        """Returns (first byte, body) for every whole packet of one read; raises at close."""
        if self.pending:
            out, self.pending = self.pending, []
            return out
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        self.buf += data
        out = []
        while True:
            if len(self.buf) < 2:
                break
            n, mult, i = 0, 1, 1
            while True:
                if i >= len(self.buf):
                    return out
                b = self.buf[i]
                n += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    break
            if len(self.buf) < i + n:
                break
            out.append((self.buf[0], bytes(self.buf[i : i + n])))
            del self.buf[: i + n]
        return out


def open_client(port, client_id, clean, timeout=10):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(connect_packet(client_id, clean))
    r = Reader(s)
    while True:
        got = r.packets()
        for i, (first, body) in enumerate(got):
            if first >> 4 == 2:
                r.pending = got[i + 1 :]
                if body[1] != 0:
                    raise ConnectionError(f"CONNACK return code {body[1]}")
                # Blocking from here: the broker's end (kill -9) ends the reads.
                s.settimeout(None)
                return s, r


class Subscriber:
    def __init__(self):
        self.got = set()
        self.dups = 0
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def serve(self, sock, reader):
        """Reads PUBLISHes and acknowledges them until the socket fails."""
        try:
            while True:
                acks = bytearray()
                for first, body in reader.packets():
                    if first >> 4 != 3:
                        continue
                    tlen = struct.unpack(">H", body[:2])[0]
                    at = 2 + tlen
                    if (first >> 1) & 3:
                        acks += packet(0x40, body[at : at + 2])
                        at += 2
                    key = struct.unpack(">IQ", body[at : at + 12])
                    with self.lock:
                        if key in self.got:
                            self.dups += 1
                        self.got.add(key)
                        self.last = time.monotonic()
                if acks:
                    sock.sendall(acks)
        except OSError:
            pass


def publisher(port, index, window, stop, acked, lock):
    """Publishes QoS 1 with up to `window` unacknowledged; records what was acknowledged."""
    try:
        sock, reader = open_client(port, f"crash-pub-{index}", True)
    except OSError:
        return
    topic = mstr(f"bench/crash/{index}")
    inflight = {}
    seq = 0
    free_ids = list(range(1, window + 1))
    try:
        while not stop.is_set():
            out = bytearray()
            while free_ids:
                pid = free_ids.pop()
                seq += 1
                payload = struct.pack(">IQ", index, seq) + bytes(52)
                out += packet(0x32, topic + struct.pack(">H", pid) + payload)
                inflight[pid] = seq
            if out:
                sock.sendall(out)
            for first, body in reader.packets():
                if first >> 4 == 4:
                    pid = struct.unpack(">H", body[:2])[0]
                    s = inflight.pop(pid, None)
                    if s is not None:
                        with lock:
                            acked.add((index, s))
                        free_ids.append(pid)
    except OSError:
        pass
    finally:
        sock.close()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, proc, timeout=20):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError("broker exited")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("broker did not listen")


def start(kind, port, folder):
    log = open(os.path.join(folder, "broker.log"), "ab")
    if kind.startswith("sandpiper"):
        durability = kind.split("-", 1)[1]
        conf = os.path.join(folder, "sandpiper.toml")
        with open(conf, "w", encoding="utf-8") as f:
            f.write(
                f'[[listener]]\nbind = "127.0.0.1:{port}"\n\n[store]\n'
                f'data_dir = "{folder}/data"\ndurability = "{durability}"\n\n'
                # No queue limit, as for Mosquitto below.
                '[mqtt]\nmax_queued_messages = 100000000\nmax_queued_bytes = 68719476736\n\n'
                '[log]\nlevel = "warn"\n\n[http]\nbind = ""\n'
            )
        cmd = [SANDPIPER, "--config", conf]
    else:
        conf = os.path.join(folder, "mosquitto.conf")
        with open(conf, "w", encoding="utf-8") as f:
            f.write(
                f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                f"persistence_location {folder}/\nautosave_interval 1\n"
                # No queue limit: what is counted lost is the crash's doing, not an
                # overflow of the subscriber's queue (1,000 messages by default).
                "max_queued_messages 0\n"
            )
        # Run as root, Mosquitto drops to its own user: it must be able to write its
        # database into the folder (it logs an error and saves nothing otherwise).
        os.chmod(folder, 0o777)
        cmd = [MOSQUITTO, "-c", conf]
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    wait_port(port, proc)
    return proc


def run(kind, args):
    folder = tempfile.mkdtemp(prefix=f"sandpiper-crash-{kind}-")
    port = free_port()
    proc = start(kind, port, folder)
    sub = Subscriber()
    sock, reader = open_client(port, "crash-sub", False)
    sock.sendall(packet(0x82, struct.pack(">H", 1) + mstr("bench/crash/#") + bytes([1])))
    if args.offline:
        # Let the SUBACK come, then leave: every message waits in the session's queue.
        time.sleep(0.5)
        sock.sendall(packet(0xE0, b""))
        sock.close()
    else:
        threading.Thread(target=sub.serve, args=(sock, reader), daemon=True).start()
    time.sleep(2.0)

    stop = threading.Event()
    acked, lock = set(), threading.Lock()
    pubs = [
        threading.Thread(target=publisher, args=(port, i, args.window, stop, acked, lock), daemon=True)
        for i in range(args.publishers)
    ]
    for t in pubs:
        t.start()
    time.sleep(args.seconds)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stop.set()
    for t in pubs:
        t.join(timeout=10)
    if not args.offline:
        sock.close()
    with lock:
        acked_at_crash = set(acked)

    proc = start(kind, port, folder)
    sock, reader = open_client(port, "crash-sub", False)
    threading.Thread(target=sub.serve, args=(sock, reader), daemon=True).start()
    sub.last = time.monotonic()
    end = time.monotonic() + 60
    while time.monotonic() < end and time.monotonic() - sub.last < 3.0:
        time.sleep(0.2)
    sock.close()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    shutil.rmtree(folder, ignore_errors=True)
    with sub.lock:
        lost = len(acked_at_crash - sub.got)
        return {
            "broker": kind,
            "acknowledged": len(acked_at_crash),
            "delivered": len(sub.got),
            "lost": lost,
            "duplicates": sub.dups,
        }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--publishers", type=int, default=4)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--brokers", default="sandpiper-sync sandpiper-periodic mosquitto")
    p.add_argument(
        "--offline",
        action="store_true",
        help="the subscriber is offline while the publishers run (its queue holds all)",
    )
    args = p.parse_args()
    if not 0 < args.seconds <= 60 or not 0 < args.publishers <= 64 or not 0 < args.window <= 1024:
        sys.exit("crash: --seconds within (0, 60], --publishers 1..64, --window 1..1024")
    rows = []
    for kind in args.brokers.split():
        if kind not in ("sandpiper-sync", "sandpiper-periodic", "mosquitto"):
            sys.exit(f"crash: unknown broker {kind}")
        rows.append(run(kind, args))
        print(rows[-1], flush=True)
    print()
    print("| broker | acknowledged before the kill | delivered in all | lost (acknowledged, never delivered) | duplicates |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['broker']} | {r['acknowledged']:,} | {r['delivered']:,} | {r['lost']:,} | {r['duplicates']:,} |".replace(
                ",", " "
            )
        )


if __name__ == "__main__":
    main()
