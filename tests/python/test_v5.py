"""MQTT 5.0 specific features.

MQTT 5.0 (OASIS Standard, 7 March 2019):
* §3.3.2.3.4 Topic Alias: [MQTT-3.3.2-7] mappings do not survive the connection, [MQTT-3.3.2-8]
  alias 0 / [MQTT-3.3.2-9] alias above the server's Topic Alias Maximum -> DISCONNECT 0x94, an
  unknown alias with an empty topic -> DISCONNECT 0x82, [MQTT-3.3.2-10] the server accepts all
  aliases 1..maximum; [MQTT-3.1.2-26]/[MQTT-3.1.2-27] the server never sends an alias when the
  client's Topic Alias Maximum is absent/0, nor one above it.
* §3.3.2.3.3 Message Expiry Interval: [MQTT-3.3.2-5] expired messages are not delivered,
  [MQTT-3.3.2-6] the forwarded value is the received value minus the time waited in the server.
* [MQTT-3.3.2-4] Payload Format Indicator, [MQTT-3.3.2-15] Response Topic, [MQTT-3.3.2-16]
  Correlation Data, [MQTT-3.3.2-17]/[MQTT-3.3.2-18] User Properties (unaltered, order kept),
  [MQTT-3.3.2-20] Content Type -- all forwarded unaltered.
* §3.8.2.1.2 Subscription Identifier (the value 0 is a Protocol Error -> 0x82), §3.3.4
  [MQTT-3.3.4-3] identifiers sent with matching messages.
* §3.1.2.11.4 Maximum Packet Size: [MQTT-3.1.2-24] the server must not send larger packets,
  [MQTT-3.1.2-25] it discards such a message for that client only and carries on.
* §3.1.2.11.7 Request Problem Information = 0: [MQTT-3.1.2-29] no Reason String / User
  Property on packets other than PUBLISH, CONNACK and DISCONNECT.
* §3.14.2.2.2 a DISCONNECT with a non-zero Session Expiry after CONNECT had 0 -> DISCONNECT 0x82;
  §4.12 AUTH without an Authentication Method in CONNECT is a Protocol Error (0x82);
  [MQTT-3.3.4-6] a client PUBLISH must not carry a Subscription Identifier.
"""

import time

import pytest

from conftest import (DISCONNECT, PUBACK, PUBCOMP, PUBREC, SUBACK, UNSUBACK, Client, P,
                      RawClient, build_publish, enc_props, enc_str, enc_u16, packet, sub_opts,
                      uid)


# ---------------------------------------------------------------- topic aliases (inbound)

def test_inbound_topic_alias(broker):
    b = broker()
    sub = Client(b, version=4)  # a 3.1.1 subscriber must see full topic names
    sub.subscribe("ta/#", qos=1)
    raw = RawClient(b, version=5)
    ack = raw.connect()
    assert ack.props.get(P.TOPIC_ALIAS_MAXIMUM, 0) >= 2
    raw.publish("ta/one", b"a", qos=1, props={P.TOPIC_ALIAS: 1})
    raw.publish("", b"b", qos=1, props={P.TOPIC_ALIAS: 1})
    raw.publish("ta/two", b"c", qos=1, props={P.TOPIC_ALIAS: 2})
    raw.publish("ta/three", b"d", qos=0, props={P.TOPIC_ALIAS: 1})  # re-map alias 1
    raw.publish("", b"e", qos=1, props={P.TOPIC_ALIAS: 2})
    raw.publish("", b"f", qos=1, props={P.TOPIC_ALIAS: 1})
    msgs = sub.messages.expect_exactly(6)
    assert [(m.topic, m.payload) for m in msgs] == [
        ("ta/one", b"a"), ("ta/one", b"b"), ("ta/two", b"c"),
        ("ta/three", b"d"), ("ta/two", b"e"), ("ta/three", b"f")]


