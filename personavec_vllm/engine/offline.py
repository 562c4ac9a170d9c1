"""Persona steering and monitoring with vLLM's offline `LLM` API.

    from vllm import SamplingParams
    from personavec_vllm import make_llm, persona_params, projections

    llm = make_llm("path/to/model", vectors="path/to/vector/library")
    params = persona_params(SamplingParams(max_tokens=64),
                            steer=[{"vector": "evil", "coeff": -2.0}],
                            monitor={"vectors": ["evil"]})
    out = llm.generate(["Hi"], params)[0]
    projections(out)   # {"evil": {20: LayerProjection(prompt_last=..., response_mean=..., per_token=[...])}}

The plugin must be active (it is whenever this package is installed and `VLLM_PLUGINS` is unset
or lists `personavec`).
"""

from __future__ import annotations

from typing import Any

from personavec_vllm.config import EXTRA_ARGS_KEY
from personavec_vllm.engine.llm import make_llm, shutdown, use_vectors
from personavec_vllm.results import LayerProjection

__all__ = ["make_llm", "persona_failure", "persona_params", "projections", "shutdown", "use_vectors"]


def persona_params(
    params, steer: list[dict[str, Any]] | None = None, monitor: Any = None, request_key: str | None = None
):
    """A copy of `params` (SamplingParams) carrying a persona spec in `extra_args`."""
    spec: dict[str, Any] = {}
    if steer is not None:
        spec["persona_steer"] = steer
    if monitor is not None:
        spec["persona_monitor"] = monitor
    if request_key is not None:
        spec["request_key"] = request_key
    out = params.clone()
    out.extra_args = {**(params.extra_args or {}), EXTRA_ARGS_KEY: spec}
    return out


def projections(
    output, timeout: float = 120.0, request_key: str | None = None
) -> dict[str, dict[int, LayerProjection]]:
    """Projections of a finished `RequestOutput` (`{}` if it monitored nothing). Raises
    `PersonaRequestFailed` if the worker could not serve the request (it then ran unsteered)."""
    from personavec_vllm.engine.frontend import projection_sink

    num_generated = max(len(c.token_ids) for c in output.outputs)
    return projection_sink().collect(request_key or output.request_id, num_generated, timeout)


def persona_failure(output, timeout: float = 30.0, request_key: str | None = None) -> str | None:
    """Why the worker could not steer or monitor a finished `RequestOutput` (it then ran as a
    plain request), or None if it was served as asked. Over HTTP such a request is aborted and
    answered with an error; offline, check with this (or `projections`, which raises)."""
    from personavec_vllm.engine.frontend import projection_sink

    return projection_sink().failure(request_key or output.request_id, timeout)
