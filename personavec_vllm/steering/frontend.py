"""Front-end side (the process that owns `LLM` / the API server): validate, resolve, salt.

`InputProcessor.process_inputs` is the one place every request passes before it reaches the
engine, from the offline API and from HTTP alike. There we
- validate the persona spec in `extra_args["personavec"]` (bad input raises a
  `VLLMValidationError` naming the field; the engine never sees it),
- write the resolved spec (defaults filled in) to `extra_args["personavec_resolved"]` for the
  worker,
- give steered requests a cache salt derived from their steering, so their prefix-cache
  blocks are never shared with differently steered or plain requests.

`InputProcessor.__init__` runs in each API server process; there we bind that process's
projection sink, at an address of its own. Each monitored request names the sink of the process
that took it (`extra_args[REPLY_TO_KEY]`), so the worker answers the right process when
`--api-server-count` starts several. The address is never passed down through the environment:
a child process that bound an inherited address would take the socket file from its parent
(ZMQ unlinks and rebinds an `ipc://` path) and, on exit, leave the parent's sink deaf.
"""

from __future__ import annotations

import functools
import logging
import os

from personavec_vllm import RESOLVED_KEY
from personavec_vllm.spec import Limits, PersonaSpec, PersonaSpecError, parse_extra_args
from personavec_vllm.steering.architectures import architectures
from personavec_vllm.steering.results import REPLY_TO_KEY, ProjectionSink
from personavec_vllm.steering.runner import VECTORS_ENV
from personavec_vllm.vectors import VectorLibrary

logger = logging.getLogger(__name__)

SINK: ProjectionSink | None = None


def projection_sink() -> ProjectionSink:
    global SINK
    if SINK is None:
        SINK = ProjectionSink()
    return SINK


def open_library(model_config) -> VectorLibrary:
    """The front end's view of the vector library (the same directory the workers read),
    checked against the model's shape before the engine starts."""
    hf = model_config.hf_text_config
    return VectorLibrary(os.environ.get(VECTORS_ENV) or None, hf.num_hidden_layers, hf.hidden_size)


def resolve_request(params, library: VectorLibrary, model_config, request_id: str) -> PersonaSpec | None:
    """Validate and resolve the persona spec of one request's SamplingParams. Projections come
    back under the spec's `request_key`, by default the request id the caller gave vLLM."""
    extra = getattr(params, "extra_args", None)
    try:
        spec = parse_extra_args(extra, library, Limits.from_env(), request_id)
        if spec is not None and not set(model_config.architectures or ()) & set(architectures()):
            raise PersonaSpecError(
                "personavec", "unsupported",
                f"persona steering is not enabled for {model_config.architectures}; "
                "add the architecture to PERSONAVEC_ARCHITECTURES",
            )
    except PersonaSpecError as exc:
        from vllm.exceptions import VLLMValidationError

        raise VLLMValidationError(str(exc), parameter=exc.field) from exc
    return None if spec is None or spec.is_empty else spec


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
        if vllm_config.use_v2_model_runner:
            raise RuntimeError(
                "personavec hooks vLLM's V1 model runner; start vLLM with VLLM_USE_V2_MODEL_RUNNER=0"
            )
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
                "start the engine with a global seed instead", parameter="seed", value=params.seed,
            )
        spec = resolve_request(params, self.personavec_library, self.model_config, request_id)
        request = orig_process(self, request_id, prompt, params, *args, **kwargs)
        if spec is not None:
            # A new dict on vLLM's copy of the params: the caller's object may be shared.
            sampling = request.sampling_params
            sampling.extra_args = {**(sampling.extra_args or {}), RESOLVED_KEY: spec.to_dict()}
            if spec.monitor:
                sink = projection_sink()
                # This process's sink: with several API server processes, each has its own.
                sampling.extra_args[REPLY_TO_KEY] = sink.address
                sink.expect(spec.request_key, [(t.vector, l) for t in spec.monitor for l in t.layers])
            if salt := spec.cache_salt():
                request.cache_salt = f"{request.cache_salt}|{salt}" if request.cache_salt else salt
        return request

    InputProcessor.__init__ = __init__
    InputProcessor.process_inputs = process_inputs
    InputProcessor._personavec_hooked = True
