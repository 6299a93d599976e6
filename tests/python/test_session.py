"""Session state: clean session / clean start, session present, offline queueing, session expiry,
retransmission on resume.

MQTT 3.1.1: §3.1.2.4 Clean Session ([MQTT-3.1.2-4] resume session state when CleanSession=0,
[MQTT-3.1.2-6] CleanSession=1 discards the previous session and the new one lasts only as long as
the connection), §3.2.2.2 Session Present ([MQTT-3.2.2-1], [MQTT-3.2.2-2]), §4.1 session state
(QoS 1/2 messages pending for an offline client; QoS 0 is optional -- Sandpiper does not queue
QoS 0 for offline clients, per its contract), §4.4 [MQTT-4.4.0-1] on reconnect with
CleanSession=0 re-send unacknowledged PUBLISH and PUBREL packets with their original Packet
Identifiers, [MQTT-3.3.1-1] DUP=1 on re-delivery, §3.3.1.2 DUP is set only on re-delivery,
[MQTT-4.3.3-1] no PUBLISH re-send after PUBREL, §4.6 order of re-sent messages.
MQTT 5.0: §3.1.2.4 Clean Start ([MQTT-3.1.2-4], [MQTT-3.1.2-5], [MQTT-3.1.2-6]), §3.1.2.11.2
Session Expiry Interval (absent/0 = session ends with the connection; [MQTT-4.1.0-2] discard after
expiry), §3.2.2.3.2 CONNACK Session Expiry Interval when the server uses another value,
§3.14.2.2.2 DISCONNECT may change the Session Expiry Interval, [MQTT-3.2.2-2]/[MQTT-3.2.2-3]
Session Present, [MQTT-4.4.0-1] resend on resume, [MQTT-3.3.1-1]/[MQTT-3.3.1-3] DUP flag.
Sandpiper contract: max_session_expiry caps v5 expiry and is used for 3.x clean_session=0.
"""

import time

import pytest

from conftest import (PUBLISH, PUBREL, QUIET, Client, P, RawClient, build_ack, PUBCOMP,
                      PUBREC, uid)

PERSIST_V5 = {"SessionExpiryInterval": 60}


def persistent(b, cid, version, expiry=60, **kw):
    props = {"SessionExpiryInterval": expiry} if version == 5 else None
    return Client(b, client_id=cid, version=version, clean=False, connect_props=props, **kw)


def raw_persistent(b, cid, version, expiry=60):
    raw = RawClient(b, version=version)
    props = {P.SESSION_EXPIRY: expiry} if version == 5 else None
    ack = raw.connect(client_id=cid, clean=False, props=props)
    return raw, ack


V45 = pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])


@V45
def test_session_present_flag(broker, version):
    b = broker()
    cid = uid("sp")
    c = persistent(b, cid, version)
    assert c.session_present is False, "no session existed yet"
    c.subscribe("sp/t", qos=1)
    c.disconnect()
    c = persistent(b, cid, version)
    assert c.session_present is True, "session must be resumed"
    c.disconnect()
    # clean session / clean start: session present must be 0 and the old session discarded
    c = Client(b, client_id=cid, version=version, clean=True)
    assert c.session_present is False
    c.disconnect()
    c = persistent(b, cid, version)
    assert c.session_present is False, "clean connection must have discarded the session"


@V45
def test_subscriptions_survive_reconnect(broker, version):
    b = broker()
    cid = uid("sv")
    c = persistent(b, cid, version)
    assert c.subscribe("sv/+", qos=1) == [1]
    c.disconnect()
    c = persistent(b, cid, version)
    assert c.session_present is True
    pub = Client(b, version=version)
    pub.publish("sv/a", b"after-resume", qos=1)
    msgs = c.messages.expect_exactly(1)
    assert msgs[0].payload == b"after-resume" and msgs[0].qos == 1


@V45
def test_clean_session_discards_subscriptions(broker, version):
    b = broker()
    cid = uid("cs")
    c = Client(b, client_id=cid, version=version, clean=True)
    c.subscribe("cs/t", qos=1)
    c.disconnect()
    c = Client(b, client_id=cid, version=version, clean=True)
    assert c.session_present is False
    Client(b, version=version).publish("cs/t", b"nobody", qos=1)
    c.messages.expect_none()


