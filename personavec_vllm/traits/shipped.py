"""The shipped trait definitions (package data) and finding a trait by name or path."""

from __future__ import annotations

import os
from pathlib import Path

from personavec_vllm.data import traits_dir
from personavec_vllm.traits.schema import NAME_RE, TraitDefinition, validate_file

# Shipped trait definitions: package data, so they come with any install of the package.
TRAITS_DIR = traits_dir()


def shipped_traits(directory: str | os.PathLike | None = None) -> list[str]:
    """Names of the trait definitions in `directory` (default: the shipped ones)."""
    directory = Path(directory) if directory is not None else TRAITS_DIR
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.json") if p.is_file())


def resolve_trait_path(name_or_path: str | os.PathLike) -> Path:
    """A path to an existing file stays as is; a bare trait name means a shipped trait."""
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    text = str(name_or_path)
    if NAME_RE.match(text):
        shipped = TRAITS_DIR / f"{text}.json"
        if shipped.is_file():
            return shipped
        known = ", ".join(shipped_traits()) or "none"
        raise FileNotFoundError(
            f"unknown trait {text!r}: no file {shipped} and no file {candidate} (shipped traits: {known})"
        )
    raise FileNotFoundError(f"{candidate}: no such trait definition file")


def load_trait(name_or_path: str | os.PathLike) -> TraitDefinition:
    """Load and validate a trait definition by shipped name ('evil') or by path."""
    return validate_file(resolve_trait_path(name_or_path))
