"""Bridges (``[[bridge]]``) between real brokers: Sandpiper to Debian's Mosquitto (2.0.x) and
Sandpiper to Sandpiper, over MQTT 3.1.1 and 5.0, plain and TLS. No mocks: every remote is a
real process (or, for the misbehaving remotes, a real TCP server in a thread).

What is checked (README "Bridges"):

* Forwarding both ways with prefixes (out: local ``sensors/#`` -> remote ``site17/sensors/...``;
  in: remote ``site17/cmd/#`` -> local ``cmd/...``), at QoS 0, 1 and 2; the QoS delivered is
  the lowest of the message's, the topic entry's ceiling (``qos``) and the subscription's.
* RETAIN passes with ``retain = true`` and is cleared with ``retain = false``; MQTT 5 message
  properties pass both ways.
* No loops on a two-way bridge: MQTT 5 No Local at a Sandpiper remote, the MQTT 3.1.1 bridge
  bit (protocol level 0x84, ``try_private``) at a Sandpiper or Mosquitto remote, and a bridge
  never sends back out what it brought in.
* Durability: a local QoS 1 publisher is acknowledged while the remote is down, and what it
  published arrives complete and in order once the remote is back, also after a ``kill -9``
  of the bridging broker (both directions); QoS 2 end to end exactly once.
* TLS to the remote (``mqtts://``, ``ca``, ``server_name``); a wrong CA never connects.
* A remote that never answers, answers garbage or refuses costs only its own bridge.
* ``/metrics`` (``sandpiper_bridge_*``) and ``$SYS/broker/connection/NAME/state``,
  ``$SYS/broker/bridge/NAME/...``.
* Configuration errors name the bridge (``bridge NAME: reason``), non-zero exit.

Remotes that are stopped and started again listen on a port picked free beforehand, so they
come back on the same port; Sandpipers restarted keep their ``--data-dir``. Bridges use short
back-offs (``reconnect_min_ms = 100``, ``reconnect_max_ms = 500``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import (ARRIVE, REPO_ROOT, SANDPIPER_BIN, Broker, Client, _toml_value, parse_metrics,
                      assert_broker_healthy, uid)

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

pytestmark = pytest.mark.skipif(not os.path.exists(MOSQUITTO),
                                reason="needs Debian's mosquitto (apt-get install mosquitto)")

# Numbered batches: large enough to span several bridge windows, small enough to stay quick.
BATCH = 300
# How long a whole batch of QoS 1 publishes may take to be acknowledged (remote down).
ACK_WITHIN = 5.0
# How long a batch may take to reach its subscriber once everything is up again.
DELIVER_WITHIN = 15.0


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, check, timeout: float = ARRIVE, interval: float = 0.05,
               detail=lambda: ""):
    """Polls ``check()`` until it returns something truthy and returns that; fails after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() >= deadline:
            pytest.fail(f"{what} (within {timeout}s){detail()}")
        time.sleep(interval)


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# Processes: Sandpiper nodes that can be restarted, Mosquitto
# --------------------------------------------------------------------------------------------


def topic(direction: str, filter: str, **kw) -> dict:
    """One ``[[bridge.topic]]`` entry."""
    return {"direction": direction, "filter": filter, **kw}


def bridge(name: str, address: str, *topics: dict, **settings) -> str:
    """One ``[[bridge]]`` section with short back-offs (tests' defaults)."""
    s = {"name": name, "address": address, "reconnect_min_ms": 100, "reconnect_max_ms": 500,
         "connect_timeout": 2}
    s.update(settings)
    lines = ["[[bridge]]"] + [f"{k} = {_toml_value(v)}" for k, v in s.items()]
    for t in topics:
        lines += ["", "[[bridge.topic]]"] + [f"{k} = {_toml_value(v)}" for k, v in t.items()]
    return "\n".join(lines) + "\n"


def node_config(port: int = 0, bridges: tuple | list = (), sys_interval: int | None = None,
                extra: str = "") -> str:
    """A Sandpiper configuration: one plain listener, info log, ``/metrics`` on a free port,
    then ``extra`` (more listeners) and the bridges."""
    text = (f'[[listener]]\nname = "default"\nbind = "127.0.0.1:{port}"\n\n{extra}'
            '[log]\nlevel = "info"\n\n[http]\nbind = "127.0.0.1:0"\n\n')
    if sys_interval is not None:
        text += f"[sys]\ninterval = {sys_interval}\n\n"
    return text + "\n".join(bridges)


