#!/usr/bin/env python3
"""Store benchmark: a large offline backlog and many retained messages.

Starts a release `sandpiper` on a free loopback port with a fresh data folder, registers a
persistent subscriber and disconnects it, then publishes N QoS 1 messages (64-byte
payloads) toward it and R retained messages on distinct topics, pipelined over one raw
MQTT 3.1.1 connection. Reports the publish rate, the broker's RSS with the backlog queued,
then restarts the broker and reports start-up time (process start to `listening`) and RSS
after start, and finally drains the backlog and checks that every message arrived.

    python3 tests/bench/store.py [--messages 1000000] [--retained 100000] [--durability sync]

Bounded: every phase has a timeout; traffic goes to 127.0.0.1 only.
"""

import argparse
import os
import re
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
BIN = os.environ.get("SANDPIPER_BIN", os.path.join(ROOT, "target", "release", "sandpiper"))


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mstr(s):
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def packet(first, body):
    return bytes([first]) + varint(len(body)) + body


def connect(client_id, clean):
    flags = 0x02 if clean else 0x00
    return packet(0x10, mstr("MQTT") + bytes([4, flags]) + struct.pack(">H", 60) + mstr(client_id))


def publish(topic, payload, pid, retain=False):
    first = 0x32 | (0x01 if retain else 0)
    return packet(first, mstr(topic) + struct.pack(">H", pid) + payload)


def read_packet(sock, buf):
    """Returns (first byte, body) from a socket, keeping leftovers in buf (a bytearray)."""
    while True:
        if len(buf) >= 2:
            mult, length, i = 1, 0, 1
            while i < len(buf):
                b = buf[i]
                length += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    if len(buf) >= i + length:
                        first, body = buf[0], bytes(buf[i:i + length])
                        del buf[:i + length]
                        return first, body
                    break
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("closed")
        buf.extend(chunk)


class Broker:
    def __init__(self, data_dir, durability):
        self.data_dir = data_dir
        self.config = os.path.join(os.path.dirname(data_dir), "bench.toml")
        with open(self.config, "w") as f:
            f.write('[[listener]]\nbind = "127.0.0.1:0"\n\n[mqtt]\n'
                    "max_queued_messages = 100000000\nmax_queued_bytes = 100000000000\n"
                    "max_inflight = 1000\n\n"
                    f'[store]\ndurability = "{durability}"\n')

    def start(self):
        t0 = time.monotonic()
        self.proc = subprocess.Popen([BIN, "--config", self.config, "--data-dir", self.data_dir],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("broker exited during start")
            m = re.search(r"listening.*addr=(\S+)", line)
            if m:
                self.port = int(m.group(1).rsplit(":", 1)[1])
                self.startup = time.monotonic() - t0
                threading.Thread(target=self.proc.stderr.read, daemon=True).start()
                return self
        raise RuntimeError("broker did not start")

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)

    def sock(self, client_id, clean):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=120)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(connect(client_id, clean))
        buf = bytearray()
        first, body = read_packet(s, buf)
        assert first == 0x20 and body[1] == 0, f"CONNACK {body!r}"
        return s, buf, body[0] & 1


def pipelined(sock, buf, packets, window=2000):
    """Sends QoS 1 PUBLISHes keeping `window` unacknowledged; returns when all are acked."""
    acked = 0
    sent = 0
    n = len(packets)
    while acked < n:
        if sent - acked < window and sent < n:
            end = min(n, acked + window)
            sock.sendall(b"".join(packets[sent:end]))
            sent = end
        first, _ = read_packet(sock, buf)
        if first >> 4 == 4:
            acked += 1


def publish_all(broker, items, label):
    s, buf, _ = broker.sock(f"bench-{label}", True)
    t0 = time.monotonic()
    done = 0
    chunk = 100_000
    for start in range(0, len(items), chunk):
        part = [publish(topic, payload, ((start + i) % 65535) + 1, retain)
                for i, (topic, payload, retain) in enumerate(items[start:start + chunk])]
        pipelined(s, buf, part, window=min(2000, len(part)))
        done += len(part)
    elapsed = time.monotonic() - t0
    s.sendall(b"\xe0\x00")
    s.close()
    return elapsed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--retained", type=int, default=100_000)
    ap.add_argument("--durability", default="sync")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="sandpiper-store-bench-")
    data = os.path.join(tmp, "data")
    try:
        b = Broker(data, args.durability).start()
        s, buf, _ = b.sock("backlog", False)
        s.sendall(packet(0x82, struct.pack(">H", 1) + mstr("backlog/#") + b"\x01"))
        read_packet(s, buf)
        s.sendall(b"\xe0\x00")
        s.close()
        time.sleep(0.2)
        rss0 = b.rss_kib()
        payload = b"x" * 64
        t = publish_all(b, [("backlog/x", payload, False)] * args.messages, "backlog")
        rt = publish_all(b, [(f"retained/{i}", payload, True) for i in range(args.retained)],
                         "retained")
        rss1 = b.rss_kib()
        b.stop()
        db = os.path.getsize(os.path.join(data, "sandpiper.redb"))
        b2 = Broker(data, args.durability).start()
        time.sleep(0.5)
        rss2 = b2.rss_kib()
        s, buf, present = b2.sock("backlog", False)
        assert present == 1, "session survived the restart"
        got = 0
        t0 = time.monotonic()
        s.settimeout(30)
        while got < args.messages:
            first, body = read_packet(s, buf)
            if first >> 4 == 3:
                pid = body[2 + struct.unpack(">H", body[:2])[0]:][:2]
                s.sendall(b"\x40\x02" + pid)
                got += 1
        drain = time.monotonic() - t0
        b2.stop()
        print(f"durability={args.durability} messages={args.messages} retained={args.retained}")
        print(f"queue {args.messages} QoS 1 msgs to an offline session: {t:.1f} s "
              f"({args.messages / t:,.0f} msg/s); {args.retained} retained: {rt:.1f} s "
              f"({args.retained / rt:,.0f} msg/s)")
        print(f"broker RSS: idle {rss0} KiB, with backlog + retained {rss1} KiB; "
              f"store file {db / 1e6:.0f} MB")
        print(f"restart: start-up {b2.startup:.2f} s, RSS after start {rss2} KiB")
        print(f"drain after restart: {got} messages in {drain:.1f} s ({got / drain:,.0f} msg/s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
