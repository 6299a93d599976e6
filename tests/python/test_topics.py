"""Topic names, topic filters, wildcards, subscribe / unsubscribe.

MQTT 3.1.1: §4.7.1.2 multi-level wildcard ([MQTT-4.7.1-2] '#' last and alone in its level;
"sport/#" also matches "sport"), §4.7.1.3 single-level wildcard ([MQTT-4.7.1-3] occupies a whole
level; "sport/+" matches "sport/" but not "sport"), §4.7.2 [MQTT-4.7.2-1] filters starting with a
wildcard do not match topic names starting with '$', §4.7.3 [MQTT-4.7.3-1] topics at least one
character, case sensitive, no normalisation, '/' alone / leading '/' are distinct levels,
[MQTT-3.3.2-2] no wildcards in a PUBLISH topic name, §3.8.4 [MQTT-3.8.4-3] identical filter
replaces the subscription, §3.9.3 SUBACK 0x80 failure, §3.10.4 [MQTT-3.10.4-1]..[MQTT-3.10.4-5]
UNSUBSCRIBE stops delivery and is always acknowledged.
MQTT 5.0: §4.7 (same rules, [MQTT-4.7.2-1], [MQTT-4.7.3-4] no normalisation), §3.9.3 SUBACK
0x8F Topic Filter invalid, §3.11.3 UNSUBACK 0x00 / 0x11 No subscription existed, §3.3.2.1 a
zero-length topic without a Topic Alias is a Protocol Error.
"""

import time

import pytest

from conftest import (DISCONNECT, PUBACK, QUIET, SUBACK, Client, RawClient, build_publish,
                      build_subscribe, sub_opts)

MATCH_CASES = [
    ("sport/tennis/+", ["sport/tennis/player1", "sport/tennis/"],
     ["sport/tennis/player1/ranking", "sport/tennis", "sport/tenniss/x", "Sport/tennis/p"]),
    ("sport/#", ["sport", "sport/", "sport/tennis", "sport/tennis/player1/ranking"],
     ["sports", "Sport/tennis", "xsport/tennis"]),
    ("sport/+", ["sport/", "sport/x"], ["sport", "sport/x/y"]),
    ("+/+", ["/finance", "a/b", "a/"], ["a", "a/b/c", "abc"]),
    ("/+", ["/finance", "/"], ["finance", "a/b", "//x"]),
    ("+", ["finance", "x y"], ["/finance", "a/b", "a/"]),
    ("#", ["a", "a/b/c", "/x", "/"], ["$app/x", "$SYSx"]),
    ("a/+/c/#", ["a/b/c", "a/b/c/d/e", "a//c"], ["a/c", "a/b/d", "a/b/c2"]),
    ("+/tennis/#", ["sport/tennis", "sport/tennis/x"], ["sport/tennis2", "tennis"]),
    ("ACCOUNTS", ["ACCOUNTS"], ["Accounts", "accounts", "ACCOUNTS/x"]),
    ("a b/\u20ac/\u00e9", ["a b/\u20ac/\u00e9"], ["a b/e/e", "ab/\u20ac/\u00e9", "a b/\u20ac/e\u0301"]),
]


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
@pytest.mark.parametrize("flt,matching,other", MATCH_CASES,
                         ids=[c[0].encode("ascii", "replace").decode() for c in MATCH_CASES])
def test_topic_filter_matching(broker, version, flt, matching, other):
    b = broker()
    sub = Client(b, version=version)
    assert sub.subscribe(flt, qos=1) == [1]
    pub = Client(b, version=version)
    for t in other + matching:
        pub.publish(t, t.encode(), qos=1)
    msgs = sub.messages.expect_exactly(len(matching))
    assert sorted(m.topic for m in msgs) == sorted(matching)
    assert all(m.payload == m.topic.encode() for m in msgs)


def test_dollar_topics_not_matched_by_leading_wildcards(broker):
    b = broker()
    subs = {}
    for flt in ("#", "+/status", "+/+", "$app/#", "$app/+"):
        c = Client(b, version=5)
        c.subscribe(flt, qos=1)
        subs[flt] = c
    pub = Client(b, version=5)
    pub.publish("$app/status", b"dollar", qos=1)
    pub.publish("app/status", b"plain", qos=1)
    for c in subs.values():
        c.messages.wait_for(1)
    time.sleep(QUIET)
    assert [m.payload for m in subs["$app/#"].messages.all()] == [b"dollar"]
    assert [m.payload for m in subs["$app/+"].messages.all()] == [b"dollar"]
    for flt in ("#", "+/status", "+/+"):
        got = [m.payload for m in subs[flt].messages.all()]
        assert got == [b"plain"], f"{flt!r} must not match '$app/status': {got}"


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
@pytest.mark.parametrize("flt", ["a/#/b", "a+/b", "a/b#", "#/", "a/+b", ""],
                         ids=["hash-not-last", "plus-partial", "hash-partial", "hash-slash",
                              "plus-suffix", "empty"])
