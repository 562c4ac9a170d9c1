"""Front-end side (the process that owns `LLM` / the API server): admit, resolve, salt.

`InputProcessor.process_inputs` is the one place every request passes before it reaches the
engine, from the offline API and from every HTTP route alike. There we

- refuse every request that carries one of our internal `extra_args` keys (only we write them:
  the worker trusts them) or, over HTTP, a raw `extra_args["personavec"]` spec (HTTP clients use
  the `persona_*` body fields, validated by the route, so that the request key, limits and
  metrics stay the server's);
- take the spec: over HTTP, the one the route resolved, by its ticket (`Admissions`); offline,
  the `extra_args["personavec"]` the caller wrote, validated here (bad input raises a
  `VLLMValidationError` naming the field; the engine never sees it);
- write the resolved spec (defaults filled in, vector versions pinned) to
  `extra_args["personavec_resolved"]` for the worker, and the address of this process's
  projection sink to `extra_args["personavec_reply_to"]`, so that the worker's reports (admitted,
  failed, projections, done) reach the process that took the request, when
  `--api-server-count` starts several;
- give steered requests a cache salt derived from their steering and the vector versions, so
  their prefix-cache blocks are never shared with differently steered or plain requests, nor
  with requests steered by an older version of the same vector.

`InputProcessor.__init__` runs in each API server process; there we open the vector library
and bind that process's projection sink, at an address of its own (never passed down through
the environment: a child that bound an inherited `ipc://` address would take the socket file
from its parent and, on exit, leave the parent's sink deaf).
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field, replace

from personavec_vllm import config
from personavec_vllm.config import EXTRA_ARGS_KEY, REPLY_TO_KEY, RESOLVED_KEY, TICKET_KEY
from personavec_vllm.engine.architectures import architectures
from personavec_vllm.engine.transport import ProjectionSink
from personavec_vllm.library import VectorLibrary
from personavec_vllm.spec import Limits, PersonaSpec, PersonaSpecError, parse_extra_args

logger = logging.getLogger(__name__)

SINK: ProjectionSink | None = None
# Set by the endpoint plugin: this process serves HTTP, so raw extra_args specs come from
# clients and are refused.
SERVING_HTTP = False


def projection_sink() -> ProjectionSink:
    global SINK
    if SINK is None:
        SINK = ProjectionSink()
    return SINK


def open_library(model_config) -> VectorLibrary:
    """The front end's view of the vector library (the same directory the workers read),
    checked against the model's shape and the library cap before the engine starts. This process
    owns the directory: it keeps the versions requests were admitted with."""
    hf = model_config.hf_text_config
    return VectorLibrary(
        config.get(config.VECTORS),
        hf.num_hidden_layers,
        hf.hidden_size,
        max_vectors=config.get_int(config.MAX_LIBRARY),
        keep_versions=True,
    )


@dataclass
class Admission:
    """One client request's persona work, resolved by the HTTP route before vLLM sees it.

    vLLM may make several engine requests of one client request (a list of prompts); each gets
    a request key of its own, derived from the spec's."""

    spec: PersonaSpec
    ticket: str = field(default_factory=lambda: uuid.uuid4().hex)
    keys: list[str] = field(default_factory=list)
    opened: float = field(default_factory=time.monotonic)
    _counter: itertools.count = field(default_factory=itertools.count, repr=False)

    def next_spec(self) -> PersonaSpec:
        n = next(self._counter)
        spec = self.spec if n == 0 else self.spec.with_key(f"{self.spec.request_key}.{n}")
        self.keys.append(spec.request_key)
        return spec


class Admissions:
    """Specs the HTTP layer resolved, by ticket, until its request is answered. A ticket is an
    unguessable one-request token: a client cannot name another request's spec or key."""

    # An admission whose response was never produced (a client that left before its stream
    # started) is dropped after this long.
    MAX_AGE_S = 3600.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, Admission] = {}
        self._swept = time.monotonic()

    def open(self, spec: PersonaSpec) -> Admission:
        admission = Admission(spec)
        with self._lock:
            self._open[admission.ticket] = admission
            if admission.opened - self._swept > 60:
                self._swept = admission.opened
                for ticket in [t for t, a in self._open.items() if admission.opened - a.opened > self.MAX_AGE_S]:
                    del self._open[ticket]
        return admission

    def claim(self, ticket: object) -> PersonaSpec | None:
        """The spec for one more engine request of the admission `ticket`; None if unknown."""
        with self._lock:
            admission = self._open.get(ticket) if isinstance(ticket, str) else None
            return None if admission is None else admission.next_spec()

    def close(self, admission: Admission) -> None:
        with self._lock:
            self._open.pop(admission.ticket, None)


ADMISSIONS = Admissions()


def _refuse(field_name: str, message: str, reason: str = "bad_type"):
    from vllm.exceptions import VLLMValidationError

    prefix = "vllm_xargs" if SERVING_HTTP else "extra_args"
    return VLLMValidationError(f"{prefix}.{field_name}: {message}", parameter=f"{prefix}.{field_name}")


def check_internal_keys(extra: dict) -> None:
    """Refuse any personavec-reserved key a caller wrote (raises `VLLMValidationError`)."""
    for key in extra:
        if isinstance(key, str) and key.lower().startswith("personavec") and key not in (EXTRA_ARGS_KEY, TICKET_KEY):
            raise _refuse(key, "is reserved for personavec's internal use")


