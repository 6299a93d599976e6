"""The monitoring examples against a real broker and Debian's Prometheus (2.42).

A broker with its ``[http]`` listener on 127.0.0.1:0 and two bundled plugins from
``plugins/dist`` (``acl`` allowing everything, and the ``webhook`` sink posting to an HTTP
server of this module), so that the plugin and sink series exist, and a bridge to its own
listener (3.1.1 without the bridge bit, so that what it sends comes back in and both its
directions count), is put under a little load with paho-mqtt (QoS 0 and QoS 1 messages to
a connected subscriber, the sink and the bridge).
A ``prometheus`` on a free 127.0.0.1 port scrapes its ``/metrics`` every second, with
``examples/prometheus/alerts.yml`` as its rule file. Then:

* ``promtool check rules`` accepts ``examples/prometheus/alerts.yml``, and ``promtool check
  metrics`` finds nothing to complain about in a scrape of ``/metrics`` (exit 0).
* ``examples/grafana/sandpiper.json`` is an importable dashboard (datasource variable, unique
  panel ids), and every PromQL expression of its panels and template variables, with the
  Grafana variables substituted (``$job`` -> ``sandpiper``, ``$instance`` -> ``.*``,
  ``$__rate_interval``/``$__interval``/``$__range`` -> ``1m``: the window holds every sample
  since Prometheus started, load included), is accepted by Prometheus and returns data
  (a dashboard panel showing "No data" on a broker with plugins and traffic is a bug), with
  every label the panel's legend names.
* Every alert rule is loaded and evaluates without error, and none is pending or firing on
  the healthy broker. Their expressions are expected to be empty here (they select what is
  wrong), so they only need to be accepted; what they select is checked with ``promtool test
  rules`` on synthetic series instead: each alert fires, with its labels, when its metric
  says so, and none fires on healthy series.
* Every ``sandpiper_*`` and ``process_*`` series the dashboard and the rules use is exported
  by the broker, so an expression cannot be empty only because it names a metric that is not
  there.

Prometheus and promtool are required (``tests/install`` installs Debian's ``prometheus``):
the tests fail, not skip, when they are missing. The plugins come from ``plugins/build``.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import _LIVE_CLIENTS, REPO_ROOT, Broker, Client, uid

DASHBOARD = REPO_ROOT / "examples" / "grafana" / "sandpiper.json"
ALERTS = REPO_ROOT / "examples" / "prometheus" / "alerts.yml"
PLUGINS = REPO_ROOT / "plugins" / "dist"

JOB = "sandpiper"
# What the Grafana variables stand for here.
GRAFANA_VARS = {
    "job": JOB,
    "instance": ".*",
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1m",
}
QOS0_MESSAGES = 300
QOS1_MESSAGES = 300
LOAD_TOPIC = "load"


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"`{tool}` not found: tests/install installs it (Debian's prometheus)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_until(what: str, check, timeout: float, interval: float = 0.2, detail=lambda: ""):
    """Polls ``check()`` until it returns something truthy; returns it. Fails after
    ``timeout`` seconds, with ``detail()`` in the message."""
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            got = check()
            if got:
                return got
        except (OSError, ValueError, KeyError) as e:
            last_error = e
        if time.monotonic() >= deadline:
            pytest.fail(f"{what} within {timeout}s (last error: {last_error!r}){detail()}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# The dashboard's and the rules' expressions
# --------------------------------------------------------------------------------------------


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list) -> list:
    """Every panel, those inside collapsed rows included."""
    out = []
    for p in panels:
        out.append(p)
        out += all_panels(p.get("panels", []))
    return out


def substitute(expr: str) -> str:
    """``expr`` with the Grafana variables (``$name``, ``${name}``, ``[[name]]``) replaced."""
    def value(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in GRAFANA_VARS:
            raise KeyError(f"no test value for the Grafana variable {name!r} in {expr!r}")
        return GRAFANA_VARS[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", value, expr)


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(test id, PromQL with the variables substituted, legend format) of every panel
    target."""
    out = []
    for panel in all_panels(load_dashboard().get("panels", [])):
        for t in panel.get("targets", []):
            if t.get("expr"):
                out.append((f"{panel['title']}#{t.get('refId', '?')}", substitute(t["expr"]),
                            t.get("legendFormat", "")))
    return out


