"""A request's persona spec: what to steer and what to monitor.

The spec travels in `SamplingParams.extra_args["personavec"]` with the same field names as
the HTTP API (`persona_steer`, `persona_monitor`), so the offline `LLM` API, the OpenAI server
and error messages all speak one language. `parse_spec` validates raw user input and resolves
defaults against the vector library; the result (`PersonaSpec.to_dict`) is what the worker reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from personavec_vllm import config
from personavec_vllm.config import EXTRA_ARGS_KEY
from personavec_vllm.library import VectorLibrary
from personavec_vllm.vectors import PersonaVector

Positions = Literal["all", "prompt", "response"]
POSITIONS: tuple[str, ...] = ("all", "prompt", "response")

# Fixed set of rejection reasons: the only label values of the rejection counter.
REJECT_REASONS = (
    "unknown_vector",
    "layer_out_of_range",
    "bad_coeff",
    "bad_positions",
    "too_many_vectors",
    "bad_type",
    "unsupported",
    "internal_field",
)


@dataclass(frozen=True)
class Limits:
    """Operator bounds on what one request may ask for."""

    max_abs_coeff: float = float(config.DEFAULTS[config.MAX_COEFF])
    max_vectors: int = int(config.DEFAULTS[config.MAX_VECTORS])

    @classmethod
    def from_env(cls) -> Limits:
        return cls(
            max_abs_coeff=config.get_float(config.MAX_COEFF),
            max_vectors=config.get_int(config.MAX_VECTORS),
        )


class PersonaSpecError(ValueError):
    """Bad persona input. `field` names the offending request field (e.g. `persona_steer[0].coeff`)."""

    def __init__(self, field: str, reason: str, message: str):
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class SteerTerm:
    """Add `coeff * v[layer]` to the residual stream after each of `layers` at `positions`."""

    vector: str
    coeff: float
    layers: tuple[int, ...]
    positions: Positions = "response"


@dataclass(frozen=True)
class MonitorTerm:
    """Report `h . v / |v|` of the residual stream after each of `layers`."""

    vector: str
    layers: tuple[int, ...]


@dataclass(frozen=True)
class PersonaSpec:
    steer: tuple[SteerTerm, ...] = ()
    monitor: tuple[MonitorTerm, ...] = ()
    per_token: bool = False
    request_key: str = ""
    # (vector, content version) of every vector used: the request is served exactly these
    # versions, even if the library changes while it runs.
    versions: tuple[tuple[str, str], ...] = ()
    # The vectors themselves, as resolved in this process (not sent to the worker).
    vectors: Mapping[str, PersonaVector] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_empty(self) -> bool:
        return not self.steer and not self.monitor

    def to_dict(self) -> dict[str, Any]:
        """The resolved form carried to the worker (and echoed in responses)."""
        out: dict[str, Any] = {"request_key": self.request_key, "vector_versions": dict(self.versions)}
        if self.steer:
            out["persona_steer"] = [
                {"vector": t.vector, "coeff": t.coeff, "layers": list(t.layers), "positions": t.positions}
                for t in self.steer
            ]
        if self.monitor:
            out["persona_monitor"] = {
                "vectors": {t.vector: list(t.layers) for t in self.monitor},
                "per_token": self.per_token,
            }
        return out

    @classmethod
    def from_dict(cls, data: Any) -> PersonaSpec:
        """Read the resolved form written by `to_dict` (in the worker). The front end wrote it,
        but it is still checked for shape: a malformed one raises `PersonaSpecError`, which fails
        that request only."""
        try:
            steer = tuple(
                SteerTerm(str(t["vector"]), float(t["coeff"]), tuple(int(x) for x in t["layers"]), t["positions"])
                for t in data.get("persona_steer", ())
            )
            monitor_data = data.get("persona_monitor") or {}
            monitor = tuple(
                MonitorTerm(str(name), tuple(int(x) for x in layers))
                for name, layers in monitor_data.get("vectors", {}).items()
            )
            versions = tuple((str(k), str(v)) for k, v in data.get("vector_versions", {}).items())
            spec = cls(
                steer, monitor, bool(monitor_data.get("per_token", False)), str(data.get("request_key", "")), versions
            )
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as exc:
            raise PersonaSpecError("personavec", "internal_field", f"malformed resolved spec ({exc!r})") from None
        if any(t.positions not in POSITIONS or not math.isfinite(t.coeff) for t in steer):
            raise PersonaSpecError("personavec", "internal_field", "malformed resolved spec")
        return spec

    def cache_salt(self) -> str | None:
        """Steered requests write different KV values, so they must not share prefix-cache blocks
        with requests steered differently (or not at all), nor with requests steered the same way
        by an earlier version of a vector. Same steering and versions, same salt: identical steered
        requests still share their prefix cache. Monitoring alone changes nothing."""
        if not self.steer:
            return None
        versions = dict(self.versions)
        canonical = json.dumps(
            {
                "steer": self.to_dict()["persona_steer"],
                "versions": {t.vector: versions.get(t.vector) for t in self.steer},
            },
            sort_keys=True,
        )
        return "personavec:" + hashlib.sha256(canonical.encode()).hexdigest()[:32]

    def with_key(self, request_key: str) -> PersonaSpec:
        return dataclasses.replace(self, request_key=request_key)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_layers(value: Any, field: str, num_layers: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise PersonaSpecError(field, "bad_type", "must be a non-empty list of layer numbers")
    layers = []
    for i, layer in enumerate(value):
        if not _is_int(layer):
            raise PersonaSpecError(f"{field}[{i}]", "bad_type", f"must be an integer, got {_short(layer)}")
        if not 1 <= layer <= num_layers:
            raise PersonaSpecError(
                f"{field}[{i}]",
                "layer_out_of_range",
                f"layer {_short(layer)} is out of range: this model has layers 1..{num_layers} "
                f"(layer L = residual stream after decoder layer L-1)",
            )
        layers.append(layer)
    if len(set(layers)) != len(layers):
        raise PersonaSpecError(field, "bad_type", "lists a layer twice")
    return tuple(layers)


def _short(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut short: error messages never echo a huge client value."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**50 else "a very large integer"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key(name: Any) -> str:
    """A client-chosen field name, safe to put in an error (bounded length)."""
    text = str(name)
    return text if len(text) <= 64 else text[:61] + "..."


def _lookup(library: VectorLibrary, name: Any, field: str, resolved: dict[str, PersonaVector]) -> PersonaVector:
    """The vector `name` names; the first lookup of a name pins its version for the request."""
    if not isinstance(name, str):
        raise PersonaSpecError(field, "bad_type", f"must be a vector name (string), got {_short(name)}")
    vector = resolved.get(name) or library.get(name)
    if vector is None:
        known = ", ".join(library.names()) or "none loaded"
        raise PersonaSpecError(field, "unknown_vector", f"unknown vector {_short(name)} (available: {known})")
    resolved.setdefault(name, vector)
    return vector


def _parse_steer(
    raw: Any, library: VectorLibrary, limits: Limits, resolved: dict[str, PersonaVector]
) -> tuple[SteerTerm, ...]:
    field = "persona_steer"
    if raw is None:
        return ()
    single = isinstance(raw, dict)  # one term may be given without the list
    if single:
        raw = [raw]
    if not isinstance(raw, list):
        raise PersonaSpecError(field, "bad_type", "must be a list of {vector, coeff, layers, positions}")
    if len(raw) > limits.max_vectors:
        raise PersonaSpecError(field, "too_many_vectors", f"{len(raw)} terms; at most {limits.max_vectors} per request")
    terms = []
    for i, item in enumerate(raw):
        f = field if single else f"{field}[{i}]"
        if not isinstance(item, dict):
            raise PersonaSpecError(f, "bad_type", "must be an object {vector, coeff, layers, positions}")
        unknown = set(item) - {"vector", "coeff", "layers", "positions"}
        if unknown:
            raise PersonaSpecError(f"{f}.{_key(sorted(map(str, unknown))[0])}", "bad_type", "unknown field")
        vector = _lookup(library, item.get("vector"), f"{f}.vector", resolved)
        coeff = item.get("coeff")
        if isinstance(coeff, bool) or not isinstance(coeff, (int, float)):
            raise PersonaSpecError(f"{f}.coeff", "bad_type", f"must be a number, got {_short(coeff)}")
        try:
            coeff = float(coeff)
        except OverflowError:  # an integer too large for a float
            raise PersonaSpecError(f"{f}.coeff", "bad_coeff", "is too large") from None
        if not math.isfinite(coeff):
            raise PersonaSpecError(f"{f}.coeff", "bad_coeff", "must be finite")
        if abs(coeff) > limits.max_abs_coeff:
            raise PersonaSpecError(
                f"{f}.coeff", "bad_coeff", f"|coeff| = {abs(coeff):g} exceeds the limit {limits.max_abs_coeff:g}"
            )
        layers = item.get("layers")
        layers = (vector.layer,) if layers is None else _parse_layers(layers, f"{f}.layers", library.num_layers)
        positions = item.get("positions", "response")
        if positions not in POSITIONS:
            raise PersonaSpecError(
                f"{f}.positions", "bad_positions", f"must be one of {', '.join(POSITIONS)}; got {_short(positions)}"
            )
        terms.append(SteerTerm(vector.name, coeff, layers, positions))
    return tuple(terms)


def _parse_monitor(
    raw: Any, library: VectorLibrary, limits: Limits, resolved: dict[str, PersonaVector]
) -> tuple[tuple[MonitorTerm, ...], bool]:
    field = "persona_monitor"
    if raw is None or raw is False:  # identity: 0 and [] are not "off", they are errors
        return (), False
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise PersonaSpecError(field, "bad_type", "must be true or an object {vectors, layers, per_token}")
    unknown = set(raw) - {"vectors", "layers", "per_token"}
    if unknown:
        raise PersonaSpecError(f"{field}.{_key(sorted(map(str, unknown))[0])}", "bad_type", "unknown field")
    names = raw.get("vectors")
    if names is None:
        names = library.names()
        if not names:
            raise PersonaSpecError(field, "unknown_vector", "no vectors are loaded to monitor")
    elif not isinstance(names, list) or not names:
        raise PersonaSpecError(f"{field}.vectors", "bad_type", "must be a non-empty list of vector names")
    if raw.get("vectors") is not None and len(names) > limits.max_vectors:
        raise PersonaSpecError(
            f"{field}.vectors", "too_many_vectors", f"{len(names)} vectors; at most {limits.max_vectors}"
        )
    if len(set(map(str, names))) != len(names):
        raise PersonaSpecError(f"{field}.vectors", "bad_type", "lists a vector twice")
    layers = raw.get("layers")
    if layers is not None:
        layers = _parse_layers(layers, f"{field}.layers", library.num_layers)
    per_token = raw.get("per_token", False)
    if not isinstance(per_token, bool):
        raise PersonaSpecError(f"{field}.per_token", "bad_type", f"must be true or false, got {_short(per_token)}")
    terms = []
    for i, name in enumerate(names):
        vector = _lookup(library, name, f"{field}.vectors[{i}]", resolved)
        terms.append(MonitorTerm(vector.name, layers or (vector.layer,)))
    return tuple(terms), per_token


def parse_spec(
    persona_steer: Any,
    persona_monitor: Any,
    library: VectorLibrary,
    limits: Limits | None = None,
    request_key: str | None = None,
) -> PersonaSpec:
    """Validate user input and resolve defaults. Raises `PersonaSpecError` naming the field."""
    limits = limits or Limits()
    resolved: dict[str, PersonaVector] = {}
    steer = _parse_steer(persona_steer, library, limits, resolved)
    monitor, per_token = _parse_monitor(persona_monitor, library, limits, resolved)
    versions = tuple((name, vector.version) for name, vector in resolved.items())
    return PersonaSpec(steer, monitor, per_token, request_key or uuid.uuid4().hex, versions, resolved)


def parse_extra_args(
    extra_args: dict[str, Any] | None,
    library: VectorLibrary,
    limits: Limits | None = None,
    default_key: str | None = None,
) -> PersonaSpec | None:
    """The spec under `extra_args["personavec"]`, validated; None when the request has none."""
    if not extra_args or EXTRA_ARGS_KEY not in extra_args:
        return None
    raw = extra_args[EXTRA_ARGS_KEY]
    if isinstance(raw, str):  # the HTTP server passes it as JSON (vLLM's vllm_xargs are flat)
        try:
            raw = json.loads(raw)
        except ValueError:
            raise PersonaSpecError(EXTRA_ARGS_KEY, "bad_type", "is not valid JSON") from None
    if not isinstance(raw, dict):
        raise PersonaSpecError(EXTRA_ARGS_KEY, "bad_type", "must be an object {persona_steer, persona_monitor}")
    unknown = set(raw) - {"persona_steer", "persona_monitor", "request_key"}
    if unknown:
        raise PersonaSpecError(_key(sorted(map(str, unknown))[0]), "bad_type", "unknown persona field")
    key = raw.get("request_key")
    if key is not None and not isinstance(key, str):
        raise PersonaSpecError("request_key", "bad_type", "must be a string")
    return parse_spec(raw.get("persona_steer"), raw.get("persona_monitor"), library, limits, key or default_key)