class Node(Broker):
    """A Sandpiper that can be stopped (SIGTERM) or killed (SIGKILL) and started again with
    the same configuration and data folder. Its log is kept across runs; ``wait_log`` sees
    the current run only."""

    def __init__(self, config_text: str, port: int = 0):
        super().__init__(config_text)
        self.fixed_port = port
        self.history: list[str] = []
        self.http: str | None = None
        self.halted = False

    def start(self, timeout: float = 15.0) -> "Node":
        self.halted = False
        super().start(timeout)
        if self.fixed_port:
            # The default listener, whichever listener logged first.
            self.port = self.fixed_port
            assert self.wait_log(rf"listening.*addr=127\.0\.0\.1:{self.fixed_port}\b", 5), (
                f"listener on {self.fixed_port} not up:\n{self.log()}")
        line = self.wait_log(r"metrics and health endpoints up", 5)
        assert line, f"no `metrics and health endpoints up` line:\n{self.log()}"
        self.http = re.search(r"http=(\S+)", line).group(1)
        return self

    def halt(self, kill: bool = False) -> None:
        """Stops the process (SIGTERM, or SIGKILL with ``kill``), keeping the data folder."""
        assert self.proc is not None
        assert self.running(), f"sandpiper is not running (exit code {self.proc.poll()})"
        self.halted = True
        if kill:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
            self.returncode = self.proc.returncode
        else:
            code, _ = self.terminate()
            assert code == 0, f"sandpiper exited {code} on SIGTERM:\n{self.log()}"
        with self._cond:
            self._cond.wait_for(lambda: self._eof, timeout=5)
            how = "SIGKILL" if kill else "SIGTERM"
            self.history += self.lines + [f"----- {how}, exit code {self.returncode} -----"]
            self.lines = []
            self.addr = None
            self._eof = False

    def restart(self, kill: bool = False) -> "Node":
        self.halt(kill)
        return self.start()

    def stop(self) -> None:
        if self.running():
            super().stop()
        else:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def crashed(self) -> bool:
        """Whether the process ended without being told to."""
        return self.proc is not None and not self.halted and self.proc.poll() is not None

    def log(self) -> str:
        with self._cond:
            return "\n".join(self.history + self.lines)

    def mark(self) -> int:
        """Where the current run's log is now (for ``wait_bridge(..., since=)``)."""
        with self._cond:
            return len(self.lines)

    def wait_bridge(self, name: str, what: str = "bridge connected",
                    timeout: float = ARRIVE, since: int = 0) -> str:
        """Waits for a log line of the current run (from line ``since``) whose message matches
        the regex ``what`` and that names bridge ``name``."""
        rx = re.compile(rf"(?:{what}).*\bbridge=\"?{re.escape(name)}\"?(?:\s|$)")
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[since:]:
                    if rx.search(line):
                        return line
                since = max(since, len(self.lines))
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    break
                self._cond.wait(left)
        pytest.fail(f"no `{what}` line for bridge {name} within {timeout}s:\n{self.log()}")

    # -- /metrics -----------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://{self.http}/metrics", timeout=5) as r:
            return parse_metrics(r.read().decode())

    def bridge_metric(self, metric: str, name: str) -> float | None:
        return self.metrics().get(f'{metric}{{bridge="{name}"}}')

    def wait_metric(self, metric: str, name: str, ok, timeout: float = ARRIVE) -> float:
        """Waits until ``ok(value)`` for ``metric{bridge="name"}``; returns the value."""
        seen = []

        def check():
            v = self.bridge_metric(metric, name)
            seen.append(v)
            return v is not None and ok(v)

        wait_until(f'{metric}{{bridge="{name}"}} as expected', check, timeout, interval=0.1,
                   detail=lambda: f"; last value {seen[-1:]}")
        return seen[-1]


