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
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from personavec_vllm.engine.transport import LayerProjection
from personavec_vllm.library import VectorLibrary

if TYPE_CHECKING:
    from personavec_vllm.server.policy import Policy
from personavec_vllm.spec import Limits, PersonaSpec, PersonaSpecError, merge_specs, parse_spec
from personavec_vllm.vectors import PersonaVector

PERSONA_FIELDS = ("persona_steer", "persona_monitor")


class GateOut(BaseModel):
    vector: str
    layer: int
    above: float | None = None
    below: float | None = None


class AppliedSteer(BaseModel):
    """One steering term as applied (defaults filled in, thresholds in raw units)."""

    vector: str
    op: str
    layers: list[int]
    positions: str
    coeff: float | None = None
    min: float | None = None
    max: float | None = None
    when: GateOut | None = None
    fired: bool | None = Field(None, description="with `when`: whether the condition held for this request")
    source: Literal["policy", "client"] = Field(
        "client", description="who asked for it: the server's policy or the client"
    )


class ProjectionOut(BaseModel):
    prompt_last: float
    response_mean: float | None
    per_token: list[float] | None = None
    before_steering: ProjectionOut | None = Field(
        None, description="the same before this request's own terms at this layer (where it has any)"
    )


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
    recommended_layer: int = Field(description="the layer steering uses when a request names none")
    monitor_layer: int = Field(description="the layer monitoring, screening and alert rules read when none is named")
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
            monitor_layer=vector.monitor_layer,
            layers=list(range(1, vector.num_layers + 1)),
            norms=[round(n, 6) for n in vector.norms()],
        )


class SdUnits(BaseModel):
    """A projection value in standard deviations of the plain replies' projection at that layer
    (mean + sd * std, statistics stored with the vector)."""

    model_config = ConfigDict(extra="forbid")
    sd: float


class CoeffUnits(BaseModel):
    """A steering coefficient in units comparable across layers (exactly one field): the norm of
    the added push, or plain replies' projection standard deviations at that layer."""

    model_config = ConfigDict(extra="forbid")
    norm: float | None = None
    sd: float | None = None


class GateIn(BaseModel):
    """`when`: apply the term only if the request's projection at its last prompt token crosses a
    threshold (exactly one of `above`, `below`)."""

    model_config = ConfigDict(extra="forbid")
    vector: str
    layer: int | None = Field(None, description="default: the vector's recommended layer")
    above: float | SdUnits | None = None
    below: float | SdUnits | None = None


class SteerTermIn(BaseModel):
    """One steering term of `persona_steer` (schema only: `personavec_vllm.spec` validates)."""

    model_config = ConfigDict(extra="forbid")
    vector: str = Field(description="a vector of the served library (GET /v1/persona/vectors)")
    op: Literal["add", "ablate", "cap"] = "add"
    coeff: float | CoeffUnits | None = Field(
        None,
        description="op add: coefficient in units of the raw vector (negative suppresses the trait), or "
        '{"norm": x}: a push of norm x, or {"sd": k}: k standard deviations of plain replies\' projection',
    )
    min: float | SdUnits | None = Field(None, description="op cap: lowest projection h . v/|v| kept")
    max: float | SdUnits | None = Field(None, description="op cap: highest projection h . v/|v| kept")
    layers: list[int] | None = Field(None, description="layers 1..num_layers; default: the vector's recommended layer")
    positions: Literal["all", "prompt", "response"] = "response"
    when: GateIn | None = None


class MonitorIn(BaseModel):
    """`persona_monitor` as an object (schema only)."""

    model_config = ConfigDict(extra="forbid")
    vectors: list[str] | None = Field(None, description="default: every library vector")
    layers: list[int] | None = Field(None, description="default: each vector's monitoring layer (`monitor_layer`)")
    per_token: bool = False


class PersonaFieldsIn(BaseModel):
    """The persona request fields, as they appear in the OpenAPI schema of the two routes."""

    persona_steer: list[SteerTermIn] | SteerTermIn | None = Field(
        None, description="steering terms (they add up); one term may be given without the list"
    )
    persona_monitor: bool | MonitorIn | None = Field(
        None, description="true: every library vector at its monitoring layer; or an object"
    )


