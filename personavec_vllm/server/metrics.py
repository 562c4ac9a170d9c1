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

import math
import os
import threading

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.metrics_core import HistogramMetricFamily

from personavec_vllm.spec import REJECT_REASONS, PersonaSpec
from personavec_vllm.steering.results import LayerProjection
from personavec_vllm.vectors import PersonaVector

KINDS = ("prompt_last", "response_mean")
HISTOGRAM = "personavec_projection"
DEFAULT_BUCKETS = tuple(
    sorted({s * m for s in (-1, 1) for m in (0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256)} | {0.0})
)


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

    def __init__(self, histograms: dict):
        self._histograms = histograms

    def collect(self):
        family = HistogramMetricFamily(HISTOGRAM, "Projection h.v/|v| of monitored requests on persona vectors",
                                       labels=["vector", "kind", "model", "layer"])
        for histogram in list(self._histograms.values()):
            for metric in histogram.collect():
                family.samples.extend(metric.samples)
        yield family


class PersonaMetrics:
    def __init__(self, model: str, registry=REGISTRY):
        self.model = model
        self._multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self._lock = threading.Lock()
        self._histograms: dict[tuple[str, int, tuple[float, ...]], Histogram] = {}
        labels = dict(registry=registry)
        self.steered = Counter("personavec_steered_requests", "Requests steered, per vector",
                               ["vector", "model"], **labels)
        self.monitored = Counter("personavec_monitored_requests", "Requests monitored, per vector",
                                 ["vector", "model"], **labels)
        projection_labels = ["vector", "kind", "model", "layer"]
        self.sum_pos = Counter("personavec_projection_sum_pos", "Sum of the positive projections observed",
                               projection_labels, **labels)
        self.sum_neg = Counter("personavec_projection_sum_neg", "Sum of |projection| of the negative projections observed",
                               projection_labels, **labels)
        self.rejected = Counter("personavec_rejected_requests", "Persona requests refused with HTTP 400, by reason",
                                ["reason", "model"], **labels)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason, model=model)  # export zeros, so rate() works from the start
        if not self._multiprocess and registry is not None:
            registry.register(_ProjectionFamily(self._histograms))

    def _histogram(self, vector: PersonaVector, layer: int) -> Histogram:
        buckets = fitted_buckets(vector, layer)
        key = (vector.name, layer, buckets)
        with self._lock:
            histogram = self._histograms.get(key)
            if histogram is None:
                histogram = Histogram(HISTOGRAM, "Projection h.v/|v| of monitored requests on persona vectors",
                                      ["vector", "kind", "model", "layer"], buckets=buckets, registry=None)
                self._histograms[key] = histogram
        return histogram

    def observe_request(self, spec: PersonaSpec) -> None:
        for name in dict.fromkeys(t.vector for t in spec.steer):
            self.steered.labels(vector=name, model=self.model).inc()
        for term in spec.monitor:
            self.monitored.labels(vector=term.vector, model=self.model).inc()

    def observe_projections(self, projections: dict[str, dict[int, LayerProjection]], vectors: dict[str, PersonaVector]) -> None:
        for name, by_layer in projections.items():
            for layer, proj in by_layer.items():
                histogram = self._histogram(vectors[name], layer)
                for kind, value in (("prompt_last", proj.prompt_last), ("response_mean", proj.response_mean)):
                    if value is None:
                        continue
                    series = dict(vector=name, kind=kind, model=self.model, layer=str(layer))
                    histogram.labels(**series).observe(value)
                    self.sum_pos.labels(**series).inc(max(value, 0.0))
                    self.sum_neg.labels(**series).inc(max(-value, 0.0))

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason=reason, model=self.model).inc()
