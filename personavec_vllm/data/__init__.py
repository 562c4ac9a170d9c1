"""The files that ship inside the package: trait definitions and the default model's vectors.

Found through `importlib.resources`, so they come with every install (wheel, editable, source)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def data_dir() -> Path:
    return Path(str(files("personavec_vllm"))) / "data"


def traits_dir() -> Path:
    """The shipped trait definitions (`NAME.json`)."""
    return data_dir() / "traits"


def vectors_dir(model_name: str) -> Path:
    """The shipped vector library of a model (may not exist)."""
    return data_dir() / "vectors" / model_name
