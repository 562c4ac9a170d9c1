"""Persona vector files and vector libraries (a public file format).

A persona vector file `NAME.safetensors` holds one float32 tensor `persona_vector` of shape
`[num_layers + 1, hidden_size]`. Row `L` is the residual stream *after* decoder layer `L-1`
(row 0 = embeddings), i.e. HF `output_hidden_states[L]`; "steer at layer L" adds to the output
of decoder module `L-1`. String metadata in the safetensors header: `trait`, `model`,
`hidden_size`, `num_layers`, `layer` (recommended layer), `method`, `description`; any other
string keys (e.g. projection statistics as JSON) are kept in `extra`.

A vector library is a directory of such files; a vector's name is its file stem.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TENSOR_NAME = "persona_vector"
REQUIRED_METADATA = ("trait", "model", "hidden_size", "num_layers", "layer", "method", "description")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class VectorFileError(ValueError):
    """A vector file is malformed or does not fit the model it is used with."""


@dataclass(frozen=True)
class PersonaVector:
    """One persona direction per layer, `[num_layers + 1, hidden_size]` float32."""

    name: str
    vectors: torch.Tensor
    trait: str
    model: str
    layer: int
    method: str = "response_avg_diff"
    description: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not NAME_PATTERN.match(self.name):
            raise VectorFileError(
                f"vector name {self.name!r} must be 1-64 characters of letters, digits, '_', '-', '.'"
            )
        if self.vectors.ndim != 2 or self.vectors.dtype != torch.float32:
            raise VectorFileError(
                f"vector {self.name!r}: expected a 2-D float32 tensor, got "
                f"{tuple(self.vectors.shape)} {self.vectors.dtype}"
            )
        if not torch.isfinite(self.vectors).all():
            raise VectorFileError(f"vector {self.name!r} contains non-finite values")
        if not 1 <= self.layer <= self.num_layers:
            raise VectorFileError(
                f"vector {self.name!r}: recommended layer {self.layer} is outside 1..{self.num_layers}"
            )

    @property
    def num_layers(self) -> int:
        return self.vectors.shape[0] - 1

    @property
    def hidden_size(self) -> int:
        return self.vectors.shape[1]

    def norms(self) -> list[float]:
        return self.vectors.norm(dim=1).tolist()

    def stats(self) -> dict:
        """Projection statistics stored with the vector (JSON in metadata key `stats`), if any."""
        raw = self.extra.get("stats")
        return json.loads(raw) if raw else {}

    def projection_stats(self, layer: int) -> dict[str, float] | None:
        """Projection statistics at `layer` on the extraction's positive and negative answers:
        `pos_mean`, `pos_std`, `neg_mean`, `neg_std` (stored as `stats.projection[layer]`)."""
        return self.stats().get("projection", {}).get(str(layer))

    def plain_stats(self, layer: int) -> dict[str, float] | None:
        """Projection statistics at `layer` on plain replies (no system prompt: what ordinary
        traffic looks like): `mean`, `std` (stored as `stats.plain[layer]`), if recorded."""
        return self.stats().get("plain", {}).get(str(layer))

    def check_fits(self, num_layers: int, hidden_size: int) -> None:
        if (self.num_layers, self.hidden_size) != (num_layers, hidden_size):
            raise VectorFileError(
                f"vector {self.name!r} has shape [{self.num_layers + 1}, {self.hidden_size}] "
                f"(extracted on {self.model!r}) but the served model needs "
                f"[{num_layers + 1}, {hidden_size}] (num_layers + 1, hidden_size)"
            )


def unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    """`[L+1, H]` -> each row divided by its norm (zero rows stay zero)."""
    vectors = vectors.float()
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def save_vector(vector: PersonaVector, path: str | os.PathLike) -> Path:
    """Write atomically (temp file + rename), so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        **vector.extra,
        "trait": vector.trait,
        "model": vector.model,
        "hidden_size": str(vector.hidden_size),
        "num_layers": str(vector.num_layers),
        "layer": str(vector.layer),
        "method": vector.method,
        "description": vector.description,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({TENSOR_NAME: vector.vectors.contiguous()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_vector(path: str | os.PathLike, name: str | None = None) -> PersonaVector:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            if TENSOR_NAME not in f.keys():
                raise VectorFileError(f"{path}: no tensor named {TENSOR_NAME!r}")
            tensor = f.get_tensor(TENSOR_NAME)
    except VectorFileError:
        raise
    except Exception as exc:  # safetensors raises several exception types
        raise VectorFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise VectorFileError(f"{path}: metadata is missing {', '.join(missing)}")
    try:
        declared = (int(metadata["num_layers"]), int(metadata["hidden_size"]))
        layer = int(metadata["layer"])
    except ValueError as exc:
        raise VectorFileError(f"{path}: num_layers, hidden_size and layer must be integers") from exc
    if tuple(tensor.shape) != (declared[0] + 1, declared[1]):
        raise VectorFileError(
            f"{path}: tensor shape {tuple(tensor.shape)} disagrees with metadata "
            f"num_layers={declared[0]}, hidden_size={declared[1]}"
        )
    extra = {k: v for k, v in metadata.items() if k not in REQUIRED_METADATA}
    return PersonaVector(
        name=name or path.stem,
        vectors=tensor.to(torch.float32),
        trait=metadata["trait"],
        model=metadata["model"],
        layer=layer,
        method=metadata["method"],
        description=metadata["description"],
        extra=extra,
    )


class VectorLibrary:
    """The vectors of one directory, checked against the served model's shape.

    Re-reading the directory (`refresh`) picks up files added or changed at run time.
    """

    def __init__(self, directory: str | os.PathLike | None, num_layers: int, hidden_size: int):
        self.directory = Path(directory) if directory else None
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self._vectors: dict[str, PersonaVector] = {}
        self._mtimes: dict[str, float] = {}
        self.refresh()

    def refresh(self) -> None:
        """Load new or changed files; drop vectors whose file disappeared."""
        if self.directory is None:
            return
        if not self.directory.is_dir():
            raise VectorFileError(f"vector library {self.directory} is not a directory")
        seen = set()
        for path in sorted(self.directory.glob("*.safetensors")):
            name = path.stem
            seen.add(name)
            mtime = path.stat().st_mtime_ns
            if self._mtimes.get(name) == mtime:
                continue
            vector = load_vector(path)
            vector.check_fits(self.num_layers, self.hidden_size)
            self._vectors[name] = vector
            self._mtimes[name] = mtime
        for name in set(self._vectors) - seen:
            del self._vectors[name]
            del self._mtimes[name]

    def add(self, vector: PersonaVector) -> None:
        """Add in memory only (offline use and tests); `save_vector` into the directory persists."""
        vector.check_fits(self.num_layers, self.hidden_size)
        self._vectors[vector.name] = vector

    def get(self, name: str) -> PersonaVector | None:
        vector = self._vectors.get(name)
        if vector is None and self.directory is not None:
            self.refresh()
            vector = self._vectors.get(name)
        return vector

    def version(self, name: str) -> int:
        """File modification time (ns) of the loaded vector; 0 for vectors added in memory. Lets
        other processes reading the same directory notice a replaced file."""
        return self._mtimes.get(name, 0)

    def names(self) -> list[str]:
        return sorted(self._vectors)

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def __len__(self) -> int:
        return len(self._vectors)