def variable_queries() -> list[tuple[str, str]]:
    """(variable name, PromQL) of the dashboard's query variables: ``label_values(SELECTOR,
    LABEL)`` becomes ``count by (LABEL) (SELECTOR)``, which has data when the variable has
    values."""
    out = []
    for v in load_dashboard()["templating"]["list"]:
        if v.get("type") != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", q)
        assert m, f"variable {v['name']}: only label_values(selector, label) is checked: {q!r}"
        out.append((v["name"], f"count by ({m.group(2)}) ({substitute(m.group(1))})"))
    return out


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:sandpiper|process)_[a-zA-Z0-9_]+)", expr))


def alert_names_in_file() -> list[str]:
    return re.findall(r"^\s*-\s*alert:\s*(\S+)\s*$", ALERTS.read_text(), re.M)


# --------------------------------------------------------------------------------------------
# The running stack: webhook endpoint, broker with plugins, load, Prometheus
# --------------------------------------------------------------------------------------------


class Hook:
    """The webhook sink's endpoint: counts the messages of every batch POSTed to it."""

    def __init__(self) -> None:
        hook = self
        self.messages = 0
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with hook.lock:
                    hook.messages += len(json.loads(body).get("messages", []))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def count(self) -> int:
        with self.lock:
            return self.messages

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Prometheus:
    """One ``prometheus`` process with its own configuration and storage in ``dir``."""

    def __init__(self, dir: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = dir
        config = dir / "prometheus.yml"
        # JSON is YAML.
        config.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                       "scrape_timeout": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
        }, indent=2))
        self.log_path = dir / "prometheus.log"
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [require("prometheus"), f"--config.file={config}",
             f"--storage.tsdb.path={dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=subprocess.STDOUT,
            cwd=dir)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def detail(self) -> str:
        return f"\n===== prometheus log =====\n{self.log()[-4000:]}"

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = http_get(url)
        doc = json.loads(body)
        doc["http_status"] = status
        return doc

    def query(self, expr: str) -> dict:
        return self.api("query", query=expr)

    def wait_ready(self, timeout: float) -> None:
        def ready():
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited with {self.proc.returncode}{self.detail()}")
            return http_get(f"{self.url}/-/ready", timeout=1)[0] == 200

        wait_until("prometheus not ready", ready, timeout, detail=self.detail)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log_file.close()


