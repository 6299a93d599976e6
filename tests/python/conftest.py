"""Shared fixtures and helpers for the Sandpiper end-to-end test suite.

* ``broker`` -- fixture factory: ``b = broker(max_packet_size=1000)`` writes a temp TOML config
  (one listener on 127.0.0.1:0, the keyword arguments go to ``[mqtt]``), starts ``$SANDPIPER_BIN``
  (default ``<repo>/target/debug/sandpiper``), reads the real port from the ``listening ...
  addr=HOST:PORT`` log line, keeps draining the log in a thread, and SIGTERMs the broker on
  teardown (printing its log if the test failed).
* ``Client`` -- a thin synchronous wrapper around a paho-mqtt 2.x client (MQTT 3.1, 3.1.1, 5.0)
  with a thread-safe ``Collector`` of received messages.
* ``RawClient`` -- a raw TCP MQTT client that sends hand-built bytes and parses every packet it
  receives, for protocol-level checks paho cannot do.
"""

from __future__ import annotations

import collections
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
SANDPIPER_BIN = os.environ.get(
    "SANDPIPER_BIN", str(REPO_ROOT / "target" / "debug" / "sandpiper")
)
LISTEN_RE = re.compile(r"listening.*addr=(\S+)")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Time budgets (seconds). "Should arrive" waits are generous, "should not arrive" waits short.
ARRIVE = 5.0
QUIET = 0.5


def uid(prefix: str = "c") -> str:
    """A short unique MQTT client id / topic fragment (valid for MQTT 3.1's 23-char limit)."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------------------------
# Broker process management
# --------------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise TypeError(f"unsupported TOML value {value!r}")


def render_config(listener: dict | None = None, mqtt_section: dict | None = None,
                  log_level: str | None = None) -> str:
    lst = {"name": "default", "bind": "127.0.0.1:0"}
    lst.update(listener or {})
    lines = ["[[listener]]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in lst.items()]
    if mqtt_section:
        lines += ["", "[mqtt]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in mqtt_section.items()]
    lines += ["", "[log]", f"level = {_toml_value(log_level or 'info')}"]
    return "\n".join(lines) + "\n"


class Broker:
    """One running broker process."""

    def __init__(self, config_text: str):
        self.config_text = config_text
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self.addr: str | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self._tmpdir = tempfile.mkdtemp(prefix="sandpiper-e2e-")
        self.config_path = Path(self._tmpdir) / "sandpiper.toml"

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> "Broker":
        if not os.path.exists(SANDPIPER_BIN):
            pytest.fail(
                f"broker binary {SANDPIPER_BIN} not found; build it with "
                "`cargo build -p sandpiper --bin sandpiper` or set SANDPIPER_BIN"
            )
        self.config_path.write_text(self.config_text)
        env = dict(os.environ)
        env["NO_COLOR"] = "1"
        if "SANDPIPER_TEST_RUST_LOG" in env:
            env["RUST_LOG"] = env["SANDPIPER_TEST_RUST_LOG"]
        else:
            env.pop("RUST_LOG", None)
        self.proc = subprocess.Popen(
            [SANDPIPER_BIN, "--config", str(self.config_path),
             "--data-dir", str(Path(self._tmpdir) / "data")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=self._tmpdir,
        )
        self._open_streams = 2
        threading.Thread(target=self._drain, args=(self.proc.stderr,), daemon=True).start()
        threading.Thread(target=self._drain, args=(self.proc.stdout,), daemon=True).start()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.addr is None and not self._eof:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        if self.addr is None:
            self.stop()
            raise RuntimeError(
                f"broker did not log a `listening ... addr=` line within {timeout}s "
                f"(exit code {self.returncode}); config:\n{self.config_text}\nlog:\n{self.log()}"
            )
        host, _, port = self.addr.rpartition(":")
        self.host = host.strip("[]") or "127.0.0.1"
        self.port = int(port)
        return self

    def _drain(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = ANSI_RE.sub("", raw.decode("utf-8", "replace")).rstrip("\r\n")
            with self._cond:
                self.lines.append(line)
                if self.addr is None:
                    m = LISTEN_RE.search(line)
                    if m:
                        self.addr = m.group(1).strip(",;\"'")
                self._cond.notify_all()
        with self._cond:
            self._open_streams -= 1
            if self._open_streams == 0:
                self._eof = True
            self._cond.notify_all()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 5.0) -> tuple[int | None, float]:
        """SIGTERM and wait; returns (exit code, seconds it took). Kills after ``timeout``."""
        assert self.proc is not None
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        elapsed = time.monotonic() - t0
        self.returncode = self.proc.returncode
        return self.returncode, elapsed

    def stop(self) -> None:
        if self.proc is not None:
            self.terminate()
            with self._cond:
                self._cond.wait_for(lambda: self._eof, timeout=2)
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    # -- log access -------------------------------------------------------------------------
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_log(self, pattern: str, timeout: float = ARRIVE) -> str | None:
        """Wait until a log line matches ``pattern``; returns the line or None."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if rx.search(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    return None
                self._cond.wait(left)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


# --------------------------------------------------------------------------------------------
# Across nodes: `pytest --across-nodes` runs a suite once more with every `broker()` made of
# two Sandpiper nodes of one cluster (one nats-server with JetStream). Clients alternate
# between the nodes (a client id given by the test always lands on the same node, so its
# session stays there): a publisher and a subscriber made one after the other are on
# different nodes. After a SUBSCRIBE, UNSUBSCRIBE or a retained PUBLISH the client waits
# until the other node knows. A test that needs what only one process has (its log, its
# metrics, a restart, raw packets) is skipped in this mode.
# --------------------------------------------------------------------------------------------


