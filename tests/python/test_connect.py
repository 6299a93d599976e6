"""CONNECT / CONNACK, keep alive, client identifiers, session takeover.

MQTT 3.1.1 (OASIS Standard): §3.1 CONNECT -- [MQTT-3.1.0-1] first packet must be CONNECT,
[MQTT-3.1.0-2] a second CONNECT is a protocol violation (disconnect), [MQTT-3.1.2-2] unsupported
protocol level -> CONNACK 0x01 then disconnect, [MQTT-3.1.2-3] reserved connect flag must be 0,
[MQTT-3.1.2-13] Will QoS must be 0 without Will Flag, [MQTT-3.1.2-22] no password without user
name, [MQTT-3.1.2-24] keep alive: disconnect after 1.5 x Keep Alive, [MQTT-3.1.3-6]/[MQTT-3.1.3-7]
zero-byte ClientId requires CleanSession=1, [MQTT-3.1.3-8] otherwise CONNACK 0x02 and close,
[MQTT-3.1.4-2] an existing client with the same ClientId is disconnected, §3.2 CONNACK (2 byte
variable header), [MQTT-3.12.4-1] PINGRESP, §4.8 protocol violations close the connection.
MQTT 3.1 (IBM): protocol name "MQIsdp", level 3.
MQTT 5.0 (OASIS Standard): [MQTT-3.1.2-2] unsupported version -> CONNACK 0x84, §3.1.2.10 /
[MQTT-3.1.2-22] keep alive, §3.2.2.3.14 Server Keep Alive, [MQTT-3.1.3-6]/[MQTT-3.2.2-16] Assigned
Client Identifier, [MQTT-3.1.3-8] 0x85, [MQTT-3.1.4-3] takeover -> DISCONNECT 0x8E, [MQTT-3.1.0-2]
second CONNECT -> 0x82, §3.2.2.3 CONNACK properties (Receive Maximum, Maximum QoS, Retain
Available, Maximum Packet Size, Topic Alias Maximum), §3.1.2.11.3/§3.1.2.11.4 Receive Maximum /
Maximum Packet Size of 0 are protocol errors.
Sandpiper contract: connect_timeout, max_keep_alive, allow_empty_client_id, CONNACK values.
"""

import time

import pytest

from conftest import (CONNACK, DISCONNECT, PINGRESP, PINGREQ_BYTES, QUIET, VERSION_IDS,
                      VERSIONS, Client, P, RawClient, build_connect, build_publish, enc_str,
                      enc_u16, packet, uid)


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_connect_and_pubsub_each_protocol_version(broker, version):
    b = broker()
    sub = Client(b, version=version)
    assert sub.connack_rc == 0
    assert sub.session_present is False
    assert sub.subscribe("conn/t", qos=1) == [1]
    pub = Client(b, version=version)
    pub.publish("conn/t", b"hello", qos=1)
    msgs = sub.messages.expect_exactly(1)
    assert (msgs[0].topic, msgs[0].payload, msgs[0].qos) == ("conn/t", b"hello", 1)


@pytest.mark.parametrize("version", [3, 4], ids=["v31", "v311"])
def test_v3_connack_is_two_bytes(broker, version):
    b = broker()
    raw = RawClient(b, version=version)
    ack = raw.connect()
    assert ack.body == b"\x00\x00", f"3.x CONNACK variable header must be 2 bytes: {ack.body!r}"
    raw.ping()


def test_v5_connack_default_properties(broker):
    """Default config: topic_alias_maximum 64, QoS 2 supported (no Maximum QoS property),
    retain available (absent or 1)."""
    b = broker()
    raw = RawClient(b, version=5)
    ack = raw.connect()
    assert ack.session_present is False
    assert ack.props.get(P.TOPIC_ALIAS_MAXIMUM) == 64
    assert P.MAXIMUM_QOS not in ack.props, "Maximum QoS must be absent when QoS 2 is supported"
    assert ack.props.get(P.RETAIN_AVAILABLE, 1) == 1
    assert ack.props.get(P.MAXIMUM_PACKET_SIZE, 1048576) == 1048576
    assert ack.props.get(P.RECEIVE_MAXIMUM, 65535) == 256
    assert P.ASSIGNED_CLIENT_ID not in ack.props, "client supplied an id; nothing to assign"


def test_v5_connack_properties_reflect_config(broker):
    b = broker(max_packet_size=4096, topic_alias_maximum=7, receive_maximum=20,
               retain_available=False)
    raw = RawClient(b, version=5)
    ack = raw.connect()
    assert ack.props.get(P.MAXIMUM_PACKET_SIZE) == 4096
    assert ack.props.get(P.TOPIC_ALIAS_MAXIMUM) == 7
    assert ack.props.get(P.RECEIVE_MAXIMUM) == 20
    assert ack.props.get(P.RETAIN_AVAILABLE) == 0


