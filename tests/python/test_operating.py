"""Operating Sandpiper: systemd's notify protocol (READY, WATCHDOG, STOPPING) over a real
datagram socket, and the Debian package built by examples/debian/build-deb, installed with
dpkg, started with its own configuration and removed."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, SANDPIPER_BIN, Broker, Client, render_config, uid


class NotifySocket:
    """A datagram socket standing in for systemd's: what the broker sends, in order."""

    def __init__(self, abstract: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"sandpiper-test-{os.getpid()}-{uid()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.dir = tempfile.mkdtemp(prefix="sandpiper-notify-")
            self.address = os.path.join(self.dir, "notify.sock")
            self.sock.bind(self.address)
        self.sock.settimeout(0.2)
        self.seen: list[str] = []

    def wait_for(self, state: str, timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            self.seen.extend(data.split("\n"))
            if state in self.seen:
                return self.seen
        raise AssertionError(f"no {state!r} within {timeout}s; got {self.seen}")

    def drain(self) -> None:
        """Takes what is queued now, without waiting."""
        self.sock.setblocking(False)
        try:
            while True:
                self.seen.extend(self.sock.recv(4096).decode().split("\n"))
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(0.2)

    def close(self) -> None:
        self.sock.close()
        if hasattr(self, "dir"):
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_ready_watchdog_stopping(monkeypatch, abstract):
    sock = NotifySocket(abstract)
    monkeypatch.setenv("NOTIFY_SOCKET", sock.address)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    b = Broker(render_config())
    try:
        b.start()
        seen = sock.wait_for("READY=1")
        assert "STOPPING=1" not in seen
        # Ready means serving: a client connects at once.
        c = Client(b, version=5)
        c.disconnect()
        # Pings at half the interval: about 10 in a second.
        sock.drain()
        sock.seen.clear()
        time.sleep(1.0)
        sock.drain()
        pings = sock.seen.count("WATCHDOG=1")
        assert 4 <= pings <= 20, sock.seen
        code, _ = b.terminate()
        assert code == 0
        sock.wait_for("STOPPING=1", timeout=5)
    finally:
        b.stop()
        sock.close()


def test_no_notify_socket_no_notifications(broker):
    # Without NOTIFY_SOCKET (a broker started by hand) nothing is sent and nothing fails.
    b = broker()
    assert "notification failed" not in b.log()
    assert "watchdog" not in b.log()


def _dpkg_installed(name: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", name],
                       capture_output=True, text=True)
    return r.returncode == 0 and "install ok installed" in r.stdout


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_debian_package_installs_serves_and_removes(tmp_path):
    assert os.geteuid() == 0, "installing a package needs root (tests/run runs as root in CI)"
    assert shutil.which("dpkg-deb"), "dpkg-deb (Debian's dpkg) is needed"
    assert not _dpkg_installed("sandpiper"), \
        "a sandpiper package is installed on this machine: the test will not replace it"
    assert _port_free(1883) and _port_free(8083), \
        "the packaged configuration binds 127.0.0.1:1883 and :8083, which are taken here"
    out = subprocess.run(
        [str(REPO_ROOT / "examples" / "debian" / "build-deb"), "--binary", SANDPIPER_BIN,
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    deb = out.stdout.strip().splitlines()[-1]
    contents = subprocess.run(["dpkg-deb", "--contents", deb], capture_output=True,
                              text=True, check=True).stdout
    for path in ["./usr/bin/sandpiper", "./etc/sandpiper/sandpiper.toml",
                 "./lib/systemd/system/sandpiper.service",
                 "./usr/lib/sandpiper/plugins/acl.wasm",
                 "./usr/lib/sandpiper/plugins/acl.example.toml",
                 "./usr/share/doc/sandpiper/README.md"]:
        assert path in contents, f"{path} not in the package:\n{contents}"
    info = subprocess.run(["dpkg-deb", "--info", deb], capture_output=True, text=True,
                          check=True).stdout
    assert "Package: sandpiper" in info and "conffiles" in info, info

    installed = False
    proc = None
    sock = NotifySocket()
    try:
        r = subprocess.run(["dpkg", "-i", deb], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        installed = True
        assert _dpkg_installed("sandpiper")
        assert subprocess.run(["getent", "passwd", "sandpiper"]).returncode == 0
        assert Path("/var/lib/sandpiper").is_dir()
        unit = Path("/lib/systemd/system/sandpiper.service").read_text()
        assert "Type=notify" in unit and "WatchdogSec=" in unit
        version = subprocess.run(["/usr/bin/sandpiper", "--version"], capture_output=True,
                                 text=True, check=True).stdout
        assert "plugin contract" in version
        # The installed configuration checks out, then serves as the unit would start it
        # (its data folder: a scratch one, so the test leaves the system's untouched).
        check = subprocess.run(["/usr/bin/sandpiper", "--config", "/etc/sandpiper/sandpiper.toml",
                                "--check-config"], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        data = tmp_path / "data"
        env = dict(os.environ, NOTIFY_SOCKET=sock.address, NO_COLOR="1")
        env.pop("RUST_LOG", None)
        proc = subprocess.Popen(
            ["/usr/bin/sandpiper", "--config", "/etc/sandpiper/sandpiper.toml",
             "--data-dir", str(data)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        sock.wait_for("READY=1", timeout=30)

        class Installed:
            host, port = "127.0.0.1", 1883
        sub = Client(Installed, version=5)
        sub.subscribe("pkg/#", qos=1)
        pub = Client(Installed, version=4)
        pub.publish("pkg/hello", b"from the package", qos=1)
        [m] = sub.messages.expect_exactly(1)
        assert m.payload == b"from the package"
        pub.disconnect()
        sub.disconnect()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        sock.wait_for("STOPPING=1", timeout=5)
        proc = None
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(5)
        sock.close()
        if installed:
            r = subprocess.run(["dpkg", "--purge", "sandpiper"], capture_output=True,
                               text=True, timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
    assert not _dpkg_installed("sandpiper")
    assert not Path("/usr/bin/sandpiper").exists()
    assert not Path("/etc/sandpiper/sandpiper.toml").exists()
    assert subprocess.run(["getent", "passwd", "sandpiper"],
                          capture_output=True).returncode != 0