@V45
def test_offline_queue_keeps_qos1_and_qos2_but_not_qos0(broker, version):
    b = broker()
    cid = uid("oq")
    c = persistent(b, cid, version)
    c.subscribe("oq/#", qos=2)
    c.disconnect()
    pub = Client(b, version=version)
    pub.publish("oq/zero", b"q0", qos=0)
    for i in range(3):
        pub.publish("oq/one", f"q1-{i}".encode(), qos=1)
        pub.publish("oq/two", f"q2-{i}".encode(), qos=2)
    pub.publish("oq/zero", b"q0-last", qos=0)
    # a QoS 1 sentinel from the same connection: once it is acknowledged the broker has also
    # routed the QoS 0 message published before it
    pub.publish("oq/one", b"sentinel", qos=1)
    c = persistent(b, cid, version)
    assert c.session_present is True
    msgs = c.messages.expect_exactly(7)
    ones = [m.payload for m in msgs if m.topic == "oq/one"]
    twos = [m.payload for m in msgs if m.topic == "oq/two"]
    assert ones == [b"q1-0", b"q1-1", b"q1-2", b"sentinel"], "QoS 1 messages queued in order"
    assert twos == [b"q2-0", b"q2-1", b"q2-2"], "QoS 2 messages queued in order"
    assert all(m.qos == 1 for m in msgs if m.topic == "oq/one")
    assert all(m.qos == 2 for m in msgs if m.topic == "oq/two")
    assert not [m for m in msgs if m.topic == "oq/zero"], "QoS 0 must not be queued offline"


@V45
def test_queued_messages_never_sent_have_dup_0(broker, version):
    """Messages queued while offline are first transmissions on resume: DUP must be 0."""
    b = broker()
    cid = uid("d0")
    raw, _ = raw_persistent(b, cid, version)
    raw.subscribe("d0/t", qos=1)
    raw.disconnect()
    pub = Client(b, version=version)
    for i in range(3):
        pub.publish("d0/t", f"m{i}".encode(), qos=1)
    raw, ack = raw_persistent(b, cid, version)
    assert ack.session_present is True
    pubs = raw.collect_publishes(3)
    assert [p.payload for p in pubs] == [b"m0", b"m1", b"m2"]
    assert all(not p.dup for p in pubs), pubs
    assert all(p.qos == 1 and p.pid for p in pubs), pubs


def test_v5_no_session_expiry_means_session_ends_with_connection(broker):
    b = broker()
    cid = uid("se0")
    c = Client(b, client_id=cid, version=5, clean=False)  # no Session Expiry Interval -> 0
    c.subscribe("se0/t", qos=1)
    c.disconnect()
    Client(b, version=5).publish("se0/t", b"lost", qos=1)
    c = Client(b, client_id=cid, version=5, clean=False)
    assert c.session_present is False
    c.messages.expect_none()


def test_v5_session_expires_after_interval(broker):
    b = broker()
    short, long_ = uid("short"), uid("long")
    for cid, exp in ((short, 1), (long_, 30)):
        c = persistent(b, cid, 5, expiry=exp)
        c.subscribe("exp/t", qos=1)
        c.disconnect()
    Client(b, version=5).publish("exp/t", b"queued", qos=1)
    time.sleep(2.5)
    gone = persistent(b, short, 5, expiry=1)
    assert gone.session_present is False, "session with expiry 1s must be gone after 2.5s"
    kept = persistent(b, long_, 5, expiry=30)
    assert kept.session_present is True
    assert [m.payload for m in kept.messages.expect_exactly(1)] == [b"queued"]
    gone.messages.expect_none(0.2)


def test_v5_disconnect_can_shorten_session_expiry(broker):
    b = broker()
    cid = uid("dse")
    c = persistent(b, cid, 5, expiry=30)
    c.subscribe("dse/t", qos=1)
    c.disconnect(props={"SessionExpiryInterval": 0})
    c = persistent(b, cid, 5, expiry=30)
    assert c.session_present is False


def test_v5_clean_start_discards_existing_session(broker):
    b = broker()
    cid = uid("cls")
    c = persistent(b, cid, 5)
    c.subscribe("cls/t", qos=1)
    c.disconnect()
    Client(b, version=5).publish("cls/t", b"queued", qos=1)
    c = Client(b, client_id=cid, version=5, clean=True, connect_props=PERSIST_V5)
    assert c.session_present is False
    c.messages.expect_none()
    Client(b, version=5).publish("cls/t", b"after", qos=1)
    c.messages.expect_none(0.3)  # old subscription gone too


def test_max_session_expiry_caps_v5_interval(broker):
    b = broker(max_session_expiry=1)
    cid = uid("cap")
    raw = RawClient(b, version=5)
    ack = raw.connect(client_id=cid, clean=False, props={P.SESSION_EXPIRY: 600})
    assert ack.props.get(P.SESSION_EXPIRY) == 1, (
        f"server using a smaller Session Expiry Interval must tell the client: {ack!r}")
    raw.subscribe("cap/t", qos=1)
    raw.disconnect()
    time.sleep(2.5)
    raw = RawClient(b, version=5)
    ack = raw.connect(client_id=cid, clean=False, props={P.SESSION_EXPIRY: 600})
    assert ack.session_present is False


def test_max_session_expiry_applies_to_v311_persistent_session(broker):
    b = broker(max_session_expiry=1)
    cid = uid("cap3")
    c = persistent(b, cid, 4)
    c.subscribe("cap3/t", qos=1)
    c.disconnect()
    c = persistent(b, cid, 4)
    assert c.session_present is True, "resumed within max_session_expiry"
    c.disconnect()
    time.sleep(2.5)
    c = persistent(b, cid, 4)
    assert c.session_present is False, "3.x session expires after max_session_expiry"


