"""Will messages.

MQTT 3.1.1: §3.1.2.5 Will Flag -- the Will is published when the network connection is closed
abnormally (I/O error, keep alive expiry, client closes without DISCONNECT, server closes for a
protocol error) ([MQTT-3.1.2-8]), and removed on DISCONNECT ([MQTT-3.1.2-10]); §3.1.2.6 Will QoS,
§3.1.2.7 [MQTT-3.1.2-17] Will Retain -> published as retained; §3.14.4 [MQTT-3.14.4-3] DISCONNECT
discards the Will.
MQTT 3.1 (IBM): same Will semantics ("MQIsdp").
MQTT 5.0: [MQTT-3.1.2-8] publish after close when the Will Delay Interval elapsed or the session
ended, unless deleted by DISCONNECT 0x00 or a new connection for the ClientID came first,
[MQTT-3.1.2-10], §3.14.2.1 DISCONNECT 0x04 (Disconnect with Will Message) publishes it,
§3.1.3.2.2 Will Delay Interval and [MQTT-3.1.3-9] no Will if the session is resumed within the
delay, §3.1.4 takeover: the existing connection's Will is published unless the new connection
has Clean Start 0 and the Will Delay is > 0, §3.1.3.2 Will Properties are sent with the Will
(Payload Format Indicator, Message Expiry Interval, Content Type, Response Topic, Correlation
Data, User Properties -- [MQTT-3.1.3-10] order of User Properties kept).
"""

import time

import pytest

from conftest import (ARRIVE, QUIET, VERSION_IDS, VERSIONS, Client, P, RawClient, build_publish,
                      uid)

WILL = {"topic": "will/x", "payload": b"bye", "qos": 1}


def _watcher(b, topic="will/#", qos=2):
    w = Client(b, version=5)
    w.subscribe(topic, qos=qos)
    return w


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_will_published_on_abnormal_close(broker, version):
    b = broker()
    w = _watcher(b)
    raw = RawClient(b, version=version)
    raw.connect(will=WILL)
    raw.close()
    msgs = w.messages.expect_exactly(1)
    assert (msgs[0].topic, msgs[0].payload, msgs[0].qos, msgs[0].retain) == (
        "will/x", b"bye", 1, False)


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_no_will_after_normal_disconnect(broker, version):
    b = broker()
    w = _watcher(b)
    raw = RawClient(b, version=version)
    raw.connect(will=WILL)
    raw.disconnect(rc=0x00 if version == 5 else None)
    w.messages.expect_none(1.0)


def test_v5_disconnect_with_will_message_0x04(broker):
    b = broker()
    w = _watcher(b)
    raw = RawClient(b, version=5)
    raw.connect(will=WILL)
    raw.disconnect(rc=0x04)
    msgs = w.messages.expect_exactly(1)
    assert msgs[0].payload == b"bye"


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_will_qos_is_min_with_subscription(broker, version):
    b = broker()
    w = _watcher(b, qos=0)
    raw = RawClient(b, version=version)
    raw.connect(will={"topic": "will/q", "payload": b"q2", "qos": 2})
    raw.close()
    msgs = w.messages.expect_exactly(1)
    assert msgs[0].qos == 0


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_will_retain(broker, version):
    b = broker()
    raw = RawClient(b, version=version)
    raw.connect(will={"topic": "will/r", "payload": b"retained-will", "qos": 1, "retain": True})
    raw.close()
    deadline = time.monotonic() + ARRIVE
    while True:  # the Will is published asynchronously; poll with fresh subscribers
        late = Client(b, version=version)
        late.subscribe("will/r", qos=1)
        try:
            msgs = late.messages.wait_for(1, timeout=0.5)
            break
        except AssertionError:
            late.close()
            assert time.monotonic() < deadline, "retained Will never stored"
    assert msgs[0].payload == b"retained-will" and msgs[0].retain is True


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_will_published_when_server_closes_for_protocol_error(broker, version):
    b = broker()
    w = _watcher(b)
    raw = RawClient(b, version=version)
    raw.connect(will=WILL)
    raw.send(b"\x36" + build_publish("x/y", b"", qos=1, pid=1, version=version)[1:])  # QoS 3
    raw.expect_closed()
    assert [m.payload for m in w.messages.expect_exactly(1)] == [b"bye"]


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_will_published_once_per_connection(broker, version):
    b = broker()
    w = _watcher(b)
    cid = uid("once")
    for i in range(2):
        raw = RawClient(b, version=version)
        raw.connect(client_id=cid, will={"topic": "will/x", "payload": f"w{i}".encode(), "qos": 1})
        raw.close()
        w.messages.wait_for(i + 1)
    msgs = w.messages.expect_exactly(2)
    assert [m.payload for m in msgs] == [b"w0", b"w1"]


