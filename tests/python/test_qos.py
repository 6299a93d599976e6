"""Quality of service: delivery QoS, overlapping subscriptions, flow control, QoS 2 de-duplication.

MQTT 3.1.1: §3.8.4 [MQTT-3.8.4-6] QoS of delivered messages = min(published QoS, granted QoS),
§3.9.3 SUBACK return codes in order, §3.3.5 [MQTT-3.3.5-1] overlapping subscriptions -> deliver at
the maximum QoS of the matching subscriptions, §4.3.2 / §4.3.3 QoS 1 and 2 protocol flows
([MQTT-4.3.2-*], [MQTT-4.3.3-2]: until PUBREL the receiver acknowledges a re-sent PUBLISH with the
same Packet Identifier by PUBREC and MUST NOT deliver it onward twice; after PUBCOMP the same
identifier is a new publication), §2.3.1 non-zero unique Packet Identifiers, §4.6 message
ordering, [MQTT-3.3.1-2] DUP=0 for QoS 0.
MQTT 5.0: [MQTT-3.8.4-8] min QoS, [MQTT-3.3.4-2] overlapping subscriptions, [MQTT-3.3.4-3] /
[MQTT-3.3.4-4] all matching Subscription Identifiers in the single copy, §3.1.2.11.3 Receive
Maximum and §4.9 flow control ([MQTT-3.3.4-9] the server MUST NOT send more than Receive Maximum
unacknowledged QoS 1/2 PUBLISH packets; a QoS 2 slot is freed by PUBCOMP, not PUBREC),
[MQTT-4.3.3-10] QoS 2 duplicate suppression, [MQTT-4.3.3-12] new publication after PUBCOMP,
[MQTT-2.2.1-4] unused non-zero Packet Identifiers, [MQTT-4.6.0-5]/[MQTT-4.6.0-6] ordered topics.
Sandpiper contract: max_inflight caps the outbound window (3.x: the window itself).
"""

import time

import pytest

from conftest import (PUBACK, PUBCOMP, PUBREC, PUBREL, QUIET, VERSION_IDS, VERSIONS,
                      Client, P, RawClient, build_ack, build_publish, sub_opts, uid)


@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_roundtrip_at_each_qos(broker, version, qos):
    b = broker()
    sub = Client(b, version=version)
    assert sub.subscribe("qos/t", qos=2) == [2]
    pub = Client(b, version=version)
    pub.publish("qos/t", f"payload-{qos}".encode(), qos=qos)
    msgs = sub.messages.expect_exactly(1)
    assert msgs[0].qos == qos
    assert msgs[0].payload == f"payload-{qos}".encode()


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_delivery_qos_is_min_of_publish_and_subscription(broker, version):
    b = broker()
    subs = {}
    for sq in (0, 1, 2):
        c = Client(b, version=version)
        assert c.subscribe("minq/#", qos=sq) == [sq]
        subs[sq] = c
    pub = Client(b, version=version)
    for pq in (0, 1, 2):
        pub.publish(f"minq/p{pq}", f"p{pq}".encode(), qos=pq)
    for c in subs.values():
        c.messages.wait_for(3)
    time.sleep(QUIET)
    for sq, c in subs.items():
        msgs = c.messages.all()
        assert len(msgs) == 3, msgs
        got = {m.topic: m.qos for m in msgs}
        assert got == {f"minq/p{pq}": min(pq, sq) for pq in (0, 1, 2)}, f"sub QoS {sq}: {got}"


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_suback_grants_requested_qos_in_order(broker, version):
    b = broker()
    raw = RawClient(b, version=version)
    raw.connect()
    ack = raw.subscribe([("g/a", 2), ("g/b", 0), ("g/c", 1), ("g/+/d", 2)])
    assert ack.codes == [2, 0, 1, 2]


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_overlapping_subscriptions_deliver_one_copy_at_max_qos(broker, version):
    b = broker()
    sub = Client(b, version=version)
    sub.subscribe("ov/+/x", qos=1)
    sub.subscribe("ov/#", qos=2)
    sub.subscribe("ov/a/x", qos=0)
    pub = Client(b, version=version)
    pub.publish("ov/a/x", b"two", qos=2)
    msgs = sub.messages.expect_exactly(1)
    assert msgs[0].qos == 2
    sub.messages.clear()
    pub.publish("ov/a/x", b"one", qos=1)
    msgs = sub.messages.expect_exactly(1)
    assert msgs[0].qos == 1 and msgs[0].payload == b"one"


