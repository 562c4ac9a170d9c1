"""Trait definitions: the file schema (`schema`), the shipped traits (`shipped`) and drafting new
ones with an LLM (`draft`)."""

from personavec_vllm.traits.schema import (
    NAME_RE,
    NAME_RULE,
    Problem,
    TraitDefinition,
    TraitDraftError,
    TraitFileError,
    parse_trait,
    validate_file,
)
from personavec_vllm.traits.shipped import TRAITS_DIR, load_trait, resolve_trait_path, shipped_traits

__all__ = [
    "NAME_RE",
    "NAME_RULE",
    "TRAITS_DIR",
    "Problem",
    "TraitDefinition",
    "TraitDraftError",
    "TraitFileError",
    "draft_trait",
    "load_trait",
    "parse_trait",
    "resolve_trait_path",
    "shipped_traits",
    "validate_file",
]


def __getattr__(name: str):
    if name in ("draft_trait", "draft_messages"):  # drafting pulls in an HTTP client: on demand
        from personavec_vllm.traits import draft

        return getattr(draft, name)
    raise AttributeError(name)
