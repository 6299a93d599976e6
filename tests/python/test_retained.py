"""Retained messages and v5 subscription options (Retain Handling, Retain As Published, No Local).

MQTT 3.1.1: §3.3.1.3 RETAIN -- [MQTT-3.3.1-5] store/replace the retained message and its QoS,
[MQTT-3.3.1-6] send retained messages on a new subscription, [MQTT-3.3.1-7] a QoS 0 retained
message replaces the previous one, [MQTT-3.3.1-8] RETAIN=1 when sent because of a new
subscription, [MQTT-3.3.1-9] RETAIN=0 when sent to an established subscription,
[MQTT-3.3.1-10]/[MQTT-3.3.1-11] an empty retained payload is delivered normally and removes the
retained message, [MQTT-3.3.1-12] RETAIN=0 publications neither stored nor replace the retained
one; §3.8.4 [MQTT-3.8.4-6] delivery QoS = min(retained QoS, granted QoS).
MQTT 5.0: [MQTT-3.3.1-5]..[MQTT-3.3.1-8] (same), [MQTT-3.3.1-9]/[MQTT-3.3.1-10]/[MQTT-3.3.1-11]
Retain Handling 0/1/2, [MQTT-3.3.1-12]/[MQTT-3.3.1-13] Retain As Published, [MQTT-3.8.3-3] No
Local, [MQTT-3.8.4-4] Retain Handling 0 re-sends on re-subscribe, §3.2.2.3.5 Retain Available =
0 -> a retained PUBLISH gets DISCONNECT 0x9A, [MQTT-3.2.2-13] a retained Will is refused.
"""

import pytest

from conftest import (VERSION_IDS, VERSIONS, Client, P, RawClient, build_connect, build_publish,
                      uid)


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_retained_sent_to_new_subscriber(broker, version):
    b = broker()
    pub = Client(b, version=version)
    pub.publish("ret/a", b"v1", qos=1, retain=True)
    sub = Client(b, version=version)
    sub.subscribe("ret/a", qos=1)
    msgs = sub.messages.expect_exactly(1)
    assert (msgs[0].payload, msgs[0].retain, msgs[0].qos) == (b"v1", True, 1)


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_retained_replaced_by_newer(broker, version):
    b = broker()
    pub = Client(b, version=version)
    pub.publish("ret/r", b"old", qos=1, retain=True)
    pub.publish("ret/r", b"new", qos=0, retain=True)  # QoS 0 retained replaces too
    sub = Client(b, version=version)
    sub.subscribe("ret/r", qos=2)
    msgs = sub.messages.expect_exactly(1)
    assert msgs[0].payload == b"new" and msgs[0].retain and msgs[0].qos == 0


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_empty_retained_payload_clears_and_is_delivered(broker, version):
    b = broker()
    pub = Client(b, version=version)
    pub.publish("ret/c", b"something", qos=1, retain=True)
    existing = Client(b, version=version)
    existing.subscribe("ret/c", qos=1)
    existing.messages.wait_for(1)
    pub.publish("ret/c", b"", qos=1, retain=True)
    msgs = existing.messages.expect_exactly(2)
    assert msgs[1].payload == b"", "empty retained message is delivered to existing subscribers"
    late = Client(b, version=version)
    late.subscribe("ret/c", qos=1)
    late.messages.expect_none()


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_non_retained_publish_does_not_touch_retained(broker, version):
    b = broker()
    pub = Client(b, version=version)
    pub.publish("ret/n", b"kept", qos=1, retain=True)
    pub.publish("ret/n", b"transient", qos=1, retain=False)
    pub.publish("ret/n2", b"never-stored", qos=1, retain=False)
    sub = Client(b, version=version)
    sub.subscribe("ret/+", qos=1)
    msgs = sub.messages.expect_exactly(1)
    assert msgs[0].payload == b"kept" and msgs[0].topic == "ret/n"


def test_v311_live_delivery_clears_retain_flag(broker):
    b = broker()
    sub = Client(b, version=4)
    sub.subscribe("ret/live", qos=1)
    Client(b, version=4).publish("ret/live", b"x", qos=1, retain=True)
    msgs = sub.messages.expect_exactly(1)
    assert msgs[0].retain is False, "established subscription gets RETAIN=0 [MQTT-3.3.1-9]"


def test_wildcard_subscription_receives_all_matching_retained(broker):
    b = broker()
    pub = Client(b, version=4)
    expected = {"rw/a": b"1", "rw/b": b"2", "rw/c/d": b"3"}
    for t, p in expected.items():
        pub.publish(t, p, qos=1, retain=True)
    pub.publish("other/x", b"no", qos=1, retain=True)
    sub = Client(b, version=4)
    sub.subscribe("rw/#", qos=1)
    msgs = sub.messages.expect_exactly(3)
    assert {m.topic: m.payload for m in msgs} == expected
    assert all(m.retain for m in msgs)