class Mosquitto:
    """Debian's mosquitto on a port picked once (so it comes back on the same port), with a
    generated configuration; optionally with persistence in its folder."""

    def __init__(self, persistence: bool = False):
        self.host = "127.0.0.1"
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sandpiper-mosq-"))
        self.conf = self.dir / "mosquitto.conf"
        self.logfile = self.dir / "mosquitto.log"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true",
                 # Started as root it would switch to the `mosquitto` user otherwise.
                 "user root", "log_dest stderr", "log_type error", "log_type warning",
                 "log_type notice", "log_type information", "connection_messages true"]
        if persistence:
            lines += ["persistence true", f"persistence_location {self.dir}/"]
        self.config_text = "\n".join(lines) + "\n"
        self.conf.write_text(self.config_text)
        self.proc: subprocess.Popen | None = None
        self._log = ""

    def start(self, timeout: float = 10.0) -> "Mosquitto":
        out = open(self.logfile, "ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=out, cwd=self.dir)
        out.close()
        deadline = time.monotonic() + timeout
        while not accepts(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.halt()
                raise RuntimeError(f"mosquitto did not listen on {self.port}:\n{self.log()}")
            time.sleep(0.05)
        return self

    def halt(self) -> None:
        """SIGTERM (Mosquitto saves its persistence file on the way out)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return self._log

    def stop(self) -> None:
        self.halt()
        self._log = self.log()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def net(request):
    """Starts Sandpiper nodes and Mosquittos; stops them all at the end (their logs printed if
    the test failed)."""
    made: list = []

    class Net:
        @staticmethod
        def sandpiper(config_text: str, port: int = 0, start: bool = True) -> Node:
            n = Node(config_text, port)
            made.append(n)
            return n.start() if start else n

        @staticmethod
        def mosquitto(persistence: bool = False, start: bool = True) -> Mosquitto:
            m = Mosquitto(persistence)
            made.append(m)
            return m.start() if start else m

    yield Net()

    failed = any(getattr(getattr(request.node, f"rep_{w}", None), "failed", False)
                 for w in ("setup", "call"))
    crashed = [x for x in made if isinstance(x, Node) and x.crashed()]
    for x in reversed(made):
        x.stop()
        if failed or x in crashed:
            kind = "sandpiper" if isinstance(x, Node) else "mosquitto"
            config = x.config_text
            print(f"\n===== {kind} log (port {x.port}) =====\n{config}\n-----\n{x.log()}\n"
                  f"===== end of {kind} log =====", file=sys.stderr)
    if crashed:
        pytest.fail(f"sandpiper exited on its own during the test: exit codes "
                    f"{[x.proc.returncode for x in crashed]}")


def url(node: Node | Mosquitto) -> str:
    return f"mqtt://127.0.0.1:{node.port}"


# --------------------------------------------------------------------------------------------
# Message helpers
# --------------------------------------------------------------------------------------------


def wait_flow(src, src_topic: str, dst, dst_topic: str, timeout: float = ARRIVE) -> None:
    """Publishes QoS 0 probes on ``src_topic`` at ``src`` until a subscriber to ``dst_topic`` at
    ``dst`` gets one: the bridge carries that way now (its remote SUBSCRIBE is in effect)."""
    sub = Client(dst, version=5)
    sub.subscribe(dst_topic, qos=0)
    pub = Client(src, version=5)
    try:
        deadline = time.monotonic() + timeout
        while not len(sub.messages):
            assert time.monotonic() < deadline, (
                f"nothing published on {src_topic} reached {dst_topic} within {timeout}s")
            pub.publish(src_topic, b"probe", qos=0, wait=False)
            time.sleep(0.1)
    finally:
        sub.close()
        pub.close()


def publish_batch(client: Client, topic_name: str, n: int, qos: int = 1,
                  within: float = ACK_WITHIN) -> float:
    """Publishes ``0``..``n-1`` and asserts the whole batch is acknowledged within ``within``
    seconds; returns how long it took."""
    t0 = time.monotonic()
    infos = [client.publish(topic_name, str(i), qos=qos, wait=False) for i in range(n)]
    deadline = t0 + within
    for i, info in enumerate(infos):
        info.wait_for_publish(max(deadline - time.monotonic(), 0.01))
        assert info.is_published(), (
            f"message {i} of {n} not acknowledged within {within}s "
            f"({sum(x.is_published() for x in infos)} were)")
    return time.monotonic() - t0


def numbers(msgs) -> list[int]:
    return [int(m.payload) for m in msgs]


def wait_numbers(sub: Client, n: int, timeout: float = DELIVER_WITHIN) -> list[int]:
    """Waits until ``0``..``n-1`` all arrived at ``sub`` (duplicates counted once)."""
    def complete():
        return len(set(numbers(sub.messages.all())) & set(range(n))) >= n

    deadline = time.monotonic() + timeout
    while not complete():
        if time.monotonic() >= deadline:
            got = numbers(sub.messages.all())
            missing = sorted(set(range(n)) - set(got))
            pytest.fail(f"{len(set(got))} of {n} distinct messages within {timeout}s; "
                        f"missing {missing[:20]}{'...' if len(missing) > 20 else ''}")
        time.sleep(0.05)
    return numbers(sub.messages.all())


def assert_in_order(got: list[int], n: int) -> None:
    """``got`` is ``0``..``n-1`` in order, each repeated only right after itself."""
    dedup = [x for i, x in enumerate(got) if i == 0 or got[i - 1] != x]
    if dedup != list(range(n)):
        bad = next(i for i, (a, b) in enumerate(zip(dedup + [None] * n, range(n))) if a != b)
        pytest.fail(f"not 0..{n - 1} in order: first difference at position {bad}: "
                    f"{dedup[max(bad - 3, 0):bad + 5]} (received {len(got)}, "
                    f"{len(dedup)} after removing adjacent repeats)")


def persistent(target, cid: str) -> Client:
    """An MQTT 3.1.1 Clean Session 0 client (its session outlives the connection)."""
    return Client(target, client_id=cid, version=4, clean=False)


def triples(msgs) -> list[tuple[str, bytes, int]]:
    return sorted((m.topic, m.payload, m.qos) for m in msgs)


# --------------------------------------------------------------------------------------------
# 1. Forwarding both ways with prefixes, QoS 0/1/2, against Mosquitto
# --------------------------------------------------------------------------------------------

PROTOCOLS = pytest.mark.parametrize("protocol", ["3.1.1", "5"], ids=["v311", "v5"])


@PROTOCOLS
def test_forwarding_with_prefixes_both_ways_to_mosquitto(net, protocol):
    """Out: local ``sensors/data/qN`` reaches Mosquitto as ``site17/sensors/data/qN`` and local
    ``edge/up/x`` as ``up/x`` (``local_prefix`` removed); in: Mosquitto's ``site17/cmd/data/qN``
    reaches local subscribers as ``cmd/data/qN``. Each at QoS 0, 1 and 2, with the payload, and
    the QoS the message had (subscriptions at QoS 2, ceiling 2): nothing else arrives."""
    m = net.mosquitto()
    a = net.sandpiper(node_config(bridges=[bridge(
        "cloud", url(m),
        topic("out", "sensors/#", remote_prefix="site17/"),
        topic("in", "cmd/#", remote_prefix="site17/"),
        topic("out", "up/#", local_prefix="edge/"),
        protocol=protocol)]))
    a.wait_bridge("cloud")
    remote_sub = Client(m, version=5)
    assert remote_sub.subscribe([("site17/sensors/data/#", 2), ("up/#", 2)]) == [2, 2]
    local_sub = Client(a, version=5)
    assert local_sub.subscribe("cmd/data/#", qos=2) == [2]
    wait_flow(a, "sensors/probe", m, "site17/sensors/probe")
    wait_flow(m, "site17/cmd/probe", a, "cmd/probe")

    local_pub = Client(a, version=5)
    remote_pub = Client(m, version=5)
    for qos in (0, 1, 2):
        local_pub.publish(f"sensors/data/q{qos}", f"out{qos}", qos=qos)
        remote_pub.publish(f"site17/cmd/data/q{qos}", f"in{qos}", qos=qos)
    local_pub.publish("edge/up/x", "up", qos=1)

    assert triples(remote_sub.messages.expect_exactly(4)) == [
        ("site17/sensors/data/q0", b"out0", 0),
        ("site17/sensors/data/q1", b"out1", 1),
        ("site17/sensors/data/q2", b"out2", 2),
        ("up/x", b"up", 1),
    ]
    assert triples(local_sub.messages.expect_exactly(3)) == [
        ("cmd/data/q0", b"in0", 0),
        ("cmd/data/q1", b"in1", 1),
        ("cmd/data/q2", b"in2", 2),
    ]


# --------------------------------------------------------------------------------------------
# 2. QoS ceiling
# --------------------------------------------------------------------------------------------


def test_topic_qos_is_a_ceiling(net):
    """``qos = 1`` on an out entry: a local QoS 2 message reaches a remote QoS 2 subscriber at
    QoS 1. ``qos = 0`` on an in entry: a remote QoS 2 message reaches a local QoS 2 subscriber
    at QoS 0. A subscription's lower QoS still lowers it further (remote QoS 0 subscriber)."""
    m = net.mosquitto()
    a = net.sandpiper(node_config(bridges=[bridge(
        "cloud", url(m), topic("out", "ceil/#", qos=1), topic("in", "down/#", qos=0))]))
    a.wait_bridge("cloud")
    remote_sub = Client(m, version=5)
    remote_sub.subscribe("ceil/data", qos=2)
    remote_sub0 = Client(m, version=5)
    remote_sub0.subscribe("ceil/data", qos=0)
    local_sub = Client(a, version=5)
    local_sub.subscribe("down/data", qos=2)
    wait_flow(a, "ceil/probe", m, "ceil/probe")
    wait_flow(m, "down/probe", a, "down/probe")

    Client(a, version=5).publish("ceil/data", "two", qos=2)
    Client(m, version=5).publish("down/data", "two", qos=2)
    assert triples(remote_sub.messages.expect_exactly(1)) == [("ceil/data", b"two", 1)]
    assert triples(remote_sub0.messages.expect_exactly(1, settle=0)) == [("ceil/data", b"two", 0)]
    assert triples(local_sub.messages.expect_exactly(1)) == [("down/data", b"two", 0)]


# --------------------------------------------------------------------------------------------
# 3. Retain
# --------------------------------------------------------------------------------------------


def test_retain_passes_only_with_retain_true(net):
    """Two bridges to one Mosquitto: with ``retain = true`` a retained local message is retained
    at the remote (a subscriber that comes afterwards gets it, RETAIN set); with ``retain =
    false`` the same message goes unretained, so the late subscriber gets nothing for it."""
    m = net.mosquitto()
    a = net.sandpiper(node_config(bridges=[
        bridge("keep", url(m), topic("out", "ret/keep/#"), retain=True),
        bridge("flat", url(m), topic("out", "ret/flat/#"), retain=False),
    ]))
    a.wait_bridge("keep")
    a.wait_bridge("flat")
    watcher = Client(m, version=5)
    watcher.subscribe("ret/+/x", qos=1)
    wait_flow(a, "ret/keep/probe", m, "ret/keep/probe")
    wait_flow(a, "ret/flat/probe", m, "ret/flat/probe")

    pub = Client(a, version=5)
    pub.publish("ret/keep/x", "kept", qos=1, retain=True)
    pub.publish("ret/flat/x", "flat", qos=1, retain=True)
    # Both reached Mosquitto (a live copy: RETAIN is not set on it for a plain subscriber).
    assert sorted(x.topic for x in watcher.messages.expect_exactly(2, settle=0)) == [
        "ret/flat/x", "ret/keep/x"]

    late = Client(m, version=5)
    late.subscribe("ret/+/x", qos=1)
    [got] = late.messages.expect_exactly(1)
    assert (got.topic, got.payload, got.retain) == ("ret/keep/x", b"kept", True)


# --------------------------------------------------------------------------------------------
# 4. MQTT 5 properties
# --------------------------------------------------------------------------------------------

PROPS = {
    "UserProperty": [("site", "17"), ("site", "again"), ("unit", "°C")],
    "ContentType": "application/json",
    "CorrelationData": b"\x00\x01corr\xff",
    "ResponseTopic": "reply/here",
    "PayloadFormatIndicator": 1,
}


def test_mqtt5_properties_pass_both_ways_between_sandpipers(net):
    """Sandpiper A bridged to Sandpiper B over MQTT 5: user properties (order and repeats
    kept), content type, correlation data, response topic and payload format indicator pass
    A -> B and B -> A unchanged."""
    b = net.sandpiper(node_config())
    a = net.sandpiper(node_config(bridges=[bridge(
        "b", url(b), topic("out", "props/out/#"), topic("in", "props/in/#"), protocol="5")]))
    a.wait_bridge("b")
    sub_b = Client(b, version=5)
    sub_b.subscribe("props/out/data", qos=1)
    sub_a = Client(a, version=5)
    sub_a.subscribe("props/in/data", qos=1)
    wait_flow(a, "props/out/probe", b, "props/out/probe")
    wait_flow(b, "props/in/probe", a, "props/in/probe")

    Client(a, version=5).publish("props/out/data", '{"t": 21}', qos=1, props=PROPS)
    Client(b, version=5).publish("props/in/data", '{"t": 22}', qos=1, props=PROPS)
    for sub, payload in ((sub_b, b'{"t": 21}'), (sub_a, b'{"t": 22}')):
        [got] = sub.messages.expect_exactly(1, settle=0)
        assert got.payload == payload
        assert {k: got.props.get(k) for k in PROPS} == PROPS, got.props


# --------------------------------------------------------------------------------------------
# 5. No loops on a two-way bridge
# --------------------------------------------------------------------------------------------

LOOP_REMOTES = pytest.mark.parametrize("remote,protocol", [
    ("sandpiper", "5"), ("sandpiper", "3.1.1"), ("mosquitto", "3.1.1")],
    ids=["sandpiper-v5", "sandpiper-v311-bridge-bit", "mosquitto-v311-try-private"])


@LOOP_REMOTES
def test_two_way_bridge_makes_no_loop(net, remote, protocol):
    """``direction = "both"`` on ``loop/#``, no prefixes. A message published on A (QoS 0 and 1)
    reaches the remote's subscriber once and A's own subscriber once (the remote does not echo
    it back: No Local over MQTT 5, the bridge bit over 3.1.1), and the same for messages
    published at the remote (A does not send back what it brought in). Nothing more arrives
    during a second."""
    r = net.mosquitto() if remote == "mosquitto" else net.sandpiper(node_config())
    a = net.sandpiper(node_config(bridges=[bridge(
        "loop", url(r), topic("both", "loop/#"), protocol=protocol, try_private=True)]))
    a.wait_bridge("loop")
    wait_flow(a, "loop/probe/a", r, "loop/probe/a")
    wait_flow(r, "loop/probe/r", a, "loop/probe/r")
    sub_a = Client(a, version=5)
    sub_a.subscribe("loop/data/#", qos=1)
    sub_r = Client(r, version=5)
    sub_r.subscribe("loop/data/#", qos=1)

    pub_a = Client(a, version=5)
    pub_r = Client(r, version=5)
    for qos in (0, 1):
        pub_a.publish(f"loop/data/a{qos}", f"from A q{qos}", qos=qos)
        pub_r.publish(f"loop/data/r{qos}", f"from R q{qos}", qos=qos)
    expected = [("loop/data/a0", b"from A q0", 0), ("loop/data/a1", b"from A q1", 1),
                ("loop/data/r0", b"from R q0", 0), ("loop/data/r1", b"from R q1", 1)]
    sub_a.messages.wait_for(4)
    assert triples(sub_r.messages.expect_exactly(4, settle=1.0)) == expected
    assert triples(sub_a.messages.expect_exactly(4, settle=0)) == expected


# --------------------------------------------------------------------------------------------
# 6. Remote stopped and started again
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("remote", ["sandpiper", "mosquitto"])
def test_remote_restart_loses_nothing_and_keeps_order(net, remote):
    """The remote (Sandpiper B with its store, or Mosquitto with ``persistence true``) has a
    persistent subscriber on ``site/#`` and is stopped. Sandpiper A's publisher sends 300
    numbered QoS 1 messages on ``site/n``: all acknowledged within a few seconds although the
    remote is down. The remote starts again on the same port; the subscriber comes back and
    gets 0..299 in order, none missing."""
    if remote == "mosquitto":
        r = net.mosquitto(persistence=True)
    else:
        port = free_port()
        r = net.sandpiper(node_config(port=port), port=port)
    a = net.sandpiper(node_config(bridges=[bridge("r", url(r), topic("out", "site/#"))]))
    a.wait_bridge("r")
    cid = uid("keep")
    sub = persistent(r, cid)
    assert sub.subscribe("site/#", qos=1) == [1]
    sub.disconnect()

    r.halt()
    a.wait_bridge("r", "bridge connection lost|bridge cannot connect")
    since = a.mark()
    publish_batch(Client(a, version=5), "site/n", BATCH)

    r.start()
    a.wait_bridge("r", timeout=10, since=since)
    sub = persistent(r, cid)
    assert sub.session_present is True
    assert_in_order(wait_numbers(sub, BATCH), BATCH)


# --------------------------------------------------------------------------------------------
# 7. kill -9 of the bridging broker; QoS 2
# --------------------------------------------------------------------------------------------


def test_kill9_of_bridging_broker_keeps_its_outbound_queue(net):
    """Remote B is down; A acknowledges 300 numbered QoS 1 messages selected by its out bridge,
    then is killed with SIGKILL and started again with the same data folder; B starts. B's
    persistent subscriber gets 0..299 in order, none missing."""
    port = free_port()
    b = net.sandpiper(node_config(port=port), port=port)
    cid = uid("keep")
    sub = persistent(b, cid)
    sub.subscribe("site/#", qos=1)
    sub.disconnect()
    b.halt()

    a = net.sandpiper(node_config(bridges=[bridge("b", url(b), topic("out", "site/#"))]))
    a.wait_bridge("b", "bridge cannot connect")
    publish_batch(Client(a, version=5), "site/n", BATCH)
    a.restart(kill=True)
    assert a.returncode == -signal.SIGKILL
    b.start()
    a.wait_bridge("b", timeout=10)
    sub = persistent(b, cid)
    assert sub.session_present is True
    assert_in_order(wait_numbers(sub, BATCH), BATCH)


def test_kill9_of_bridging_broker_inbound_from_its_persistent_remote_session(net):
    """A's bridge has a persistent session at B (``clean_start = false``, established once,
    subscription in effect), and A a persistent local subscriber. A is killed with SIGKILL;
    B's publisher sends 300 numbered QoS 1 messages (B keeps them for the bridge's session);
    A starts again: its local subscriber gets 0..299 in order, none missing."""
    b = net.sandpiper(node_config())
    a = net.sandpiper(node_config(bridges=[bridge(
        "b", url(b), topic("in", "cmd/#"), clean_start=False, session_expiry=600)]))
    a.wait_bridge("b")
    wait_flow(b, "cmd/probe", a, "cmd/probe")
    cid = uid("keep")
    sub = persistent(a, cid)
    sub.subscribe("cmd/data", qos=1)
    sub.disconnect()

    a.halt(kill=True)
    publish_batch(Client(b, version=5), "cmd/data", BATCH)
    a.start()
    a.wait_bridge("b")
    sub = persistent(a, cid)
    assert sub.session_present is True
    assert_in_order(wait_numbers(sub, BATCH), BATCH)


def test_qos2_end_to_end_exactly_once(net):
    """200 numbered QoS 2 messages from A's publisher reach B's QoS 2 subscriber over the
    bridge exactly once each, in order, at QoS 2, and both brokers are still running."""
    n = 200
    b = net.sandpiper(node_config())
    a = net.sandpiper(node_config(bridges=[bridge("b", url(b), topic("out", "q2/#"))]))
    a.wait_bridge("b")
    sub = Client(b, version=5)
    sub.subscribe("q2/n", qos=2)
    wait_flow(a, "q2/probe", b, "q2/probe")
    publish_batch(Client(a, version=5), "q2/n", n, qos=2, within=DELIVER_WITHIN)
    got = sub.messages.expect_exactly(n, timeout=DELIVER_WITHIN)
    assert numbers(got) == list(range(n))
    assert {x.qos for x in got} == {2}
    assert a.running() and b.running()


# --------------------------------------------------------------------------------------------
# 8. TLS
# --------------------------------------------------------------------------------------------


@pytest.fixture
def certs(tmp_path) -> Path:
    if not shutil.which("openssl"):
        pytest.skip("needs openssl")
    out = tmp_path / "certs"
    subprocess.run(["bash", str(REPO_ROOT / "tests" / "certs" / "generate"), str(out)],
                   check=True, capture_output=True, timeout=60)
    return out


def test_bridge_over_tls(net, certs):
    """B has a ``tls`` listener (CN=localhost, SAN localhost + 127.0.0.1). A's bridge to
    ``mqtts://127.0.0.1:PORT`` with ``ca`` = the test CA and ``server_name = "localhost"``
    connects and carries a message. A second bridge with a foreign CA never connects (``bridge
    cannot connect`` with a TLS reason, ``sandpiper_bridge_connected`` 0), and A keeps serving
    its clients."""
    plain_port, tls_port = free_port(), free_port()
    b = net.sandpiper(node_config(port=plain_port, extra=(
        f'[[listener]]\nname = "tls"\nkind = "tls"\nbind = "127.0.0.1:{tls_port}"\n'
        f'cert = "{certs / "server.pem"}"\nkey = "{certs / "server.key"}"\n\n')),
        port=plain_port)
    assert b.wait_log(rf"listening.*addr=127\.0\.0\.1:{tls_port}\b")
    address = f"mqtts://127.0.0.1:{tls_port}"
    a = net.sandpiper(node_config(bridges=[
        bridge("secure", address, topic("out", "tls/#"), ca=str(certs / "ca.pem"),
               server_name="localhost"),
        bridge("wrongca", address, topic("out", "tls/#"), ca=str(certs / "other-ca.pem"),
               client_id="wrong-ca-bridge"),
    ]))
    a.wait_bridge("secure")
    sub = Client(b, version=5)
    sub.subscribe("tls/data", qos=1)
    wait_flow(a, "tls/probe", b, "tls/probe")
    Client(a, version=5).publish("tls/data", "encrypted", qos=1)
    [got] = sub.messages.expect_exactly(1)
    assert got.payload == b"encrypted"

    line = a.wait_bridge("wrongca", "bridge cannot connect")
    assert "TLS" in line, line
    assert a.wait_metric("sandpiper_bridge_reconnects_total", "wrongca", lambda v: v >= 2) >= 2
    assert a.bridge_metric("sandpiper_bridge_connected", "wrongca") == 0
    assert not re.search(r"bridge connected.*\bbridge=\"?wrongca\b", a.log())
    assert_broker_healthy(a)


# --------------------------------------------------------------------------------------------
# 9. Misbehaving remotes
# --------------------------------------------------------------------------------------------


class BadRemote:
    """A TCP server in a thread that accepts connections and either never answers
    (``silent``) or answers garbage (``garbage``: a CONNACK header announcing 256 MB, then
    zeros)."""

    GARBAGE = b"\x20\xff\xff\xff\x7f" + b"\x00" * 64

    def __init__(self, mode: str):
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.conns: list[socket.socket] = []
        self.stopped = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted += 1
            self.conns.append(conn)
            if self.mode == "garbage":
                try:
                    conn.sendall(self.GARBAGE)
                except OSError:
                    pass

    def close(self) -> None:
        self.stopped.set()
        for s in [self.sock, *self.conns]:
            try:
                s.close()
            except OSError:
                pass


@pytest.fixture
def bad_remotes():
    made = {mode: BadRemote(mode) for mode in ("silent", "garbage")}
    yield made
    for r in made.values():
        r.close()


def test_bad_remotes_cost_only_their_own_bridge(net, bad_remotes):
    """Bridges to a server that never answers, one that answers garbage and a closed port
    (``connect_timeout = 1``), and a fourth to Mosquitto. The broker serves a client round trip
    (QoS 1) promptly; each bad bridge logs ``bridge cannot connect`` (or ``connection lost``)
    and shows ``sandpiper_bridge_connected`` 0 and reconnects > 0; the good bridge forwards."""
    m = net.mosquitto()
    closed = free_port()
    ports = {"silent": bad_remotes["silent"].port, "garbage": bad_remotes["garbage"].port,
             "refused": closed}
    bridges = [bridge(name, f"mqtt://127.0.0.1:{p}", topic("out", f"{name}/#"),
                      connect_timeout=1) for name, p in ports.items()]
    bridges.append(bridge("good", url(m), topic("out", "good/#"), connect_timeout=1))
    a = net.sandpiper(node_config(bridges=bridges))

    # A client round trip, promptly, while the bad bridges struggle.
    sub = Client(a, version=5)
    sub.subscribe("local/rt", qos=1)
    pub = Client(a, version=5)
    t0 = time.monotonic()
    pub.publish("local/rt", "round trip", qos=1)
    sub.messages.wait_for(1, timeout=2)
    assert time.monotonic() - t0 < 2.0

    for name in ports:
        a.wait_bridge(name, "bridge cannot connect|bridge connection lost", timeout=5)
    for name in ports:
        a.wait_metric("sandpiper_bridge_reconnects_total", name, lambda v: v > 0)
        assert a.bridge_metric("sandpiper_bridge_connected", name) == 0, name
    assert bad_remotes["silent"].accepted >= 1
    assert bad_remotes["garbage"].accepted >= 1

    a.wait_bridge("good")
    remote_sub = Client(m, version=5)
    remote_sub.subscribe("good/data", qos=1)
    wait_flow(a, "good/probe", m, "good/probe")
    pub.publish("good/data", "still forwarded", qos=1)
    [got] = remote_sub.messages.expect_exactly(1, settle=0)
    assert got.payload == b"still forwarded"
    assert a.bridge_metric("sandpiper_bridge_connected", "good") == 1
    assert_broker_healthy(a)


# --------------------------------------------------------------------------------------------
# 10. Metrics and $SYS
# --------------------------------------------------------------------------------------------


def test_metrics_and_sys_topics(net):
    """After 5 messages out and 3 in, ``/metrics`` shows ``sandpiper_bridge_connected`` 1,
    ``sent_total`` >= 5, ``received_total`` >= 3, ``queued_messages`` back to 0, and
    ``$SYS/broker/connection/cloud/state`` is "1" (``$SYS/broker/bridge/cloud/sent`` >= 5).
    Once the remote is stopped the state reads "0" and ``sandpiper_bridge_connected`` 0,
    ``reconnects_total`` counts the loss, a QoS 0 message is dropped (``dropped_total`` 1) and a
    QoS 1 message waits (``queued_messages`` 1)."""
    m = net.mosquitto()
    a = net.sandpiper(node_config(sys_interval=1, bridges=[bridge(
        "cloud", url(m), topic("out", "up/#"), topic("in", "down/#"))]))
    a.wait_bridge("cloud")
    state = Client(a, version=5)
    state.subscribe([("$SYS/broker/connection/cloud/state", 0),
                     ("$SYS/broker/bridge/cloud/sent", 0)])
    wait_flow(a, "up/probe", m, "up/probe")
    wait_flow(m, "down/probe", a, "down/probe")
    n, k = 5, 3
    pub = Client(a, version=5)
    for i in range(n):
        pub.publish("up/data", str(i), qos=1)
    rpub = Client(m, version=5)
    for i in range(k):
        rpub.publish("down/data", str(i), qos=1)

    assert a.wait_metric("sandpiper_bridge_sent_total", "cloud", lambda v: v >= n) >= n
    assert a.wait_metric("sandpiper_bridge_received_total", "cloud", lambda v: v >= k) >= k
    assert a.wait_metric("sandpiper_bridge_queued_messages", "cloud", lambda v: v == 0) == 0
    assert a.bridge_metric("sandpiper_bridge_connected", "cloud") == 1
    assert a.bridge_metric("sandpiper_bridge_dropped_total", "cloud") == 0
    reconnects = a.bridge_metric("sandpiper_bridge_reconnects_total", "cloud")
    assert reconnects is not None

    def sys_value(suffix: str, ok):
        return any(x.topic.endswith(suffix) and ok(x.text) for x in state.messages.all())

    wait_until('$SYS/broker/connection/cloud/state "1"',
               lambda: sys_value("/state", lambda t: t == "1"), timeout=3)
    wait_until(f"$SYS/broker/bridge/cloud/sent >= {n}",
               lambda: sys_value("/sent", lambda t: int(t) >= n), timeout=3)

    m.halt()
    a.wait_bridge("cloud", "bridge connection lost")
    state.messages.clear()
    wait_until('$SYS/broker/connection/cloud/state "0"',
               lambda: sys_value("/state", lambda t: t == "0"), timeout=3)
    assert a.bridge_metric("sandpiper_bridge_connected", "cloud") == 0
    assert a.wait_metric("sandpiper_bridge_reconnects_total", "cloud",
                         lambda v: v > reconnects) > reconnects
    # While away: QoS 0 is dropped (counted), QoS 1 waits in the queue.
    pub.publish("up/data", "q0 while away", qos=0)
    pub.publish("up/data", "q1 while away", qos=1)
    assert a.wait_metric("sandpiper_bridge_dropped_total", "cloud", lambda v: v >= 1) == 1
    assert a.wait_metric("sandpiper_bridge_queued_messages", "cloud", lambda v: v >= 1) == 1


# --------------------------------------------------------------------------------------------
# 11. Configuration errors
# --------------------------------------------------------------------------------------------

GOOD_TOPIC = '[[bridge.topic]]\ndirection = "out"\nfilter = "a/#"\n'


@pytest.mark.parametrize("name,section", [
    ("badaddr", '[[bridge]]\nname = "badaddr"\naddress = "tcp://x"\n\n' + GOOD_TOPIC),
    ("notopic", '[[bridge]]\nname = "notopic"\naddress = "mqtt://127.0.0.1:1884"\n'),
    ("qos3", '[[bridge]]\nname = "qos3"\naddress = "mqtt://127.0.0.1:1884"\n\n'
     '[[bridge.topic]]\ndirection = "out"\nfilter = "a/#"\nqos = 3\n'),
], ids=["tcp-address", "no-topic", "qos-3"])
def test_bad_bridge_configuration_is_refused_naming_the_bridge(tmp_path, name, section):
    """``--check-config`` exits non-zero on a bridge whose address is ``tcp://x``, that has no
    ``[[bridge.topic]]``, or whose topic has ``qos = 3``, saying ``bridge NAME: reason``."""
    if not os.path.exists(SANDPIPER_BIN):
        pytest.fail(f"{SANDPIPER_BIN} not built")
    path = tmp_path / "bad.toml"
    path.write_text('[[listener]]\nname = "default"\nbind = "127.0.0.1:0"\n\n' + section)
    r = subprocess.run([SANDPIPER_BIN, "--config", str(path), "--check-config"],
                       capture_output=True, text=True, timeout=30, cwd=tmp_path)
    said = r.stdout + r.stderr
    assert r.returncode != 0, f"accepted:\n{section}\n{said}"
    assert f"bridge {name}: " in said, said


# --------------------------------------------------------------------------------------------
# 12. Back-pressure: a connected bridge slower than its publisher slows it, drops nothing
# --------------------------------------------------------------------------------------------


class SlowLink:
    """A TCP proxy in front of a real broker that carries at most ``rate`` bytes per second
    towards it (a slow WAN link); answers pass unhindered."""

    def __init__(self, target_port: int, rate: int):
        self.rate = rate
        self.target = target_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                down, _ = self.sock.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [down, up]
            threading.Thread(target=self._pipe, args=(down, up, self.rate), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, down, None), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, rate: int | None) -> None:
        chunk = 512 if rate else 65536
        try:
            while not self.stopped.is_set():
                data = src.recv(chunk)
                if not data:
                    break
                dst.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()
        for s in self.conns:
            s.close()


def test_a_bridge_slower_than_its_publisher_slows_it_and_drops_nothing(net):
    """The bridge reaches Mosquitto through a link that carries 20 KB/s; its queue holds at
    most 200 messages (``max_queue``), so publishers are held back from 100. A publisher
    sends 600 QoS 1 messages as fast as it may: all 600 reach the remote subscriber in order
    and none is dropped (``dropped_total`` 0): it was held back, not overflowed."""
    m = net.mosquitto()
    link = SlowLink(m.port, rate=20_000)
    try:
        a = net.sandpiper(node_config(bridges=[bridge(
            "slow", f"mqtt://127.0.0.1:{link.port}", topic("out", "up/#"),
            max_queue=200, protocol="3.1.1")]))
        a.wait_bridge("slow")
        sub = Client(m, version=4)
        sub.subscribe("up/#", qos=1)
        wait_flow(a, "up/probe", m, "up/probe")
        sub.messages.clear()
        pub = Client(a, version=4)
        n = 600
        publish_batch(pub, "up/n", n, within=60)
        assert_in_order(wait_numbers(sub, n, timeout=60), n)
        # Without being held back the publisher would have overflowed the queue of 200.
        assert a.bridge_metric("sandpiper_bridge_dropped_total", "slow") == 0
    finally:
        link.close()


@pytest.mark.parametrize("qos", [1, 2])
def test_a_full_queue_while_connected_drops_its_oldest_and_goes_on(net, qos):
    """Back-pressure off (``backpressure_timeout_ms = 0``), the bridge behind a 20 KB/s link,
    ``max_queue = 100``: 600 messages overflow the queue while the bridge is connected and
    sending, so records in flight are dropped under it. The bridge goes on: the queue empties
    (``queued_messages`` 0), the drops are counted, the remote gets the newest message, and
    what it gets is in order."""
    m = net.mosquitto()
    link = SlowLink(m.port, rate=20_000)
    try:
        a = net.sandpiper(node_config(
            extra="[mqtt]\nbackpressure_timeout_ms = 0\n\n",
            bridges=[bridge("full", f"mqtt://127.0.0.1:{link.port}", topic("out", "up/#"),
                            max_queue=100, max_inflight=20)]))
        a.wait_bridge("full")
        sub = Client(m, version=5)
        sub.subscribe("up/#", qos=2)
        wait_flow(a, "up/probe", m, "up/probe")
        sub.messages.clear()
        pub = Client(a, version=5, max_inflight=100)  # within our Receive Maximum
        n = 600
        publish_batch(pub, "up/n", n, qos=qos, within=30)
        a.wait_metric("sandpiper_bridge_queued_messages", "full", lambda v: v == 0, timeout=30)
        dropped = a.bridge_metric("sandpiper_bridge_dropped_total", "full")
        assert dropped and dropped > 0, "the queue of 100 never overflowed"
        wait_until("the newest message at the remote",
                   lambda: n - 1 in numbers(sub.messages.all()), timeout=30)
        got = numbers(sub.messages.all())
        assert got == sorted(got), f"out of order: {got[:40]}"
        assert len(got) == len(set(got)), "a message arrived twice"
        assert len(got) + dropped >= n, f"{len(got)} received + {dropped} dropped < {n}"
    finally:
        link.close()
