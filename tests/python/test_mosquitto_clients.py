"""Interoperability with Debian's mosquitto_pub / mosquitto_sub (libmosquitto 2.0.x).

Exercises, with an independent client implementation, the same spec rules as the other modules:
MQTT 3.1 / 3.1.1 / 5.0 CONNECT (§3.1), QoS 0/1/2 flows (3.1.1 §4.3, 5.0 §4.3) and delivery QoS
min(publish, subscription) (3.1.1 [MQTT-3.8.4-6], 5.0 [MQTT-3.8.4-8]), retained messages incl.
clearing with an empty payload (3.1.1 §3.3.1.3, 5.0 §3.3.1.3), persistent sessions (3.1.1
§3.1.2.4, 5.0 §3.1.2.11.2), Will on abnormal close (§3.1.2.5), and v5 PUBLISH properties
forwarded unaltered (5.0 [MQTT-3.3.2-4], [MQTT-3.3.2-15]..[MQTT-3.3.2-20]).
"""

import queue
import shutil
import signal
import subprocess
import threading
import time

import pytest

from conftest import Client, uid

MOSQ_V = {3: "mqttv31", 4: "mqttv311", 5: "mqttv5"}
VERSION_PARAMS = pytest.mark.parametrize("version", [3, 4, 5], ids=["V31", "V311", "V5"])

pytestmark = pytest.mark.skipif(
    not (shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub")),
    reason="mosquitto-clients not installed (apt-get install mosquitto-clients)")


def mosq_pub(b, topic, message=None, version=4, qos=0, extra=(), stdin=None):
    args = ["mosquitto_pub", "-h", b.host, "-p", str(b.port), "-V", MOSQ_V[version],
            "-q", str(qos), "-t", topic]
    if message is not None:
        args += ["-m", message]
    args += list(extra)
    r = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=15)
    assert r.returncode == 0, f"{args} failed ({r.returncode}): {r.stderr}"


