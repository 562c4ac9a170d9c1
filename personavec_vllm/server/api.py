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

import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from personavec_vllm.engine.transport import LayerProjection
from personavec_vllm.library import VectorLibrary
from personavec_vllm.spec import Limits, PersonaSpec, PersonaSpecError, parse_spec
from personavec_vllm.vectors import PersonaVector

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
    def of(cls, vector: PersonaVector) -> VectorInfo:
        return cls(
            name=vector.name,
            trait=vector.trait,
            description=vector.description,
            model=vector.model,
            method=vector.method,
            recommended_layer=vector.layer,
            layers=list(range(1, vector.num_layers + 1)),
            norms=[round(n, 6) for n in vector.norms()],
        )


class SteerTermIn(BaseModel):
    """One steering term of `persona_steer` (schema only: `personavec_vllm.spec` validates)."""

    model_config = ConfigDict(extra="forbid")
    vector: str = Field(description="a vector of the served library (GET /v1/persona/vectors)")
    coeff: float = Field(description="coefficient in units of the raw vector; negative suppresses the trait")
    layers: list[int] | None = Field(None, description="layers 1..num_layers; default: the vector's recommended layer")
    positions: Literal["all", "prompt", "response"] = "response"


class MonitorIn(BaseModel):
    """`persona_monitor` as an object (schema only)."""

    model_config = ConfigDict(extra="forbid")
    vectors: list[str] | None = Field(None, description="default: every library vector")
    layers: list[int] | None = Field(None, description="default: each vector's recommended layer")
    per_token: bool = False


class PersonaFieldsIn(BaseModel):
    """The persona request fields, as they appear in the OpenAPI schema of the two routes."""

    persona_steer: list[SteerTermIn] | SteerTermIn | None = Field(
        None, description="steering terms (they add up); one term may be given without the list"
    )
    persona_monitor: bool | MonitorIn | None = Field(
        None, description="true: every library vector at its recommended layer; or an object"
    )


@dataclass
class PersonaRequest:
    """What a request asked for, after validation and resolution (vector versions pinned)."""

    spec: PersonaSpec

    @property
    def monitors(self) -> bool:
        return bool(self.spec.monitor)

    def response_object(self, projections: dict[str, dict[int, LayerProjection]] | None) -> PersonaOut:
        out = PersonaOut(
            steer=[
                AppliedSteer(vector=t.vector, coeff=t.coeff, layers=list(t.layers), positions=t.positions)
                for t in self.spec.steer
            ]
        )
        if self.monitors:
            out.projections = {
                name: {
                    str(layer): ProjectionOut(
                        prompt_last=p.prompt_last,
                        response_mean=p.response_mean,
                        per_token=p.per_token if self.spec.per_token else None,
                    )
                    for layer, p in sorted(by_layer.items())
                }
                for name, by_layer in (projections or {}).items()
            }
        return out


def _is_single_prompt(prompt: Any) -> bool:
    """A completion `prompt` that makes one engine request: a string, a list of token ids, or a
    list holding one of those."""
    if isinstance(prompt, str):
        return True
    if isinstance(prompt, list):
        if all(isinstance(t, int) for t in prompt):
            return bool(prompt)
        return len(prompt) == 1
    return prompt is None


def check_vllm_xargs(body: dict[str, Any]) -> None:
    """`vllm_xargs` goes straight into the engine's extra_args: personavec's keys there are ours
    alone. Raises `PersonaSpecError` naming the key."""
    xargs = body.get("vllm_xargs")
    if isinstance(xargs, dict):
        for key in xargs:
            if isinstance(key, str) and key.lower().startswith("personavec"):
                raise PersonaSpecError(
                    f"vllm_xargs.{key[:64]}",
                    "internal_field",
                    "is reserved for personavec; use the persona_steer and persona_monitor fields",
                )


def take_persona_fields(body: dict[str, Any], library: VectorLibrary, limits: Limits) -> PersonaRequest | None:
    """Remove and validate the persona fields of a request body. Raises `PersonaSpecError`."""
    check_vllm_xargs(body)
    stray = [k for k in body if k.lower().startswith("persona") and k not in PERSONA_FIELDS]
    if stray:
        raise PersonaSpecError(
            stray[0][:64],
            "bad_type",
            f"unknown persona field (known: {', '.join(PERSONA_FIELDS)}; names are case-sensitive)",
        )
    steer, monitor = body.pop("persona_steer", None), body.pop("persona_monitor", None)
    if steer is None and (monitor is None or monitor is False):
        return None
    spec = parse_spec(steer, monitor, library, limits, request_key=f"pv-{uuid.uuid4().hex}")
    if spec.is_empty:
        return None
    if spec.monitor and body.get("n", 1) not in (1, None):
        raise PersonaSpecError("n", "unsupported", "persona_monitor needs n = 1 (one choice per request)")
    if spec.monitor and not _is_single_prompt(body.get("prompt")):
        raise PersonaSpecError(
            "prompt", "unsupported", "persona_monitor needs a single prompt (send one request per prompt)"
        )
    if body.get("use_beam_search") is True:
        raise PersonaSpecError(
            "use_beam_search", "unsupported", "persona steering and monitoring do not support beam search"
        )
    return PersonaRequest(spec)
