"""Prometheus metrics of persona steering and monitoring, served on vLLM's own `/metrics`.

- `personavec_projection{vector, kind, model, layer}`: histogram of projections, `kind` is
  `prompt_last` or `response_mean`. Buckets are fitted per vector and layer to the projection
  statistics stored with the vector (positive/negative means and spreads); vectors without
  statistics get a wide symmetric default.
- `personavec_projection_sum_pos_total` / `personavec_projection_sum_neg_total` (same labels):
  the sums of the positive parts and of the magnitudes of the negative parts of the observed
  projections. Histograms with negative buckets carry no `_sum` (a sum that can fall is no
  counter, and `rate()` would read a fall as a reset), so the signed sum is their difference.
- `personavec_steered_requests_total{vector, model}`, `personavec_monitored_requests_total{vector, model}`.
- `personavec_rejected_requests_total{reason, model}`: persona input refused with HTTP 400.
- `personavec_failed_requests_total{model}`: persona requests the worker could not serve
  (answered with an error; the engine kept serving).

A vector's series are removed when it leaves the library, and restart from zero when it is
replaced by a different version (a counter reset, which `rate()` handles): projections of two
different directions never share a series. A request that finishes after its vector was replaced
or deleted is not observed. (Under `PROMETHEUS_MULTIPROC_DIR`, removed series stay in the other
processes' files until they restart: prometheus_client's multiprocess mode cannot remove them.)

Label values come only from the vector library, the served model name and fixed sets
(`KINDS`, `REJECT_REASONS`): never from request text, so cardinality stays bounded.

The drift signal, mean projection of trait X over the last 5 minutes:

    (  sum by (model) (rate(personavec_projection_sum_pos_total{vector="X", kind="response_mean"}[5m]))
     - sum by (model) (rate(personavec_projection_sum_neg_total{vector="X", kind="response_mean"}[5m])))
    / sum by (model) (rate(personavec_projection_count{vector="X", kind="response_mean"}[5m]))

Prometheus histograms may carry different `le` sets per series, but one prometheus_client
`Histogram` has one bucket list, so we keep one `Histogram` per (vector, layer) outside the
registry and expose them as one family. Under vLLM's multiprocess mode
(`PROMETHEUS_MULTIPROC_DIR`) each process writes its series to the shared directory and vLLM's
`MultiProcessCollector` merges them, buckets included.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import HistogramMetricFamily

from personavec_vllm.engine.transport import LayerProjection
from personavec_vllm.spec import REJECT_REASONS, PersonaSpec
from personavec_vllm.vectors import PersonaVector

KINDS = ("prompt_last", "response_mean")
HISTOGRAM = "personavec_projection"
DEFAULT_BUCKETS = tuple(sorted({s * m for s in (-1, 1) for m in (0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256)} | {0.0}))


def fitted_buckets(vector: PersonaVector, layer: int, count: int = 16) -> tuple[float, ...]:
    """Evenly spaced over mean -+ 3 sd of every stored answer set (positive, negative and, where
    recorded, plain replies), so ordinary traffic does not pile up in an edge bucket."""
    stats = vector.projection_stats(layer)
    if not stats:
        return DEFAULT_BUCKETS
    spreads = [(stats["neg_mean"], stats["neg_std"]), (stats["pos_mean"], stats["pos_std"])]
    plain = vector.plain_stats(layer)
    if plain:
        spreads.append((plain["mean"], plain["std"]))
    lo = min(mean - 3 * sd for mean, sd in spreads)
    hi = max(mean + 3 * sd for mean, sd in spreads)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return DEFAULT_BUCKETS
    step = (hi - lo) / (count - 1)
    return tuple(round(lo + i * step, 6) for i in range(count))


class _ProjectionFamily:
    """Collector exposing all per-(vector, layer) histograms as one family."""

    def __init__(self, histograms: dict[tuple[str, int], Histogram]):
        self._histograms = histograms

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            HISTOGRAM,
            "Projection h.v/|v| of monitored requests on persona vectors",
            labels=["vector", "kind", "model", "layer"],
        )
        for histogram in list(self._histograms.values()):
            for metric in histogram.collect():
                family.samples.extend(metric.samples)
        yield family


class PersonaMetrics:
    def __init__(self, model: str, registry: CollectorRegistry | None = REGISTRY):
        self.model = model
        self._multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self._lock = threading.Lock()
        self._histograms: dict[tuple[str, int], Histogram] = {}
        self._buckets: dict[tuple[str, int], tuple[float, ...]] = {}
        # vector -> (counter kind, label values) of its counter series
        self._series: dict[str, set[tuple[str, tuple[str, ...]]]] = {}
        self.steered = Counter(
            "personavec_steered_requests", "Requests steered, per vector", ["vector", "model"], registry=registry
        )
        self.monitored = Counter(
            "personavec_monitored_requests", "Requests monitored, per vector", ["vector", "model"], registry=registry
        )
        projection_labels = ["vector", "kind", "model", "layer"]
        self.sum_pos = Counter(
            "personavec_projection_sum_pos",
            "Sum of the positive projections observed",
            projection_labels,
            registry=registry,
        )
        self.sum_neg = Counter(
            "personavec_projection_sum_neg",
            "Sum of |projection| of the negative projections observed",
            projection_labels,
            registry=registry,
        )
        self.rejected = Counter(
            "personavec_rejected_requests",
            "Persona requests refused with HTTP 400, by reason",
            ["reason", "model"],
            registry=registry,
        )
        self.failed = Counter(
            "personavec_failed_requests",
            "Persona requests the worker could not serve (answered with an error)",
            ["model"],
            registry=registry,
        )
        self.gates = Counter(
            "personavec_gate_decisions",
            "Conditions (when) of steering terms decided at the last prompt token, by whether they opened",
            ["vector", "model", "opened"],
            registry=registry,
        )
        self.policy_version = Gauge(
            "personavec_policy_version",
            "Version of the server policy in force (0: none); it counts accepted changes since start",
            ["model"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.policy_changes = Counter(
            "personavec_policy_changes",
            "Attempts to change the server policy, by result (accepted, rejected)",
            ["model", "result"],
            registry=registry,
        )
        for result in ("accepted", "rejected"):
            self.policy_changes.labels(model=model, result=result)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason, model=model)  # export zeros, so rate() works from the start
        self.failed.labels(model=model)
        if not self._multiprocess and registry is not None:
            registry.register(_ProjectionFamily(self._histograms))

    def _histogram(self, vector: PersonaVector, layer: int) -> Histogram:
        """The one histogram of (vector, layer); a new one when the vector's buckets changed."""
        buckets = fitted_buckets(vector, layer)
        key = (vector.name, layer)
        with self._lock:
            histogram = self._histograms.get(key)
            if histogram is None or self._buckets[key] != buckets:
                histogram = Histogram(
                    HISTOGRAM,
                    "Projection h.v/|v| of monitored requests on persona vectors",
                    ["vector", "kind", "model", "layer"],
                    buckets=buckets,
                    registry=None,
                )
                self._histograms[key] = histogram
                self._buckets[key] = buckets
        return histogram

    def _labels(self, vector: str, kind: str, *values: str) -> tuple[str, ...]:
        """`values`, remembered as a series of `vector` (so `forget_vector` can remove it)."""
        with self._lock:
            self._series.setdefault(vector, set()).add((kind, values))
        return values

    def observe_gates(self, spec: PersonaSpec, opened: list[bool] | None) -> None:
        conditions = list(dict.fromkeys(t.when for t in spec.steer if t.when is not None))
        if opened is None or len(opened) != len(conditions):
            return
        for gate, value in zip(conditions, opened):
            values = self._labels(gate.vector, "gate", gate.vector, self.model, "true" if value else "false")
            self.gates.labels(*values).inc()

    def observe_request(self, spec: PersonaSpec) -> None:
        for name in dict.fromkeys(t.vector for t in spec.steer):
            self.steered.labels(*self._labels(name, "steered", name, self.model)).inc()
        for term in spec.monitor:
            self.monitored.labels(*self._labels(term.vector, "monitored", term.vector, self.model)).inc()

    def observe_projections(
        self,
        projections: dict[str, dict[int, LayerProjection]],
        spec: PersonaSpec,
        live_version: Callable[[str], str | None],
    ) -> None:
        """Record a finished request's projections, on the vector versions it was served with,
        unless a vector was replaced or deleted meanwhile (its series belong to the new one)."""
        versions = dict(spec.versions)
        for name, by_layer in projections.items():
            vector = spec.vectors.get(name)
            if vector is None or live_version(name) != versions.get(name):
                continue
            for layer, proj in by_layer.items():
                histogram = self._histogram(vector, layer)
                for kind, value in (("prompt_last", proj.prompt_last), ("response_mean", proj.response_mean)):
                    if value is None:
                        continue
                    series = (name, kind, self.model, str(layer))
                    histogram.labels(*series).observe(value)
                    self.sum_pos.labels(*self._labels(name, "sum", *series)).inc(max(value, 0.0))
                    self.sum_neg.labels(*series).inc(max(-value, 0.0))

    def forget_vector(self, name: str) -> None:
        """Remove every series of vector `name` (it was deleted, or replaced by another version)."""
        with self._lock:
            for key in [k for k in self._histograms if k[0] == name]:
                del self._histograms[key]
                del self._buckets[key]
            series = self._series.pop(name, set())
        for kind, values in series:
            counters = {
                "gate": (self.gates,),
                "steered": (self.steered,),
                "monitored": (self.monitored,),
                "sum": (self.sum_pos, self.sum_neg),
            }[kind]
            for counter in counters:
                with contextlib.suppress(KeyError):
                    counter.remove(*values)

    def policy_changed(self, version: int) -> None:
        """A policy was accepted (`version` 0: the server runs without one)."""
        if version:
            self.policy_changes.labels(model=self.model, result="accepted").inc()
        self.policy_version.labels(model=self.model).set(version)

    def policy_rejected(self) -> None:
        self.policy_changes.labels(model=self.model, result="rejected").inc()

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason=reason, model=self.model).inc()

    def fail(self) -> None:
        self.failed.labels(model=self.model).inc()
