"""Shared fixtures: the embedded default model, tiny random models, a free port.

The default model is converted once into the personavec cache (`$PERSONAVEC_CACHE_DIR`,
default `~/.cache/personavec`) and reused by later runs; tiny models are built under
`<cache>/test-models/` (about a second each).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

# Small KV cache for every engine a test starts (the server default is 2 GiB).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from personavec_vllm.models import cache_dir, default_model_path
from personavec_vllm.testing import TINY_ARCHS, build_tiny_model
from personavec_vllm.testing import free_port as _free_port


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    return _free_port()


@pytest.fixture(scope="session")
def default_model() -> Path:
    """HF folder of the embedded SmolLM2-135M-Instruct (converted on first use)."""
    return default_model_path()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Callable[..., Path]:
    """Factory: `tiny_model_dir(arch, **build_tiny_model_kwargs) -> Path`.

    Builds (once per argument set) under `<cache>/test-models/`.
    """
    root = cache_dir() / "test-models"

    def make(arch: str, **kwargs) -> Path:
        suffix = "".join(f"-{k}{v}" for k, v in sorted(kwargs.items()))
        return build_tiny_model(arch, root / f"tiny-{arch}{suffix}", **kwargs)

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_model_dir) -> Path:
    return tiny_model_dir("qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_model_dir) -> Path:
    return tiny_model_dir("qwen3")


@pytest.fixture(scope="session")
def tiny_mistral(tiny_model_dir) -> Path:
    return tiny_model_dir("mistral")


@pytest.fixture(scope="session", params=TINY_ARCHS)
def tiny_model(request, tiny_model_dir) -> Path:
    """Parametrized over every tiny architecture."""
    return tiny_model_dir(request.param)
