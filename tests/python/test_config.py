"""Configuration file handling (Sandpiper contract, /tmp/contract.md "Config file").

Unknown keys are rejected with an error and a non-zero exit code; every documented key is
accepted; the listener's `listening ... addr=` line is logged; `allow_anonymous` is accepted.
"""

import os
import subprocess
import tempfile

import pytest

from conftest import SANDPIPER_BIN, Client, render_config

ALL_KEYS = {
    "max_packet_size": 1048576,
    "connect_timeout": 10,
    "max_keep_alive": 65535,
    "receive_maximum": 256,
    "max_inflight": 128,
    "max_queued_messages": 1000,
    "max_queued_bytes": 16777216,
    "topic_alias_maximum": 64,
    "max_session_expiry": 4294967295,
    "retain_available": True,
    "allow_empty_client_id": True,
}


def _run_bad_config(text):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bad.toml")
        with open(path, "w") as f:
            f.write(text)
        return subprocess.run([SANDPIPER_BIN, "--config", path], capture_output=True,
                              text=True, timeout=10, cwd=d)


def test_all_documented_keys_accepted(broker):
    b = broker(listener={"allow_anonymous": True}, **ALL_KEYS)
    c = Client(b, version=5)
    assert c.subscribe("cfg/t", qos=2) == [2]


@pytest.mark.parametrize("text", [
    render_config(mqtt_section={"no_such_key": 1}),
    render_config(listener={"no_such_key": "x"}),
    render_config() + "\n[no_such_section]\nx = 1\n",
    render_config(mqtt_section={"max_packet_size": "big"}),
    "this is not toml ][",
], ids=["unknown-mqtt-key", "unknown-listener-key", "unknown-section", "wrong-type",
        "not-toml"])
def test_bad_config_rejected(text):
    if not os.path.exists(SANDPIPER_BIN):
        pytest.fail(f"{SANDPIPER_BIN} not built")
    r = _run_bad_config(text)
    assert r.returncode != 0, f"bad config accepted:\n{text}\nstderr:\n{r.stderr}"
    assert "listening" not in r.stderr
    assert r.stderr.strip(), "an error message is expected on stderr"
