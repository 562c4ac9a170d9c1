"""One way to start and stop a `vllm.LLM` with persona vectors: the defaults that make vLLM work
on the machines this project runs on, in one place.

- float32 (vLLM's "auto" runs bfloat16 on CPU, which moves projections and greedy tokens);
- a modest share of memory (`gpu_memory_utilization`; on CPU vLLM reads it as a share of RAM,
  and its default 0.92 refuses to start beside any other process) and a 1 GiB CPU KV cache
  unless `VLLM_CPU_KVCACHE_SPACE` says otherwise;
- the vector library named before the engine starts (the workers read it at start-up);
- `shutdown` stops the engine-core process now (it otherwise lingers until garbage collection,
  holding its memory).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from personavec_vllm import config


def use_vectors(directory: str | os.PathLike | None) -> None:
    """Point the plugin at a vector library (None: none); call before creating the `LLM`."""
    if directory is None:
        os.environ.pop(config.VECTORS, None)
    else:
        os.environ[config.VECTORS] = str(Path(directory).resolve())


def make_llm(
    model: str | os.PathLike,
    *,
    vectors: str | os.PathLike | None = None,
    seed: int = 0,
    max_model_len: int = 2048,
    enforce_eager: bool = False,
    memory_share: float = 0.3,
    **kwargs: Any,
):
    """A `vllm.LLM` for `model` with the plugin active; `vectors` (a library folder), if given,
    is what the engine serves. Other keyword arguments go to `vllm.LLM`."""
    from vllm import LLM

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if vectors is not None:
        use_vectors(vectors)
    return LLM(
        model=str(model),
        dtype=kwargs.pop("dtype", "float32"),
        seed=seed,
        max_model_len=max_model_len,
        gpu_memory_utilization=memory_share,
        enforce_eager=enforce_eager,
        **kwargs,
    )


def shutdown(llm) -> None:
    """Stop a `vllm.LLM`'s engine-core process now, instead of at garbage collection."""
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
