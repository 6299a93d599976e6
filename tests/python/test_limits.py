"""Limits and malformed input: maximum packet size, per-session queue limits, server Receive
Maximum, malformed packets and protocol errors (other clients must be unaffected).

MQTT 3.1.1: §2.2.3 Remaining Length (at most 4 bytes), §2.2.2 reserved fixed-header flags
([MQTT-2.2.2-1]/[MQTT-2.2.2-2]: invalid flags -> close), [MQTT-3.3.1-4] QoS 3 is invalid,
§1.5.3 [MQTT-1.5.3-1]/[MQTT-1.5.3-2] ill-formed UTF-8 / U+0000 -> close, [MQTT-3.6.1-1] PUBREL
flags, [MQTT-3.8.1-1] SUBSCRIBE flags, [MQTT-3.8.3-3] at least one filter, [MQTT-3-8.3-4]
reserved bits / QoS 3 in SUBSCRIBE, [MQTT-2.3.1-1] non-zero Packet Identifier, §4.8 protocol
violations close the network connection.
MQTT 5.0: §3.1.2.11.4 / §3.2.2.3.6 Maximum Packet Size (server's value in CONNACK; a larger
packet -> DISCONNECT 0x95), §3.1.2.11.3 / §3.3.4 [MQTT-3.3.4-9]: more than the server's Receive
Maximum unacknowledged QoS 2 PUBLISHes -> DISCONNECT 0x93, §4.13 handling errors: Malformed
Packet -> DISCONNECT 0x81, Protocol Error -> DISCONNECT 0x82 ([MQTT-4.13.1-1] then close), §2.1.3
[MQTT-2.1.3-1] reserved flags, [MQTT-3.3.1-4], [MQTT-1.5.4-1]/[MQTT-1.5.4-2] UTF-8, §2.2.2.2
invalid property identifier -> malformed, duplicate single-valued property -> protocol error,
[MQTT-3.8.3-5] SUBSCRIBE reserved option bits, [MQTT-3.6.1-1], [MQTT-3.8.1-1].
Sandpiper contract: max_packet_size, max_queued_messages / max_queued_bytes (overflow drops the
newest message for that session only), receive_maximum.
"""

import time

import pytest

from conftest import (PUBACK, PUBREC, Client, P, RawClient, assert_broker_healthy,
                      build_publish, enc_props, enc_str, enc_u16, enc_varint, packet, sub_opts,
                      uid)


# ---------------------------------------------------------------- maximum packet size

def _publish_of_size(total, topic="mp/t", qos=1, pid=1, version=5):
    """A PUBLISH whose encoded size is exactly ``total`` bytes."""
    base = len(build_publish(topic, b"", qos=qos, pid=pid, version=version))
    n = total - base
    for _ in range(3):  # remaining-length bytes may grow with the payload
        pk = build_publish(topic, b"p" * n, qos=qos, pid=pid, version=version)
        if len(pk) == total:
            return pk
        n -= len(pk) - total
    raise AssertionError("could not size packet")


def test_v5_connack_announces_maximum_packet_size(broker):
    b = broker(max_packet_size=1024)
    raw = RawClient(b, version=5)
    assert raw.connect().props.get(P.MAXIMUM_PACKET_SIZE) == 1024


def test_v5_packet_at_limit_accepted_one_over_rejected(broker):
    b = broker(max_packet_size=1024)
    watcher = Client(b, version=5)
    watcher.subscribe("mp/#", qos=1)
    raw = RawClient(b, version=5)
    raw.connect()
    raw.send(_publish_of_size(1024, pid=1))
    assert raw.expect(PUBACK).pid == 1
    raw.send(_publish_of_size(1025, pid=2))
    raw.expect_disconnect(0x95)
    msgs = watcher.messages.expect_exactly(1)
    assert len(msgs[0].payload) > 1000
    assert_broker_healthy(b)