def test_inbound_topic_alias_not_forwarded_to_subscriber(broker):
    b = broker()
    sub = RawClient(b, version=5)
    sub.connect()  # no Topic Alias Maximum
    sub.subscribe([("taf/#", sub_opts(1))])
    raw = RawClient(b, version=5)
    raw.connect()
    raw.publish("taf/x", b"1", qos=1, props={P.TOPIC_ALIAS: 1})
    raw.publish("", b"2", qos=1, props={P.TOPIC_ALIAS: 1})
    pubs = sub.collect_publishes(2)
    for pk in pubs:
        assert pk.topic == "taf/x" and P.TOPIC_ALIAS not in pk.props, pk


@pytest.mark.parametrize("alias", [0, 6, 65535])
def test_inbound_topic_alias_out_of_range(broker, alias):
    b = broker(topic_alias_maximum=5)
    watcher = Client(b, version=5)
    watcher.subscribe("#", qos=1)
    raw = RawClient(b, version=5)
    ack = raw.connect()
    assert ack.props.get(P.TOPIC_ALIAS_MAXIMUM) == 5
    raw.publish("tr/ok", b"5 is fine", qos=1, props={P.TOPIC_ALIAS: 5})
    raw.send(build_publish("tr/x", b"bad", qos=1, pid=9, props={P.TOPIC_ALIAS: alias}, version=5))
    raw.expect_disconnect(0x94)
    msgs = watcher.messages.expect_exactly(1)
    assert msgs[0].topic == "tr/ok"


def test_inbound_topic_alias_disabled(broker):
    b = broker(topic_alias_maximum=0)
    raw = RawClient(b, version=5)
    ack = raw.connect()
    assert ack.props.get(P.TOPIC_ALIAS_MAXIMUM, 0) == 0
    raw.send(build_publish("td/x", b"bad", qos=0, props={P.TOPIC_ALIAS: 1}, version=5))
    raw.expect_disconnect(0x94)


def test_inbound_unknown_topic_alias_is_protocol_error(broker):
    b = broker()
    raw = RawClient(b, version=5)
    raw.connect()
    raw.send(build_publish("", b"bad", qos=0, props={P.TOPIC_ALIAS: 3}, version=5))
    raw.expect_disconnect(0x82)


def test_topic_alias_mapping_does_not_survive_reconnect(broker):
    b = broker()
    cid = uid("tac")
    raw = RawClient(b, version=5)
    raw.connect(client_id=cid, clean=False, props={P.SESSION_EXPIRY: 30})
    raw.publish("tac/x", b"1", qos=1, props={P.TOPIC_ALIAS: 1})
    raw.disconnect()
    raw = RawClient(b, version=5)
    raw.connect(client_id=cid, clean=False, props={P.SESSION_EXPIRY: 30})
    raw.send(build_publish("", b"2", qos=0, props={P.TOPIC_ALIAS: 1}, version=5))
    raw.expect_disconnect(0x82)


# ---------------------------------------------------------------- topic aliases (outbound)

def test_no_outbound_topic_alias_without_client_maximum(broker):
    b = broker()
    sub = RawClient(b, version=5)
    sub.connect()
    sub.subscribe([("oa/#", sub_opts(1))])
    pub = Client(b, version=5)
    for i in range(6):
        pub.publish("oa/same/topic", f"{i}".encode(), qos=1)
    for pk in sub.collect_publishes(6):
        assert P.TOPIC_ALIAS not in pk.props and pk.topic == "oa/same/topic", pk


def test_outbound_topic_aliases_within_client_maximum(broker):
    b = broker()
    sub = RawClient(b, version=5)
    sub.connect(props={P.TOPIC_ALIAS_MAXIMUM: 2})
    sub.subscribe([("ob/#", sub_opts(1))])
    pub = Client(b, version=5)
    topics = ["ob/a", "ob/b", "ob/a", "ob/c", "ob/a", "ob/b", "ob/c", "ob/c", "ob/a", "ob/b"]
    for i, t in enumerate(topics):
        pub.publish(t, f"{i}".encode(), qos=1)
    mapping: dict[int, str] = {}
    resolved = []
    for pk in sub.collect_publishes(len(topics)):
        alias = pk.props.get(P.TOPIC_ALIAS)
        if alias is not None:
            assert 1 <= alias <= 2, f"alias {alias} outside the client's maximum 2: {pk!r}"
            if pk.topic:
                mapping[alias] = pk.topic
            else:
                assert alias in mapping, f"empty topic with an alias never established: {pk!r}"
            resolved.append(mapping[alias])
        else:
            assert pk.topic, f"empty topic name without alias: {pk!r}"
            resolved.append(pk.topic)
    assert resolved == topics


