"""TLS listeners with Debian's mosquitto_pub / mosquitto_sub (libmosquitto, OpenSSL): server
certificate checked with ``--cafile``, mutual TLS with client certificates (a missing or foreign
certificate is refused), a client certificate as the user name where anonymous clients are not
allowed, and certificate rotation without a restart while a subscriber stays connected.

Certificates are made per test by ``tests/certs/generate`` (openssl CLI).
"""

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, uid

pytestmark = pytest.mark.skipif(
    not (shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub") and shutil.which("openssl")),
    reason="needs mosquitto-clients and openssl")

MOSQ_V = {4: "mqttv311", 5: "mqttv5"}


@pytest.fixture
def certs(tmp_path) -> Path:
    out = tmp_path / "certs"
    subprocess.run(["bash", str(REPO_ROOT / "tests" / "certs" / "generate"), str(out)],
                   check=True, capture_output=True, timeout=60)
    return out


def tls_listener(certs: Path, **extra) -> dict:
    lst = {"kind": "tls", "cert": str(certs / "server.pem"), "key": str(certs / "server.key")}
    lst.update(extra)
    return lst


def tls_args(b, ca: Path, client: Path | None = None, version: int = 4) -> list[str]:
    args = ["-h", "127.0.0.1", "-p", str(b.port), "-V", MOSQ_V[version], "--cafile", str(ca)]
    if client is not None:
        args += ["--cert", str(client.with_suffix(".pem")), "--key", str(client.with_suffix(".key"))]
    return args


def pub(b, ca, topic, message, client=None, version=4, qos=1):
    return subprocess.run(
        ["mosquitto_pub", *tls_args(b, ca, client, version), "-q", str(qos), "-t", topic,
         "-m", message],
        capture_output=True, text=True, timeout=15)


class Sub:
    """mosquitto_sub over TLS in the background, subscribed once it has received the
    retained message it put on a sync topic."""

    def __init__(self, b, ca, topic, count, client=None, version=4):
        self.sync = f"sync/{uid()}"
        subprocess.run(["mosquitto_pub", *tls_args(b, ca, client, version), "-q", "1", "-r",
                        "-t", self.sync, "-m", "ready"], check=True, timeout=15)
        self.proc = subprocess.Popen(
            ["mosquitto_sub", *tls_args(b, ca, client, version), "-q", "1", "-W", "20",
             "-C", str(count + 1), "-t", self.sync, "-t", topic, "-F", "%t %p"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = self.proc.stdout.readline().strip()
        assert first == f"{self.sync} ready", (first, self.proc.stderr.read() if not first else "")

    def lines(self, n):
        out = [self.proc.stdout.readline().strip() for _ in range(n)]
        self.proc.wait(timeout=20)
        return out


@pytest.mark.parametrize("version", [4, 5], ids=["v311", "v5"])
def test_mosquitto_clients_over_tls_with_cafile(broker, certs, version):
    b = broker(listener=tls_listener(certs))
    topic = f"tls/{uid()}"
    sub = Sub(b, certs / "ca.pem", topic, 1, version=version)
    r = pub(b, certs / "ca.pem", topic, "encrypted", version=version)
    assert r.returncode == 0, r.stderr
    assert sub.lines(1) == [f"{topic} encrypted"]


def test_client_that_does_not_trust_the_server_is_not_connected(broker, certs):
    b = broker(listener=tls_listener(certs))
    r = pub(b, certs / "other-ca.pem", "tls/x", "m")
    assert r.returncode != 0


def test_plain_mqtt_on_a_tls_listener_gets_nothing(broker, certs):
    b = broker(listener=tls_listener(certs))
    r = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(b.port), "-t", "x", "-m",
                        "m"], capture_output=True, text=True, timeout=15)
    assert r.returncode != 0


def test_mutual_tls_refuses_missing_and_foreign_certificates(broker, certs):
    b = broker(listener=tls_listener(certs, client_ca=str(certs / "ca.pem")))
    ca = certs / "ca.pem"
    topic = f"mtls/{uid()}"
    sub = Sub(b, ca, topic, 1, client=certs / "client")
    for client in (None, certs / "other-client"):
        r = pub(b, ca, topic, "intruder", client=client)
        assert r.returncode != 0, f"{client} was let in"
    r = pub(b, ca, topic, "trusted", client=certs / "client")
    assert r.returncode == 0, r.stderr
    assert sub.lines(1) == [f"{topic} trusted"]


def test_certificate_is_the_user_name_where_anonymous_is_refused(broker, certs):
    b = broker(listener=tls_listener(certs, client_ca=str(certs / "ca.pem"),
                                     require_client_cert=False, username_from_cert=True,
                                     allow_anonymous=False))
    ca = certs / "ca.pem"
    r = pub(b, ca, "cert/user", "m", client=certs / "client", version=5)
    assert r.returncode == 0, r.stderr
    r = pub(b, ca, "cert/user", "m", version=5)
    assert r.returncode != 0
    said = (r.stderr + r.stdout).lower()
    assert "not authori" in said, said


def test_certificate_rotation_without_restart(broker, certs):
    b = broker(listener=tls_listener(certs))
    topic = f"rot/{uid()}"
    sub = Sub(b, certs / "ca.pem", topic, 1)
    for src, dst in (("other-server.key", "server.key"), ("other-server.pem", "server.pem")):
        tmp = certs / f"{dst}.new"
        shutil.copy(certs / src, tmp)
        tmp.rename(certs / dst)
    deadline = time.monotonic() + 10
    while True:
        r = pub(b, certs / "other-ca.pem", topic, "rotated")
        if r.returncode == 0:
            break
        assert time.monotonic() < deadline, f"new certificate not served: {r.stderr}"
        time.sleep(0.2)
    # The subscriber connected with the old certificate is still there and got the message.
    assert sub.lines(1) == [f"{topic} rotated"]
    assert "TLS certificates reloaded" in b.log()