def resolve_request(processor, params, request_id: str) -> PersonaSpec | None:
    """The resolved persona spec of one engine request, or None for a plain one. Raises
    `VLLMValidationError` for anything a caller may not send."""
    extra = getattr(params, "extra_args", None) or {}
    if not extra:
        return None
    check_internal_keys(extra)
    if processor.personavec_disabled and (TICKET_KEY in extra or EXTRA_ARGS_KEY in extra):
        from vllm.exceptions import VLLMValidationError

        raise VLLMValidationError(processor.personavec_disabled, parameter="persona")
    if TICKET_KEY in extra:
        spec = ADMISSIONS.claim(extra[TICKET_KEY])
        if spec is None or EXTRA_ARGS_KEY in extra:
            raise _refuse(TICKET_KEY, "is reserved for personavec's internal use")
    elif EXTRA_ARGS_KEY in extra:
        if SERVING_HTTP:
            raise _refuse(
                EXTRA_ARGS_KEY,
                "persona fields go in the request body (persona_steer, persona_monitor), not in vllm_xargs",
            )
        try:
            spec = parse_extra_args(extra, processor.personavec_library, Limits.from_env(), request_id)
        except PersonaSpecError as exc:
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(str(exc), parameter=exc.field) from exc
    else:
        return None
    return None if spec is None or spec.is_empty else spec


def persona_disabled_reason(vllm_config, model_config) -> str | None:
    """Why this engine cannot serve persona requests (None if it can). Plain requests are never
    affected: a personavec install must not change what plain vLLM does."""
    if not config.steering_on():
        return f"persona steering and monitoring are off on this server ({config.STEERING}=off)"
    if vllm_config.use_v2_model_runner:
        return (
            "persona steering hooks vLLM's V1 model runner, and this engine runs the V2 runner; "
            "start it with VLLM_USE_V2_MODEL_RUNNER=0 (personavec serve does)"
        )
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        # Each pipeline stage holds some layers, steers and reports only those, and its rank 0
        # would report a request as done: projections would be partial and counted per stage.
        return (
            "persona steering and monitoring are not supported with pipeline parallelism "
            f"(--pipeline-parallel-size {vllm_config.parallel_config.pipeline_parallel_size}); "
            "use --tensor-parallel-size, or several engines (--data-parallel-size)"
        )
    if not set(model_config.architectures or ()) & set(architectures()):
        return (
            f"persona steering is not enabled for {model_config.architectures}; "
            "add the architecture to PERSONAVEC_ARCHITECTURES"
        )
    return None


def install_frontend_hooks() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    if getattr(InputProcessor, "_personavec_hooked", False):
        return
    for name in ("__init__", "process_inputs"):
        if not callable(getattr(InputProcessor, name, None)):
            raise RuntimeError(f"personavec: vLLM's InputProcessor has no {name}; supports vllm 0.32.*")
    orig_init = InputProcessor.__init__
    orig_process = InputProcessor.process_inputs

    @functools.wraps(orig_init)
    def __init__(self, vllm_config, *args, **kwargs):
        orig_init(self, vllm_config, *args, **kwargs)
        self.personavec_disabled = persona_disabled_reason(vllm_config, self.model_config)
        if self.personavec_disabled:
            logger.warning("personavec: %s; plain requests are served as usual", self.personavec_disabled)
        self.personavec_library = open_library(self.model_config)
        projection_sink()

    from vllm.platforms import current_platform

    refuse_seeds = current_platform.is_cpu()

    @functools.wraps(orig_process)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        if refuse_seeds and getattr(params, "seed", None) is not None:
            from vllm.exceptions import VLLMValidationError

            # vLLM 0.32's CPU sampler kills the engine on a seeded request ("CPU Generator does
            # not use offset"); refuse it rather than lose every request in flight.
            raise VLLMValidationError(
                "per-request seeds are not supported by vLLM's CPU backend (they crash the engine); "
                "start the engine with a global seed instead",
                parameter="seed",
                value=params.seed,
            )
        spec = resolve_request(self, params, request_id)
        request = orig_process(self, request_id, prompt, params, *args, **kwargs)
        if spec is not None:
            # vLLM's own copy of the params (the caller's object may be shared): our input keys
            # are replaced by the resolved spec and this process's sink address.
            sampling = request.sampling_params
            extra = {k: v for k, v in (sampling.extra_args or {}).items() if k not in (EXTRA_ARGS_KEY, TICKET_KEY)}
            sink = projection_sink()
            if SERVING_HTTP and spec.monitor and not spec.per_token:
                spec = replace(spec, summed=True)  # one report per request, at its end
            sampling.extra_args = {**extra, RESOLVED_KEY: spec.to_dict(), REPLY_TO_KEY: sink.address}
            sink.expect(
                spec.request_key, [(t.vector, layer) for t in spec.monitor for layer in t.layers], held=SERVING_HTTP
            )
            if salt := spec.cache_salt():
                request.cache_salt = f"{request.cache_salt}|{salt}" if request.cache_salt else salt
        return request

    InputProcessor.__init__ = __init__  # type: ignore[method-assign]
    InputProcessor.process_inputs = process_inputs  # type: ignore[method-assign]
    InputProcessor._personavec_hooked = True  # type: ignore[attr-defined]
