"""Prometheus recording and alert rules, generated from the vector library
(`personavec deploy rules`).

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

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # vectors (and torch) load only when a library is read
    from personavec_vllm.vectors import PersonaVector

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
    """Alert thresholds of one vector at its monitoring layer (`PersonaVector.monitor_layer`)."""

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
    """None when the vector has no usable statistics at its monitoring layer."""
    layer = vector.monitor_layer
    stats = vector.projection_stats(layer)
    if not stats:
        return None
    try:
        pos, neg = float(stats["pos_mean"]), float(stats["neg_mean"])
    except (KeyError, TypeError, ValueError):
        return None
    if not (math.isfinite(pos) and math.isfinite(neg)) or pos <= neg:
        return None
    plain = vector.plain_stats(layer) or {}
    try:
        plain_mean: float | None = float(plain["mean"])
        plain_std: float | None = float(plain["std"])
        if not (math.isfinite(plain_mean) and math.isfinite(plain_std)):  # type: ignore[arg-type]
            raise ValueError
    except (KeyError, TypeError, ValueError):
        plain_mean = plain_std = None
    return TraitThresholds(vector.name, vector.trait, layer, pos, neg, plain_mean, plain_std, min_samples)


def _level_meaning(t: TraitThresholds, severity: str) -> str:
    """Why the threshold of `severity` sits where it does, for the alert's description."""
    extraction = (
        f"the midpoint {_num(t.midpoint)} between answers that express the trait (mean {_num(t.pos_mean)}) and "
        f"answers that do not (mean {_num(t.neg_mean)}) at extraction"
        if severity == "warning"
        else f"{_num(t.pos_mean)}, the mean of answers that express the trait at extraction"
    )
    level = t.warning if severity == "warning" else t.critical
    if t.plain_mean is None or level == (t.midpoint if severity == "warning" else t.pos_mean):
        return extraction
    ses = 2 if severity == "warning" else 4
    return (
        f"{_num(level)}: plain replies at extraction (no system prompt) average {_num(t.plain_mean)} (sd "
        f"{_num(t.plain_std or 0.0)}), so the threshold is raised from {extraction} to their mean + {ses} standard "
        f"errors of a {t.min_samples}-reply mean"
    )


def load_library(directory: str | Path) -> list[PersonaVector]:
    """The vectors of a library folder (top level `*.safetensors`, as the server reads it)."""
    from personavec_vllm.library import vector_files
    from personavec_vllm.vectors import VectorFileError, load_vector

    directory = Path(directory)
    if not directory.is_dir():
        raise VectorFileError(f"vector library {directory} is not a directory")
    return [load_vector(path) for path in vector_files(directory)]


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
        f'(persona_steer: [{{"vector": "{t.vector}", "coeff": -2}}]) or roll back the change.'
    )
    rules = []
    for severity, level in (("warning", t.warning), ("critical", t.critical)):
        meaning = _level_meaning(t, severity)
        rules.append(
            {
                "alert": "PersonaTraitDrift",
                "expr": f"{mean}{sel} > {_num(level)}\n{enough}",
                "for": s.for_,
                "labels": {**labels, "severity": severity},
                "annotations": {
                    "summary": f"Replies of {{{{ $labels.model }}}} drift toward '{t.trait}' ({severity})",
                    "description": (
                        f"The mean projection of replies of {{{{ $labels.model }}}} on {who} over the last "
                        f'{s.window} is {{{{ $value | printf "%.3g" }}}}, above {meaning}.'
                    ),
                    "action": todo,
                },
            }
        )
    rise = s.rise_fraction * t.separation
    rules.append(
        {
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
                    f'{s.window} is {{{{ $value | printf "%.3g" }}}} above its mean at this time yesterday '
                    f"({s.baseline} average, offset 1d); the alert threshold is {_num(rise)} "
                    f"({s.rise_fraction:g} of the extraction's separation {_num(t.separation)})."
                ),
                "action": todo,
            },
        }
    )
    return rules


def build_rules(vectors: list[PersonaVector], settings: RuleSettings = RuleSettings()) -> tuple[dict, list[str]]:
    """The rule file as a dict, and the names of the vectors that got no drift/rise alerts."""
    s = settings
    by_name = sorted(vectors, key=lambda v: v.name)
    found = {v.name: thresholds(v, s.min_samples) for v in by_name}
    skipped = [name for name, t in found.items() if t is None]
    model = _matchers(model=s.model)
    recording: list[dict[str, Any]] = [
        {"record": RECORD_MEAN.format(window=s.window), "expr": _mean_expr(s.window)},
        {
            "record": RECORD_COUNT.format(window=s.window),
            "expr": f"sum by (vector, kind, model, layer) (increase(personavec_projection_count[{s.window}]))",
        },
        {
            "record": RECORD_REJECTED.format(window=s.rejected_window),
            "expr": f"sum by (model, reason) (rate(personavec_rejected_requests_total[{s.rejected_window}]))",
        },
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
    alerts.append(
        {
            "alert": "PersonaRequestsRejected",
            "expr": f"{RECORD_REJECTED.format(window=s.rejected_window)}{rejected_sel} > {_num(s.rejected_rate)}",
            "for": s.for_,
            "labels": {"component": "personavec", "severity": "warning"},
            "annotations": {
                "summary": "{{ $labels.model }} refuses persona requests ({{ $labels.reason }})",
                "description": (
                    '{{ $value | printf "%.3g" }} requests/s to {{ $labels.model }} were refused with HTTP 400 '
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
        }
    )
    monitored = "{" + model + "}" if model else ""
    observed = "{" + _matchers(kind="prompt_last", model=s.model) + "}"
    alerts.append(
        {
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
        }
    )
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


def render_rules(
    vectors: list[PersonaVector], settings: RuleSettings = RuleSettings(), source: str = "", fmt: str = "prometheus"
) -> str:
    """The rule file text. `fmt` is `prometheus` (a rule file) or `prometheusrule` (a
    Prometheus Operator `PrometheusRule` object with the same groups)."""
    doc, skipped = build_rules(vectors, settings)
    with_alerts = sorted(v.name for v in vectors if v.name not in skipped)
    header = [
        "# Generated by `personavec deploy rules`" + (f" from {source}" if source else "") + ": do not edit;",
        "# regenerate when the vector library changes. Thresholds come from each vector's stored",
        "# projection statistics at its monitoring layer (see personavec_vllm/ops/rules.py).",
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