def test_v311_oversized_packet_closes_connection(broker):
    b = broker(max_packet_size=1024)
    watcher = Client(b, version=5)
    watcher.subscribe("mp/#", qos=1)
    raw = RawClient(b, version=4)
    raw.connect()
    raw.send(_publish_of_size(1024, pid=1, version=4))
    assert raw.expect(PUBACK).pid == 1
    raw.send(_publish_of_size(3000, pid=2, version=4))
    raw.expect_disconnect()
    assert len(watcher.messages.expect_exactly(1)) == 1
    assert_broker_healthy(b, version=4)


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_oversize_detected_from_header_without_waiting_for_body(broker, version):
    b = broker(max_packet_size=1024)
    raw = RawClient(b, version=version)
    raw.connect()
    raw.send(b"\x32" + enc_varint(10_000_000))  # claims a 10 MB PUBLISH; body never sent
    t0 = time.monotonic()
    raw.expect_disconnect(0x95 if version == 5 else None, timeout=3)
    assert time.monotonic() - t0 < 3


def test_oversized_connect_rejected(broker):
    b = broker(max_packet_size=512)
    raw = RawClient(b, version=5)
    raw.send(b"\x10" + enc_varint(100_000))
    seen = raw.expect_closed(timeout=3)
    for p in seen:
        assert p.rc >= 0x80, f"oversized CONNECT must not be accepted: {seen}"


# ---------------------------------------------------------------- queue limits

def test_max_queued_messages_drops_newest_for_slow_subscriber(broker):
    b = broker(max_queued_messages=5)
    slow = RawClient(b, version=5)
    slow.connect(props={P.RECEIVE_MAXIMUM: 1})
    slow.subscribe([("mq/t", sub_opts(1))])
    fast = Client(b, version=5)
    fast.subscribe("mq/t", qos=1)
    pub = Client(b, version=5)
    for i in range(10):
        pub.publish("mq/t", f"m{i}".encode(), qos=1)
        fast.messages.wait_for(i + 1)  # lock-step, so `fast` never has a backlog itself
    assert len(fast.messages.expect_exactly(10, settle=0.2)) == 10, "others get everything"
    got = []
    while True:
        pk = slow.recv_packet(1.0)
        if pk is None:
            break
        got.append(pk.payload)
        slow.ack(pk)
    # 1 in flight + 5 queued; m6..m9 (the newest) dropped
    assert got == [f"m{i}".encode() for i in range(6)], got
    assert b.wait_log(r"(?i)(drop|overflow|queue.*full)", 2), "overflow must be logged"
    assert b.running()


def test_max_queued_messages_offline_session(broker):
    b = broker(max_queued_messages=5, max_inflight=2)
    cid = uid("mqo")
    c = Client(b, client_id=cid, version=4, clean=False)
    c.subscribe("mqo/t", qos=1)
    c.disconnect()
    other = Client(b, version=4)
    other.subscribe("mqo/t", qos=1)
    pub = Client(b, version=4)
    for i in range(12):
        pub.publish("mqo/t", f"m{i}".encode(), qos=1)
        other.messages.wait_for(i + 1)  # lock-step, so `other` never has a backlog itself
    assert len(other.messages.expect_exactly(12, settle=0.2)) == 12
    c = Client(b, client_id=cid, version=4, clean=False)
    assert c.session_present
    c.messages.wait_for(5)
    time.sleep(0.7)
    got = [m.payload for m in c.messages.all()]
    # the oldest messages survive (newest dropped); at most max_inflight extra may have been
    # assigned to the in-flight window
    assert 5 <= len(got) <= 7, got
    assert got == [f"m{i}".encode() for i in range(len(got))], got


def test_max_queued_bytes(broker):
    b = broker(max_queued_bytes=250, max_inflight=1)
    cid = uid("mqb")
    c = Client(b, client_id=cid, version=5, clean=False,
               connect_props={"SessionExpiryInterval": 60})
    c.subscribe("qb/t", qos=1)
    c.disconnect()
    pub = Client(b, version=5)
    for i in range(6):
        pub.publish("qb/t", bytes([48 + i]) * 100, qos=1)  # 104 bytes each incl. topic
    c = Client(b, client_id=cid, version=5, clean=False,
               connect_props={"SessionExpiryInterval": 60})
    c.messages.wait_for(2)
    time.sleep(0.7)
    got = [m.payload[:1] for m in c.messages.all()]
    assert 2 <= len(got) <= 3, f"250 bytes hold 2 messages of 104 bytes (+1 in flight): {got}"
    assert got == [bytes([48 + i]) for i in range(len(got))]