def test_v5_will_delay_interval(broker):
    b = broker()
    w = _watcher(b)
    raw = RawClient(b, version=5)
    raw.connect(props={P.SESSION_EXPIRY: 30},
                will={**WILL, "props": {P.WILL_DELAY: 2}})
    raw.close()
    t0 = time.monotonic()
    w.messages.expect_none(1.0)
    msgs = w.messages.wait_for(1, timeout=5)
    elapsed = time.monotonic() - t0
    assert msgs[0].payload == b"bye"
    assert 1.5 <= elapsed <= 4.5, f"Will published {elapsed:.2f}s after close, delay was 2s"


def test_v5_will_delay_cancelled_by_reconnect(broker):
    b = broker()
    w = _watcher(b)
    cid = uid("wd")
    raw = RawClient(b, version=5)
    raw.connect(client_id=cid, clean=False, props={P.SESSION_EXPIRY: 30},
                will={**WILL, "props": {P.WILL_DELAY: 1}})
    raw.close()
    time.sleep(0.2)
    again = RawClient(b, version=5)
    ack = again.connect(client_id=cid, clean=False, props={P.SESSION_EXPIRY: 30})
    assert ack.session_present is True
    w.messages.expect_none(2.0)  # well past the 1s delay
    again.disconnect()


def test_v5_will_sent_when_session_ends_before_delay(broker):
    b = broker()
    w = _watcher(b)
    raw = RawClient(b, version=5)
    raw.connect(props={P.SESSION_EXPIRY: 1}, will={**WILL, "props": {P.WILL_DELAY: 60}})
    raw.close()
    t0 = time.monotonic()
    msgs = w.messages.wait_for(1, timeout=5)
    elapsed = time.monotonic() - t0
    assert msgs[0].payload == b"bye"
    assert 0.5 <= elapsed <= 4.0, f"Will at {elapsed:.2f}s; session expiry 1s, delay 60s"


def test_v5_will_with_delay_and_no_session_expiry_published_at_close(broker):
    """Session Expiry 0: the session ends with the connection, so the Will goes out at once."""
    b = broker()
    w = _watcher(b)
    raw = RawClient(b, version=5)
    raw.connect(will={**WILL, "props": {P.WILL_DELAY: 60}})
    raw.close()
    msgs = w.messages.wait_for(1, timeout=3)
    assert msgs[0].payload == b"bye"


def test_v5_will_published_on_takeover_with_clean_start(broker):
    b = broker()
    w = _watcher(b)
    cid = uid("tw")
    old = RawClient(b, version=5)
    old.connect(client_id=cid, will=WILL)
    new = RawClient(b, version=5)
    new.connect(client_id=cid, clean=True)
    old.expect_disconnect(0x8E)
    assert [m.payload for m in w.messages.expect_exactly(1)] == [b"bye"]


def test_v5_will_not_published_on_takeover_resuming_session_with_delay(broker):
    b = broker()
    w = _watcher(b)
    cid = uid("tr")
    old = RawClient(b, version=5)
    old.connect(client_id=cid, clean=False, props={P.SESSION_EXPIRY: 30},
                will={**WILL, "props": {P.WILL_DELAY: 1}})
    new = RawClient(b, version=5)
    ack = new.connect(client_id=cid, clean=False, props={P.SESSION_EXPIRY: 30})
    assert ack.session_present is True
    old.expect_disconnect(0x8E)
    w.messages.expect_none(2.0)


def test_v5_will_properties_forwarded(broker):
    b = broker()
    w = _watcher(b)
    user = [("k", "v1"), ("k", "v2"), ("a", "b"), ("\u00fc", "\u20ac")]
    raw = RawClient(b, version=5)
    raw.connect(will={**WILL, "props": [
        (P.PAYLOAD_FORMAT, 1),
        (P.MESSAGE_EXPIRY, 60),
        (P.CONTENT_TYPE, "text/plain"),
        (P.RESPONSE_TOPIC, "will/resp"),
        (P.CORRELATION_DATA, b"\x00\x01\xfe\xff"),
        (P.WILL_DELAY, 0),
    ] + [(P.USER_PROPERTY, kv) for kv in user]})
    raw.close()
    m = w.messages.expect_exactly(1)[0]
    assert m.props.get("PayloadFormatIndicator") == 1
    assert m.props.get("ContentType") == "text/plain"
    assert m.props.get("ResponseTopic") == "will/resp"
    assert m.props.get("CorrelationData") == b"\x00\x01\xfe\xff"
    assert m.props.get("UserProperty") == user, "User Properties unaltered and in order"
    assert 55 <= m.props.get("MessageExpiryInterval", -1) <= 60
    assert "WillDelayInterval" not in m.props


def test_will_not_published_for_client_without_will(broker):
    b = broker()
    w = _watcher(b, topic="#")
    raw = RawClient(b, version=4)
    raw.connect()
    raw.close()
    w.messages.expect_none(QUIET)
