"""What monitoring returns: a request's projections on one vector at one layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class LayerProjection:
    """Projections of one request on one vector at one layer, of the residual stream after the
    request's own steering terms at that layer; `before`: the same before them (only where the
    request steers at that layer)."""

    prompt_last: float
    response_mean: float | None
    per_token: list[float]
    before: LayerProjection | None = None

    def to_dict(self, per_token: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt_last": self.prompt_last, "response_mean": self.response_mean}
        if per_token:
            out["per_token"] = self.per_token
        if self.before is not None:
            out["before_steering"] = self.before.to_dict(per_token)
        return out


def from_sums(
    prompt_last: float | None, total: float, count: int, before: LayerProjection | None = None
) -> LayerProjection:
    """From what the device accumulated: the last prompt token's value and the sum over the
    `count` generated tokens fed back (no per-token values)."""
    assert prompt_last is not None
    return LayerProjection(prompt_last, total / count if count else None, [], before)


def summarize(values: list[float], before: list[float] | None = None) -> LayerProjection:
    """`values[0]` is the last prompt token; the rest are the generated tokens fed back."""
    response = values[1:]
    mean = sum(response) / len(response) if response else None
    return LayerProjection(values[0], mean, list(values), None if before is None else summarize(before))
