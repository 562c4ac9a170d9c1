"""Steered versions of vLLM's causal-LM classes, registered over the built-in architectures.

`ModelRegistry` entries point at `personavec_vllm.steering.architectures:<Arch>`; this module
builds `<Arch>` on first access from vLLM's own table of built-in models, so the same lazy
lookup works in every process (including vLLM's model-inspection subprocess).
"""

from __future__ import annotations

import importlib
import os

# Architectures steered by default; any other decoder whose layers return
# (hidden_states, residual) can be added with PERSONAVEC_ARCHITECTURES=ArchA,ArchB.
DEFAULT_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def architectures() -> tuple[str, ...]:
    extra = [a.strip() for a in os.environ.get("PERSONAVEC_ARCHITECTURES", "").split(",") if a.strip()]
    return tuple(dict.fromkeys([*DEFAULT_ARCHITECTURES, *extra]))


def builtin_class(arch: str) -> type:
    from vllm.model_executor.models import registry

    try:
        module_rel, class_name = registry._VLLM_MODELS[arch]
    except KeyError:
        raise RuntimeError(f"personavec: {arch!r} is not a built-in vLLM architecture") from None
    module = importlib.import_module(registry._resolve_module_name(module_rel))
    return getattr(module, class_name)


def register_architectures() -> None:
    from vllm import ModelRegistry

    for arch in architectures():
        ModelRegistry.register_model(arch, f"{__name__}:{arch}")


def __getattr__(arch: str) -> type:
    if arch.startswith("__"):
        raise AttributeError(arch)
    from personavec_vllm.steering.layers import steerable

    cls = steerable(builtin_class(arch))
    cls.__module__, cls.__qualname__ = __name__, arch  # picklable by reference
    globals()[arch] = cls
    return cls