def pytest_addoption(parser):
    parser.addoption("--across-nodes", action="store_true", default=False,
                     help="run each broker() as two cluster nodes, clients spread over both")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--across-nodes"):
        return
    import inspect
    for item in items:
        fn = getattr(item, "function", None)
        try:
            raw = fn is not None and "RawClient(" in inspect.getsource(fn)
        except (OSError, TypeError):
            raw = False
        if raw:
            item.add_marker(pytest.mark.skip(reason="across nodes: raw protocol tests talk to one node"))


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Nats:
    """One nats-server with JetStream on free loopback ports."""

    def __init__(self):
        server = os.environ.get("NATS_SERVER") or shutil.which("nats-server")
        if not server:
            pytest.fail("--across-nodes needs nats-server (tests/install provides it)")
        self.dir = Path(tempfile.mkdtemp(prefix="sandpiper-nats-"))
        self.port = _free_port()
        while (http := _free_port()) == self.port:
            pass
        (self.dir / "n.conf").write_text(
            f'listen: 127.0.0.1:{self.port}\nhttp: 127.0.0.1:{http}\n'
            f'jetstream {{ store_dir: "{self.dir / "js"}" }}\n')
        self.proc = subprocess.Popen([server, "-c", str(self.dir / "n.conf")],
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(self.dir / "log", "wb"))
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/jsz", timeout=1) as r:
                    if "config" in json.load(r):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "nats-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.proc, self.dir)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text: each sample's name with its labels, and its value."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                pass
    return out


