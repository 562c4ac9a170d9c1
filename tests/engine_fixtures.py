"""Shared vLLM engines for the engine tests.

Engines are expensive (tens of seconds to start, about a GB of memory each), so one is alive at
a time: asking for a different configuration shuts the previous one down. Test modules request
their engines in an order that keeps restarts few.
"""

from __future__ import annotations

import gc
import os

import torch

from personavec_vllm.engine.llm import shutdown
from personavec_vllm.vectors import PersonaVector, save_vector

_CURRENT: dict = {"key": None, "llm": None}


def make_vectors(directory, num_layers: int, hidden: int, names=("a", "b", "c"), norm: float = 0.5, seed: int = 0):
    """Random directions with per-layer norm `norm` (the tiny models' residual norm is ~0.2-1)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for _i, name in enumerate(names):
        v = torch.randn(num_layers + 1, hidden, generator=gen)
        v = v / v.norm(dim=1, keepdim=True) * norm
        vector = PersonaVector(
            name=name,
            vectors=v,
            trait=name,
            model="test",
            layer=min(2, num_layers),
            description=f"random test direction {name}",
        )
        save_vector(vector, os.path.join(directory, f"{name}.safetensors"))
        out[name] = v
    return out


def shutdown_engine() -> None:
    llm = _CURRENT["llm"]
    _CURRENT.update(key=None, llm=None)
    if llm is not None:
        shutdown(llm)
        del llm
        gc.collect()


def get_engine(model: str, vectors_dir: str | None, *, eager: bool, plugin: bool = True, **kwargs):
    """The shared `vllm.LLM` for this configuration (starting it, and stopping any other)."""
    key = (model, vectors_dir, eager, plugin, tuple(sorted(kwargs.items())))
    if _CURRENT["key"] == key:
        return _CURRENT["llm"]
    shutdown_engine()
    from personavec_vllm.engine.llm import make_llm

    saved = {k: os.environ.get(k) for k in ("PERSONAVEC_VECTORS", "VLLM_PLUGINS")}
    os.environ.pop("PERSONAVEC_VECTORS", None)
    if vectors_dir:
        os.environ["PERSONAVEC_VECTORS"] = str(vectors_dir)
    if not plugin:
        os.environ["VLLM_PLUGINS"] = "none"  # an allow-list naming no installed plugin
    try:
        llm = make_llm(
            model, enforce_eager=eager, memory_share=0.2, max_model_len=kwargs.pop("max_model_len", 1024), **kwargs
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    _CURRENT.update(key=key, llm=llm)
    return llm