# ---------------------------------------------------------------- message expiry

def _offline_subscriber(b, topic, cid):
    c = Client(b, client_id=cid, version=5, clean=False,
               connect_props={"SessionExpiryInterval": 60})
    c.subscribe(topic, qos=1)
    c.disconnect()


def test_expired_messages_dropped_from_offline_queue(broker):
    b = broker()
    cid = uid("mx")
    _offline_subscriber(b, "mx/t", cid)
    pub = Client(b, version=5)
    pub.publish("mx/t", b"short", qos=1, props={"MessageExpiryInterval": 1})
    pub.publish("mx/t", b"no-expiry", qos=1)
    pub.publish("mx/t", b"long", qos=1, props={"MessageExpiryInterval": 60})
    time.sleep(2.2)
    c = Client(b, client_id=cid, version=5, clean=False,
               connect_props={"SessionExpiryInterval": 60})
    msgs = c.messages.expect_exactly(2)
    assert [m.payload for m in msgs] == [b"no-expiry", b"long"]
    assert "MessageExpiryInterval" not in msgs[0].props
    assert 50 <= msgs[1].props["MessageExpiryInterval"] <= 58, msgs[1].props


def test_message_expiry_forwarded_as_remaining_time(broker):
    b = broker()
    cid = uid("mr")
    _offline_subscriber(b, "mr/t", cid)
    Client(b, version=5).publish("mr/t", b"m", qos=1, props={"MessageExpiryInterval": 30})
    time.sleep(1.3)
    c = Client(b, client_id=cid, version=5, clean=False,
               connect_props={"SessionExpiryInterval": 60})
    m = c.messages.expect_exactly(1)[0]
    assert 20 <= m.props.get("MessageExpiryInterval", -1) <= 29, (
        f"remaining interval must be reduced by the ~1.3s spent queued: {m.props}")


def test_live_message_expiry_forwarded(broker):
    b = broker()
    sub = Client(b, version=5)
    sub.subscribe("ml/t", qos=1)
    pub = Client(b, version=5)
    pub.publish("ml/t", b"e", qos=1, props={"MessageExpiryInterval": 10})
    pub.publish("ml/t", b"none", qos=1)
    msgs = sub.messages.expect_exactly(2)
    assert 8 <= msgs[0].props.get("MessageExpiryInterval", -1) <= 10
    assert "MessageExpiryInterval" not in msgs[1].props


def test_retained_message_expiry(broker):
    b = broker()
    pub = Client(b, version=5)
    pub.publish("rx/short", b"s", qos=1, retain=True, props={"MessageExpiryInterval": 1})
    pub.publish("rx/long", b"l", qos=1, retain=True, props={"MessageExpiryInterval": 30})
    time.sleep(2.2)
    sub = Client(b, version=5)
    sub.subscribe("rx/#", qos=1)
    msgs = sub.messages.expect_exactly(1)
    assert msgs[0].topic == "rx/long"
    assert 20 <= msgs[0].props.get("MessageExpiryInterval", -1) <= 28


# ---------------------------------------------------------------- forwarded properties