# ---------------------------------------------------------------- server receive maximum

def test_server_receive_maximum_exceeded(broker):
    b = broker(receive_maximum=2)
    raw = RawClient(b, version=5)
    ack = raw.connect()
    assert ack.props.get(P.RECEIVE_MAXIMUM) == 2
    for pid in (1, 2):
        raw.send(build_publish("rmx/t", b"x", qos=2, pid=pid, version=5))
        assert raw.expect(PUBREC).pid == pid
    raw.send(build_publish("rmx/t", b"x", qos=2, pid=3, version=5))  # third without PUBREL
    raw.expect_disconnect(0x93)
    assert_broker_healthy(b)


def test_server_receive_maximum_not_exceeded_when_completing_flows(broker):
    b = broker(receive_maximum=2)
    sub = Client(b, version=5)
    sub.subscribe("rmo/t", qos=2)
    raw = RawClient(b, version=5)
    raw.connect()
    for i in range(6):
        raw.publish("rmo/t", f"m{i}".encode(), qos=2)  # full flow each time
    assert len(sub.messages.expect_exactly(6)) == 6


# ---------------------------------------------------------------- malformed packets

def _v5_props_raw(raw_props: bytes) -> bytes:
    return enc_varint(len(raw_props)) + raw_props


MALFORMED_V5 = {
    # name: (bytes, allowed reason codes)
    "publish-qos3": (b"\x36" + build_publish("m/t", b"x", qos=1, pid=1, version=5)[1:], {0x81}),
    "remaining-length-5-bytes": (b"\x30\xff\xff\xff\xff\x7f", {0x81}),
    "invalid-utf8-topic": (build_publish(b"m/\xff\xfe", b"x", version=5), {0x81}),
    "utf16-surrogate-topic": (build_publish(b"m/\xed\xa0\x80", b"x", version=5), {0x81}),
    "null-char-topic": (build_publish(b"m/a\x00b", b"x", version=5), {0x81}),
    "topic-length-overruns": (packet(0x30, enc_u16(100) + b"m/t" + b"\x00"), {0x81}),
    "property-length-overruns": (packet(0x30, enc_str("m/t") + enc_varint(50) + b"\x01\x01"),
                                 {0x81}),
    "unknown-property-id": (packet(0x30, enc_str("m/t") + _v5_props_raw(b"\x7f\x00") + b"x"),
                            {0x81}),
    "wrong-property-for-packet": (packet(0x30, enc_str("m/t")
                                         + enc_props({P.SESSION_EXPIRY: 5}) + b"x"), {0x81}),
    "duplicate-payload-format": (packet(0x30, enc_str("m/t")
                                        + enc_props([(P.PAYLOAD_FORMAT, 0),
                                                     (P.PAYLOAD_FORMAT, 0)]) + b"x"), {0x82}),
    "subscribe-bad-flags": (packet(0x80, enc_u16(1) + b"\x00" + enc_str("m/t") + b"\x01"),
                            {0x81}),
    "subscribe-reserved-option-bits": (packet(0x82, enc_u16(1) + b"\x00" + enc_str("m/t")
                                              + b"\xc1"), {0x81}),
    # §3.8.3.1: Maximum QoS 3 and Retain Handling 3 are Protocol Errors (not malformed)
    "subscribe-qos3": (packet(0x82, enc_u16(1) + b"\x00" + enc_str("m/t") + b"\x03"), {0x82}),
    "subscribe-retain-handling-3": (packet(0x82, enc_u16(1) + b"\x00" + enc_str("m/t")
                                           + b"\x31"), {0x82}),
    "subscribe-no-filters": (packet(0x82, enc_u16(1) + b"\x00"), {0x81, 0x82}),
    "unsubscribe-bad-flags": (packet(0xA0, enc_u16(1) + b"\x00" + enc_str("m/t")), {0x81}),
    "pubrel-bad-flags": (packet(0x60, enc_u16(1)), {0x81}),
    "pingreq-bad-flags": (b"\xc1\x00", {0x81}),
    "packet-type-0": (b"\x00\x00", {0x81, 0x82}),
    "publish-qos1-packet-id-0": (build_publish("m/t", b"x", qos=1, pid=0, version=5),
                                 {0x81, 0x82}),
    "connack-from-client": (b"\x20\x03\x00\x00\x00", {0x81, 0x82}),
}