@dataclass
class PersonaRequest:
    """What a request asked for, after validation and resolution (vector versions pinned): the
    client's fields merged with the server policy's terms (which come first in `spec.steer`)."""

    spec: PersonaSpec
    policy_terms: int = 0  # the first `policy_terms` steering terms are the policy's
    client_monitor: frozenset[tuple[str, int]] | None = None  # (vector, layer) the client asked to see
    answer: bool = True  # the client sent persona fields: it gets a `persona` object

    @classmethod
    def of_client(cls, spec: PersonaSpec) -> PersonaRequest:
        return cls(spec, 0, frozenset((t.vector, layer) for t in spec.monitor for layer in t.layers))

    @property
    def monitors(self) -> bool:
        return bool(self.spec.monitor)

    def response_object(
        self, projections: dict[str, dict[int, LayerProjection]] | None, gates: list[bool] | None = None
    ) -> PersonaOut:
        """The `persona` object: the terms applied (with `fired` for conditional ones, once the
        worker decided them) and the projections."""
        conditions = list(dict.fromkeys(t.when for t in self.spec.steer if t.when is not None))
        steer = []
        for i, term in enumerate(self.spec.steer):
            applied = AppliedSteer.model_validate(
                {**term.to_dict(), "source": "policy" if i < self.policy_terms else "client"}
            )
            if term.when is not None and gates is not None and len(gates) == len(conditions):
                applied.fired = gates[conditions.index(term.when)]
            steer.append(applied)
        out = PersonaOut(steer=steer)
        per_token = self.spec.per_token

        def projection(p: LayerProjection) -> ProjectionOut:
            return ProjectionOut(
                prompt_last=p.prompt_last,
                response_mean=p.response_mean,
                per_token=p.per_token if per_token else None,
                before_steering=None if p.before is None else projection(p.before),
            )

        if self.client_monitor:
            shown = self.client_monitor
            out.projections = {
                name: {str(layer): projection(p) for layer, p in sorted(by_layer.items()) if (name, layer) in shown}
                for name, by_layer in (projections or {}).items()
                if any(vector == name for vector, _ in shown)
            }
        return out

    @property
    def conditional(self) -> bool:
        return any(t.when is not None for t in self.spec.steer)


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


def take_persona_fields(
    body: dict[str, Any],
    library: VectorLibrary,
    limits: Limits,
    policy: Policy | None = None,
    request_id: str | None = None,
) -> PersonaRequest | None:
    """Remove and validate the persona fields of a request body, and merge the server policy's
    terms in (its monitoring only for the requests it samples, by `request_id`). None for a request
    with nothing to steer or monitor. Raises `PersonaSpecError`."""
    check_vllm_xargs(body)
    stray = [k for k in body if k.lower().startswith("persona") and k not in PERSONA_FIELDS]
    if stray:
        raise PersonaSpecError(
            stray[0][:64],
            "bad_type",
            f"unknown persona field (known: {', '.join(PERSONA_FIELDS)}; names are case-sensitive)",
        )
    steer, monitor = body.pop("persona_steer", None), body.pop("persona_monitor", None)
    asked = steer is not None or not (monitor is None or monitor is False)
    key = f"pv-{uuid.uuid4().hex}"
    sampled = policy is not None and policy.samples(request_id or key) and _monitorable(body)
    applies = policy is not None and bool(policy.steer or sampled)
    if not asked and not applies:
        return None
    if steer is not None and policy is not None and not policy.client_steering:
        raise PersonaSpecError("persona_steer", "unsupported", "client steering is disabled by the server policy")
    resolved: dict[str, PersonaVector] = {}
    client = parse_spec(steer, monitor, library, policy.limits if policy else limits, key, resolved)
    request = PersonaRequest.of_client(client)
    request.answer = asked
    if policy is not None and applies:
        try:
            own = parse_spec(
                list(policy.file.steer) or None,
                policy.monitor_fields() if sampled else None,
                library,
                UNLIMITED,
                key,
                resolved,
            )
        except PersonaSpecError as exc:
            raise PolicyBroken(
                f"the server policy (version {policy.version}) no longer fits the library: {exc}"
            ) from None
        request.spec = merge_specs(own, client)
        request.policy_terms = len(own.steer)
    spec = request.spec
    if spec.is_empty:
        return None
    if client.monitor and body.get("n", 1) not in (1, None):
        raise PersonaSpecError("n", "unsupported", "persona_monitor needs n = 1 (one choice per request)")
    if client.monitor and not _is_single_prompt(body.get("prompt")):
        raise PersonaSpecError(
            "prompt", "unsupported", "persona_monitor needs a single prompt (send one request per prompt)"
        )
    if body.get("use_beam_search") is True:
        what = "persona steering and monitoring" if asked else "this server's policy"
        raise PersonaSpecError("use_beam_search", "unsupported", f"{what} does not support beam search")
    return request


UNLIMITED = Limits(max_abs_coeff=float("inf"), max_vectors=64)  # the operator's own terms


class PolicyBroken(RuntimeError):
    """The policy in force names something the library no longer has (a server-side fault)."""


def _monitorable(body: dict[str, Any]) -> bool:
    """One choice of one prompt: the policy monitors only what gives one `persona` result."""
    return body.get("n", 1) in (1, None) and _is_single_prompt(body.get("prompt")) and not body.get("use_beam_search")
