"""Orderly shutdown on SIGTERM.

MQTT 5.0: §3.14.2.1 DISCONNECT Reason Code 0x8B (Server shutting down), [MQTT-3.14.4-1]/
[MQTT-3.14.4-2] after sending DISCONNECT the server sends nothing more and closes the connection,
[MQTT-3.14.0-1] DISCONNECT only after a successful CONNACK, [MQTT-3.14.2-2] no Session Expiry
Interval on a server DISCONNECT. MQTT 3.1.1: the server never sends DISCONNECT (§3.14 is
client-to-server only), it just closes the network connection.
Sandpiper contract: SIGTERM -> stop accepting, v5 clients get DISCONNECT 0x8B, 3.x clients are
closed, process exits 0 within a few seconds.
"""

import signal
import socket
import time

from conftest import Client, P, RawClient, uid


def _sigterm(b):
    t0 = time.monotonic()
    b.proc.send_signal(signal.SIGTERM)
    return t0


def test_sigterm_disconnects_clients_and_exits_zero(broker):
    b = broker()
    v5 = RawClient(b, version=5)
    v5.connect()
    v5.subscribe("sd/t", qos=1)
    v311 = RawClient(b, version=4)
    v311.connect()
    v31 = RawClient(b, version=3)
    v31.connect()
    pending = RawClient(b, version=5)  # TCP connected, CONNECT not yet sent
    t0 = _sigterm(b)
    d = v5.expect_disconnect(0x8B, timeout=5)
    assert P.SESSION_EXPIRY not in d.props
    v311.expect_disconnect(timeout=5)
    v31.expect_disconnect(timeout=5)
    seen = pending.expect_closed(timeout=5)
    assert all(p.type != 14 for p in seen), "no DISCONNECT before a CONNACK [MQTT-3.14.0-1]"
    rc = b.proc.wait(5)
    elapsed = time.monotonic() - t0
    assert rc == 0, f"exit code {rc}"
    assert elapsed < 5, f"shutdown took {elapsed:.2f}s"


def test_sigterm_idle_broker_exits_fast(broker):
    b = broker()
    rc, elapsed = b.terminate(timeout=5)
    assert rc == 0
    assert elapsed < 3, f"idle shutdown took {elapsed:.2f}s"


def test_sigterm_with_inflight_and_persistent_sessions(broker):
    b = broker()
    stuck = RawClient(b, version=5)
    stuck.connect(client_id=uid("st"), clean=False,
                  props={P.SESSION_EXPIRY: 600, P.RECEIVE_MAXIMUM: 1})
    stuck.subscribe([("sdi/t", 1)])
    offline = Client(b, client_id=uid("off"), version=4, clean=False)
    offline.subscribe("sdi/t", qos=2)
    offline.disconnect()
    pub = Client(b, version=5)
    for i in range(20):
        pub.publish("sdi/t", f"m{i}".encode(), qos=1)
    stuck.next_publish()  # never acknowledged
    paho5 = pub
    t0 = _sigterm(b)
    stuck.expect_disconnect(0x8B, timeout=5)
    assert paho5.wait_disconnected(5)
    assert paho5.disconnect_rc == 0x8B, f"paho saw reason {paho5.disconnect_rc}"
    rc = b.proc.wait(5)
    assert rc == 0 and time.monotonic() - t0 < 5


def test_no_new_connections_after_shutdown(broker):
    b = broker()
    c = Client(b, version=5)
    _sigterm(b)
    assert c.wait_disconnected(5)
    b.proc.wait(5)
    s = socket.socket()
    s.settimeout(2)
    try:
        refused = s.connect_ex((b.host, b.port)) != 0
    finally:
        s.close()
    assert refused, "listener must be closed after shutdown"