def test_overlapping_subscriptions_carry_all_subscription_identifiers(broker):
    b = broker()
    raw = RawClient(b, version=5)
    raw.connect()
    raw.subscribe([("sid/+/x", sub_opts(1))], props={P.SUBSCRIPTION_ID: 1})
    raw.subscribe([("sid/#", sub_opts(2))], props={P.SUBSCRIPTION_ID: 2})
    raw.subscribe([("sid/a/x", sub_opts(0))], props={P.SUBSCRIPTION_ID: 300})
    raw.subscribe([("sid/a/+", sub_opts(0))])  # no identifier
    Client(b, version=5).publish("sid/a/x", b"m", qos=2)
    pk = raw.next_publish()
    raw.ack(pk)
    assert pk.qos == 2
    assert sorted(pk.props.get(P.SUBSCRIPTION_ID, [])) == [1, 2, 300], pk
    raw.expect_nothing()


def _subscriber_with_receive_maximum(b, rm, topic="rm/t", qos=1):
    raw = RawClient(b, version=5)
    raw.connect(props={P.RECEIVE_MAXIMUM: rm})
    raw.subscribe([(topic, sub_opts(qos))])
    return raw


def test_receive_maximum_limits_unacked_qos1_publishes(broker):
    b = broker()
    raw = _subscriber_with_receive_maximum(b, 2)
    pub = Client(b, version=5)
    for i in range(5):
        pub.publish("rm/t", f"m{i}".encode(), qos=1)
    p0, p1 = raw.next_publish(), raw.next_publish()
    raw.expect_nothing(1.0)  # window full: exactly 2 outstanding
    raw.ack(p0)
    p2 = raw.next_publish()
    raw.expect_nothing(QUIET)
    raw.ack(p1)
    raw.ack(p2)
    p3, p4 = raw.next_publish(), raw.next_publish()
    raw.ack(p3)
    raw.ack(p4)
    raw.expect_nothing(QUIET)
    pubs = [p0, p1, p2, p3, p4]
    assert [p.payload for p in pubs] == [f"m{i}".encode() for i in range(5)]
    assert all(p.qos == 1 and not p.dup for p in pubs)
    assert len({p0.pid, p1.pid}) == 2 and 0 not in {p.pid for p in pubs}


def test_receive_maximum_qos2_slot_released_only_by_pubcomp(broker):
    b = broker()
    raw = _subscriber_with_receive_maximum(b, 1, qos=2)
    pub = Client(b, version=5)
    pub.publish("rm/t", b"first", qos=2)
    pub.publish("rm/t", b"second", qos=2)
    p0 = raw.next_publish()
    assert p0.payload == b"first"
    raw.expect_nothing(QUIET)
    raw.send(build_ack(PUBREC, p0.pid, version=5))
    rel = raw.recv_packet()
    assert rel is not None and rel.type == PUBREL and rel.pid == p0.pid, rel
    raw.expect_nothing(QUIET)  # PUBREC does not free the slot
    raw.send(build_ack(PUBCOMP, p0.pid, version=5))
    p1 = raw.next_publish()
    assert p1.payload == b"second"
    raw.ack(p1)


def test_receive_maximum_does_not_delay_other_packets(broker):
    """[MQTT-3.3.4-10]: a full window must not delay non-PUBLISH packets. (QoS 0 PUBLISHes MAY
    be held back too, §4.9, so they are not checked.)"""
    b = broker()
    raw = _subscriber_with_receive_maximum(b, 1)
    pub = Client(b, version=5)
    for i in range(3):
        pub.publish("rm/t", f"m{i}".encode(), qos=1)
    p0 = raw.next_publish()
    raw.ping()  # PINGRESP while the window is full
    ack = raw.subscribe([("rm/other", sub_opts(0))])
    assert ack.codes == [0]
    unack = raw.unsubscribe(["rm/other"])
    assert unack.codes == [0x00]
    raw.ack(p0)
    assert raw.next_publish().payload == b"m1"