def test_retained_delivery_qos_is_min(broker):
    b = broker()
    Client(b, version=4).publish("rq/t", b"q2", qos=2, retain=True)
    for sq in (0, 1, 2):
        sub = Client(b, version=4)
        sub.subscribe("rq/t", qos=sq)
        msgs = sub.messages.expect_exactly(1, settle=0.2)
        assert msgs[0].qos == sq


def test_v5_retain_handling_0_sends_on_every_subscribe(broker):
    b = broker()
    Client(b, version=5).publish("rh/t", b"r", qos=1, retain=True)
    sub = Client(b, version=5)
    sub.subscribe("rh/t", qos=1, retain_handling=0)
    sub.messages.wait_for(1)
    sub.subscribe("rh/t", qos=1, retain_handling=0)
    msgs = sub.messages.expect_exactly(2)
    assert all(m.retain and m.payload == b"r" for m in msgs)


def test_v5_retain_handling_1_sends_only_for_new_subscription(broker):
    b = broker()
    Client(b, version=5).publish("rh1/t", b"r", qos=1, retain=True)
    sub = Client(b, version=5)
    sub.subscribe("rh1/t", qos=1, retain_handling=1)
    sub.messages.wait_for(1)
    sub.subscribe("rh1/t", qos=1, retain_handling=1)  # already exists -> nothing
    sub.messages.expect_exactly(1)
    sub.subscribe("rh1/+", qos=1, retain_handling=1)  # a new filter -> sent
    msgs = sub.messages.expect_exactly(2)
    assert msgs[1].retain and msgs[1].payload == b"r"


def test_v5_retain_handling_2_never_sends_retained(broker):
    b = broker()
    pub = Client(b, version=5)
    pub.publish("rh2/t", b"r", qos=1, retain=True)
    sub = Client(b, version=5)
    sub.subscribe("rh2/t", qos=1, retain_handling=2)
    sub.messages.expect_none()
    pub.publish("rh2/t", b"live", qos=1)
    msgs = sub.messages.expect_exactly(1)
    assert msgs[0].payload == b"live", "live messages still flow with retain handling 2"


def test_v5_retain_as_published(broker):
    b = broker()
    plain = Client(b, version=5)
    plain.subscribe("rap/t", qos=1, retain_as_published=False)
    rap = Client(b, version=5)
    rap.subscribe("rap/t", qos=1, retain_as_published=True)
    pub = Client(b, version=5)
    pub.publish("rap/t", b"retained", qos=1, retain=True)
    pub.publish("rap/t", b"normal", qos=1, retain=False)
    p = plain.messages.expect_exactly(2)
    r = rap.messages.expect_exactly(2)
    assert [(m.payload, m.retain) for m in p] == [(b"retained", False), (b"normal", False)]
    assert [(m.payload, m.retain) for m in r] == [(b"retained", True), (b"normal", False)]


def test_v5_no_local(broker):
    b = broker()
    me = Client(b, version=5)
    me.subscribe("nl/t", qos=1, no_local=True)
    me.subscribe("nl/own", qos=1, no_local=False)
    me.publish("nl/t", b"mine", qos=1)
    me.publish("nl/own", b"echo", qos=1)
    other = Client(b, version=5)
    other.publish("nl/t", b"theirs", qos=1)
    msgs = me.messages.expect_exactly(2)
    assert sorted(m.payload for m in msgs) == [b"echo", b"theirs"]


def test_retain_unavailable(broker):
    b = broker(retain_available=False)
    watcher = Client(b, version=5)
    watcher.subscribe("ru/#", qos=1)
    raw = RawClient(b, version=5)
    ack = raw.connect()
    assert ack.props.get(P.RETAIN_AVAILABLE) == 0
    raw.publish("ru/ok", b"not retained", qos=1)  # fine
    raw.send(build_publish("ru/t", b"x", qos=1, pid=2, retain=True, version=5))
    raw.expect_disconnect(0x9A)
    msgs = watcher.messages.expect_exactly(1)
    assert msgs[0].payload == b"not retained"


def test_retain_unavailable_refuses_retained_will(broker):
    b = broker(retain_available=False)
    raw = RawClient(b, version=5)
    raw.send(build_connect(5, uid("rw"), will={"topic": "w/t", "payload": b"x", "retain": True}))
    seen = raw.expect_closed()
    assert seen and seen[0].rc >= 0x80, f"CONNECT with retained Will must be refused: {seen}"
