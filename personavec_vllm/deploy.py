"""Production monitoring, generated from the vector library: Prometheus rules and the Grafana
dashboard (`personavec deploy rules`, `personavec deploy dashboard`).

Alert thresholds come from the projection statistics that extraction stores with each vector
(`PersonaVector.projection_stats(layer)`: mean and spread of `h . v / |v|` over answers that
express the trait (`pos_*`) and answers that do not (`neg_*`)), at the vector's recommended
layer. They are never copied by hand: regenerate the rules whenever the library changes.

The drift signal is the mean `response_mean` projection of a trait over a sliding window,
from the signed sum counters (a histogram with negative buckets has no `_sum`, see
`personavec_vllm.server.metrics`):

    (rate(personavec_projection_sum_pos_total[W]) - rate(personavec_projection_sum_neg_total[W]))
    / rate(personavec_projection_count[W])

summed over replicas (and API server processes) per vector, kind, model and layer; windows
without replies give no sample (not NaN). A series' first observations before its first scrape
are not in any rate: a counter is exported from its first observation on.

- `PersonaTraitDrift` (warning): the windowed mean is above the midpoint between `pos_mean` and
  `neg_mean`: replies now look more like the trait-expressing extraction answers than like the
  others. The same alert at severity `critical` fires above `pos_mean` itself. Where extraction
  also recorded plain replies (no system prompt; `PersonaVector.plain_stats`), the warning
  threshold is at least `plain_mean + 2 se` and the critical one at least `plain_mean + 4 se`,
  with `se = plain_std / sqrt(min_samples)` the spread of a window mean over the fewest replies
  an alert looks at: ordinary traffic of a small model can sit above the midpoint, and an alert
  that fires on normal replies teaches people to ignore it.
- `PersonaTraitSuddenRise` (warning): the windowed mean rose, relative to the same hour of the
  previous day (`offset 1d`), by more than `rise_fraction * (pos_mean - neg_mean)`.
- `PersonaRequestsRejected` (warning): persona fields refused with HTTP 400 above a rate.
- `PersonaProjectionsMissing` (warning): monitored requests arrive but no projections are
  recorded (the worker's results do not reach the API server).

Vectors without stored statistics (imported GGUF control vectors, hand-made vectors) get no
drift and no rise alert: there is no scale to derive a threshold from. The generated file
names them in a comment.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from personavec_vllm.vectors import PersonaVector, VectorFileError, load_vector

RECORD_MEAN = "vector_kind_model_layer:personavec_projection:mean{window}"
RECORD_COUNT = "vector_kind_model_layer:personavec_projection_count:increase{window}"
RECORD_THRESHOLD = "personavec:drift_threshold"
RECORD_REJECTED = "model_reason:personavec_rejected_requests:rate{window}"
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
DASHBOARD_UID = "personavec"


@dataclass(frozen=True)
class RuleSettings:
    """Knobs of the generated rules. Production defaults; tests shrink the times."""

    window: str = "10m"  # sliding window of the drift mean
    for_: str = "15m"  # how long a condition must hold before an alert fires
    interval: str = "30s"  # evaluation interval of the rule groups
    min_samples: int = 20  # monitored replies in the window before drift/rise alerts may fire
    rise_fraction: float = 0.25  # sudden rise: this share of (pos_mean - neg_mean) above yesterday
    baseline: str = "1h"  # yesterday's mean is averaged over this long a stretch (offset 1d)
    rejected_rate: float = 0.05  # rejected persona requests per second, per model and reason
    rejected_window: str = "5m"
    model: str | None = None  # restrict the alerts to this served model name

    def __post_init__(self) -> None:
        for name in ("window", "for_", "interval", "baseline", "rejected_window"):
            value = getattr(self, name)
            if not DURATION.match(value):
                raise ValueError(f"{name.rstrip('_')}: {value!r} is not a Prometheus duration (e.g. 30s, 10m, 1h)")
        if self.min_samples < 1:
            raise ValueError("min_samples must be at least 1")
        if not (self.rise_fraction > 0 and math.isfinite(self.rise_fraction)):
            raise ValueError("rise_fraction must be a positive number")
        if not (self.rejected_rate >= 0 and math.isfinite(self.rejected_rate)):
            raise ValueError("rejected_rate must be a non-negative number")


@dataclass(frozen=True)
class TraitThresholds:
    """Alert thresholds of one vector at its recommended layer."""

    vector: str
    trait: str
    layer: int
    pos_mean: float
    neg_mean: float
    plain_mean: float | None = None
    plain_std: float | None = None
    min_samples: int = 1  # replies a window mean averages at least (RuleSettings.min_samples)

    @property
    def midpoint(self) -> float:
        return (self.pos_mean + self.neg_mean) / 2

    @property
    def plain_se(self) -> float:
        """Standard error of a window mean of plain replies."""
        return (self.plain_std or 0.0) / math.sqrt(self.min_samples)

    def _above_plain(self, ses: float) -> float:
        return -math.inf if self.plain_mean is None else self.plain_mean + ses * self.plain_se

    @property
    def warning(self) -> float:
        return max(self.midpoint, self._above_plain(2))

    @property
    def critical(self) -> float:
        return max(self.pos_mean, self._above_plain(4))

    @property
    def separation(self) -> float:
        return self.pos_mean - self.neg_mean


def thresholds(vector: PersonaVector, min_samples: int = RuleSettings.min_samples) -> TraitThresholds | None:
    """None when the vector has no usable statistics at its recommended layer."""
    stats = vector.projection_stats(vector.layer)
    if not stats:
        return None
    try:
        pos, neg = float(stats["pos_mean"]), float(stats["neg_mean"])
    except (KeyError, TypeError, ValueError):
        return None
    if not (math.isfinite(pos) and math.isfinite(neg)) or pos <= neg:
        return None
    plain = vector.plain_stats(vector.layer) or {}
    try:
        plain_mean, plain_std = float(plain["mean"]), float(plain["std"])
        if not (math.isfinite(plain_mean) and math.isfinite(plain_std)):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        plain_mean = plain_std = None
    return TraitThresholds(vector.name, vector.trait, vector.layer, pos, neg, plain_mean, plain_std, min_samples)


def _level_meaning(t: TraitThresholds, severity: str) -> str:
    """Why the threshold of `severity` sits where it does, for the alert's description."""
    extraction = (
        f"the midpoint {_num(t.midpoint)} between answers that express the trait (mean {_num(t.pos_mean)}) and "
        f"answers that do not (mean {_num(t.neg_mean)}) at extraction" if severity == "warning"
        else f"{_num(t.pos_mean)}, the mean of answers that express the trait at extraction"
    )
    level = t.warning if severity == "warning" else t.critical
    if t.plain_mean is None or level == (t.midpoint if severity == "warning" else t.pos_mean):
        return extraction
    ses = 2 if severity == "warning" else 4
    return (f"{_num(level)}: plain replies at extraction (no system prompt) average {_num(t.plain_mean)} (sd "
            f"{_num(t.plain_std)}), so the threshold is raised from {extraction} to their mean + {ses} standard "
            f"errors of a {t.min_samples}-reply mean")


