"""Every vLLM internal personavec touches, in one list, checked when the plugin loads.

personavec hooks private parts of vLLM (its model runner, input processor and model registry),
so it pins the vLLM minor version and, at start-up, checks that each name below still exists
with the parameters we call it with. A moved internal stops the start with a message naming it,
rather than serve requests whose steering would silently vanish.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

SUPPORTED_VLLM = "0.32."

# (module, attribute path, leading parameter names after `self` that we rely on, or None)
HOOKED: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    # worker side (engine/worker.py): the V1 model runner; the CPU runner inherits these
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.load_model", ()),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._update_states", ("scheduler_output",)),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._prepare_inputs", ("scheduler_output", "num_scheduled_tokens")),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._model_forward", ()),
    # front end (engine/frontend.py)
    ("vllm.v1.engine.input_processor", "InputProcessor.__init__", ("vllm_config",)),
    ("vllm.v1.engine.input_processor", "InputProcessor.process_inputs", ("request_id", "prompt", "params")),
    ("vllm.v1.engine.async_llm", "AsyncLLM.abort", ("request_id", "internal")),
    ("vllm.v1.engine.async_llm", "AsyncLLM.errored", None),
    # model registry (engine/architectures.py)
    ("vllm.model_executor.models.registry", "_VLLM_MODELS", None),
    ("vllm.model_executor.models.registry", "_resolve_module_name", None),
    # HTTP server (server/plugin.py)
    ("vllm.entrypoints.serve.utils.api_utils", "validate_json_request", None),
    ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest", None),
    ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest", None),
)
# Fields of the runner's `input_batch` read every step (checked when the model is loaded).
INPUT_BATCH_FIELDS = ("req_ids", "num_reqs", "num_computed_tokens_cpu", "num_prompt_tokens")
# Methods the CPU runner must inherit unchanged (it overrides load_model, which we hook too).
CPU_RUNNER_INHERITS = ("_update_states", "_prepare_inputs", "_model_forward")


def _resolve(module: str, path: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def problems() -> list[str]:
    """What differs from the vLLM internals this release was written against (empty if none)."""
    import vllm

    found = []
    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        found.append(f"vllm {vllm.__version__} is installed; this personavec-vllm supports {SUPPORTED_VLLM}*")
    for module, path, params in HOOKED:
        try:
            obj = _resolve(module, path)
        except (ImportError, AttributeError):
            found.append(f"{module}.{path} is gone")
            continue
        if params:
            names = [p for p in inspect.signature(obj).parameters if p != "self"]
            if names[: len(params)] != list(params):
                found.append(f"{module}.{path} takes ({', '.join(names)}), expected ({', '.join(params)}, ...)")
    return found


def check() -> None:
    """Raise `RuntimeError` listing every moved internal (called when the plugin loads)."""
    found = problems()
    if found:
        raise RuntimeError("personavec-vllm cannot hook this vLLM: " + "; ".join(found))


def check_cpu_runner() -> None:
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    overridden = [name for name in CPU_RUNNER_INHERITS if name in CPUModelRunner.__dict__]
    if overridden:
        raise RuntimeError(
            f"personavec: vLLM's CPUModelRunner overrides {', '.join(overridden)}; "
            f"this personavec-vllm supports vllm {SUPPORTED_VLLM}*"
        )


def check_input_batch(batch: Any) -> None:
    missing = [f for f in INPUT_BATCH_FIELDS if not hasattr(batch, f)]
    if missing:
        raise RuntimeError(
            f"personavec: vLLM's input batch no longer has {', '.join(missing)}; "
            f"this personavec-vllm supports vllm {SUPPORTED_VLLM}*"
        )


def builtin_model_class(arch: str) -> type:
    """vLLM's own class for architecture `arch` (through its private model table)."""
    from vllm.model_executor.models import registry

    try:
        module_rel, class_name = registry._VLLM_MODELS[arch]
    except KeyError:
        raise RuntimeError(f"personavec: {arch!r} is not a built-in vLLM architecture") from None
    module = importlib.import_module(registry._resolve_module_name(module_rel))
    return getattr(module, class_name)  # type: ignore[no-any-return]
