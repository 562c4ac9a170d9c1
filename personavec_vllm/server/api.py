"""The persona fields of the OpenAI-compatible API, and the typed objects it returns.

Request (on `/v1/chat/completions` and `/v1/completions`):

    "persona_steer":   [{"vector": "evil", "coeff": -1.5, "layers": [20], "positions": "response"}]
    "persona_monitor": {"vectors": ["evil"], "layers": [20], "per_token": false}   (or true)

Response: a top-level `persona` object with the applied steering (defaults resolved) and
`projections[vector][layer] = {prompt_last, response_mean, per_token?}`; when streaming, the
same object arrives in a last chunk before `[DONE]`.

Validation rules live in `personavec_vllm.spec` (shared with the offline API); here we only
map them to HTTP: a `PersonaSpecError` becomes a 400 naming the field.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from personavec_vllm import EXTRA_ARGS_KEY
from personavec_vllm.spec import Limits, PersonaSpec, PersonaSpecError, parse_spec
from personavec_vllm.steering.results import LayerProjection
from personavec_vllm.vectors import PersonaVector, VectorLibrary

PERSONA_FIELDS = ("persona_steer", "persona_monitor")


class AppliedSteer(BaseModel):
    vector: str
    coeff: float
    layers: list[int]
    positions: str


class ProjectionOut(BaseModel):
    prompt_last: float
    response_mean: float | None
    per_token: list[float] | None = None


class PersonaOut(BaseModel):
    """The `persona` object of a response."""

    steer: list[AppliedSteer] = Field(default_factory=list)
    projections: dict[str, dict[str, ProjectionOut]] | None = None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class VectorInfo(BaseModel):
    """One entry of `GET /v1/persona/vectors`."""

    name: str
    trait: str
    description: str
    model: str = Field(description="model (name or path) the vector was extracted on")
    method: str
    recommended_layer: int
    layers: list[int] = Field(description="layers that can be steered and monitored")
    norms: list[float] = Field(description="norm per layer, index = layer (0 = embeddings)")

    @classmethod
    def of(cls, vector: PersonaVector) -> "VectorInfo":
        return cls(
            name=vector.name, trait=vector.trait, description=vector.description, model=vector.model,
            method=vector.method, recommended_layer=vector.layer,
            layers=list(range(1, vector.num_layers + 1)), norms=[round(n, 6) for n in vector.norms()],
        )


@dataclass
class PersonaRequest:
    """What a request asked for, after validation."""

    spec: PersonaSpec
    raw: dict[str, Any]  # the fields as the client sent them

    @property
    def monitors(self) -> bool:
        return bool(self.spec.monitor)

    def extra_args(self) -> dict[str, str]:
        """For vLLM's `vllm_xargs` (flat values only): the raw fields as JSON, re-validated by the
        front-end hook, so HTTP and offline requests take the same path into the engine."""
        return {EXTRA_ARGS_KEY: json.dumps({**self.raw, "request_key": self.spec.request_key})}

    def response_object(self, projections: dict[str, dict[int, LayerProjection]] | None) -> PersonaOut:
        out = PersonaOut(steer=[AppliedSteer(vector=t.vector, coeff=t.coeff, layers=list(t.layers), positions=t.positions)
                                for t in self.spec.steer])
        if self.monitors:
            out.projections = {
                name: {
                    str(layer): ProjectionOut(
                        prompt_last=p.prompt_last, response_mean=p.response_mean,
                        per_token=p.per_token if self.spec.per_token else None,
                    )
                    for layer, p in sorted(by_layer.items())
                }
                for name, by_layer in (projections or {}).items()
            }
        return out


def take_persona_fields(body: dict[str, Any], library: VectorLibrary, limits: Limits) -> PersonaRequest | None:
    """Remove and validate the persona fields of a request body. Raises `PersonaSpecError`."""
    stray = [k for k in body if k.startswith("persona") and k not in PERSONA_FIELDS]
    if stray:
        raise PersonaSpecError(stray[0], "bad_type", f"unknown persona field (known: {', '.join(PERSONA_FIELDS)})")
    steer, monitor = body.pop("persona_steer", None), body.pop("persona_monitor", None)
    if steer is None and monitor in (None, False):
        return None
    spec = parse_spec(steer, monitor, library, limits, request_key=f"pv-{uuid.uuid4().hex}")
    if spec.monitor and body.get("n", 1) not in (1, None):
        raise PersonaSpecError("n", "unsupported", "persona_monitor needs n = 1 (one choice per request)")
    if spec.monitor and body.get("use_beam_search"):
        raise PersonaSpecError("use_beam_search", "unsupported", "persona_monitor does not support beam search")
    raw = {k: v for k, v in (("persona_steer", steer), ("persona_monitor", monitor)) if v is not None}
    return PersonaRequest(spec, raw)
