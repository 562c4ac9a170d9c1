"""Steered versions of vLLM's causal-LM classes, registered over the built-in architectures.

`ModelRegistry` entries point at `personavec_vllm.engine.architectures:<Arch>`; this module
builds `<Arch>` on first access from vLLM's own table of built-in models, so the same lazy
lookup works in every process (including vLLM's model-inspection subprocess).
"""

from __future__ import annotations

from personavec_vllm import config

# Architectures steered by default; any other decoder whose layers return
# (hidden_states, residual) can be added with PERSONAVEC_ARCHITECTURES=ArchA,ArchB.
DEFAULT_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def architectures() -> tuple[str, ...]:
    extra = config.comma_list(config.get(config.ARCHITECTURES))
    return tuple(dict.fromkeys([*DEFAULT_ARCHITECTURES, *extra]))


def register_architectures() -> None:
    from vllm import ModelRegistry

    for arch in architectures():
        ModelRegistry.register_model(arch, f"{__name__}:{arch}")


def __getattr__(arch: str) -> type:
    if arch.startswith("__"):
        raise AttributeError(arch)
    from personavec_vllm.engine._compat import builtin_model_class
    from personavec_vllm.engine.layers import steerable

    cls = steerable(builtin_model_class(arch))
    cls.__module__, cls.__qualname__ = __name__, arch  # picklable by reference
    globals()[arch] = cls
    return cls