def test_max_inflight_limits_v311_window(broker):
    b = broker(max_inflight=2)
    raw = RawClient(b, version=4)
    raw.connect()
    raw.subscribe("mi/t", qos=1)
    pub = Client(b, version=4)
    for i in range(4):
        pub.publish("mi/t", f"m{i}".encode(), qos=1)
    p0, p1 = raw.next_publish(), raw.next_publish()
    raw.expect_nothing(1.0)
    raw.ack(p0)
    raw.ack(p1)
    rest = raw.collect_publishes(2)
    assert [p.payload for p in [p0, p1] + rest] == [b"m0", b"m1", b"m2", b"m3"]


def test_max_inflight_caps_larger_v5_receive_maximum(broker):
    b = broker(max_inflight=3)
    raw = _subscriber_with_receive_maximum(b, 50)
    pub = Client(b, version=5)
    for i in range(5):
        pub.publish("rm/t", f"m{i}".encode(), qos=1)
    first = [raw.next_publish() for _ in range(3)]
    raw.expect_nothing(1.0)
    for p in first:
        raw.ack(p)
    rest = raw.collect_publishes(2)
    assert [p.payload for p in first + rest] == [f"m{i}".encode() for i in range(5)]


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_qos2_resent_publish_before_pubrel_is_not_delivered_twice(broker, version):
    b = broker()
    sub = Client(b, version=5)
    sub.subscribe("dd/t", qos=2)
    raw = RawClient(b, version=version)
    raw.connect()
    raw.send(build_publish("dd/t", b"once", qos=2, pid=7, version=version))
    rec = raw.expect(PUBREC)
    assert rec.pid == 7
    raw.send(build_publish("dd/t", b"once", qos=2, pid=7, dup=True, version=version))
    rec2 = raw.expect(PUBREC)
    assert rec2.pid == 7, "a re-sent PUBLISH must be acknowledged with PUBREC again"
    raw.send(build_ack(PUBREL, 7, version=version))
    comp = raw.expect(PUBCOMP)
    assert comp.pid == 7
    msgs = sub.messages.expect_exactly(1, settle=0.8)
    assert msgs[0].payload == b"once" and msgs[0].qos == 2
    # after PUBCOMP, the same packet id is a new publication
    raw.send(build_publish("dd/t", b"again", qos=2, pid=7, version=version))
    assert raw.expect(PUBREC).pid == 7
    raw.send(build_ack(PUBREL, 7, version=version))
    raw.expect(PUBCOMP)
    msgs = sub.messages.expect_exactly(2)
    assert [m.payload for m in msgs] == [b"once", b"again"]


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_qos2_publish_resent_after_reconnect_is_not_delivered_twice(broker, version):
    """The spec-sanctioned re-send ([MQTT-4.4.0-1]): reconnect with a persistent session and
    re-send the PUBLISH whose PUBREC was lost -- the server answers PUBREC and does not deliver
    again; the flow then completes with PUBREL/PUBCOMP."""
    b = broker()
    sub = Client(b, version=5)
    sub.subscribe("ddr/t", qos=2)
    cid = uid("ddr")
    props = {P.SESSION_EXPIRY: 60} if version == 5 else None
    raw = RawClient(b, version=version)
    raw.connect(client_id=cid, clean=False, props=props)
    raw.send(build_publish("ddr/t", b"once", qos=2, pid=9, version=version))
    assert raw.expect(PUBREC).pid == 9
    raw.close()  # pretend the PUBREC was lost
    time.sleep(0.2)
    raw = RawClient(b, version=version)
    ack = raw.connect(client_id=cid, clean=False, props=props)
    assert ack.session_present is True
    raw.send(build_publish("ddr/t", b"once", qos=2, pid=9, dup=True, version=version))
    assert raw.expect(PUBREC).pid == 9
    raw.send(build_ack(PUBREL, 9, version=version))
    assert raw.expect(PUBCOMP).pid == 9
    msgs = sub.messages.expect_exactly(1, settle=0.8)
    assert msgs[0].payload == b"once"


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_qos1_same_packet_id_after_puback_is_new_publication(broker, version):
    b = broker()
    sub = Client(b, version=5)
    sub.subscribe("q1/t", qos=1)
    raw = RawClient(b, version=version)
    raw.connect()
    for payload in (b"a", b"b"):
        raw.send(build_publish("q1/t", payload, qos=1, pid=42, version=version))
        ack = raw.expect(PUBACK)
        assert ack.pid == 42
    msgs = sub.messages.expect_exactly(2)
    assert [m.payload for m in msgs] == [b"a", b"b"]


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_inbound_acks_echo_packet_ids(broker, version):
    b = broker()
    raw = RawClient(b, version=version)
    raw.connect()
    raw.send(build_publish("ids/t", b"x", qos=1, pid=65535, version=version))
    assert raw.expect(PUBACK).pid == 65535
    raw.send(build_publish("ids/t", b"y", qos=2, pid=1234, version=version))
    assert raw.expect(PUBREC).pid == 1234
    raw.send(build_ack(PUBREL, 1234, version=version))
    assert raw.expect(PUBCOMP).pid == 1234


