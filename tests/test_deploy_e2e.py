"""End to end: a real Prometheus on 127.0.0.1 scrapes a real `personavec serve` (tiny Llama,
`--enforce-eager`) and evaluates the rules `personavec deploy rules` generated with test
timings (15 s window, `for: 2s`, 1 s scrape and evaluation).

Vector `a` carries projection statistics pos_mean 1 / neg_mean -1 (threshold 0): replies steered
against it keep the recorded drift mean below 0 and no alert; replies steered toward it push the
mean above 0 and the drift alert goes pending, then firing, then resolves when the traffic
stops. Vector `b` (threshold 9) is monitored all along and never alerts; `c` has no statistics
and no alert rule. The dashboard's every panel query runs against this Prometheus, and every
metric name it uses exists on the server's /metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from test_deploy import DASHBOARD_FILE, ensure_promtool, stats_library

from personavec_vllm.ops import dashboard as deploy
from personavec_vllm.testing import build_tiny_model, free_port, http_json, run_server

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"
WINDOW = "15s"
MEAN = f"vector_kind_model_layer:personavec_projection:mean{WINDOW}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ensure_promtool()
    if shutil.which("prometheus") is None:
        pytest.skip("the prometheus server binary is missing (scripts/install-prometheus.sh installs it)")
    root = tmp_path_factory.mktemp("deploy_e2e")
    model = str(build_tiny_model("llama", root / "llama"))
    vectors = stats_library(root / "vectors", num_layers=4, hidden=128)
    return root, model, vectors


@contextlib.contextmanager
def prometheus(root, target: str, rules: str):
    """A fresh Prometheus (its own config, log and storage under a new folder: no series of an
    earlier test's Prometheus may leak into this one's queries)."""
    port = free_port()
    root = Path(tempfile.mkdtemp(prefix="prometheus-", dir=root))
    config = root / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{rules}]\n"
        f"scrape_configs:\n- job_name: personavec\n  static_configs:\n  - targets: ['{target}']\n"
    )
    check = subprocess.run([ensure_promtool(), "check", "config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    log = open(root / "prometheus.log", "wb")  # noqa: SIM115 - Prometheus writes to it until the fixture ends
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={root / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (root / "prometheus.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(base + "/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus not ready after 60 s"
            time.sleep(0.5)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def query(prom: str, expr: str) -> list[dict]:
    body = http_json(f"{prom}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=30)
    assert body["status"] == "success", body
    return body["data"]["result"]


def alerts(prom: str, vector: str | None = None) -> list[dict]:
    out = http_json(f"{prom}/api/v1/alerts", timeout=30)["data"]["alerts"]
    return [
        a
        for a in out
        if a["labels"]["alertname"].startswith("Persona") and (vector is None or a["labels"].get("vector") == vector)
    ]


def complete(server: str, coeff: float, i: int) -> float:
    reply = http_json(
        server + "/v1/completions",
        {
            "model": MODEL,
            "prompt": f"Tell me about item number {i}.",
            "max_tokens": 6,
            "temperature": 0,
            "persona_steer": [{"vector": "a", "coeff": coeff, "layers": [2]}],
            "persona_monitor": {"vectors": ["a", "b"], "layers": [2]},
        },
    )
    persona = reply["persona"]
    assert "error" not in persona, persona
    return persona["projections"]["a"]["2"]["response_mean"]


def until(condition, timeout: float, what: str, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(step)


def test_drift_alert_on_a_live_server(setup):
    root, model, vectors = setup
    rules = root / "rules.yml"
    gen = subprocess.run(
        [
            sys.executable,
            "-m",
            "personavec_vllm.cli",
            "deploy",
            "rules",
            "--vectors",
            str(vectors),
            "--out",
            str(rules),
            "--window",
            WINDOW,
            "--for",
            "2s",
            "--interval",
            "1s",
            "--min-samples",
            "2",
            "--rejected-window",
            WINDOW,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert gen.returncode == 0, gen.stderr
    port = free_port()
    args = [
        "--model",
        model,
        "--vectors",
        str(vectors),
        "--served-model-name",
        MODEL,
        "--enforce-eager",
        "--max-model-len",
        "1024",
    ]
    with (
        run_server(args, port=port, log_path=root / "server.log") as server,
        prometheus(root, f"127.0.0.1:{port}", str(rules)) as prom,
    ):
        until(lambda: query(prom, 'up{job="personavec"} == 1'), 30, "the first scrape")
        a_mean = f'{MEAN}{{vector="a", kind="response_mean", model="{MODEL}", layer="2"}}'

        # steered against the trait: the recorded mean is below the threshold 0, no alert
        low = []
        start = time.monotonic()
        while time.monotonic() - start < 8 or not query(prom, a_mean):
            low.append(complete(server, -8.0, len(low)))
            assert time.monotonic() - start < 60, "no recorded drift mean after 60 s"
        assert sum(low) / len(low) < 0, low
        (sample,) = query(prom, a_mean)
        assert float(sample["value"][1]) < 0
        assert alerts(prom, "a") == []

        # steered toward it: the mean crosses the threshold, the alert goes pending, then firing
        high, states = [], set()
        start = time.monotonic()
        while time.monotonic() - start < 120:
            high.append(complete(server, 8.0, len(high)))
            drift = [
                x
                for x in alerts(prom, "a")
                if x["labels"]["alertname"] == "PersonaTraitDrift" and x["labels"]["severity"] == "warning"
            ]
            states |= {x["state"] for x in drift}
            if "firing" in states and time.monotonic() - start > 18:  # window filled with high replies
                break
        assert sum(high) / len(high) > 0, high
        logs = sorted(root.glob("prometheus-*/prometheus.log"), key=lambda p: p.stat().st_mtime)
        assert "firing" in states, (states, query(prom, a_mean), logs[-1].read_text()[-2000:])
        (sample,) = query(prom, a_mean)
        recorded = float(sample["value"][1])
        assert recorded > 0 and min(high) - 1e-6 <= recorded <= max(high) + 1e-6, (recorded, high[-20:])
        (firing,) = [
            x
            for x in alerts(prom, "a")
            if x["labels"]["severity"] == "warning" and x["labels"]["alertname"] == "PersonaTraitDrift"
        ]
        assert firing["labels"]["model"] == MODEL and firing["labels"]["trait"] == "a"
        assert MODEL in firing["annotations"]["summary"] and "'a'" in firing["annotations"]["description"]
        assert "What to do" in firing["annotations"]["action"]
        assert alerts(prom, "b") == [] and alerts(prom, "c") == []
        threshold = query(prom, 'personavec:drift_threshold{vector="a", severity="warning"}')
        assert [float(s["value"][1]) for s in threshold] == [0.0]

        # the dashboard: every panel query runs here and returns data; metric names are real
        check_dashboard(server, prom)

        # traffic stops: the window empties and the alert resolves
        until(
            lambda: not [x for x in alerts(prom, "a") if x["labels"]["alertname"] == "PersonaTraitDrift"],
            60,
            "the drift alert to resolve",
        )
        assert "pending" in states or "firing" in states


def check_dashboard(server: str, prom: str) -> None:
    board = json.loads(DASHBOARD_FILE.read_text())
    empty = []
    for title, expr in deploy.panel_queries(board):
        result = query(prom, deploy.plain_promql(expr))
        if not result:
            empty.append((title, expr))
    assert not empty, empty
    for v in board["templating"]["list"]:
        if v["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*), \w+\)", v["query"]["query"]).group(1)
            assert query(prom, deploy.plain_promql(inner)), v["name"]
    with urllib.request.urlopen(server + "/metrics", timeout=30) as resp:
        exposed = {
            line.split("{")[0].split(" ")[0]
            for line in resp.read().decode().splitlines()
            if line and not line.startswith("#")
        }
    used = set()
    for _, expr in deploy.panel_queries(board):
        used |= set(re.findall(r"(?<![\w:])((?:vllm:|personavec_)\w+)(?![\w:])", expr))
    assert used and used <= exposed, sorted(used - exposed)


def test_drift_alert_on_traffic_that_never_asked(setup):
    """A server policy monitors all traffic: plain requests, which send no persona field, feed the
    drift mean; a policy change (PUT, hot) that steers every reply toward the trait makes the
    alert fire, and the version metric moves."""
    root, model, vectors = setup
    rules = root / "rules-policy.yml"
    gen = subprocess.run(
        [
            sys.executable,
            "-m",
            "personavec_vllm.cli",
            "deploy",
            "rules",
            "--vectors",
            str(vectors),
            "--out",
            str(rules),
            "--window",
            WINDOW,
            "--for",
            "2s",
            "--interval",
            "1s",
            "--min-samples",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert gen.returncode == 0, gen.stderr
    policy = root / "policy.yaml"
    policy.write_text("monitor: {vectors: [a], layers: [2]}\nsteer: [{vector: a, coeff: -8, layers: [2]}]\n")
    port = free_port()
    args = [
        "--model",
        model,
        "--vectors",
        str(vectors),
        "--served-model-name",
        MODEL,
        "--enforce-eager",
        "--max-model-len",
        "1024",
        "--policy",
        str(policy),
    ]
    env = {**os.environ, "PERSONAVEC_ADMIN_KEY": "e2e-admin"}
    with (
        run_server(args, port=port, log_path=root / "server-policy.log", env=env) as server,
        prometheus(root, f"127.0.0.1:{port}", str(rules)) as prom,
    ):
        until(lambda: query(prom, 'up{job="personavec"} == 1'), 30, "the first scrape")
        a_mean = f'{MEAN}{{vector="a", kind="response_mean", model="{MODEL}", layer="2"}}'

        def plain(i):
            reply = http_json(
                server + "/v1/completions", {"model": MODEL, "prompt": f"Item {i}.", "max_tokens": 6, "temperature": 0}
            )
            assert "persona" not in reply

        start, i = time.monotonic(), 0
        while time.monotonic() - start < 8 or not query(prom, a_mean):
            plain(i)
            i += 1
            assert time.monotonic() - start < 60, "no recorded drift mean from unmonitored traffic after 60 s"
        assert float(query(prom, a_mean)[0]["value"][1]) < 0 and alerts(prom, "a") == []
        req = urllib.request.Request(
            server + "/v1/persona/policy",
            method="PUT",
            data=b"monitor: {vectors: [a], layers: [2]}\nsteer: [{vector: a, coeff: 8, layers: [2]}]\n",
            headers={"Authorization": "Bearer e2e-admin"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert json.loads(resp.read())["policy"]["version"] == 2
        states = set()
        start = time.monotonic()
        while time.monotonic() - start < 120 and "firing" not in states:
            plain(i)
            i += 1
            states |= {x["state"] for x in alerts(prom, "a") if x["labels"]["alertname"] == "PersonaTraitDrift"}
        assert "firing" in states, (states, query(prom, a_mean))
        assert [float(s["value"][1]) for s in query(prom, "personavec_policy_version")] == [2.0]
