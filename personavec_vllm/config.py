"""Every `PERSONAVEC_*` setting, and the keys personavec puts into vLLM's `extra_args`.

Settings are environment variables because vLLM starts the processes that read them (API
servers, engine core, workers) and passes its environment down; each is read where it is used,
through the getters here, so that a test or an operator can change it before a process starts.
"""

from __future__ import annotations

import os
from pathlib import Path

# ---- keys in SamplingParams.extra_args ----------------------------------------------------
# The offline API's persona spec (`{persona_steer, persona_monitor, request_key}`).
EXTRA_ARGS_KEY = "personavec"
# Written by the front end for the worker: the validated spec, defaults resolved, versions pinned.
RESOLVED_KEY = "personavec_resolved"
# Written by the front end: the address of the projection sink of the process that took the request.
REPLY_TO_KEY = "personavec_reply_to"
# Written by the HTTP route: the ticket of the spec it resolved (see engine.frontend.Admissions).
TICKET_KEY = "personavec_ticket"
# Only personavec writes these; a request that arrives with one is refused.
INTERNAL_KEYS = frozenset({RESOLVED_KEY, REPLY_TO_KEY, TICKET_KEY})

# ---- settings ---------------------------------------------------------------------------
VECTORS = "PERSONAVEC_VECTORS"  # the served vector library (a folder)
MAX_COEFF = "PERSONAVEC_MAX_COEFF"  # largest |coeff| of a steering term
MAX_VECTORS = "PERSONAVEC_MAX_VECTORS"  # terms (and monitored vectors) per request
MAX_LIBRARY = "PERSONAVEC_MAX_LIBRARY"  # vectors in the library; the engine's table has twice as many columns
ADMIN_KEY = "PERSONAVEC_ADMIN_KEY"  # enables POST/DELETE /v1/persona/vectors (Bearer token)
MAX_UPLOAD_BYTES = "PERSONAVEC_MAX_UPLOAD_BYTES"  # largest vector upload
MAX_JSON_DEPTH = "PERSONAVEC_MAX_JSON_DEPTH"  # deepest JSON body on the persona routes
ARCHITECTURES = "PERSONAVEC_ARCHITECTURES"  # extra model architectures to steer (comma-separated)
CACHE_DIR = "PERSONAVEC_CACHE_DIR"  # converted default model, tiny test models
DRAFT_MODEL = "PERSONAVEC_DRAFT_MODEL"  # `personavec trait new`: the model that drafts
JUDGE_BASE_URL = "PERSONAVEC_JUDGE_BASE_URL"  # `personavec extract`: the judge endpoint
JUDGE_MODEL = "PERSONAVEC_JUDGE_MODEL"
JUDGE_API_KEY = "PERSONAVEC_JUDGE_API_KEY"
POLICY = "PERSONAVEC_POLICY"  # the server policy file (personavec serve --policy)
# "off": no steering op in the model (stock vLLM's compiled graph), persona fields refused; what
# the op costs when no request uses it is the throughput difference to "on" (benchmark scenario 2n)
STEERING = "PERSONAVEC_STEERING"
FAULT_VECTOR = "PERSONAVEC_FAULT_VECTOR"  # tests only: the worker fails requests using this vector

DEFAULTS: dict[str, str] = {
    MAX_COEFF: "50",
    MAX_VECTORS: "8",
    MAX_LIBRARY: "64",
    MAX_UPLOAD_BYTES: str(16 * 1024 * 1024),
    MAX_JSON_DEPTH: "64",
    STEERING: "on",
}


def get(name: str) -> str | None:
    """The setting's value, else its default (None if it has none)."""
    return os.environ.get(name) or DEFAULTS.get(name)


def get_int(name: str) -> int:
    value = get(name)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def get_float(name: str) -> float:
    value = get(name)
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def steering_on() -> bool:
    """`PERSONAVEC_STEERING`: on (default) or off; anything else is an error, not a guess."""
    value = (get(STEERING) or "").strip().lower()
    if value not in ("on", "off"):
        raise ValueError(f"{STEERING} must be on or off, got {get(STEERING)!r}")
    return value == "on"


def cache_dir() -> Path:
    """Root cache folder: `$PERSONAVEC_CACHE_DIR`, default `~/.cache/personavec` (the converted
    default model, tiny test models, the versions vector libraries keep)."""
    env = os.environ.get(CACHE_DIR)
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "personavec"
    return root.resolve()


def comma_list(text: str | None) -> list[str]:
    """`"a, b,,c"` -> `["a", "b", "c"]`: the one parser of comma-separated lists (settings and
    command-line options alike)."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]
