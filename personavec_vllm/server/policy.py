"""The server policy: what the operator applies to every request, whatever the client sends.

    # personavec serve --policy policy.yaml
    monitor:                  # measure this share of all traffic (chat, completions, streaming)
      vectors: all            # or a list of names
      layers: [12]            # default: each vector's monitoring layer (`monitor_layer`)
      sample: 0.25            # 0..1, decided by a hash of the request id: reproducible
    steer:                    # applied to every request, in the persona_steer term language
      - {vector: evil, op: cap, max: {sd: 3}}
    client_steering: allow    # or deny: persona_steer from clients is refused with 400
    limits: {max_coeff: 8, max_terms: 4}

A policy is validated in full (pydantic, then every term and vector against the served library)
before it replaces the one in force, so a bad file or `PUT /v1/persona/policy` never takes effect;
each change is logged and counted, and its version is a metric.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from personavec_vllm.library import VectorLibrary
from personavec_vllm.server.api import UNLIMITED
from personavec_vllm.spec import Limits, MonitorTerm, PersonaSpecError, SteerTerm, parse_spec

logger = logging.getLogger(__name__)


class MonitorPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vectors: Literal["all"] | list[str] = "all"
    layers: list[int] | None = None
    sample: float = Field(1.0, ge=0.0, le=1.0)


class LimitsPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_coeff: float | None = Field(None, gt=0, allow_inf_nan=False)
    max_terms: int | None = Field(None, ge=1, le=64)


class PolicyFile(BaseModel):
    """The policy file's schema (YAML or JSON)."""

    model_config = ConfigDict(extra="forbid")
    monitor: MonitorPolicy | None = None
    steer: list[dict[str, Any]] = Field(default_factory=list)
    client_steering: Literal["allow", "deny"] = "allow"
    limits: LimitsPolicy = Field(default_factory=lambda: LimitsPolicy(max_coeff=None, max_terms=None))


class PolicyError(ValueError):
    """An invalid policy; `path` names the offending entry (e.g. `steer[0].coeff`)."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


@dataclass(frozen=True)
class Policy:
    """A validated policy in force. `version` counts accepted policies since the server started
    (0: none)."""

    file: PolicyFile = field(default_factory=PolicyFile)
    version: int = 0
    source: str = "none"
    steer: tuple[SteerTerm, ...] = ()
    monitor: tuple[MonitorTerm, ...] = ()

    @property
    def limits(self) -> Limits:
        base = Limits.from_env()
        return Limits(
            max_abs_coeff=self.file.limits.max_coeff or base.max_abs_coeff,
            max_vectors=self.file.limits.max_terms or base.max_vectors,
        )

    @property
    def client_steering(self) -> bool:
        return self.file.client_steering == "allow"

    def samples(self, request_id: str) -> bool:
        """Whether the policy monitors this request: the same answer for the same request id."""
        if not self.monitor or self.file.monitor is None:
            return False
        rate = self.file.monitor.sample
        if rate >= 1.0:
            return True
        digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64 < rate

    def vectors(self) -> set[str]:
        """The vectors the policy names (a library without one of them breaks the policy)."""
        named = {t.vector for t in self.steer} | {t.when.vector for t in self.steer if t.when is not None}
        if self.file.monitor is not None and self.file.monitor.vectors != "all":
            named |= set(self.file.monitor.vectors)
        return named

    def monitor_fields(self) -> dict[str, Any] | None:
        """The policy's monitoring as `persona_monitor` fields (`vectors: all` is resolved per
        request, so that vectors added later are measured too)."""
        if self.file.monitor is None:
            return None
        fields: dict[str, Any] = {}
        if self.file.monitor.vectors != "all":
            fields["vectors"] = self.file.monitor.vectors
        if self.file.monitor.layers is not None:
            fields["layers"] = self.file.monitor.layers
        return fields

    def summary(self) -> dict[str, Any]:
        return {"version": self.version, "source": self.source, **self.file.model_dump(exclude_none=True)}


def _pydantic_path(exc: ValidationError) -> tuple[str, str]:
    first = exc.errors()[0]
    path = ""
    for part in first["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path, first["msg"]


def parse_policy(text: str, library: VectorLibrary, version: int, source: str) -> Policy:
    """Validate a policy document (YAML or JSON text) against the library. Raises `PolicyError`."""
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise PolicyError("", f"not YAML or JSON ({exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError("", "a policy must be a mapping (monitor, steer, client_steering, limits)")
    try:
        policy_file = PolicyFile.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(*_pydantic_path(exc)) from None
    draft = Policy(policy_file, version, source)
    try:
        spec = parse_spec(policy_file.steer or None, draft.monitor_fields(), library, UNLIMITED, request_key="policy")
    except PersonaSpecError as exc:
        path = exc.field.replace("persona_steer", "steer", 1).replace("persona_monitor", "monitor", 1)
        raise PolicyError(path, str(exc).split(": ", 1)[-1]) from None
    return Policy(policy_file, version, source, spec.steer, spec.monitor)


class PolicyHolder:
    """The policy in force, replaced atomically by `load` (the old one serves until the new one
    validated)."""

    def __init__(self, library: VectorLibrary, path: str | None = None):
        self.library = library
        self.path = path
        self._lock = threading.Lock()
        self.current = Policy()
        self.history: list[dict[str, Any]] = []
        self._file_stamp: tuple[int, int] | None = None
        self._checked = 0.0
        if path:
            self.reload_file(who="start-up")

    def file_changed(self, interval_s: float = 1.0) -> bool:
        """Whether the policy file changed since it was last read (checked at most once per
        `interval_s`): with several API server processes each re-reads it, see
        `policy_routes.policy_in_force`."""
        now = time.monotonic()
        if not self.path or now - self._checked < interval_s:
            return False
        self._checked = now
        return self._stamp() != self._file_stamp

    def _stamp(self) -> tuple[int, int] | None:
        try:
            stat = Path(self.path or "").stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    def load(self, text: str, who: str, source: str) -> Policy:
        with self._lock:
            policy = parse_policy(text, self.library, self.current.version + 1, source)
            self.current = policy
            entry = {
                "version": policy.version,
                "by": who,
                "source": source,
                "at": time.time(),
                "policy": policy.file.model_dump(exclude_none=True),
            }
            self.history.append(entry)
            del self.history[:-20]
        logger.warning(
            "personavec: policy version %d in force (by %s, from %s): %s",
            policy.version,
            who,
            source,
            json.dumps(entry["policy"], sort_keys=True),
        )
        return policy

    def reload_file(self, who: str = "SIGHUP") -> Policy:
        if not self.path:
            raise PolicyError("", "the server was started without --policy: nothing to reload")
        self._file_stamp = self._stamp()  # a bad file is not retried until it changes again
        return self.load(Path(self.path).read_text(encoding="utf-8"), who=who, source=self.path)