def test_publish_properties_forwarded_unchanged(broker):
    b = broker()
    sub = RawClient(b, version=5)
    sub.connect()
    sub.subscribe([("pp/#", sub_opts(2))])
    old = Client(b, version=4)
    old.subscribe("pp/#", qos=1)
    user = [("z", "1"), ("a", "2"), ("z", "3"), ("\u043a\u043b\u044e\u0447", "\u0437\u043d"),
            ("empty", "")]
    corr = bytes(range(256))
    props = [(P.PAYLOAD_FORMAT, 1), (P.CONTENT_TYPE, "application/json; charset=utf-8"),
             (P.RESPONSE_TOPIC, "pp/reply/me"), (P.CORRELATION_DATA, corr)]
    props += [(P.USER_PROPERTY, kv) for kv in user]
    pub = RawClient(b, version=5)
    pub.connect()
    pub.publish("pp/t", '{"k": "v\u00e9"}'.encode(), qos=2, props=props)
    pk = sub.next_publish()
    sub.ack(pk)
    assert pk.props.get(P.PAYLOAD_FORMAT) == 1
    assert pk.props.get(P.CONTENT_TYPE) == "application/json; charset=utf-8"
    assert pk.props.get(P.RESPONSE_TOPIC) == "pp/reply/me"
    assert pk.props.get(P.CORRELATION_DATA) == corr
    assert pk.props.get(P.USER_PROPERTY) == user, "User Properties unaltered, in order"
    assert pk.payload == '{"k": "v\u00e9"}'.encode()
    m = old.messages.expect_exactly(1)[0]
    assert m.payload == pk.payload  # the 3.1.1 subscriber just gets the message


def test_payload_format_indicator_zero_forwarded(broker):
    b = broker()
    sub = Client(b, version=5)
    sub.subscribe("pf/t", qos=1)
    Client(b, version=5).publish("pf/t", b"\xff\xfe binary", qos=1,
                                 props={"PayloadFormatIndicator": 0})
    m = sub.messages.expect_exactly(1)[0]
    assert m.payload == b"\xff\xfe binary"
    assert m.props.get("PayloadFormatIndicator", 0) == 0


# ---------------------------------------------------------------- subscription identifiers

def test_subscription_identifier_sent_and_updated(broker):
    b = broker()
    raw = RawClient(b, version=5)
    raw.connect()
    raw.subscribe([("si/t", sub_opts(1))], props={P.SUBSCRIPTION_ID: 42})
    other = RawClient(b, version=5)
    other.connect()
    other.subscribe([("si/t", sub_opts(1))])
    pub = Client(b, version=5)
    pub.publish("si/t", b"1", qos=1)
    pk = raw.next_publish()
    raw.ack(pk)
    assert pk.props.get(P.SUBSCRIPTION_ID) == [42]
    opk = other.next_publish()
    other.ack(opk)
    assert P.SUBSCRIPTION_ID not in opk.props
    raw.subscribe([("si/t", sub_opts(1))], props={P.SUBSCRIPTION_ID: 268435455})
    pub.publish("si/t", b"2", qos=1)
    pk = raw.next_publish()
    raw.ack(pk)
    assert pk.props.get(P.SUBSCRIPTION_ID) == [268435455]


def test_subscription_identifier_zero_is_protocol_error(broker):
    b = broker()
    raw = RawClient(b, version=5)
    raw.connect()
    raw.send(packet(0x82, enc_u16(1) + enc_props({P.SUBSCRIPTION_ID: 0}) + enc_str("s0/t")
                    + bytes([1])))
    raw.expect_disconnect(0x82)


def test_client_publish_with_subscription_identifier_rejected(broker):
    b = broker()
    watcher = Client(b, version=5)
    watcher.subscribe("cs/#", qos=1)
    raw = RawClient(b, version=5)
    raw.connect()
    raw.send(build_publish("cs/t", b"x", qos=1, pid=1, props={P.SUBSCRIPTION_ID: 5}, version=5))
    raw.expect_disconnect((0x81, 0x82))
    watcher.messages.expect_none()


# ---------------------------------------------------------------- maximum packet size

def test_client_maximum_packet_size_respected(broker):
    b = broker()
    small = RawClient(b, version=5)
    small.connect(props={P.MAXIMUM_PACKET_SIZE: 200})
    small.subscribe([("mps/#", sub_opts(1))])
    big_ok = Client(b, version=5)
    big_ok.subscribe("mps/#", qos=1)
    pub = Client(b, version=5)
    pub.publish("mps/t", b"x" * 500, qos=1)  # too large for `small`
    pub.publish("mps/t", b"small", qos=1)
    pub.publish("mps/t", b"y" * 150, qos=0)  # 150 + headers < 200: fits
    msgs = big_ok.messages.expect_exactly(3)
    assert [len(m.payload) for m in msgs] == [500, 5, 150]
    pk = small.next_publish()
    small.ack(pk)
    assert pk.payload == b"small", f"oversized message must be skipped, got {pk!r}"
    pk2 = small.next_publish()
    assert pk2.payload == b"y" * 150 and pk2.size <= 200
    small.expect_nothing()
    small.ping()
    assert all(p.size <= 200 for p in small.log), "no packet may exceed the client's maximum"