@pytest.mark.parametrize("level", [2, 6, 0x7F])
def test_unknown_protocol_level_rejected(broker, level):
    """3.1.1 [MQTT-3.1.2-2]: CONNACK 0x01 then close; 5.0 allows 0x84. Never accepted."""
    b = broker()
    raw = RawClient(b, version=4)
    raw.send(build_connect(level, uid("r"), keepalive=30))  # "MQTT" + unsupported level
    seen = raw.expect_closed()
    acks = [p for p in seen if p.type == CONNACK]
    assert len(acks) == 1, f"expected one CONNACK refusing level {level}, got {seen}"
    assert acks[0].rc in (0x01, 0x84), f"CONNACK {acks[0]!r}"
    assert all(p.type == CONNACK for p in seen), seen


@pytest.mark.parametrize("first", ["pingreq", "subscribe", "publish"])
def test_first_packet_must_be_connect(broker, first):
    b = broker()
    raw = RawClient(b, version=4)
    data = {
        "pingreq": PINGREQ_BYTES,
        "subscribe": packet(0x82, enc_u16(1) + enc_str("a/b") + b"\x00"),
        "publish": build_publish("a/b", b"x", qos=0),
    }[first]
    raw.send(data)
    seen = raw.expect_closed()
    assert seen == [], f"server must not answer a non-CONNECT first packet: {seen}"


def test_connect_timeout_closes_silent_connection(broker):
    b = broker(connect_timeout=1)
    raw = RawClient(b, version=4)
    t0 = time.monotonic()
    seen = raw.expect_closed(timeout=5)
    elapsed = time.monotonic() - t0
    assert seen == []
    assert 0.7 <= elapsed <= 4.0, f"closed after {elapsed:.2f}s, connect_timeout is 1s"


def test_connect_timeout_applies_to_incomplete_connect(broker):
    b = broker(connect_timeout=1)
    raw = RawClient(b, version=4)
    raw.send(build_connect(4, uid("r"))[:5])  # fixed header + part of the protocol name
    t0 = time.monotonic()
    seen = raw.expect_closed(timeout=5)
    assert seen == []
    assert time.monotonic() - t0 <= 4.0


def test_connect_timeout_does_not_apply_after_connect(broker):
    b = broker(connect_timeout=1)
    raw = RawClient(b, version=4)
    time.sleep(0.3)
    raw.connect(keepalive=60)
    time.sleep(1.8)
    raw.ping()  # still connected well after connect_timeout


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_keepalive_timeout_closes_and_publishes_will(broker, version):
    b = broker()
    watcher = Client(b, version=5)
    watcher.subscribe("will/ka", qos=1)
    raw = RawClient(b, version=version)
    raw.connect(keepalive=1, will={"topic": "will/ka", "payload": b"gone", "qos": 1})
    t0 = time.monotonic()
    seen = raw.expect_closed(timeout=5)
    elapsed = time.monotonic() - t0
    assert 1.0 <= elapsed <= 3.5, f"closed after {elapsed:.2f}s; keep alive 1s -> ~1.5s"
    if version == 5:
        for p in seen:
            if p.type == DISCONNECT:
                assert p.rc == 0x8D, f"keep alive timeout DISCONNECT must be 0x8D: {p!r}"
    msgs = watcher.messages.expect_exactly(1)
    assert msgs[0].payload == b"gone"


def test_pings_keep_connection_alive(broker):
    b = broker()
    raw = RawClient(b, version=4)
    raw.connect(keepalive=1)
    for _ in range(6):
        time.sleep(0.5)
        raw.ping()
    raw.expect_nothing(0.2)


def test_v5_server_keep_alive_overrides_larger_client_value(broker):
    b = broker(max_keep_alive=2)
    raw = RawClient(b, version=5)
    ack = raw.connect(keepalive=60)
    assert ack.props.get(P.SERVER_KEEP_ALIVE) == 2, ack
    t0 = time.monotonic()
    raw.expect_closed(timeout=6)  # the broker enforces its own value: 1.5 x 2s
    elapsed = time.monotonic() - t0
    assert 2.0 <= elapsed <= 5.0, f"closed after {elapsed:.2f}s, server keep alive 2s"


def test_v5_server_keep_alive_replaces_zero(broker):
    b = broker(max_keep_alive=2)
    raw = RawClient(b, version=5)
    ack = raw.connect(keepalive=0)
    assert ack.props.get(P.SERVER_KEEP_ALIVE) == 2, ack


def test_v5_keep_alive_within_limit_is_kept(broker):
    b = broker(max_keep_alive=2)
    raw = RawClient(b, version=5)
    ack = raw.connect(keepalive=1)
    assert ack.props.get(P.SERVER_KEEP_ALIVE, 1) == 1, ack