class MosqSub:
    """mosquitto_sub in the background. With ``sync`` it also subscribes to a topic holding a
    retained message and waits for it, so the subscription is known to be active on return."""

    def __init__(self, b, topics, version=4, qos=0, count=1, wait=15, sync=True,
                 fmt="%t|%q|%r|%p", extra=()):
        self.sync_topic = None
        if sync:
            self.sync_topic = f"sync/{uid('s')}"
            mosq_pub(b, self.sync_topic, "sync", version=4, qos=1, extra=["-r"])
        args = ["mosquitto_sub", "-h", b.host, "-p", str(b.port), "-V", MOSQ_V[version],
                "-q", str(qos), "-W", str(wait), "-F", fmt]
        if count is not None:
            args += ["-C", str(count + (1 if sync else 0))]
        for t in ([self.sync_topic] if sync else []) + list(topics):
            args += ["-t", t]
        args += list(extra)
        self.args = args
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        if sync:
            first = self.next_line(10)
            assert first is not None and first.startswith(self.sync_topic + "|"), (
                f"mosquitto_sub did not get the sync message: {first!r}")

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, timeout=10):
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def finish(self, timeout=15):
        """Wait for exit; returns (exit code, remaining stdout lines, stderr)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            pytest.fail(f"{self.args} did not exit within {timeout}s")
        out = []
        while True:
            line = self.next_line(2)
            if line is None:
                break
            out.append(line)
        return self.proc.returncode, out, self.proc.stderr.read()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def subs():
    made = []
    yield made
    for s in made:
        s.kill()


@pytest.mark.parametrize("qos", [0, 1, 2])
@VERSION_PARAMS
def test_pub_sub(broker, subs, version, qos):
    b = broker()
    s = MosqSub(b, ["mc/t"], version=version, qos=qos, count=1)
    subs.append(s)
    mosq_pub(b, "mc/t", "hello", version=version, qos=qos)
    rc, lines, err = s.finish()
    assert rc == 0, err
    assert lines == [f"mc/t|{qos}|0|hello"]


@VERSION_PARAMS
def test_delivery_at_min_qos(broker, subs, version):
    b = broker()
    s = MosqSub(b, ["mq/t"], version=version, qos=1, count=3)
    subs.append(s)
    for q in (0, 1, 2):
        mosq_pub(b, "mq/t", f"p{q}", version=version, qos=q)
    rc, lines, err = s.finish()
    assert rc == 0, err
    assert sorted(lines) == ["mq/t|0|0|p0", "mq/t|1|0|p1", "mq/t|1|0|p2"]


@VERSION_PARAMS
def test_retained_with_r_and_clear(broker, subs, version):
    b = broker()
    mosq_pub(b, "mr/t", "keep", version=version, qos=1, extra=["-r"])
    s = MosqSub(b, ["mr/t"], version=version, qos=1, count=1, sync=False)
    subs.append(s)
    rc, lines, err = s.finish()
    assert rc == 0, err
    assert lines == ["mr/t|1|1|keep"]
    mosq_pub(b, "mr/t", None, version=version, qos=1, extra=["-r", "-n"])  # clear
    s2 = MosqSub(b, ["mr/t"], version=version, qos=1, count=1, wait=1, sync=False)
    subs.append(s2)
    rc, lines, _ = s2.finish()
    assert lines == [], "retained message must be gone"
    assert rc != 0  # timed out (-W) without a message


def test_count_option_stops_after_n_messages(broker, subs):
    b = broker()
    s = MosqSub(b, ["mcount/t"], version=4, qos=1, count=3)
    subs.append(s)
    mosq_pub(b, "mcount/t", None, version=4, qos=1, extra=["-l"], stdin="a\nb\nc\nd\ne\n")
    rc, lines, err = s.finish()
    assert rc == 0, err
    assert lines == ["mcount/t|1|0|a", "mcount/t|1|0|b", "mcount/t|1|0|c"]


def test_wait_timeout_on_idle_topic(broker, subs):
    b = broker()
    t0 = time.monotonic()
    s = MosqSub(b, ["idle/t"], version=5, qos=1, count=1, wait=1, sync=False)
    subs.append(s)
    rc, lines, err = s.finish(10)
    assert lines == []
    assert rc != 0, "mosquitto_sub -W exits non-zero when it times out"
    assert "timed out" in err.lower() or rc == 27
    assert time.monotonic() - t0 < 5


def test_v5_user_properties_and_other_properties(broker, subs):
    b = broker()
    paho = Client(b, version=5)
    paho.subscribe("mp/t", qos=1)
    s = MosqSub(b, ["mp/t"], version=5, qos=1, count=1, fmt="%t|%P|%C|%R|%p")
    subs.append(s)
    mosq_pub(b, "mp/t", '{"x":1}', version=5, qos=1, extra=[
        "-D", "publish", "user-property", "key", "value",
        "-D", "publish", "user-property", "key2", "value 2",
        "-D", "publish", "content-type", "application/json",
        "-D", "publish", "response-topic", "mp/reply",
        "-D", "publish", "correlation-data", "corr-123",
        "-D", "publish", "payload-format-indicator", "1",
        "-D", "publish", "message-expiry-interval", "120",
    ])
    m = paho.messages.expect_exactly(1)[0]
    assert m.payload == b'{"x":1}'
    assert m.props.get("UserProperty") == [("key", "value"), ("key2", "value 2")]
    assert m.props.get("ContentType") == "application/json"
    assert m.props.get("ResponseTopic") == "mp/reply"
    assert m.props.get("CorrelationData") == b"corr-123"
    assert m.props.get("PayloadFormatIndicator") == 1
    assert 110 <= m.props.get("MessageExpiryInterval", -1) <= 120
    rc, lines, err = s.finish()
    assert rc == 0, err
    assert lines == ['mp/t|key:value key2:value 2|application/json|mp/reply|{"x":1}']


@pytest.mark.parametrize("version", [4, 5], ids=["V311", "V5"])
def test_persistent_session_with_c_and_i(broker, subs, version):
    b = broker()
    cid = uid("ms")
    s = MosqSub(b, ["mps/t"], version=version, qos=1, count=None, sync=False,
                extra=["-c", "-i", cid, "-E"])  # -E: exit once subscribed
    subs.append(s)
    rc, _, err = s.finish()
    assert rc == 0, err
    mosq_pub(b, "mps/t", "queued-1", version=version, qos=1)
    mosq_pub(b, "mps/t", "queued-2", version=version, qos=2)
    s2 = MosqSub(b, ["mps/t"], version=version, qos=1, count=2, sync=False,
                 extra=["-c", "-i", cid])
    subs.append(s2)
    rc, lines, err = s2.finish()
    assert rc == 0, err
    # queued under the QoS 1 subscription -> delivered at min(2, 1) = 1
    assert lines == ["mps/t|1|0|queued-1", "mps/t|1|0|queued-2"]


@VERSION_PARAMS
def test_will_of_killed_mosquitto_sub(broker, subs, version):
    b = broker()
    watcher = Client(b, version=5)
    watcher.subscribe("mwill/#", qos=1)
    s = MosqSub(b, ["mwill-none/t"], version=version, qos=0, count=None,
                extra=["--will-topic", "mwill/t", "--will-payload", "dead", "--will-qos", "1"])
    subs.append(s)
    s.proc.send_signal(signal.SIGKILL)
    s.proc.wait(5)
    m = watcher.messages.expect_exactly(1)[0]
    assert (m.topic, m.payload, m.qos) == ("mwill/t", b"dead", 1)