@V45
def test_resume_resends_unacked_qos1_with_dup_and_same_packet_id(broker, version):
    b = broker()
    cid = uid("rs1")
    raw, _ = raw_persistent(b, cid, version)
    raw.subscribe("rs1/t", qos=1)
    Client(b, version=version).publish("rs1/t", b"unacked", qos=1)
    first = raw.next_publish()
    assert first.dup is False and first.qos == 1
    raw.close()  # no PUBACK
    time.sleep(0.2)
    raw, ack = raw_persistent(b, cid, version)
    assert ack.session_present is True
    again = raw.next_publish()
    assert again.payload == b"unacked"
    assert again.dup is True, "re-delivery must set DUP=1"
    assert again.pid == first.pid, "re-delivery must reuse the original Packet Identifier"
    assert again.qos == 1
    raw.ack(again)
    raw.expect_nothing()


@V45
def test_resume_resends_unreceived_qos2_publish_with_dup(broker, version):
    b = broker()
    cid = uid("rs2")
    raw, _ = raw_persistent(b, cid, version)
    raw.subscribe("rs2/t", qos=2)
    Client(b, version=version).publish("rs2/t", b"q2", qos=2)
    first = raw.next_publish()
    assert first.qos == 2 and first.dup is False
    raw.close()  # no PUBREC
    time.sleep(0.2)
    raw, _ = raw_persistent(b, cid, version)
    again = raw.next_publish()
    assert (again.payload, again.dup, again.pid, again.qos) == (b"q2", True, first.pid, 2)
    raw.ack(again)
    raw.expect_nothing()


@V45
def test_resume_resends_pubrel_not_publish(broker, version):
    b = broker()
    cid = uid("rsr")
    raw, _ = raw_persistent(b, cid, version)
    raw.subscribe("rsr/t", qos=2)
    Client(b, version=version).publish("rsr/t", b"q2", qos=2)
    pub = raw.next_publish()
    raw.send(build_ack(PUBREC, pub.pid, version=version))
    raw.wait_for(lambda p: p.type == PUBREL and p.pid == pub.pid, what="PUBREL")
    raw.close()  # no PUBCOMP
    time.sleep(0.2)
    raw, _ = raw_persistent(b, cid, version)
    pk = raw.recv_packet()
    assert pk is not None and pk.type == PUBREL and pk.pid == pub.pid, (
        f"expected the PUBREL to be re-sent (and no PUBLISH), got {pk!r}")
    raw.send(build_ack(PUBCOMP, pub.pid, version=version))
    raw.expect_nothing()
    assert not [p for p in raw.log if p.type == PUBLISH], "PUBLISH must not be re-sent after PUBREL"


@V45
def test_resume_resends_in_original_order(broker, version):
    b = broker()
    cid = uid("ord")
    raw, _ = raw_persistent(b, cid, version)
    raw.subscribe("ord/t", qos=1)
    pub = Client(b, version=version)
    for i in range(4):
        pub.publish("ord/t", f"m{i}".encode(), qos=1)
    firsts = raw.collect_publishes(4, ack=False)
    raw.close()
    time.sleep(0.2)
    raw, _ = raw_persistent(b, cid, version)
    again = raw.collect_publishes(4, ack=True)
    assert [p.payload for p in again] == [b"m0", b"m1", b"m2", b"m3"]
    assert [p.pid for p in again] == [p.pid for p in firsts]
    assert all(p.dup for p in again)
    raw.expect_nothing(QUIET)


@V45
def test_acked_messages_are_not_resent(broker, version):
    b = broker()
    cid = uid("nr")
    raw, _ = raw_persistent(b, cid, version)
    raw.subscribe("nr/t", qos=2)
    pub = Client(b, version=version)
    pub.publish("nr/t", b"one", qos=1)
    pub.publish("nr/t", b"two", qos=2)
    raw.collect_publishes(2, ack=True)
    time.sleep(0.2)
    raw.disconnect()
    raw, ack = raw_persistent(b, cid, version)
    assert ack.session_present is True
    raw.expect_nothing()


@V45
def test_takeover_resuming_session_resends_unacked(broker, version):
    """A second connection with the same ClientId and CleanSession=0 takes over the session
    ([MQTT-3.1.4-2] / [MQTT-3.1.4-3]) and gets the unacknowledged message again with DUP=1."""
    b = broker()
    cid = uid("tko")
    old, _ = raw_persistent(b, cid, version)
    old.subscribe("tko/t", qos=1)
    Client(b, version=version).publish("tko/t", b"inflight", qos=1)
    first = old.next_publish()
    new, ack = raw_persistent(b, cid, version)  # old connection still open
    assert ack.session_present is True
    old.expect_disconnect(0x8E if version == 5 else None)
    again = new.next_publish()
    assert (again.payload, again.dup, again.pid) == (b"inflight", True, first.pid)
    new.ack(again)
    Client(b, version=version).publish("tko/t", b"next", qos=1)
    nxt = new.next_publish()
    assert nxt.payload == b"next" and nxt.dup is False
    new.ack(nxt)
