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
from typing import Any

from personavec_vllm.config import EXTRA_ARGS_KEY
from personavec_vllm.library import VectorLibrary
from personavec_vllm.terms import (
    OPS,
    POSITIONS,
    REJECT_REASONS,
    Gate,
    Limits,
    MonitorTerm,
    PersonaSpecError,
    SteerTerm,
    _key,
    check_gates,
    parse_monitor,
    parse_steer,
)
from personavec_vllm.vectors import PersonaVector

__all__ = [
    "REJECT_REASONS",
    "Gate",
    "Limits",
    "MonitorTerm",
    "PersonaSpec",
    "PersonaSpecError",
    "SteerTerm",
    "merge_specs",
    "parse_extra_args",
    "parse_spec",
]


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
    # Monitoring is summed on the device and reported once, when the request ends (the HTTP
    # server, unless the client asked for per-token values); else values come every step.
    summed: bool = False

    @property
    def is_empty(self) -> bool:
        return not self.steer and not self.monitor

    def to_dict(self) -> dict[str, Any]:
        """The resolved form carried to the worker (and echoed in responses)."""
        out: dict[str, Any] = {"request_key": self.request_key, "vector_versions": dict(self.versions)}
        if self.steer:
            out["persona_steer"] = [t.to_dict() for t in self.steer]
        if self.monitor:
            out["persona_monitor"] = {
                "vectors": {t.vector: list(t.layers) for t in self.monitor},
                "per_token": self.per_token,
                "summed": self.summed,
            }
        return out

    @classmethod
    def from_dict(cls, data: Any) -> PersonaSpec:
        """Read the resolved form written by `to_dict` (in the worker). The front end wrote it,
        but it is still checked for shape: a malformed one raises `PersonaSpecError`, which fails
        that request only."""
        try:
            steer = tuple(SteerTerm.from_dict(t) for t in data.get("persona_steer", ()))
            monitor_data = data.get("persona_monitor") or {}
            monitor = tuple(
                MonitorTerm(str(name), tuple(int(x) for x in layers))
                for name, layers in monitor_data.get("vectors", {}).items()
            )
            versions = tuple((str(k), str(v)) for k, v in data.get("vector_versions", {}).items())
            spec = cls(
                steer,
                monitor,
                bool(monitor_data.get("per_token", False)),
                str(data.get("request_key", "")),
                versions,
                summed=bool(monitor_data.get("summed", False)),
            )
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as exc:
            raise PersonaSpecError("personavec", "internal_field", f"malformed resolved spec ({exc!r})") from None
        for t in steer:
            bounds = [b for b in (t.low, t.high) if b is not None]
            if (
                t.positions not in POSITIONS
                or t.op not in OPS
                or not math.isfinite(t.coeff)
                or not all(math.isfinite(b) for b in bounds)
                or (t.low is not None and t.high is not None and t.low > t.high)
                or (t.when is not None and not math.isfinite(t.when.threshold))
            ):
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


def parse_spec(
    persona_steer: Any,
    persona_monitor: Any,
    library: VectorLibrary,
    limits: Limits | None = None,
    request_key: str | None = None,
    resolved: dict[str, PersonaVector] | None = None,
) -> PersonaSpec:
    """Validate user input and resolve defaults. Raises `PersonaSpecError` naming the field.
    `resolved`: vectors already pinned for this request (specs to be merged share it)."""
    limits = limits or Limits()
    resolved = {} if resolved is None else resolved
    steer = parse_steer(persona_steer, library, limits, resolved)
    monitor, per_token = parse_monitor(persona_monitor, library, limits, resolved)
    versions = tuple((name, vector.version) for name, vector in resolved.items())
    return PersonaSpec(steer, monitor, per_token, request_key or uuid.uuid4().hex, versions, resolved)


def merge_specs(first: PersonaSpec, second: PersonaSpec) -> PersonaSpec:
    """`first`'s terms then `second`'s (e.g. the server policy's, then the client's); monitored
    layers are united per vector; `second` decides `per_token` and the request key."""
    steer = first.steer + second.steer
    check_gates(list(steer), "persona_steer")
    layers: dict[str, list[int]] = {}
    for term in first.monitor + second.monitor:
        have = layers.setdefault(term.vector, [])
        have.extend(layer for layer in term.layers if layer not in have)
    monitor = tuple(MonitorTerm(vector, tuple(ls)) for vector, ls in layers.items())
    vectors = {**first.vectors, **second.vectors}
    versions = tuple((name, vector.version) for name, vector in vectors.items())
    return PersonaSpec(steer, monitor, second.per_token, second.request_key, versions, vectors)


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