class Stack:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sandpiper-prometheus-"))
        self.hook: Hook | None = None
        self.broker: Broker | None = None
        self.prometheus: Prometheus | None = None
        self.clients: list[Client] = []
        self.metrics_url = ""

    def detail(self) -> str:
        out = ""
        if self.broker is not None:
            out += f"\n===== sandpiper log =====\n{self.broker.log()[-6000:]}"
        if self.prometheus is not None:
            out += self.prometheus.detail()
        return out

    def start(self) -> None:
        require("prometheus")
        for name in ("acl", "webhook"):
            if not (PLUGINS / f"{name}.wasm").exists():
                pytest.fail(f"{PLUGINS / name}.wasm not found: run plugins/build")
        self.hook = Hook()

        plugins = self.dir / "plugins"
        plugins.mkdir()
        # Sidecars first: a .wasm that arrives alone is loaded with the defaults.
        (plugins / "acl.toml").write_text('priority = 50\n[config]\ndefault = "allow"\n')
        (plugins / "webhook.toml").write_text(
            f'topics = ["{LOAD_TOPIC}/#"]\ntime_ms = 8000\nnetwork = ["{self.hook.addr}"]\n'
            "[sink]\nbatch = 100\nlinger_ms = 10\nretry_min_ms = 50\nretry_max_ms = 300\n"
            f'[config]\nurl = "http://{self.hook.addr}/in"\ntimeout_ms = 2000\n')
        for name in ("acl", "webhook"):
            shutil.copy(PLUGINS / f"{name}.wasm", plugins / f"{name}.wasm")

        port = free_port()
        self.broker = Broker(
            f'[[listener]]\nname = "default"\nbind = "127.0.0.1:{port}"\n\n'
            '[http]\nbind = "127.0.0.1:0"\n\n'
            f"[plugins]\ndir = {json.dumps(str(plugins))}\n\n"
            '[log]\nlevel = "info"\n\n'
            # Out: load/# as bridged/load/#; in: bridged/# as echo/bridged/#.
            f'[[bridge]]\nname = "self"\naddress = "mqtt://127.0.0.1:{port}"\n'
            'protocol = "3.1.1"\ntry_private = false\nreconnect_min_ms = 100\n\n'
            f'[[bridge.topic]]\ndirection = "out"\nfilter = "{LOAD_TOPIC}/#"\n'
            'remote_prefix = "bridged/"\n\n'
            '[[bridge.topic]]\ndirection = "in"\nfilter = "bridged/#"\n'
            'local_prefix = "echo/"\n')
        self.broker.start(timeout=30)
        line = self.broker.wait_log(r"metrics and health endpoints up", timeout=5)
        assert line, f"no `metrics and health endpoints up` line{self.detail()}"
        http_addr = re.search(r"http=(\S+)", line).group(1)
        self.metrics_url = f"http://{http_addr}/metrics"
        for name in ("acl", "webhook"):
            assert self.broker.wait_log(rf"plugin loaded plugin=\"?{name}\b", timeout=20), (
                f"plugin {name} not loaded{self.detail()}")
        assert self.broker.wait_log(r"bridge connected", timeout=10), (
            f"the bridge did not connect{self.detail()}")

        self.prometheus = Prometheus(self.dir, http_addr)
        self.prometheus.wait_ready(15)
        prom = self.prometheus

        def target_up():
            targets = prom.api("targets")["data"]["activeTargets"]
            return targets and all(t["health"] == "up" for t in targets)

        wait_until("prometheus did not scrape the broker", target_up, 15,
                   detail=self.detail)

        self.load()

        # Scraped after the load, and the rules evaluated after that scrape.
        total = QOS0_MESSAGES + QOS1_MESSAGES

        def scraped_load():
            r = prom.query(f'sum(sandpiper_messages_received_total{{job="{JOB}"}})')
            result = r["data"]["result"]
            return result and float(result[0]["value"][1]) >= total

        wait_until(f"prometheus did not see the {total} messages", scraped_load, 10,
                   detail=self.detail)
        seen_at = time.time()

        def evaluated():
            groups = prom.api("rules")["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            return rules and all(
                _rfc3339(r.get("lastEvaluation", "")) > seen_at for r in rules)

        wait_until("the alert rules were not evaluated", evaluated, 10, detail=self.detail)

    def client(self, prefix: str) -> Client:
        """A paho client that lives as long as the stack: not closed after each test by
        conftest's ``_close_clients``."""
        c = Client(self.broker, client_id=uid(prefix))
        _LIVE_CLIENTS.remove(c)
        self.clients.append(c)
        return c

    def load(self) -> None:
        """QoS 0 and QoS 1 messages from one publisher to one subscriber (which stays
        connected, so connections and sessions are not empty) and to the sink."""
        assert self.broker is not None and self.hook is not None
        sub = self.client("sub")
        sub.subscribe(f"{LOAD_TOPIC}/#", qos=1)
        pub = self.client("pub")
        infos = []
        for i in range(QOS0_MESSAGES):
            infos.append(pub.publish(f"{LOAD_TOPIC}/q0", f"m{i}", qos=0, wait=False))
        for i in range(QOS1_MESSAGES):
            infos.append(pub.publish(f"{LOAD_TOPIC}/q1", f"m{i}", qos=1, wait=False))
        # A retained message too, so the retained series are not only zero.
        infos.append(pub.publish(f"{LOAD_TOPIC}/retained", "kept", qos=1, retain=True,
                                 wait=False))
        deadline = time.monotonic() + 15
        for info in infos:
            info.wait_for_publish(max(deadline - time.monotonic(), 0.1))
            assert info.is_published(), f"a publish was not sent/acknowledged{self.detail()}"
        total = QOS0_MESSAGES + QOS1_MESSAGES + 1
        sub.messages.wait_for(total, timeout=max(deadline - time.monotonic(), 1))
        wait_until(f"the webhook did not receive the {total} messages",
                   lambda: self.hook.count() >= total, max(deadline - time.monotonic(), 1),
                   detail=lambda: f" (got {self.hook.count()}){self.detail()}")

    def stop(self) -> None:
        for c in self.clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - best effort cleanup
                pass
        if self.prometheus is not None:
            self.prometheus.stop()
        if self.broker is not None:
            self.broker.stop()
        if self.hook is not None:
            self.hook.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _rfc3339(s: str) -> float:
    """Seconds since the epoch of Prometheus' RFC 3339 timestamps (nanoseconds cut to
    microseconds); 0 for an empty or zero time."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", s or "")
    if not m or s.startswith("0001-"):
        return 0.0
    from datetime import datetime

    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    frac = (m.group(2) or "0")[:6].ljust(6, "0")
    return datetime.fromisoformat(f"{m.group(1)}.{frac}{zone}").timestamp()


@pytest.fixture(scope="module")
def stack():
    s = Stack()
    try:
        s.start()
        yield s
    finally:
        s.stop()


# --------------------------------------------------------------------------------------------
# promtool
# --------------------------------------------------------------------------------------------


def test_promtool_accepts_the_alert_rules():
    r = subprocess.run([require("promtool"), "check", "rules", str(ALERTS)],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, f"promtool check rules failed:\n{r.stdout}{r.stderr}"


def test_a_plugins_own_counters_are_exported(stack):
    # The webhook sink counts what it posted through the `metrics` host import; the broker
    # exports that as sandpiper_plugin_<plugin>_<name>.
    status, body = http_get(stack.metrics_url)
    assert status == 200
    text = body.decode() if isinstance(body, bytes) else body
    posted = [line for line in text.splitlines()
              if line.startswith("sandpiper_plugin_webhook_posted ")]
    assert posted, "no sandpiper_plugin_webhook_posted sample"
    assert float(posted[0].split()[1]) > 0, posted[0]
    assert "# TYPE sandpiper_plugin_webhook_posted untyped" in text


def test_promtool_finds_nothing_wrong_in_the_metrics(stack):
    status, body = http_get(stack.metrics_url)
    assert status == 200, f"GET /metrics: {status} {body[:200]!r}"
    r = subprocess.run([require("promtool"), "check", "metrics"], input=body,
                       capture_output=True, timeout=20)
    out = (r.stdout + r.stderr).decode(errors="replace")
    assert r.returncode == 0, f"promtool check metrics exited {r.returncode}:\n{out}"


# Each alert rule: series that should make it fire, with the labels its alert has then.
# Times are minutes of the rule unit test (one sample a minute, evaluated at 15m).
B = f'job="{JOB}",instance="b:8083"'
ALERT_SCENARIOS = {
    "SandpiperDown": (
        [(f"up{{{B}}}", "0x20")],
        {"instance": "b:8083", "job": JOB, "severity": "critical"}),
    "SandpiperNotReady": (
        [(f"sandpiper_ready{{{B}}}", "1x5 0x15")],
        {"instance": "b:8083", "job": JOB, "severity": "critical"}),
    "SandpiperMetricsAbsent": (
        [(f"up{{{B}}}", "1x20")],
        {"job": JOB, "severity": "critical"}),
    "SandpiperStoreWriteErrors": (
        [(f"sandpiper_store_write_errors_total{{{B}}}", "0+10x20")],
        {"instance": "b:8083", "job": JOB, "severity": "critical"}),
    "SandpiperStoreCommitsSlow": (
        [(f'sandpiper_store_commit_duration_seconds_bucket{{{B},le="0.1"}}', "0x20"),
         (f'sandpiper_store_commit_duration_seconds_bucket{{{B},le="0.5"}}', "0+100x20"),
         (f'sandpiper_store_commit_duration_seconds_bucket{{{B},le="+Inf"}}', "0+100x20")],
        {"instance": "b:8083", "job": JOB, "severity": "warning"}),
    "SandpiperHighDropRate": (
        [(f'sandpiper_messages_dropped_total{{{B},reason="queue_full"}}', "0+60x20"),
         (f'sandpiper_messages_dropped_total{{{B},reason="no_subscriber"}}', "0+600x20"),
         (f'sandpiper_messages_sent_total{{{B},qos="1"}}', "0+600x20")],
        {"instance": "b:8083", "job": JOB, "severity": "warning"}),
    "SandpiperPluginQueuesDropping": (
        [(f"sandpiper_plugin_events_dropped_total{{{B}}}", "0+60x20"),
         (f"sandpiper_plugin_publish_dropped_total{{{B}}}", "0x20")],
        {"instance": "b:8083", "job": JOB, "severity": "warning"}),
    "SandpiperPluginFailing": (
        [(f'sandpiper_plugin_failures_total{{{B},plugin="acl",reason="timeout"}}',
          "0+6x20")],
        {"instance": "b:8083", "job": JOB, "plugin": "acl", "reason": "timeout",
         "severity": "warning"}),
    "SandpiperPluginRefused": (
        [(f'sandpiper_plugin_reloads_total{{{B},plugin="acl",result="refused"}}',
          "0x10 1x10")],
        {"instance": "b:8083", "job": JOB, "plugin": "acl", "result": "refused",
         "severity": "warning"}),
    "SandpiperSinkFallingBehind": (
        [(f'sandpiper_sink_oldest_record_age_seconds{{{B},plugin="webhook"}}', "600x20")],
        {"instance": "b:8083", "job": JOB, "plugin": "webhook", "severity": "warning"}),
    "SandpiperBridgeDown": (
        [(f'sandpiper_bridge_connected{{{B},bridge="cloud"}}', "1x4 0x16")],
        {"instance": "b:8083", "job": JOB, "bridge": "cloud", "severity": "warning"}),
    "SandpiperBridgeDropping": (
        [(f'sandpiper_bridge_dropped_total{{{B},bridge="cloud"}}', "0x6 10x14")],
        {"instance": "b:8083", "job": JOB, "bridge": "cloud", "severity": "warning"}),
    "SandpiperSinkDropping": (
        [(f'sandpiper_sink_dropped_total{{{B},plugin="webhook"}}', "0x6 10x14")],
        {"instance": "b:8083", "job": JOB, "plugin": "webhook", "severity": "critical"}),
}
# A healthy broker, as the rules see it: no alert may fire.
HEALTHY_SERIES = [
    (f"up{{{B}}}", "1x20"),
    (f"sandpiper_connections_accepted_total{{{B}}}", "0+10x20"),
    (f"sandpiper_ready{{{B}}}", "1x20"),
    (f"sandpiper_store_write_errors_total{{{B}}}", "0x20"),
    (f'sandpiper_store_commit_duration_seconds_bucket{{{B},le="0.005"}}', "0+100x20"),
    (f'sandpiper_store_commit_duration_seconds_bucket{{{B},le="+Inf"}}', "0+100x20"),
    (f'sandpiper_messages_dropped_total{{{B},reason="queue_full"}}', "0x20"),
    (f'sandpiper_messages_dropped_total{{{B},reason="no_subscriber"}}', "0+600x20"),
    (f'sandpiper_messages_sent_total{{{B},qos="1"}}', "0+600x20"),
    (f"sandpiper_plugin_events_dropped_total{{{B}}}", "0x20"),
    (f"sandpiper_plugin_publish_dropped_total{{{B}}}", "0x20"),
    (f'sandpiper_plugin_failures_total{{{B},plugin="acl",reason="timeout"}}', "0x20"),
    (f'sandpiper_plugin_reloads_total{{{B},plugin="acl",result="loaded"}}', "1x20"),
    (f'sandpiper_plugin_reloads_total{{{B},plugin="acl",result="refused"}}', "0x20"),
    (f'sandpiper_sink_oldest_record_age_seconds{{{B},plugin="webhook"}}', "0.2x20"),
    (f'sandpiper_sink_dropped_total{{{B},plugin="webhook"}}', "0x20"),
    (f'sandpiper_bridge_connected{{{B},bridge="cloud"}}', "1x20"),
    (f'sandpiper_bridge_dropped_total{{{B},bridge="cloud"}}', "0x20"),
]


def test_each_alert_fires_on_its_condition_and_none_when_healthy(tmp_path):
    names = alert_names_in_file()
    assert sorted(names) == sorted(ALERT_SCENARIOS), (
        "every alert of alerts.yml needs a scenario in ALERT_SCENARIOS (and only those): "
        f"{sorted(set(names) ^ set(ALERT_SCENARIOS))}")

    def group(series, expected, alertname=None):
        # Only the alert of the scenario: SandpiperMetricsAbsent fires beside the others
        # (their series are not sandpiper_connections_accepted_total).
        only = f',alertname="{alertname}"' if alertname else ""
        return {
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in series],
            "promql_expr_test": [{
                "expr": f'ALERTS{{alertstate="firing"{only}}}', "eval_time": "15m",
                "exp_samples": expected}],
        }

    def alert_series(name, labels):
        inner = ",".join(f'{k}="{v}"' for k, v in
                         sorted({"alertname": name, "alertstate": "firing", **labels}.items()))
        return {"labels": f"ALERTS{{{inner}}}", "value": 1}

    tests = [group(series, [alert_series(name, labels)], name)
             for name, (series, labels) in ALERT_SCENARIOS.items()]
    tests.append(group(HEALTHY_SERIES, []))
    spec = tmp_path / "alerts_test.yml"
    # JSON is YAML.
    spec.write_text(json.dumps({"rule_files": [str(ALERTS)], "evaluation_interval": "1m",
                                "tests": tests}, indent=1))
    r = subprocess.run([require("promtool"), "test", "rules", str(spec)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"promtool test rules failed:\n{r.stdout}{r.stderr}"


# --------------------------------------------------------------------------------------------
# The dashboard
# --------------------------------------------------------------------------------------------


def test_dashboard_is_importable():
    d = load_dashboard()
    assert d.get("title") and d.get("uid"), "a dashboard needs a title and a uid"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables.get("datasource", {}).get("type") == "datasource", (
        "a `datasource` variable of type datasource selects the Prometheus to use")
    assert variables["datasource"].get("query") == "prometheus"
    panels = all_panels(d["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"panel ids must be unique: {ids}"
    for p in panels:
        if p.get("type") == "row":
            continue
        assert p.get("title"), f"panel {p['id']} has no title"
        assert p.get("datasource", {}).get("uid") == "${datasource}", (
            f"panel {p['title']!r} must use the datasource variable")
        refs = [t.get("refId") for t in p.get("targets", [])]
        assert refs and len(refs) == len(set(refs)), f"panel {p['title']!r}: refIds {refs}"
        for t in p["targets"]:
            assert t.get("datasource", {}).get("uid") == "${datasource}", (
                f"panel {p['title']!r} target {t.get('refId')}: datasource variable")
    assert dashboard_queries(), "the dashboard has no queries"


@pytest.mark.parametrize("name,expr,legend", dashboard_queries(),
                         ids=[q[0] for q in dashboard_queries()])
def test_dashboard_query_has_data(stack, name, expr, legend):
    r = stack.prometheus.query(expr)
    assert r.get("status") == "success", f"{name}: {expr}\n{r.get('errorType')}: {r.get('error')}"
    result = r["data"]["result"]
    assert result, f"{name}: no data for {expr}"
    wanted = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
    for series in result:
        missing = wanted - set(series.get("metric", {}))
        assert not missing, (f"{name}: the legend {legend!r} names label(s) "
                             f"{sorted(missing)} that {expr} does not have: {series}")


@pytest.mark.parametrize("name,expr", variable_queries(), ids=[v[0] for v in variable_queries()])
def test_dashboard_variable_has_values(stack, name, expr):
    r = stack.prometheus.query(expr)
    assert r.get("status") == "success", f"${name}: {expr}\n{r.get('error')}"
    assert r["data"]["result"], f"${name} would have no values: {expr}"


# --------------------------------------------------------------------------------------------
# The alert rules, loaded by the running Prometheus
# --------------------------------------------------------------------------------------------


def test_alert_rules_evaluate_and_none_fires_on_a_healthy_broker(stack):
    groups = stack.prometheus.api("rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert sorted(r["name"] for r in rules) == sorted(alert_names_in_file()), (
        f"Prometheus loaded {[r['name'] for r in rules]}{stack.prometheus.detail()}")
    problems = []
    for rule in rules:
        if rule.get("health") != "ok" or rule.get("lastError"):
            problems.append(f"{rule['name']}: health {rule.get('health')}, "
                            f"{rule.get('lastError')}")
        if rule.get("state") != "inactive":
            problems.append(f"{rule['name']} is {rule.get('state')} on a healthy broker: "
                            f"{rule.get('alerts')}")
        # Alerts select what is wrong: empty here, so only their acceptance is checked.
        r = stack.prometheus.query(rule["query"])
        if r.get("status") != "success":
            problems.append(f"{rule['name']}: {rule['query']}: {r.get('error')}")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------
# The series they use
# --------------------------------------------------------------------------------------------


def test_every_metric_used_is_exported(stack):
    status, body = http_get(stack.metrics_url)
    assert status == 200
    exported = {line.split("{")[0].split(" ")[0]
                for line in body.decode().splitlines() if line and not line.startswith("#")}
    used: dict[str, set[str]] = {}
    for name, expr, _ in dashboard_queries():
        for m in metric_names(expr):
            used.setdefault(m, set()).add(f"dashboard {name}")
    for rule in (r for g in stack.prometheus.api("rules")["data"]["groups"]
                 for r in g["rules"]):
        for m in metric_names(rule["query"]):
            used.setdefault(m, set()).add(f"alert {rule['name']}")
    missing = {m: sorted(where) for m, where in sorted(used.items()) if m not in exported}
    assert not missing, "not exported by the broker:\n" + "\n".join(
        f"  {m}: used by {', '.join(where)}" for m, where in missing.items())