def load_library(directory: str | Path) -> list[PersonaVector]:
    """The vectors of a library folder (top level `*.safetensors`, as the server reads it)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise VectorFileError(f"vector library {directory} is not a directory")
    return [load_vector(path) for path in sorted(directory.glob("*.safetensors"))]


# ---- rules ------------------------------------------------------------------------------

def _num(value: float) -> str:
    """A float as PromQL accepts it, stable across runs."""
    return repr(round(float(value), 6))


def _matchers(**labels: str | None) -> str:
    return ", ".join(f'{k}="{v}"' for k, v in labels.items() if v is not None)


def _mean_expr(window: str) -> str:
    by = "sum by (vector, kind, model, layer)"
    return (
        f"(\n  {by} (rate(personavec_projection_sum_pos_total[{window}]))\n"
        f"  - {by} (rate(personavec_projection_sum_neg_total[{window}]))\n)\n"
        f"/ ({by} (rate(personavec_projection_count[{window}])) > 0)\n"
    )


def _drift_rules(t: TraitThresholds, s: RuleSettings) -> list[dict]:
    mean = RECORD_MEAN.format(window=s.window)
    count = RECORD_COUNT.format(window=s.window)
    sel = "{" + _matchers(vector=t.vector, kind="response_mean", layer=str(t.layer), model=s.model) + "}"
    enough = f"and on (vector, kind, model, layer)\n{count}{sel} >= {s.min_samples}\n"
    labels = {"component": "personavec", "trait": t.trait}
    who = f"persona vector '{t.vector}' (trait '{t.trait}', layer {t.layer})"
    todo = (
        "What to do: open the personavec dashboard (trait projection and distribution panels) and "
        "check whether the rise follows a deploy, a prompt or chat template change, or a shift in "
        "traffic; sample recent replies with persona_monitor (per_token) to see which requests "
        "carry it; to contain it, steer against the trait "
        f"(persona_steer: [{{\"vector\": \"{t.vector}\", \"coeff\": -2}}]) or roll back the change."
    )
    rules = []
    for severity, level in (("warning", t.warning), ("critical", t.critical)):
        meaning = _level_meaning(t, severity)
        rules.append({
            "alert": "PersonaTraitDrift",
            "expr": f"{mean}{sel} > {_num(level)}\n{enough}",
            "for": s.for_,
            "labels": {**labels, "severity": severity},
            "annotations": {
                "summary": f"Replies of {{{{ $labels.model }}}} drift toward '{t.trait}' ({severity})",
                "description": (
                    f"The mean projection of replies of {{{{ $labels.model }}}} on {who} over the last "
                    f"{s.window} is {{{{ $value | printf \"%.3g\" }}}}, above {meaning}."
                ),
                "action": todo,
            },
        })
    rise = s.rise_fraction * t.separation
    rules.append({
        "alert": "PersonaTraitSuddenRise",
        "expr": (
            f"(\n  {mean}{sel}\n  - on (vector, kind, model, layer)\n"
            f"  avg_over_time({mean}{sel}[{s.baseline}] offset 1d)\n) > {_num(rise)}\n{enough}"
        ),
        "for": s.for_,
        "labels": {**labels, "severity": "warning"},
        "annotations": {
            "summary": f"'{t.trait}' in replies of {{{{ $labels.model }}}} rose sharply since yesterday",
            "description": (
                f"The mean projection of replies of {{{{ $labels.model }}}} on {who} over the last "
                f"{s.window} is {{{{ $value | printf \"%.3g\" }}}} above its mean at this time yesterday "
                f"({s.baseline} average, offset 1d); the alert threshold is {_num(rise)} "
                f"({s.rise_fraction:g} of the extraction's separation {_num(t.separation)})."
            ),
            "action": todo,
        },
    })
    return rules


def build_rules(vectors: list[PersonaVector], settings: RuleSettings = RuleSettings()) -> tuple[dict, list[str]]:
    """The rule file as a dict, and the names of the vectors that got no drift/rise alerts."""
    s = settings
    by_name = sorted(vectors, key=lambda v: v.name)
    found = {v.name: thresholds(v, s.min_samples) for v in by_name}
    skipped = [name for name, t in found.items() if t is None]
    model = _matchers(model=s.model)
    recording = [
        {"record": RECORD_MEAN.format(window=s.window), "expr": _mean_expr(s.window)},
        {"record": RECORD_COUNT.format(window=s.window),
         "expr": f"sum by (vector, kind, model, layer) (increase(personavec_projection_count[{s.window}]))"},
        {"record": RECORD_REJECTED.format(window=s.rejected_window),
         "expr": f"sum by (model, reason) (rate(personavec_rejected_requests_total[{s.rejected_window}]))"},
    ]
    for t in (t for t in found.values() if t is not None):
        for severity, level in (("warning", t.warning), ("critical", t.critical)):
            labels = {"vector": t.vector, "trait": t.trait, "layer": str(t.layer), "severity": severity}
            if s.model:
                labels["model"] = s.model
            recording.append({"record": RECORD_THRESHOLD, "expr": f"vector({_num(level)})", "labels": labels})
    alerts: list[dict] = []
    for t in (t for t in found.values() if t is not None):
        alerts += _drift_rules(t, s)
    rejected_sel = "{" + model + "}" if model else ""
    alerts.append({
        "alert": "PersonaRequestsRejected",
        "expr": f"{RECORD_REJECTED.format(window=s.rejected_window)}{rejected_sel} > {_num(s.rejected_rate)}",
        "for": s.for_,
        "labels": {"component": "personavec", "severity": "warning"},
        "annotations": {
            "summary": "{{ $labels.model }} refuses persona requests ({{ $labels.reason }})",
            "description": (
                "{{ $value | printf \"%.3g\" }} requests/s to {{ $labels.model }} were refused with HTTP 400 "
                f"for reason {{{{ $labels.reason }}}} over the last {s.rejected_window} "
                f"(threshold {_num(s.rejected_rate)}/s)."
            ),
            "action": (
                "What to do: the 400 body names the field. unknown_vector: a client asks for a vector "
                "the library lacks (renamed or deleted? compare GET /v1/persona/vectors with the "
                "clients' configuration); layer_out_of_range / bad_coeff / too_many_vectors: clients "
                "send values outside the limits (PERSONAVEC_MAX_COEFF, PERSONAVEC_MAX_VECTORS); "
                "unsupported: the served architecture is not enabled for steering."
            ),
        },
    })
    monitored = "{" + model + "}" if model else ""
    observed = "{" + _matchers(kind="prompt_last", model=s.model) + "}"
    alerts.append({
        "alert": "PersonaProjectionsMissing",
        "expr": (
            f"sum by (model) (rate(personavec_monitored_requests_total{monitored}[{s.window}])) > 0\n"
            f"unless on (model)\n"
            f"sum by (model) (rate(personavec_projection_count{observed}[{s.window}])) > 0\n"
        ),
        "for": s.for_,
        "labels": {"component": "personavec", "severity": "warning"},
        "annotations": {
            "summary": "Monitored requests to {{ $labels.model }} get no projections",
            "description": (
                f"{{{{ $labels.model }}}} received monitored requests over the last {s.window} but recorded "
                "no projection: replies carry persona.error instead of projections, and the drift "
                "alerts are blind."
            ),
            "action": (
                "What to do: look for 'projections of request ... incomplete' in the server log. "
                "The worker pushes projections over a local ZMQ socket to the API server process "
                "that took the request; check that the API server and the engine run on one host "
                "and that the temporary directory holding the ipc:// socket is shared between them."
            ),
        },
    })
    interval = {"interval": s.interval}
    doc = {
        "groups": [
            {"name": "personavec-recording", **interval, "rules": recording},
            {"name": "personavec-alerts", **interval, "rules": alerts},
        ]
    }
    return doc, skipped


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(doc: dict) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)


def render_rules(vectors: list[PersonaVector], settings: RuleSettings = RuleSettings(),
                 source: str = "", fmt: str = "prometheus") -> str:
    """The rule file text. `fmt` is `prometheus` (a rule file) or `prometheusrule` (a
    Prometheus Operator `PrometheusRule` object with the same groups)."""
    doc, skipped = build_rules(vectors, settings)
    with_alerts = sorted(v.name for v in vectors if v.name not in skipped)
    header = [
        "# Generated by `personavec deploy rules`" + (f" from {source}" if source else "") + ": do not edit;",
        "# regenerate when the vector library changes. Thresholds come from each vector's stored",
        "# projection statistics at its recommended layer (see personavec_vllm/deploy.py).",
        f"# Drift and rise alerts: {', '.join(with_alerts) or 'none'}.",
        "# Vectors without projection statistics get no drift or rise alert (no scale to derive a",
        f"# threshold from): {', '.join(skipped) or 'none'}.",
    ]
    if fmt == "prometheusrule":
        doc = {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": {"name": "personavec", "labels": {"app.kubernetes.io/name": "personavec"}},
            "spec": doc,
        }
    elif fmt != "prometheus":
        raise ValueError(f"unknown rule format {fmt!r}")
    return "\n".join(header) + "\n" + dump_yaml(doc)


# ---- dashboard --------------------------------------------------------------------------

# Grafana variables used in the panels' PromQL, with values that make the queries plain PromQL
# (for checking them against a Prometheus server).
DASHBOARD_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$model": ".*",
    "$vector": ".*",
    "$layer": ".*",
}

_P = 'model=~"$model", vector=~"$vector", layer=~"$layer"'


def _projection_mean(kind: str) -> str:
    by = "sum by (vector, model, layer)"
    sel = f'{{kind="{kind}", {_P}}}'
    return (
        f"(\n  {by} (rate(personavec_projection_sum_pos_total{sel}[$__rate_interval]))\n"
        f"  - {by} (rate(personavec_projection_sum_neg_total{sel}[$__rate_interval]))\n)\n"
        f"/ ({by} (rate(personavec_projection_count{sel}[$__rate_interval])) > 0)"
    )


def _quantiles(metric: str) -> list[tuple[str, str]]:
    return [
        (f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{model_name=~\"$model\"}}[$__rate_interval])))",
         f"p{int(q * 100)}")
        for q in (0.5, 0.95, 0.99)
    ]


def dashboard() -> dict:
    """The Grafana dashboard (JSON model) of persona monitoring and vLLM serving."""
    ds = {"type": "prometheus", "uid": "${datasource}"}
    panels: list[dict] = []
    y = 0

    def row(title: str) -> None:
        nonlocal y
        panels.append({"type": "row", "title": title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "id": len(panels) + 1})
        y += 1

    def panel(title: str, targets: list[tuple[str, str]], *, kind: str = "timeseries", w: int = 12,
              h: int = 8, x: int = 0, unit: str = "short", description: str = "", **extra) -> dict:
        p = {
            "id": len(panels) + 1, "type": kind, "title": title, "description": description,
            "datasource": ds, "gridPos": {"h": h, "w": w, "x": x, "y": y},
            "targets": [
                {"refId": chr(ord("A") + i), "datasource": ds, "expr": expr, "legendFormat": legend,
                 "range": True}
                for i, (expr, legend) in enumerate(targets)
            ],
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                        "tooltip": {"mode": "multi"}},
        }
        p.update(extra)
        panels.append(p)
        return p

    row("Persona traits")
    panel("Mean reply projection per trait (response_mean) and alert thresholds",
          [(_projection_mean("response_mean"), "{{vector}} L{{layer}} {{model}}"),
           (f'max by (vector, layer, severity) ({RECORD_THRESHOLD}{{vector=~"$vector", layer=~"$layer"}})',
            "{{vector}} L{{layer}} {{severity}} threshold")],
          description="Mean projection h.v/|v| of generated tokens on each persona vector, per reply, "
                      "averaged over the rate interval. Dashed lines: the drift alert thresholds from the "
                      "vector's extraction statistics (recording rule personavec:drift_threshold).",
          fieldConfig={"defaults": {"unit": "short"}, "overrides": [{
              "matcher": {"id": "byRegexp", "options": ".*threshold"},
              "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}]}]})
    panel("Mean prompt projection per trait (prompt_last)",
          [(_projection_mean("prompt_last"), "{{vector}} L{{layer}} {{model}}")], x=12,
          description="Projection at the last prompt token: predicts the reply's trait before any token "
                      "is generated.")
    y += 8
    panel("Projection distribution: $vector (response_mean)",
          [('sum by (le) (increase(personavec_projection_bucket{kind="response_mean", ' + _P + "}[$__rate_interval]))",
            "{{le}}")],
          kind="heatmap", w=24, repeat="vector", repeatDirection="h", maxPerRow=3,
          description="Replies per projection bucket (buckets are fitted to each vector's extraction "
                      "statistics). One heatmap per vector.",
          options={"calculate": False, "yAxis": {"unit": "short"}, "cellGap": 1,
                   "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
                   "tooltip": {"mode": "single", "yHistogram": True}, "legend": {"show": True}})
    panels[-1]["targets"][0]["format"] = "heatmap"
    y += 8
    panel("Steered requests/s by vector",
          [('sum by (vector) (rate(personavec_steered_requests_total{model=~"$model", vector=~"$vector"}[$__rate_interval]))',
            "{{vector}}")], w=8, unit="reqps")
    panel("Monitored requests/s by vector",
          [('sum by (vector) (rate(personavec_monitored_requests_total{model=~"$model", vector=~"$vector"}[$__rate_interval]))',
            "{{vector}}")], w=8, x=8, unit="reqps")
    panel("Rejected persona requests/s by reason",
          [('sum by (reason) (rate(personavec_rejected_requests_total{model=~"$model"}[$__rate_interval]))',
            "{{reason}}")], w=8, x=16, unit="reqps",
          description="Persona fields refused with HTTP 400 (the error names the field).")
    y += 8
    panel("Firing and pending persona alerts",
          [('sum by (alertname, alertstate, severity, vector, model, reason) (ALERTS{alertname=~"Persona.*"})',
            "{{alertstate}} {{alertname}} {{severity}} {{vector}}{{reason}} {{model}}")],
          w=24, h=6, unit="none", description="Alerts from the personavec rules (Prometheus ALERTS series).")
    y += 6
    row("vLLM serving")
    m = 'model_name=~"$model"'
    panel("Token throughput",
          [(f"sum(rate(vllm:generation_tokens_total{{{m}}}[$__rate_interval]))", "generated tokens/s"),
           (f"sum(rate(vllm:prompt_tokens_total{{{m}}}[$__rate_interval]))", "prompt tokens/s")],
          w=8, unit="short")
    panel("Requests running and waiting",
          [(f"sum(vllm:num_requests_running{{{m}}})", "running"),
           (f"sum(vllm:num_requests_waiting{{{m}}})", "waiting")], w=8, x=8, unit="short")
    panel("Finished requests/s by reason",
          [(f"sum by (finished_reason) (rate(vllm:request_success_total{{{m}}}[$__rate_interval]))",
            "{{finished_reason}}")], w=8, x=16, unit="reqps")
    y += 8
    panel("End-to-end request latency", _quantiles("vllm:e2e_request_latency_seconds"), w=8, unit="s")
    panel("Time to first token", _quantiles("vllm:time_to_first_token_seconds"), w=8, x=8, unit="s")
    panel("Inter-token latency", _quantiles("vllm:inter_token_latency_seconds"), w=8, x=16, unit="s")
    y += 8
    panel("KV cache usage", [(f"avg(vllm:kv_cache_usage_perc{{{m}}})", "used")], w=8, unit="percentunit")
    panel("Queue time", _quantiles("vllm:request_queue_time_seconds"), w=8, x=8, unit="s")
    panel("Preemptions/s", [(f"sum(rate(vllm:num_preemptions_total{{{m}}}[$__rate_interval]))", "preemptions")],
          w=8, x=16, unit="short")

    def variable(name: str, query: str, label: str) -> dict:
        return {"name": name, "label": label, "type": "query", "datasource": ds,
                "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
                "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "sort": 1,
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}

    return {
        "uid": DASHBOARD_UID,
        "title": "personavec: persona vectors on vLLM",
        "description": "Per-trait projections, steering and monitoring traffic, rejections, and vLLM "
                       "throughput and latency. Generated by `personavec deploy dashboard`.",
        "tags": ["personavec", "vllm"],
        "timezone": "browser",
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "annotations": {"list": []},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {"selected": True, "text": "Prometheus", "value": "prometheus"}},
            variable("model", "label_values(personavec_rejected_requests_total, model)", "Model"),
            variable("vector", 'label_values(personavec_projection_count{model=~"$model"}, vector)', "Vector"),
            variable("layer", 'label_values(personavec_projection_count{model=~"$model", vector=~"$vector"}, layer)', "Layer"),
        ]},
        "panels": panels,
    }


def panel_queries(board: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel."""
    out = []
    for p in board["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    return out


def plain_promql(expr: str) -> str:
    """A panel's PromQL with Grafana's variables replaced by plain values."""
    for name in sorted(DASHBOARD_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, DASHBOARD_VARIABLES[name])
    return expr


def render_dashboard() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


# ---- command line -----------------------------------------------------------------------

def add_deploy_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="monitoring files for production: Prometheus rules, Grafana dashboard")
    dsub = p.add_subparsers(dest="deploy_command", metavar="ACTION", required=True)
    r = dsub.add_parser(
        "rules", help="write Prometheus recording and alert rules for a vector library",
        description="Write Prometheus rules: the per-trait drift mean, drift alerts at thresholds derived "
                    "from each vector's stored projection statistics (midpoint of pos_mean and neg_mean "
                    "at the recommended layer: warning; pos_mean: critical; raised to plain replies' mean + 2 / 4 "
                    "standard errors of a --min-samples mean where recorded), a rise against the previous "
                    "day, rejected persona requests and missing projections.",
        allow_abbrev=False,
    )
    d = RuleSettings()
    r.add_argument("--vectors", required=True, help="vector library folder")
    r.add_argument("--out", default=None, help="file to write (default: standard output)")
    r.add_argument("--format", choices=("prometheus", "prometheusrule"), default="prometheus",
                   help="a Prometheus rule file, or a Kubernetes PrometheusRule object (Prometheus Operator)")
    r.add_argument("--model", default=None, help="served model name to restrict the alerts to (default: any)")
    r.add_argument("--window", default=d.window, help=f"drift mean window (default {d.window})")
    r.add_argument("--for", dest="for_", default=d.for_, help=f"alert 'for' duration (default {d.for_})")
    r.add_argument("--interval", default=d.interval, help=f"rule evaluation interval (default {d.interval})")
    r.add_argument("--min-samples", type=int, default=d.min_samples,
                   help=f"monitored replies in the window before drift alerts may fire (default {d.min_samples})")
    r.add_argument("--rise-fraction", type=float, default=d.rise_fraction,
                   help=f"sudden rise threshold as a share of pos_mean - neg_mean (default {d.rise_fraction})")
    r.add_argument("--baseline", default=d.baseline,
                   help=f"yesterday's mean is averaged over this long (default {d.baseline})")
    r.add_argument("--rejected-rate", type=float, default=d.rejected_rate,
                   help=f"rejected persona requests/s per model and reason (default {d.rejected_rate})")
    r.add_argument("--rejected-window", default=d.rejected_window,
                   help=f"window of the rejected rate (default {d.rejected_window})")
    r.set_defaults(func=cmd_deploy_rules)
    b = dsub.add_parser("dashboard", help="write the Grafana dashboard JSON")
    b.add_argument("--out", default=None, help="file to write (default: standard output)")
    b.set_defaults(func=cmd_deploy_dashboard)