def stop_process(proc: subprocess.Popen, folder: Path) -> None:
    """SIGTERM (SIGKILL after 10 s), then the process's folder goes."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    shutil.rmtree(folder, ignore_errors=True)


class SplitBroker:
    """What tests use of a ``Broker``, made of two cluster nodes."""

    def __init__(self, config_text: str):
        self.config_text = config_text
        self.nats: _Nats | None = None
        self.nodes: list[Broker] = []
        self.http: dict[str, str] = {}
        self._turn = 0
        self.host, self.port = "127.0.0.1", 0

    def start(self) -> "SplitBroker":
        config_text = self.config_text
        if "[http]" in config_text or "[cluster]" in config_text:
            pytest.skip("across nodes: the test configures [http] or [cluster] itself")
        self.nats = _Nats()
        for name in ("a", "b"):
            text = (config_text + '\n[http]\nbind = "127.0.0.1:0"\n\n[cluster]\n'
                    f'node = "{name}"\nnats = ["nats://127.0.0.1:{self.nats.port}"]\n'
                    'node_timeout_ms = 3000\n')
            n = Broker(text)
            self.nodes.append(n)
            n.start()
            line = n.wait_log(r"metrics and health endpoints up http=", 10)
            assert line, n.log()
            self.http[name] = re.search(r"http=(\S+)", line).group(1)
        for name in self.http:
            self._until(lambda name=name: self._ready(name), f"node {name} ready")
        self._until(lambda: all(self._metrics(n).get("sandpiper_cluster_nodes") == 1
                                for n in self.http), "the nodes know each other")
        self.host, self.port = self.nodes[0].host, self.nodes[0].port
        return self

    # -- what clients use -------------------------------------------------------------------
    def place(self, client_id: str, chosen: bool) -> tuple[str, int]:
        """The node a client connects to: the nodes in turn, so a client that connects again
        (its client id chosen by the test) may land on the other node, and its session moves
        there."""
        del client_id, chosen
        i, self._turn = self._turn, (self._turn + 1) % len(self.nodes)
        return self.nodes[i].host, self.nodes[i].port

    def settle(self, retained: bool = False) -> None:
        """Waits until each node knows the other's filters (and, ``retained``, until both
        hold the same retained messages)."""
        def agree() -> bool:
            m = {n: self._metrics(n) for n in self.http}
            for x in m:
                for y in m:
                    if x != y and m[x].get("sandpiper_cluster_filters", 0) != m[y].get(
                            f'sandpiper_cluster_node_filters{{node="{x}"}}', 0):
                        return False
            if retained:
                for k in ("sandpiper_retained_messages", "sandpiper_retained_bytes"):
                    if len({m[n].get(k, 0) for n in m}) != 1:
                        return False
            return True
        if retained:
            time.sleep(0.05)
        self._until(agree, "the nodes agree on filters and retained messages")

    # -- the rest ---------------------------------------------------------------------------
    def __getattr__(self, name: str):
        pytest.skip(f"across nodes: the test uses broker.{name}, which one process has")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
        if self.nats:
            self.nats.stop()

    def log(self) -> str:
        return "\n".join(f"===== node {n} =====\n{b.log()}" for n, b in zip(self.http, self.nodes))

    def _metrics(self, name: str) -> dict[str, float]:
        with urllib.request.urlopen(f"http://{self.http[name]}/metrics", timeout=5) as r:
            return parse_metrics(r.read().decode())

    def _ready(self, name: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http[name]}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    @staticmethod
    def _until(check, what: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"across nodes: {what} (within {timeout}s)"
            time.sleep(0.02)


@pytest.fixture
def broker(request):
    """Factory: ``broker(listener={...}, log_level=..., **mqtt_section_overrides) -> Broker``."""
    started: list[Broker] = []

    def factory(listener: dict | None = None, log_level: str | None = None,
                config_text: str | None = None, **mqtt_overrides: Any) -> Broker:
        text = config_text or render_config(listener, mqtt_overrides, log_level)
        if request.config.getoption("--across-nodes"):
            split = SplitBroker(text)
            started.append(split)
            return split.start()
        b = Broker(text)
        started.append(b)
        return b.start()

    yield factory

    failed = any(
        getattr(getattr(request.node, f"rep_{w}", None), "failed", False)
        for w in ("setup", "call")
    )
    for b in started:
        b.stop()
        if failed:
            import sys

            print(f"\n===== sandpiper log (config {b.config_text!r}) =====", file=sys.stderr)
            print(b.log(), file=sys.stderr)
            print("===== end of sandpiper log =====", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# paho-mqtt helpers
# --------------------------------------------------------------------------------------------

PAHO_PROTOCOL = {3: mqtt.MQTTv31, 4: mqtt.MQTTv311, 5: mqtt.MQTTv5}
VERSIONS = [3, 4, 5]
VERSION_IDS = ["v31", "v311", "v5"]


def paho_props(packet_type: int, **kw: Any) -> Properties | None:
    """Build paho Properties, e.g. ``paho_props(PacketTypes.PUBLISH, UserProperty=[("a","b")])``."""
    if not kw:
        return None
    p = Properties(packet_type)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def props_dict(props: Properties | None) -> dict:
    """paho Properties -> {CompressedName: value} (only the properties present)."""
    out: dict = {}
    if props is None:
        return out
    for name in props.names:
        key = name.replace(" ", "")
        if hasattr(props, key):
            out[key] = getattr(props, key)
    return out


@dataclass
class Msg:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    props: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8", "replace")


class Collector:
    """Thread-safe list of received messages."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: list = []

    def add(self, item) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()

    def all(self) -> list:
        with self._cond:
            return list(self._items)

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def clear(self) -> None:
        with self._cond:
            self._items.clear()

    def wait_for(self, n: int, timeout: float = ARRIVE) -> list:
        """Wait until at least ``n`` items arrived; returns all items (AssertionError on timeout)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self._items) >= n, timeout=timeout)
            items = list(self._items)
        assert ok, f"expected >= {n} messages within {timeout}s, got {len(items)}: {items}"
        return items

    def expect_exactly(self, n: int, timeout: float = ARRIVE, settle: float = QUIET) -> list:
        """Wait for ``n`` items, then make sure no more arrive during ``settle`` seconds."""
        self.wait_for(n, timeout)
        time.sleep(settle)
        items = self.all()
        assert len(items) == n, f"expected exactly {n} messages, got {len(items)}: {items}"
        return items

    def expect_none(self, wait: float = QUIET) -> None:
        time.sleep(wait)
        items = self.all()
        assert not items, f"expected no messages, got {items}"


class Client:
    """Synchronous-ish wrapper around a paho-mqtt 2.x client running its network loop thread."""

    def __init__(self, broker: Broker, client_id: str | None = None, version: int = 5,
                 clean: bool = True, keepalive: int = 30, connect_props: dict | None = None,
                 will: dict | None = None, username: str | None = None,
                 password: str | None = None, connect: bool = True, expect_rc: int | None = 0,
                 manual_ack: bool = False, max_inflight: int = 1000):
        self.broker = broker
        self.version = version
        self.client_id = uid("p") if client_id is None else client_id
        self.addr = (broker.place(self.client_id, client_id is not None)
                     if isinstance(broker, SplitBroker) else (broker.host, broker.port))
        self.clean = clean
        self.keepalive = keepalive
        self.connect_props = connect_props or {}
        kwargs: dict = dict(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=PAHO_PROTOCOL[version],
            reconnect_on_failure=False,
            manual_ack=manual_ack,
        )
        if version != 5:
            kwargs["clean_session"] = clean
        self.mqtt = mqtt.Client(**kwargs)
        self.mqtt.max_inflight_messages_set(max_inflight)
        _LIVE_CLIENTS.append(self)
        self.messages = Collector()
        self._cond = threading.Condition()
        self.connack_rc: int | None = None
        self.session_present: bool | None = None
        self.connack_props: dict = {}
        self.disconnected = threading.Event()
        self.disconnect_rc: int | None = None
        self.disconnect_props: dict = {}
        self._acks: dict[int, tuple[list[int], dict]] = {}
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_disconnect = self._on_disconnect
        self.mqtt.on_message = self._on_message
        self.mqtt.on_subscribe = self._on_subscribe
        self.mqtt.on_unsubscribe = self._on_unsubscribe
        if username is not None:
            self.mqtt.username_pw_set(username, password)
        if will:
            wprops = None
            if version == 5 and will.get("props"):
                wprops = paho_props(PacketTypes.WILLMESSAGE, **will["props"])
            self.mqtt.will_set(will["topic"], will.get("payload", b""), will.get("qos", 0),
                               will.get("retain", False), wprops)
        if connect:
            self.connect(expect_rc=expect_rc)

    # -- callbacks --------------------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        with self._cond:
            self.connack_rc = reason_code.value if hasattr(reason_code, "value") else int(reason_code)
            self.session_present = bool(flags.session_present)
            self.connack_props = props_dict(properties)
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        with self._cond:
            self.disconnect_rc = reason_code.value if hasattr(reason_code, "value") else reason_code
            self.disconnect_props = props_dict(properties)
            self.disconnected.set()
            self._cond.notify_all()

    def _on_message(self, client, userdata, message):
        self.messages.add(Msg(
            topic=message.topic,
            payload=bytes(message.payload),
            qos=message.qos,
            retain=bool(message.retain),
            dup=bool(message.dup),
            props=props_dict(getattr(message, "properties", None)),
        ))

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties):
        with self._cond:
            self._acks[mid] = ([rc.value for rc in reason_code_list], props_dict(properties))
            self._cond.notify_all()

    def _on_unsubscribe(self, client, userdata, mid, reason_code_list, properties):
        with self._cond:
            codes = [rc.value for rc in reason_code_list] if reason_code_list else []
            self._acks[mid] = (codes, props_dict(properties))
            self._cond.notify_all()

    def _wait_ack(self, mid: int, timeout: float) -> list[int]:
        with self._cond:
            ok = self._cond.wait_for(lambda: mid in self._acks, timeout=timeout)
            assert ok, f"{self.client_id}: no SUBACK/UNSUBACK for mid {mid} within {timeout}s"
            return self._acks.pop(mid)[0]

    # -- operations -------------------------------------------------------------------------
    def connect(self, timeout: float = ARRIVE, expect_rc: int | None = 0) -> "Client":
        props = None
        if self.version == 5:
            props = paho_props(PacketTypes.CONNECT, **self.connect_props)
            self.mqtt.connect(*self.addr, keepalive=self.keepalive,
                              clean_start=self.clean, properties=props)
        else:
            self.mqtt.connect(*self.addr, keepalive=self.keepalive)
        self.mqtt.loop_start()
        with self._cond:
            ok = self._cond.wait_for(lambda: self.connack_rc is not None, timeout=timeout)
        assert ok, f"{self.client_id}: no CONNACK within {timeout}s"
        if expect_rc is not None:
            assert self.connack_rc == expect_rc, (
                f"{self.client_id}: CONNACK rc {self.connack_rc}, expected {expect_rc}")
        return self

    def subscribe(self, topic: str | list, qos: int = 0, no_local: bool = False,
                  retain_as_published: bool = False, retain_handling: int = 0,
                  sub_id: int | None = None, user_props: list | None = None,
                  timeout: float = ARRIVE) -> list[int]:
        """Subscribe and wait for the SUBACK; returns its reason codes (granted QoS)."""
        props = None
        if self.version == 5:
            kw: dict = {}
            if sub_id is not None:
                kw["SubscriptionIdentifier"] = sub_id
            if user_props:
                kw["UserProperty"] = user_props
            props = paho_props(PacketTypes.SUBSCRIBE, **kw)
        topics = topic if isinstance(topic, list) else [(topic, qos)]
        if self.version == 5:
            arg = [(t, SubscribeOptions(qos=q, noLocal=no_local,
                                        retainAsPublished=retain_as_published,
                                        retainHandling=retain_handling)) for t, q in topics]
            rc, mid = self.mqtt.subscribe(arg, properties=props)
        else:
            rc, mid = self.mqtt.subscribe(topics)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"subscribe failed locally: {rc}"
        codes = self._wait_ack(mid, timeout)
        self._settle()
        return codes

    def unsubscribe(self, topic: str | list, timeout: float = ARRIVE) -> list[int]:
        rc, mid = self.mqtt.unsubscribe(topic)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"unsubscribe failed locally: {rc}"
        codes = self._wait_ack(mid, timeout)
        self._settle()
        return codes

    def _settle(self, retained: bool = False) -> None:
        if isinstance(self.broker, SplitBroker):
            self.broker.settle(retained)

    def publish(self, topic: str, payload: bytes | str = b"", qos: int = 0,
                retain: bool = False, props: dict | None = None, wait: bool = True,
                timeout: float = ARRIVE) -> mqtt.MQTTMessageInfo:
        p = paho_props(PacketTypes.PUBLISH, **props) if (props and self.version == 5) else None
        info = self.mqtt.publish(topic, payload, qos=qos, retain=retain, properties=p)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish failed locally: {info.rc}"
        if wait:
            info.wait_for_publish(timeout)
            assert info.is_published(), f"{self.client_id}: publish to {topic} not acknowledged"
        if retain:
            self._settle(retained=True)
        return info

    def disconnect(self, reason_code: int | None = None, props: dict | None = None,
                   timeout: float = ARRIVE) -> None:
        if self.version == 5:
            rc = ReasonCode(PacketTypes.DISCONNECT, identifier=reason_code or 0)
            self.mqtt.disconnect(reasoncode=rc,
                                 properties=paho_props(PacketTypes.DISCONNECT, **(props or {})))
        else:
            self.mqtt.disconnect()
        self.disconnected.wait(timeout)
        self.mqtt.loop_stop()

    def drop(self) -> None:
        """Close the TCP connection without sending DISCONNECT (abnormal close)."""
        sock = self.mqtt.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.disconnected.wait(ARRIVE)
        self.mqtt.loop_stop()

    def wait_disconnected(self, timeout: float = ARRIVE) -> bool:
        return self.disconnected.wait(timeout)

    def close(self) -> None:
        try:
            if not self.disconnected.is_set():
                self.mqtt.disconnect()
                self.disconnected.wait(2)
        finally:
            self.mqtt.loop_stop()


_LIVE_CLIENTS: list = []


@pytest.fixture(autouse=True)
def _close_clients():
    """Closes every paho/raw client a test created (before the broker fixture stops)."""
    yield
    while _LIVE_CLIENTS:
        c = _LIVE_CLIENTS.pop()
        try:
            c.close()
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass


def assert_broker_healthy(broker: Broker, version: int = 5) -> None:
    """A fresh publisher/subscriber pair can still exchange a QoS 1 message."""
    topic = f"health/{uid('t')}"
    sub = Client(broker, version=version)
    pub = Client(broker, version=version)
    try:
        assert sub.subscribe(topic, qos=1) == [1]
        pub.publish(topic, b"ok", qos=1)
        msgs = sub.messages.wait_for(1)
        assert msgs[0].payload == b"ok"
    finally:
        sub.close()
        pub.close()


# --------------------------------------------------------------------------------------------
# Raw MQTT packet codec
# --------------------------------------------------------------------------------------------

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = (
    8, 9, 10, 11, 12, 13, 14, 15)
PACKET_NAMES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC",
                6: "PUBREL", 7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE",
                11: "UNSUBACK", 12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH"}


class P:
    """MQTT 5 property identifiers."""
    PAYLOAD_FORMAT = 0x01
    MESSAGE_EXPIRY = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_ID = 0x0B
    SESSION_EXPIRY = 0x11
    ASSIGNED_CLIENT_ID = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTH_METHOD = 0x15
    AUTH_DATA = 0x16
    REQUEST_PROBLEM_INFO = 0x17
    WILL_DELAY = 0x18
    REQUEST_RESPONSE_INFO = 0x19
    RESPONSE_INFO = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUB_AVAILABLE = 0x28
    SUB_ID_AVAILABLE = 0x29
    SHARED_SUB_AVAILABLE = 0x2A


_BYTE_PROPS = {0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A}
_U16_PROPS = {0x13, 0x21, 0x22, 0x23}
_U32_PROPS = {0x02, 0x11, 0x18, 0x27}
_VARINT_PROPS = {0x0B}
_STR_PROPS = {0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F}
_BIN_PROPS = {0x09, 0x16}
_PAIR_PROPS = {0x26}
_MULTI_PROPS = {0x0B, 0x26}


class ProtocolDecodeError(Exception):
    pass


def enc_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def enc_u16(n: int) -> bytes:
    return struct.pack(">H", n)


def enc_u32(n: int) -> bytes:
    return struct.pack(">I", n)


def enc_str(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return enc_u16(len(b)) + b


enc_bin = enc_str


def enc_props(props: dict | list | None) -> bytes:
    """Encode v5 properties from ``{id: value}`` (lists for multi-valued ids) or ``[(id, v)]``."""
    items: list[tuple[int, Any]] = []
    if props:
        if isinstance(props, dict):
            for pid, v in props.items():
                if pid in _MULTI_PROPS and isinstance(v, list):
                    items += [(pid, x) for x in v]
                else:
                    items.append((pid, v))
        else:
            items = list(props)
    body = bytearray()
    for pid, v in items:
        body += enc_varint(pid)
        if pid in _BYTE_PROPS:
            body.append(v)
        elif pid in _U16_PROPS:
            body += enc_u16(v)
        elif pid in _U32_PROPS:
            body += enc_u32(v)
        elif pid in _VARINT_PROPS:
            body += enc_varint(v)
        elif pid in _STR_PROPS or pid in _BIN_PROPS:
            body += enc_str(v)
        elif pid in _PAIR_PROPS:
            body += enc_str(v[0]) + enc_str(v[1])
        else:
            raise ValueError(f"unknown property id {pid:#x}")
    return enc_varint(len(body)) + bytes(body)


def packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + enc_varint(len(body)) + body


def sub_opts(qos: int = 0, no_local: bool = False, rap: bool = False, rh: int = 0) -> int:
    return qos | (0x04 if no_local else 0) | (0x08 if rap else 0) | (rh << 4)


def build_connect(version: int = 4, client_id: str | bytes = "", clean: bool = True,
                  keepalive: int = 60, props: dict | list | None = None,
                  will: dict | None = None, username: str | None = None,
                  password: bytes | str | None = None, protocol_name: str | None = None,
                  flags: int | None = None) -> bytes:
    name = protocol_name if protocol_name is not None else ("MQIsdp" if version == 3 else "MQTT")
    f = 0x02 if clean else 0
    if will:
        f |= 0x04 | (will.get("qos", 0) << 3) | (0x20 if will.get("retain") else 0)
    if username is not None:
        f |= 0x80
    if password is not None:
        f |= 0x40
    if flags is not None:
        f = flags
    vh = enc_str(name) + bytes([version, f]) + enc_u16(keepalive)
    if version == 5:
        vh += enc_props(props)
    pl = enc_str(client_id)
    if will:
        if version == 5:
            pl += enc_props(will.get("props"))
        pl += enc_str(will["topic"]) + enc_bin(will.get("payload", b""))
    if username is not None:
        pl += enc_str(username)
    if password is not None:
        pl += enc_bin(password)
    return packet(0x10, vh + pl)


def build_publish(topic: str | bytes, payload: bytes | str = b"", qos: int = 0,
                  pid: int | None = None, retain: bool = False, dup: bool = False,
                  props: dict | list | None = None, version: int = 4) -> bytes:
    if isinstance(payload, str):
        payload = payload.encode()
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    vh = enc_str(topic)
    if qos > 0:
        vh += enc_u16(pid if pid is not None else 1)
    if version == 5:
        vh += enc_props(props)
    return packet(first, vh + payload)


def build_ack(ptype: int, pid: int, rc: int | None = None, props: dict | list | None = None,
              version: int = 4) -> bytes:
    first = (ptype << 4) | (0x02 if ptype == PUBREL else 0)
    body = enc_u16(pid)
    if version == 5 and (rc is not None or props):
        body += bytes([rc or 0])
        if props:
            body += enc_props(props)
    return packet(first, body)


def build_subscribe(pid: int, filters: list[tuple[str, int]], props: dict | list | None = None,
                    version: int = 4) -> bytes:
    body = enc_u16(pid)
    if version == 5:
        body += enc_props(props)
    for f, o in filters:
        body += enc_str(f) + bytes([o])
    return packet(0x82, body)


def build_unsubscribe(pid: int, filters: list[str], props: dict | list | None = None,
                      version: int = 4) -> bytes:
    body = enc_u16(pid)
    if version == 5:
        body += enc_props(props)
    for f in filters:
        body += enc_str(f)
    return packet(0xA2, body)


def build_disconnect(rc: int | None = None, props: dict | list | None = None,
                     version: int = 4) -> bytes:
    body = b""
    if version == 5 and (rc is not None or props):
        body = bytes([rc or 0])
        if props:
            body += enc_props(props)
    return packet(0xE0, body)


PINGREQ_BYTES = b"\xc0\x00"


class _Reader:
    def __init__(self, data: bytes, pos: int = 0):
        self.data = data
        self.pos = pos

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ProtocolDecodeError(f"need {n} bytes at {self.pos}, have {self.left()}")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def varint(self) -> int:
        mult, val = 1, 0
        for _ in range(4):
            b = self.u8()
            val += (b & 0x7F) * mult
            if not b & 0x80:
                return val
            mult *= 128
        raise ProtocolDecodeError("variable byte integer longer than 4 bytes")

    def bin(self) -> bytes:
        return self.take(self.u16())

    def str(self) -> str:
        return self.bin().decode("utf-8")

    def props(self) -> tuple[dict, list]:
        length = self.varint()
        end = self.pos + length
        if end > len(self.data):
            raise ProtocolDecodeError("property length exceeds packet")
        d: dict = {}
        order: list = []
        while self.pos < end:
            pid = self.varint()
            if pid in _BYTE_PROPS:
                v: Any = self.u8()
            elif pid in _U16_PROPS:
                v = self.u16()
            elif pid in _U32_PROPS:
                v = self.u32()
            elif pid in _VARINT_PROPS:
                v = self.varint()
            elif pid in _STR_PROPS:
                v = self.str()
            elif pid in _BIN_PROPS:
                v = self.bin()
            elif pid in _PAIR_PROPS:
                v = (self.str(), self.str())
            else:
                raise ProtocolDecodeError(f"unknown property id {pid:#x}")
            order.append((pid, v))
            if pid in _MULTI_PROPS:
                d.setdefault(pid, []).append(v)
            else:
                if pid in d:
                    raise ProtocolDecodeError(f"property {pid:#x} sent twice")
                d[pid] = v
        if self.pos != end:
            raise ProtocolDecodeError("property block overran its length")
        return d, order


@dataclass
class Packet:
    type: int
    flags: int
    body: bytes
    version: int
    # decoded fields (those relevant for the packet type)
    rc: int | None = None
    session_present: bool | None = None
    props: dict = field(default_factory=dict)
    props_order: list = field(default_factory=list)
    topic: str | None = None
    pid: int | None = None
    payload: bytes = b""
    qos: int = 0
    dup: bool = False
    retain: bool = False
    codes: list = field(default_factory=list)
    size: int = 0  # total encoded size of the packet

    @property
    def name(self) -> str:
        return PACKET_NAMES.get(self.type, f"type{self.type}")

    def __repr__(self) -> str:
        parts = [self.name]
        if self.type == PUBLISH:
            parts.append(f"topic={self.topic!r} qos={self.qos} dup={int(self.dup)} "
                         f"retain={int(self.retain)} pid={self.pid} payload={self.payload[:40]!r}")
        elif self.pid is not None:
            parts.append(f"pid={self.pid}")
        if self.rc is not None:
            parts.append(f"rc={self.rc:#04x}")
        if self.session_present is not None:
            parts.append(f"sp={int(self.session_present)}")
        if self.codes:
            parts.append(f"codes={self.codes}")
        if self.props:
            parts.append(f"props={self.props}")
        return "<" + " ".join(parts) + ">"


def decode_packet(ptype: int, flags: int, body: bytes, version: int) -> Packet:
    pk = Packet(type=ptype, flags=flags, body=body, version=version)
    r = _Reader(body)
    v5 = version == 5
    if ptype == CONNACK:
        pk.session_present = bool(r.u8() & 0x01)
        pk.rc = r.u8()
        if v5 and r.left():
            pk.props, pk.props_order = r.props()
    elif ptype == PUBLISH:
        pk.dup = bool(flags & 0x08)
        pk.qos = (flags >> 1) & 0x03
        pk.retain = bool(flags & 0x01)
        pk.topic = r.str()
        if pk.qos > 0:
            pk.pid = r.u16()
        if v5:
            pk.props, pk.props_order = r.props()
        pk.payload = r.take(r.left())
    elif ptype in (PUBACK, PUBREC, PUBREL, PUBCOMP):
        pk.pid = r.u16()
        if v5:
            pk.rc = r.u8() if r.left() else 0
            if r.left():
                pk.props, pk.props_order = r.props()
    elif ptype in (SUBACK, UNSUBACK):
        pk.pid = r.u16()
        if v5:
            pk.props, pk.props_order = r.props()
        pk.codes = list(r.take(r.left()))
    elif ptype == DISCONNECT:
        if v5:
            pk.rc = r.u8() if r.left() else 0
            if r.left():
                pk.props, pk.props_order = r.props()
    elif ptype == AUTH:
        if r.left():
            pk.rc = r.u8()
            if r.left():
                pk.props, pk.props_order = r.props()
    return pk


class ConnectionClosed(Exception):
    pass


class RawClient:
    """A raw-socket MQTT client. Every packet received is parsed; non-matching packets that
    arrive while waiting for a specific one are stashed and returned by later reads."""

    def __init__(self, broker: Broker | tuple, version: int = 4, timeout: float = ARRIVE):
        if isinstance(broker, SplitBroker):
            pytest.skip("across nodes: raw protocol tests talk to one node")
        addr = (broker.host, broker.port) if isinstance(broker, Broker) else broker
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.version = version
        self.buf = bytearray()
        self.eof = False
        self.stash: collections.deque[Packet] = collections.deque()
        self.log: list[Packet] = []
        self._pid = 0
        self.client_id: str | None = None
        _LIVE_CLIENTS.append(self)

    # -- transport --------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def try_send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _fill(self, deadline: float) -> bool:
        """Read more bytes; False on timeout. Sets ``eof`` on close/reset."""
        if self.eof:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            ready, _, _ = select.select([self.sock], [], [], left)
        except (OSError, ValueError):
            self.eof = True
            return False
        if not ready:
            return False
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, OSError):
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def _parse_one(self) -> Packet | None:
        if len(self.buf) < 2:
            return None
        mult, length, i = 1, 0, 1
        while True:
            if i >= len(self.buf):
                return None
            b = self.buf[i]
            length += (b & 0x7F) * mult
            i += 1
            if not b & 0x80:
                break
            mult *= 128
            if i > 4:
                raise ProtocolDecodeError("server sent a remaining length longer than 4 bytes")
        if len(self.buf) < i + length:
            return None
        first = self.buf[0]
        body = bytes(self.buf[i:i + length])
        del self.buf[:i + length]
        pk = decode_packet(first >> 4, first & 0x0F, body, self.version)
        pk.size = i + length
        self.log.append(pk)
        return pk

    def recv_packet(self, timeout: float = ARRIVE) -> Packet | None:
        """Next packet; None on timeout; raises ConnectionClosed if the server closed first."""
        if self.stash:
            return self.stash.popleft()
        deadline = time.monotonic() + timeout
        while True:
            pk = self._parse_one()
            if pk is not None:
                return pk
            if self.eof:
                raise ConnectionClosed(f"connection closed (unparsed bytes {bytes(self.buf)!r})")
            if not self._fill(deadline):
                if self.eof:
                    continue
                return None

    def wait_for(self, pred, timeout: float = ARRIVE, what: str = "packet") -> Packet:
        """Read until ``pred(packet)``; other packets are stashed (in order) for later reads."""
        deadline = time.monotonic() + timeout
        skipped: list[Packet] = []
        # look in the stash first
        for pk in list(self.stash):
            if pred(pk):
                self.stash.remove(pk)
                return pk
        stash_before = list(self.stash)
        self.stash.clear()
        try:
            while True:
                left = deadline - time.monotonic()
                try:
                    pk = self.recv_packet(max(left, 0))
                except ConnectionClosed as e:
                    raise AssertionError(
                        f"connection closed while waiting for {what}; got {skipped}: {e}") from e
                if pk is None:
                    raise AssertionError(f"no {what} within {timeout}s; got {skipped}")
                if pred(pk):
                    return pk
                skipped.append(pk)
        finally:
            self.stash.extendleft(reversed(stash_before + skipped))

    def expect(self, ptype: int, timeout: float = ARRIVE) -> Packet:
        """The very next packet must be of type ``ptype``."""
        try:
            pk = self.recv_packet(timeout)
        except ConnectionClosed as e:
            raise AssertionError(f"connection closed, expected {PACKET_NAMES[ptype]}: {e}") from e
        assert pk is not None, f"no {PACKET_NAMES[ptype]} within {timeout}s"
        assert pk.type == ptype, f"expected {PACKET_NAMES[ptype]}, got {pk!r}"
        return pk

    def expect_nothing(self, wait: float = QUIET) -> None:
        try:
            pk = self.recv_packet(wait)
        except ConnectionClosed as e:
            raise AssertionError(f"connection unexpectedly closed: {e}") from e
        assert pk is None, f"expected no packet within {wait}s, got {pk!r}"

    def expect_closed(self, timeout: float = ARRIVE) -> list[Packet]:
        """Assert the server closes the connection within ``timeout``; returns packets seen."""
        seen: list[Packet] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                pk = self.recv_packet(max(deadline - time.monotonic(), 0))
            except ConnectionClosed:
                return seen
            except ProtocolDecodeError:
                raise
            if pk is None:
                raise AssertionError(
                    f"server did not close the connection within {timeout}s; got {seen}")
            seen.append(pk)

    def closed_within(self, timeout: float) -> bool:
        try:
            self.expect_closed(timeout)
            return True
        except AssertionError:
            return False

    def expect_disconnect(self, reasons: int | Iterable[int] | None = None,
                          timeout: float = ARRIVE) -> Packet | None:
        """v5: the server must send DISCONNECT (reason in ``reasons``) and close.
        3.x: the server must just close (3.x servers never send DISCONNECT)."""
        seen = self.expect_closed(timeout)
        discs = [p for p in seen if p.type == DISCONNECT]
        if self.version != 5:
            assert not discs, f"MQTT 3.x server must not send DISCONNECT, got {seen}"
            return None
        assert discs, f"expected a DISCONNECT before the close, got {seen}"
        assert discs[-1] is seen[-1], f"DISCONNECT must be the last packet, got {seen}"
        if reasons is not None:
            allowed = {reasons} if isinstance(reasons, int) else set(reasons)
            assert discs[-1].rc in allowed, (
                f"DISCONNECT reason {discs[-1].rc:#04x}, expected one of "
                f"{sorted(hex(x) for x in allowed)}; packets {seen}")
        return discs[-1]

    # -- MQTT operations --------------------------------------------------------------------
    def next_pid(self) -> int:
        self._pid = self._pid % 65535 + 1
        return self._pid

    def connect(self, client_id: str | None = None, clean: bool = True, keepalive: int = 60,
                props: dict | list | None = None, will: dict | None = None,
                expect_rc: int | None = 0, timeout: float = ARRIVE, **kw) -> Packet:
        self.client_id = uid("r") if client_id is None else client_id
        self.send(build_connect(self.version, self.client_id, clean, keepalive, props, will,
                                **kw))
        pk = self.expect(CONNACK, timeout)
        if expect_rc is not None:
            assert pk.rc == expect_rc, f"CONNACK {pk!r}, expected rc {expect_rc:#04x}"
        return pk

    def subscribe(self, filters: list[tuple[str, int]] | str, qos: int = 0,
                  props: dict | list | None = None, timeout: float = ARRIVE) -> Packet:
        if isinstance(filters, str):
            filters = [(filters, qos)]
        pid = self.next_pid()
        self.send(build_subscribe(pid, filters, props, self.version))
        return self.wait_for(lambda p: p.type == SUBACK and p.pid == pid, timeout, "SUBACK")

    def unsubscribe(self, filters: list[str] | str, timeout: float = ARRIVE) -> Packet:
        if isinstance(filters, str):
            filters = [filters]
        pid = self.next_pid()
        self.send(build_unsubscribe(pid, filters, None, self.version))
        return self.wait_for(lambda p: p.type == UNSUBACK and p.pid == pid, timeout, "UNSUBACK")

    def publish(self, topic: str | bytes, payload: bytes | str = b"", qos: int = 0,
                retain: bool = False, props: dict | list | None = None, pid: int | None = None,
                dup: bool = False, wait: bool = True, timeout: float = ARRIVE) -> Packet | None:
        """Publish; with ``wait`` completes the QoS 1/2 handshake and returns the last ack."""
        if qos > 0 and pid is None:
            pid = self.next_pid()
        self.send(build_publish(topic, payload, qos, pid, retain, dup, props, self.version))
        if not wait or qos == 0:
            return None
        if qos == 1:
            return self.wait_for(lambda p: p.type == PUBACK and p.pid == pid, timeout, "PUBACK")
        rec = self.wait_for(lambda p: p.type == PUBREC and p.pid == pid, timeout, "PUBREC")
        if rec.rc is not None and rec.rc >= 0x80:
            return rec
        self.send(build_ack(PUBREL, pid, version=self.version))
        return self.wait_for(lambda p: p.type == PUBCOMP and p.pid == pid, timeout, "PUBCOMP")

    def next_publish(self, timeout: float = ARRIVE) -> Packet:
        return self.wait_for(lambda p: p.type == PUBLISH, timeout, "PUBLISH")

    def ack(self, pub: Packet, timeout: float = ARRIVE) -> None:
        """Acknowledge a received PUBLISH (QoS 1: PUBACK; QoS 2: PUBREC, PUBREL, PUBCOMP)."""
        if pub.qos == 1:
            self.send(build_ack(PUBACK, pub.pid, version=self.version))
        elif pub.qos == 2:
            self.send(build_ack(PUBREC, pub.pid, version=self.version))
            self.wait_for(lambda p: p.type == PUBREL and p.pid == pub.pid, timeout, "PUBREL")
            self.send(build_ack(PUBCOMP, pub.pid, version=self.version))

    def collect_publishes(self, n: int, timeout: float = ARRIVE, ack: bool = True) -> list[Packet]:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            pk = self.wait_for(lambda p: p.type == PUBLISH, max(deadline - time.monotonic(), 0),
                               f"PUBLISH #{len(out) + 1} of {n}")
            out.append(pk)
            if ack:
                self.ack(pk)
        return out

    def ping(self, timeout: float = ARRIVE) -> None:
        self.send(PINGREQ_BYTES)
        self.wait_for(lambda p: p.type == PINGRESP, timeout, "PINGRESP")

    def disconnect(self, rc: int | None = None, props: dict | list | None = None) -> None:
        self.try_send(build_disconnect(rc, props, self.version))
        # give the broker a moment to read the DISCONNECT before the FIN
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        try:
            self.expect_closed(2)
        except AssertionError:
            pass
        self.close()