def test_client_maximum_packet_size_does_not_block_queue(broker):
    """Dropping an oversized QoS 1 message must not consume an inflight slot forever."""
    b = broker()
    small = RawClient(b, version=5)
    small.connect(props={P.MAXIMUM_PACKET_SIZE: 100, P.RECEIVE_MAXIMUM: 1})
    small.subscribe([("mpq/t", sub_opts(1))])
    pub = Client(b, version=5)
    for i in range(3):
        pub.publish("mpq/t", b"z" * 300, qos=1)
    pub.publish("mpq/t", b"fits", qos=1)
    pk = small.next_publish()
    assert pk.payload == b"fits"
    small.ack(pk)


# ---------------------------------------------------------------- request problem information

def test_request_problem_information_zero(broker):
    b = broker()
    raw = RawClient(b, version=5)
    raw.connect(props={P.REQUEST_PROBLEM_INFO: 0})
    raw.publish("rpi/nobody", b"x", qos=1)  # PUBACK may be 0x10 No matching subscribers
    raw.publish("rpi/nobody", b"y", qos=2)
    raw.subscribe([("rpi/t", sub_opts(1))])
    raw.unsubscribe(["rpi/never-subscribed"])  # UNSUBACK 0x11
    raw.unsubscribe(["rpi/t"])
    raw.ping()
    checked = [p for p in raw.log if p.type in (PUBACK, PUBREC, PUBCOMP, SUBACK, UNSUBACK)]
    assert len(checked) >= 6
    for p in checked:
        assert P.REASON_STRING not in p.props and P.USER_PROPERTY not in p.props, (
            f"Request Problem Information=0 forbids Reason String/User Property here: {p!r}")


def test_puback_reason_codes_valid(broker):
    b = broker()
    raw = RawClient(b, version=5)
    raw.connect()
    ack = raw.publish("prc/nobody", b"x", qos=1)
    assert ack.rc in (0x00, 0x10), ack
    sub = Client(b, version=5)
    sub.subscribe("prc/t", qos=1)
    ack = raw.publish("prc/t", b"x", qos=1)
    assert ack.rc == 0x00, ack


# ---------------------------------------------------------------- server DISCONNECT reason codes

def test_disconnect_session_expiry_after_zero_is_protocol_error(broker):
    b = broker()
    raw = RawClient(b, version=5)
    raw.connect()  # Session Expiry Interval 0
    raw.send(packet(0xE0, bytes([0x00]) + enc_props({P.SESSION_EXPIRY: 30})))
    raw.expect_disconnect(0x82)


def test_auth_without_authentication_method_is_protocol_error(broker):
    b = broker()
    raw = RawClient(b, version=5)
    raw.connect()
    raw.send(packet(0xF0, bytes([0x19]) + enc_props({P.AUTH_METHOD: "SCRAM-SHA-1"})))
    raw.expect_disconnect(0x82)


def test_server_disconnect_carries_no_session_expiry(broker):
    """[MQTT-3.14.2-2]: the server must not send Session Expiry Interval on DISCONNECT."""
    b = broker(topic_alias_maximum=1)
    raw = RawClient(b, version=5)
    raw.connect(props={P.SESSION_EXPIRY: 30})
    raw.send(build_publish("sx/t", b"", qos=0, props={P.TOPIC_ALIAS: 2}, version=5))
    d = raw.expect_disconnect(0x94)
    assert P.SESSION_EXPIRY not in d.props


def test_unsupported_packet_after_disconnect_ignored(broker):
    """After DISCONNECT the broker closes; the will is discarded and nothing else is sent."""
    b = broker()
    raw = RawClient(b, version=5)
    raw.connect()
    raw.send(packet(0xE0, b""))
    seen = raw.expect_closed()
    assert all(p.type != DISCONNECT for p in seen) or all(p.rc < 0x80 for p in seen), seen