def test_invalid_topic_filter_not_granted(broker, version, flt):
    b = broker()
    raw = RawClient(b, version=version)
    raw.connect()
    pid = raw.next_pid()
    raw.send(build_subscribe(pid, [(flt, 1)], None, version))
    try:
        pk = raw.recv_packet()
    except Exception:  # noqa: BLE001 - connection closed is an acceptable reaction
        pk = None
    if pk is not None and pk.type == SUBACK:
        assert pk.pid == pid and len(pk.codes) == 1
        assert pk.codes[0] >= 0x80, f"invalid filter {flt!r} must not be granted: {pk!r}"
        if version == 5:
            assert pk.codes[0] in (0x8F, 0x80, 0x83), pk
    else:
        # otherwise the server treats it as a protocol error and closes the connection
        if pk is not None:
            assert version == 5 and pk.type == DISCONNECT and pk.rc >= 0x80, pk
        raw.expect_closed()
    assert b.running()


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
@pytest.mark.parametrize("topic", ["w/+", "w/#", "+", "#"])
def test_wildcard_in_publish_topic_rejected(broker, version, topic):
    b = broker()
    watcher = Client(b, version=5)
    watcher.subscribe("#", qos=1)
    raw = RawClient(b, version=version)
    raw.connect()
    raw.send(build_publish(topic, b"bad", qos=1, pid=1, version=version))
    try:
        pk = raw.recv_packet()
    except Exception:  # noqa: BLE001
        pk = None
    if pk is not None and pk.type == PUBACK:
        assert version == 5 and pk.rc >= 0x80, f"wildcard topic must not be accepted: {pk!r}"
    else:
        if pk is not None:
            assert version == 5 and pk.type == DISCONNECT and pk.rc >= 0x80, pk
        raw.expect_closed()
    watcher.messages.expect_none()


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_empty_topic_name_rejected(broker, version):
    b = broker()
    watcher = Client(b, version=5)
    watcher.subscribe("#", qos=1)
    raw = RawClient(b, version=version)
    raw.connect()
    raw.send(build_publish("", b"bad", qos=0, version=version))
    if version == 5:
        raw.expect_disconnect(0x82)
    else:
        raw.expect_disconnect()
    watcher.messages.expect_none()


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_unsubscribe_stops_delivery(broker, version):
    b = broker()
    sub = Client(b, version=version)
    sub.subscribe("un/t", qos=1)
    sub.subscribe("un/keep", qos=1)
    pub = Client(b, version=version)
    pub.publish("un/t", b"before", qos=1)
    sub.messages.wait_for(1)
    codes = sub.unsubscribe("un/t")
    if version == 5:
        assert codes == [0x00]
    pub.publish("un/t", b"after", qos=1)
    pub.publish("un/keep", b"kept", qos=1)
    msgs = sub.messages.expect_exactly(2)
    assert [m.payload for m in msgs] == [b"before", b"kept"]


def test_v5_unsuback_reason_codes(broker):
    b = broker()
    raw = RawClient(b, version=5)
    raw.connect()
    raw.subscribe([("us/a", sub_opts(1))])
    ack = raw.unsubscribe(["us/a", "us/never", "us/+"])
    assert ack.codes == [0x00, 0x11, 0x11]


def test_v311_unsubscribe_unknown_filter_still_acked(broker):
    b = broker()
    raw = RawClient(b, version=4)
    raw.connect()
    ack = raw.unsubscribe(["nothing/here"])
    assert len(ack.body) == 2, f"3.1.1 UNSUBACK carries only the packet identifier: {ack!r}"
    raw.ping()


def test_unsubscribe_matches_filter_literally(broker):
    """Unsubscribing 'lit/x' must not remove the wildcard subscription 'lit/+'."""
    b = broker()
    sub = Client(b, version=4)
    sub.subscribe("lit/+", qos=1)
    sub.unsubscribe("lit/x")
    Client(b, version=4).publish("lit/x", b"still", qos=1)
    assert [m.payload for m in sub.messages.expect_exactly(1)] == [b"still"]


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_resubscribe_replaces_existing_subscription(broker, version):
    b = broker()
    sub = Client(b, version=version)
    assert sub.subscribe("rep/x", qos=0) == [0]
    assert sub.subscribe("rep/x", qos=2) == [2]
    pub = Client(b, version=version)
    pub.publish("rep/x", b"m", qos=2)
    msgs = sub.messages.expect_exactly(1)
    assert msgs[0].qos == 2
    assert sub.subscribe("rep/x", qos=1) == [1]
    sub.messages.clear()
    pub.publish("rep/x", b"n", qos=2)
    msgs = sub.messages.expect_exactly(1)
    assert msgs[0].qos == 1


def test_many_topics_and_subscribers(broker):
    b = broker()
    subs = []
    for i in range(10):
        c = Client(b, version=4)
        c.subscribe([(f"many/{i}/#", 1), ("many/all", 1)])
        subs.append(c)
    pub = Client(b, version=4)
    for i in range(10):
        pub.publish(f"many/{i}/x", f"to-{i}".encode(), qos=1)
    pub.publish("many/all", b"everyone", qos=1)
    for i, c in enumerate(subs):
        msgs = c.messages.expect_exactly(2, settle=QUIET / 3)
        assert sorted(m.payload for m in msgs) == sorted([f"to-{i}".encode(), b"everyone"])