@pytest.mark.parametrize("name", list(MALFORMED_V5))
def test_v5_malformed_packet_disconnects_only_offender(broker, name):
    data, reasons = MALFORMED_V5[name]
    b = broker()
    bystander_sub = Client(b, version=5)
    bystander_sub.subscribe("#", qos=1)
    bystander_pub = Client(b, version=4)
    raw = RawClient(b, version=5)
    raw.connect()
    raw.send(data)
    raw.expect_disconnect(reasons)
    assert all(m.topic != "m/t" for m in bystander_sub.messages.all())
    bystander_pub.publish("still/alive", b"yes", qos=1)
    msgs = bystander_sub.messages.wait_for(1)
    assert msgs[-1].payload == b"yes"
    assert_broker_healthy(b)


MALFORMED_V311 = {
    "publish-qos3": b"\x36" + build_publish("m/t", b"x", qos=1, pid=1)[1:],
    "remaining-length-5-bytes": b"\x30\xff\xff\xff\xff\x7f",
    "invalid-utf8-topic": build_publish(b"m/\xff\xfe", b"x"),
    "null-char-topic": build_publish(b"m/a\x00b", b"x"),
    "subscribe-bad-flags": packet(0x80, enc_u16(1) + enc_str("m/t") + b"\x01"),
    "subscribe-qos3": packet(0x82, enc_u16(1) + enc_str("m/t") + b"\x03"),
    "subscribe-reserved-bits": packet(0x82, enc_u16(1) + enc_str("m/t") + b"\x41"),
    "subscribe-no-filters": packet(0x82, enc_u16(1)),
    "unsubscribe-no-filters": packet(0xA2, enc_u16(1)),
    "pubrel-bad-flags": packet(0x60, enc_u16(1)),
    "packet-type-0": b"\x00\x00",
    "packet-type-15": b"\xf0\x00",
    "publish-qos1-packet-id-0": build_publish("m/t", b"x", qos=1, pid=0),
    "subscribe-packet-id-0": packet(0x82, enc_u16(0) + enc_str("m/t") + b"\x01"),
}


@pytest.mark.parametrize("name", list(MALFORMED_V311))
def test_v311_malformed_packet_closes_only_offender(broker, name):
    b = broker()
    bystander = Client(b, version=4)
    bystander.subscribe("#", qos=1)
    raw = RawClient(b, version=4)
    raw.connect()
    raw.send(MALFORMED_V311[name])
    raw.expect_disconnect()  # closed, and no DISCONNECT packet from a 3.1.1 server
    assert all(m.topic != "m/t" for m in bystander.messages.all())
    bystander.publish("still/alive", b"yes", qos=1)
    assert bystander.messages.wait_for(1)[-1].payload == b"yes"
    assert_broker_healthy(b, version=4)


def test_garbage_before_connect_closes(broker):
    b = broker()
    raw = RawClient(b, version=4)
    raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    seen = raw.expect_closed()
    assert seen == [], seen
    assert_broker_healthy(b)


def test_many_abrupt_connections_do_not_hurt(broker):
    b = broker()
    for i in range(30):
        raw = RawClient(b, version=5 if i % 2 else 4)
        if i % 3 == 0:
            raw.connect()
        elif i % 3 == 1:
            raw.send(b"\x10\x05\x00")
        raw.close()
    assert_broker_healthy(b)
    assert_broker_healthy(b, version=4)