def test_v5_empty_client_id_gets_assigned_identifier(broker):
    b = broker()
    ids = []
    for _ in range(2):
        raw = RawClient(b, version=5)
        ack = raw.connect(client_id="")
        assert ack.rc == 0 and ack.session_present is False
        assigned = ack.props.get(P.ASSIGNED_CLIENT_ID)
        assert assigned, f"CONNACK must carry an Assigned Client Identifier: {ack!r}"
        ids.append(assigned)
        raw.ping()
    assert ids[0] != ids[1]


def test_v311_empty_client_id_with_clean_session_accepted(broker):
    b = broker()
    raw = RawClient(b, version=4)
    ack = raw.connect(client_id="", clean=True)
    assert ack.rc == 0 and ack.session_present is False
    raw.subscribe("e/t", qos=1)
    raw.publish("e/t", b"x", qos=1)
    assert raw.next_publish().payload == b"x"


def test_v311_empty_client_id_without_clean_session_rejected(broker):
    b = broker()
    raw = RawClient(b, version=4)
    ack = raw.connect(client_id="", clean=False, expect_rc=None)
    assert ack.rc == 0x02, f"expected CONNACK 0x02 (identifier rejected), got {ack!r}"
    assert ack.session_present is False
    raw.expect_closed()


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_empty_client_id_rejected_when_disallowed(broker, version):
    b = broker(allow_empty_client_id=False)
    raw = RawClient(b, version=version)
    ack = raw.connect(client_id="", clean=True, expect_rc=None)
    if version == 4:
        assert ack.rc == 0x02, ack
    else:
        assert ack.rc >= 0x80, f"v5 must refuse (0x85 Client Identifier not valid): {ack!r}"
    raw.expect_closed()


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_session_takeover(broker, version):
    b = broker()
    cid = uid("tk")
    old = RawClient(b, version=version)
    old.connect(client_id=cid)
    new = RawClient(b, version=version)
    ack = new.connect(client_id=cid)
    assert ack.rc == 0
    if version == 5:
        old.expect_disconnect(0x8E)
    else:
        old.expect_disconnect()  # closed, no DISCONNECT packet in 3.x
    new.ping()
    new.subscribe("tk/t", qos=1)
    new.publish("tk/t", b"still-here", qos=1)
    assert new.next_publish().payload == b"still-here"


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_second_connect_is_protocol_error(broker, version):
    b = broker()
    raw = RawClient(b, version=version)
    raw.connect()
    raw.send(build_connect(version, uid("again")))
    seen_disc = raw.expect_disconnect(0x82 if version == 5 else None)
    assert all(p.type != CONNACK for p in raw.log[1:]), f"no second CONNACK: {raw.log}"
    if version == 5:
        assert seen_disc is not None


@pytest.mark.parametrize("version,flags", [
    (4, 0x03),   # reserved bit 0 set
    (5, 0x03),
    (4, 0x0A),   # Will QoS 1 without Will Flag
    (5, 0x0A),
    (4, 0x42),   # password flag without user name flag (3.1.1 only)
], ids=["v311-reserved", "v5-reserved", "v311-willqos-no-will", "v5-willqos-no-will",
        "v311-password-no-username"])
def test_invalid_connect_flags_close_connection(broker, version, flags):
    b = broker()
    raw = RawClient(b, version=version)
    password = b"secret" if flags & 0x40 else None
    raw.send(build_connect(version, uid("f"), flags=flags, password=password))
    seen = raw.expect_closed()
    for p in seen:
        assert p.type == CONNACK and p.rc != 0, f"invalid CONNECT must not be accepted: {seen}"
        if version == 5:
            assert p.rc >= 0x80, p


@pytest.mark.parametrize("prop", [P.RECEIVE_MAXIMUM, P.MAXIMUM_PACKET_SIZE],
                         ids=["receive-maximum-0", "maximum-packet-size-0"])
def test_v5_connect_property_zero_is_protocol_error(broker, prop):
    b = broker()
    raw = RawClient(b, version=5)
    raw.send(build_connect(5, uid("z"), props={prop: 0}))
    seen = raw.expect_closed()
    for p in seen:
        assert p.type == CONNACK and p.rc >= 0x80, f"must be refused: {seen}"


def test_pingreq_gets_pingresp_for_each_version(broker):
    b = broker()
    for version in VERSIONS:
        raw = RawClient(b, version=version)
        raw.connect()
        raw.send(PINGREQ_BYTES)
        assert raw.expect(PINGRESP).body == b""


def test_connect_then_immediate_disconnect_is_clean(broker):
    b = broker()
    for version in VERSIONS:
        raw = RawClient(b, version=version)
        raw.connect()
        raw.disconnect()
    time.sleep(QUIET / 2)
    assert b.running()
    # broker still serves new clients
    c = Client(b, version=4)
    assert c.subscribe("x/y", qos=2) == [2]
