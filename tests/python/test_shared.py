"""Shared subscriptions ($share/{ShareName}/{filter}) for MQTT 3.1.1 and 5.0 clients.

MQTT 5.0: §4.8.2 Shared Subscriptions -- [MQTT-4.8.2-1]/[MQTT-4.8.2-2] "$share/" + non-empty
ShareName without '/', '+', '#', followed by '/' and a filter; each message matching a shared
subscription is sent to only one session of the group, every group gets its own copy, and
[MQTT-4.8.2-3] the granted QoS of the chosen member is respected; a QoS 1 message whose delivery
was not acknowledged when the member's session ends SHOULD be sent to another member of the
group. [MQTT-3.8.3-4] No Local on a shared subscription is a Protocol Error (DISCONNECT 0x82).
§3.10.4 unsubscribing removes the member.
MQTT 3.1.1 has no shared subscriptions; Sandpiper's contract extends the same semantics to 3.1.1
clients.  (QoS 2: the v5 spec says a partially delivered QoS 2 message MUST NOT go to another
member -- [MQTT-4.8.2-4]/[MQTT-4.8.2-5] -- so only QoS 1 redelivery is tested here.)
"""

import time

import pytest

from conftest import (DISCONNECT, SUBACK, Client, RawClient, build_subscribe, sub_opts)

V45 = pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])


@V45
def test_each_message_delivered_to_exactly_one_member(broker, version):
    b = broker()
    members = []
    for _ in range(3):
        c = Client(b, version=version)
        assert c.subscribe("$share/g/sh/#", qos=1) == [1]
        members.append(c)
    plain = Client(b, version=version)
    plain.subscribe("sh/#", qos=1)
    pub = Client(b, version=version)
    n = 30
    for i in range(n):
        pub.publish(f"sh/t{i % 3}", f"m{i}".encode(), qos=1)
    assert len(plain.messages.expect_exactly(n)) == n, "non-shared subscriber gets everything"
    deadline = time.monotonic() + 5
    while sum(len(m.messages) for m in members) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    got = [msg.payload for m in members for msg in m.messages.all()]
    assert len(got) == n, f"each message to exactly one member: {len(got)} deliveries for {n}"
    assert sorted(got) == sorted(f"m{i}".encode() for i in range(n))
    for m in members:
        for msg in m.messages.all():
            assert msg.topic.startswith("sh/t"), "members see the real topic name"


@V45
def test_each_group_gets_its_own_copy(broker, version):
    b = broker()
    groups = {"g1": [], "g2": []}
    for g, lst in groups.items():
        for _ in range(2):
            c = Client(b, version=version)
            c.subscribe(f"$share/{g}/grp/t", qos=1)
            lst.append(c)
    pub = Client(b, version=version)
    for i in range(10):
        pub.publish("grp/t", f"m{i}".encode(), qos=1)
    time.sleep(0.3)
    for g, lst in groups.items():
        deadline = time.monotonic() + 5
        while sum(len(c.messages) for c in lst) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        got = sorted(m.payload for c in lst for m in c.messages.all())
        assert got == sorted(f"m{i}".encode() for i in range(10)), f"group {g}: {got}"


def test_shared_member_granted_qos_respected(broker):
    b = broker()
    m0 = Client(b, version=5)
    m0.subscribe("$share/q/sq/t", qos=0)
    Client(b, version=5).publish("sq/t", b"x", qos=2)
    msgs = m0.messages.expect_exactly(1)
    assert msgs[0].qos == 0


@V45
def test_unacked_qos1_redelivered_to_other_member_when_member_leaves(broker, version):
    b = broker()
    stuck = RawClient(b, version=version)
    stuck.connect(clean=True)
    stuck.subscribe([("$share/rd/rd/t", sub_opts(1))])
    pub = Client(b, version=version)
    pub.publish("rd/t", b"precious", qos=1)
    first = stuck.next_publish()  # only member at publish time; never acknowledged
    assert first.payload == b"precious"
    other = Client(b, version=version)
    other.subscribe("$share/rd/rd/t", qos=1)
    other.messages.expect_none()  # still owned by the connected member
    stuck.close()  # session ends (clean session / expiry 0)
    msgs = other.messages.wait_for(1, timeout=5)
    assert msgs[0].payload == b"precious" and msgs[0].qos == 1
    time.sleep(0.3)
    assert len(other.messages) == 1


@V45
def test_unsubscribed_member_no_longer_receives(broker, version):
    b = broker()
    a = Client(b, version=version)
    a.subscribe("$share/u/us/t", qos=1)
    c = Client(b, version=version)
    c.subscribe("$share/u/us/t", qos=1)
    a.unsubscribe("$share/u/us/t")
    pub = Client(b, version=version)
    for i in range(6):
        pub.publish("us/t", f"m{i}".encode(), qos=1)
    msgs = c.messages.expect_exactly(6)
    assert [m.payload for m in msgs] == [f"m{i}".encode() for i in range(6)]
    assert len(a.messages) == 0


def test_shared_subscription_no_local_is_protocol_error(broker):
    b = broker()
    raw = RawClient(b, version=5)
    raw.connect()
    raw.send(build_subscribe(1, [("$share/g/nl/t", sub_opts(1, no_local=True))], None, 5))
    raw.expect_disconnect(0x82)


@pytest.mark.parametrize("flt", ["$share/g+/x", "$share//x", "$share/g", "$share/g/",
                                 "$share/#/x"],
                         ids=["plus-in-name", "empty-name", "no-filter", "empty-filter",
                              "hash-name"])
def test_invalid_shared_filters_not_granted(broker, flt):
    b = broker()
    raw = RawClient(b, version=5)
    raw.connect()
    raw.send(build_subscribe(1, [(flt, sub_opts(1))], None, 5))
    try:
        pk = raw.recv_packet()
    except Exception:  # noqa: BLE001
        pk = None
    if pk is not None and pk.type == SUBACK:
        assert pk.codes[0] >= 0x80, f"{flt!r} must not be granted: {pk!r}"
    else:
        if pk is not None:
            assert pk.type == DISCONNECT and pk.rc >= 0x80, pk
        raw.expect_closed()


def test_shared_and_normal_subscription_in_same_client(broker):
    """A client with both a shared and a normal matching subscription gets the message through
    its normal subscription and may get it through the share (at most 2 copies, at least 1)."""
    b = broker()
    c = Client(b, version=5)
    c.subscribe("$share/g/both/t", qos=1)
    c.subscribe("both/t", qos=1)
    Client(b, version=5).publish("both/t", b"x", qos=1)
    msgs = c.messages.wait_for(1)
    time.sleep(0.5)
    assert 1 <= len(c.messages) <= 2 and all(m.payload == b"x" for m in msgs)
