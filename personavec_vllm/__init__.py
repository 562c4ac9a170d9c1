"""Persona vectors for a stock vLLM server: per-request steering, live trait monitoring, and data
screening. See README.md and ARCHITECTURE.md.

The public API, by task (names load on first use, so that importing the package, which vLLM's
plugin loader does in every process, stays light):

- vectors: `PersonaVector`, `load_vector`, `save_vector`, `VectorLibrary`, `load_vectors`
- serving offline with vLLM: `make_llm`, `persona_params`, `projections`, `persona_failure`,
  `shutdown`, `use_vectors`
- request specs: `PersonaSpec`, `parse_spec`, `Limits`, `PersonaSpecError`
- training with Hugging Face models: `preventative_steering`, `ablation`
- traits and extraction: `TraitDefinition`, `load_trait`, `shipped_traits`, `extract_traits`,
  `ExtractionSettings`
- screening data: `read_dataset`, `screen_dataset`, `ScreenSettings`, `measure_shift`
- operations: `render_rules`, `RuleSettings`, `render_dashboard`

Everything else (the vLLM hooks in `personavec_vllm.engine`, the server in
`personavec_vllm.server`) is internal.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_PUBLIC: dict[str, str] = {
    "PersonaVector": "personavec_vllm.vectors",
    "VectorFileError": "personavec_vllm.vectors",
    "load_vector": "personavec_vllm.vectors",
    "save_vector": "personavec_vllm.vectors",
    "VectorLibrary": "personavec_vllm.library",
    "load_vectors": "personavec_vllm.library",
    "make_llm": "personavec_vllm.engine.offline",
    "persona_params": "personavec_vllm.engine.offline",
    "projections": "personavec_vllm.engine.offline",
    "persona_failure": "personavec_vllm.engine.offline",
    "shutdown": "personavec_vllm.engine.offline",
    "use_vectors": "personavec_vllm.engine.offline",
    "LayerProjection": "personavec_vllm.results",
    "PersonaSpec": "personavec_vllm.spec",
    "PersonaSpecError": "personavec_vllm.spec",
    "Limits": "personavec_vllm.spec",
    "parse_spec": "personavec_vllm.spec",
    "preventative_steering": "personavec_vllm.training",
    "ablation": "personavec_vllm.training",
    "TraitDefinition": "personavec_vllm.traits",
    "load_trait": "personavec_vllm.traits",
    "shipped_traits": "personavec_vllm.traits",
    "extract_traits": "personavec_vllm.extract.pipeline",
    "ExtractionSettings": "personavec_vllm.extract.pipeline",
    "read_dataset": "personavec_vllm.screen",
    "screen_dataset": "personavec_vllm.screen",
    "ScreenSettings": "personavec_vllm.screen",
    "measure_shift": "personavec_vllm.screen",
    "render_rules": "personavec_vllm.ops",
    "RuleSettings": "personavec_vllm.ops",
    "render_dashboard": "personavec_vllm.ops",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'personavec_vllm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