def test_outbound_packet_ids_unique_while_in_flight(broker):
    b = broker()
    raw = _subscriber_with_receive_maximum(b, 20)
    pub = Client(b, version=5)
    for i in range(20):
        pub.publish("rm/t", f"m{i}".encode(), qos=1)
    pubs = [raw.next_publish() for _ in range(20)]
    pids = [p.pid for p in pubs]
    assert len(set(pids)) == 20 and 0 not in pids, pids
    for p in pubs:
        raw.ack(p)


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_order_preserved_per_topic(broker, qos):
    b = broker()
    sub = Client(b, version=5)
    sub.subscribe("order/t", qos=qos)
    pub = Client(b, version=5, max_inflight=10)  # stay well inside the server's Receive Maximum
    infos = [pub.publish("order/t", f"{i:03d}".encode(), qos=qos, wait=False) for i in range(50)]
    for info in infos:
        info.wait_for_publish(5)
    msgs = sub.messages.expect_exactly(50) if qos else sub.messages.wait_for(50)
    assert [m.payload for m in msgs] == [f"{i:03d}".encode() for i in range(50)]


def test_qos0_delivery_has_no_dup_and_no_packet_id(broker):
    b = broker()
    raw = RawClient(b, version=4)
    raw.connect()
    raw.subscribe("z/t", qos=2)
    Client(b, version=4).publish("z/t", b"zero", qos=0)
    pk = raw.next_publish()
    assert pk.qos == 0 and pk.dup is False and pk.pid is None
    assert pk.payload == b"zero"


def test_slow_subscriber_does_not_block_others(broker):
    """A subscriber with a full window (never acking) must not hold up other subscribers."""
    b = broker()
    stuck = _subscriber_with_receive_maximum(b, 1, topic="slow/t")
    fast = Client(b, version=5)
    fast.subscribe("slow/t", qos=1)
    pub = Client(b, version=5)
    t0 = time.monotonic()
    for i in range(20):
        pub.publish("slow/t", f"m{i}".encode(), qos=1)
    fast.messages.expect_exactly(20)
    assert time.monotonic() - t0 < 5
    assert stuck.next_publish().payload == b"m0"



def test_qos2_exactly_once_with_concurrent_publishers(broker):
    b = broker()
    subs = []
    for version in (3, 4, 5):
        c = Client(b, version=version)
        c.subscribe("conc/#", qos=2)
        subs.append(c)
    pubs = [Client(b, version=v, max_inflight=20) for v in (4, 5, 5, 4)]
    infos = []
    for k in range(40):
        for j, p in enumerate(pubs):
            infos.append(p.publish(f"conc/{j}", f"{j}-{k}".encode(), qos=2, wait=False))
    for info in infos:
        info.wait_for_publish(10)
        assert info.is_published()
    expected = sorted(f"{j}-{k}".encode() for j in range(4) for k in range(40))
    for c in subs:
        msgs = c.messages.expect_exactly(160, timeout=10)
        assert sorted(m.payload for m in msgs) == expected, "every message exactly once"
        for j in range(4):
            seq = [m.payload for m in msgs if m.topic == f"conc/{j}"]
            assert seq == [f"{j}-{k}".encode() for k in range(40)], "per-publisher order kept"