def _write(text: str, out: str | None) -> None:
    if out is None:
        sys.stdout.write(text)
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}", file=sys.stderr)


def cmd_deploy_rules(args: argparse.Namespace, extra: list[str]) -> int:
    try:
        settings = RuleSettings(
            window=args.window, for_=args.for_, interval=args.interval, min_samples=args.min_samples,
            rise_fraction=args.rise_fraction, baseline=args.baseline, rejected_rate=args.rejected_rate,
            rejected_window=args.rejected_window, model=args.model,
        )
        vectors = load_library(args.vectors)
    except (ValueError, OSError) as exc:  # VectorFileError is a ValueError
        print(f"personavec deploy rules: {exc}", file=sys.stderr)
        return 2
    text = render_rules(vectors, settings, source=_source_name(args.vectors), fmt=args.format)
    _write(text, args.out)
    skipped = build_rules(vectors, settings)[1]
    if skipped:
        print(f"note: no drift alerts for {', '.join(skipped)} (no projection statistics)", file=sys.stderr)
    return 0


def _source_name(directory: str) -> str:
    """The library path as written in the header: relative to the current folder when inside it,
    so the committed file does not depend on where the repository is checked out."""
    path = Path(directory).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def cmd_deploy_dashboard(args: argparse.Namespace, extra: list[str]) -> int:
    _write(render_dashboard(), args.out)
    return 0
