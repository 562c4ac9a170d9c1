"""Persona vector files and vector libraries (a public file format).

A persona vector file `NAME.safetensors` holds one float32 tensor `persona_vector` of shape
`[num_layers + 1, hidden_size]`. Row `L` is the residual stream *after* decoder layer `L-1`
(row 0 = embeddings), i.e. HF `output_hidden_states[L]`; "steer at layer L" adds to the output
of decoder module `L-1`. String metadata in the safetensors header: `trait`, `model`,
`hidden_size`, `num_layers`, `layer` (recommended steering layer), `method`, `description`;
optional `monitor_layer` (the layer whose projection tracks the trait best, for monitoring,
screening and alerts; default `layer`); any other string keys (e.g. projection statistics as
JSON) are kept in `extra`.

A vector library is a directory of such files (`personavec_vllm.library`); a vector's name is
its file stem.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from personavec_vllm.files import atomic_write_bytes

TENSOR_NAME = "persona_vector"
MONITOR_LAYER_KEY = "monitor_layer"
REQUIRED_METADATA = ("trait", "model", "hidden_size", "num_layers", "layer", "method", "description")
# A vector name is a file stem: letters, digits, '_', '-', '.', not starting with '.' (no hidden
# files, no '..'), matched in full (a trailing newline is not allowed).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_RULE = "1-64 characters of letters, digits, '_', '-', '.', starting with a letter or digit"
# Bounds on what a file may hold, checked before anything is parsed or installed. A vector's
# metadata (projection statistics of every layer) is a few tens of KB; its norms are at most a few
# hundred for real models. Norms are checked in float64, so that float32 overflow is caught.
MAX_HEADER_BYTES = 1 << 20
MAX_NORM = 1e6


class VectorFileError(ValueError):
    """A vector file is malformed or does not fit the model it is used with."""


def is_valid_name(name: str) -> bool:
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None and ".." not in name


_Finite = Annotated[float, Field(allow_inf_nan=False)]
_Spread = Annotated[float, Field(allow_inf_nan=False, ge=0)]


class ProjectionStats(BaseModel):
    """Projection of the extraction's positive and negative answers at one layer."""

    model_config = ConfigDict(extra="allow")
    pos_mean: _Finite
    pos_std: _Spread
    neg_mean: _Finite
    neg_std: _Spread


class PlainStats(BaseModel):
    """Projection of plain replies (no system prompt) at one layer."""

    model_config = ConfigDict(extra="allow")
    mean: _Finite
    std: _Spread


class VectorStats(BaseModel):
    """The `stats` metadata entry (JSON): per-layer projection statistics, keyed by layer."""

    model_config = ConfigDict(extra="allow")
    projection: dict[int, ProjectionStats] = Field(default_factory=dict)
    plain: dict[int, PlainStats] = Field(default_factory=dict)


def _parse_stats(raw: str, name: str, num_layers: int) -> VectorStats:
    try:
        stats = VectorStats.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise VectorFileError(
            f"vector {name!r}: metadata `stats` is not valid ({where or 'stats'}: {first['msg']})"
        ) from None
    for layer in (*stats.projection, *stats.plain):
        if not 0 <= layer <= num_layers:
            raise VectorFileError(f"vector {name!r}: metadata `stats` names layer {layer}, outside 0..{num_layers}")
    return stats


@dataclass(frozen=True)
class PersonaVector:
    """One persona direction per layer, `[num_layers + 1, hidden_size]` float32.

    Construction validates everything a server relies on later (finite values and norms, layer
    range, the `stats` metadata), so an invalid vector never exists in memory."""

    name: str
    vectors: torch.Tensor
    trait: str
    model: str
    layer: int
    method: str = "response_avg_diff"
    description: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    _stats: VectorStats = field(init=False, repr=False, compare=False)
    _version: list[str] = field(init=False, repr=False, compare=False, default_factory=list)

    def __post_init__(self) -> None:
        if not is_valid_name(self.name):
            raise VectorFileError(f"vector name {self.name!r} must be {NAME_RULE}")
        if self.vectors.ndim != 2 or self.vectors.dtype != torch.float32:
            raise VectorFileError(
                f"vector {self.name!r}: expected a 2-D float32 tensor, got "
                f"{tuple(self.vectors.shape)} {self.vectors.dtype}"
            )
        if not torch.isfinite(self.vectors).all():
            raise VectorFileError(f"vector {self.name!r} contains non-finite values")
        largest = float(self.vectors.double().norm(dim=1).max()) if self.vectors.numel() else 0.0
        if not math.isfinite(largest) or largest > MAX_NORM:
            raise VectorFileError(
                f"vector {self.name!r}: a layer's norm is {largest:g}; norms must be at most {MAX_NORM:g}"
            )
        if not 1 <= self.layer <= self.num_layers:
            raise VectorFileError(
                f"vector {self.name!r}: recommended layer {self.layer} is outside 1..{self.num_layers}"
            )
        bad = [k for k, v in self.extra.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise VectorFileError(f"vector {self.name!r}: metadata values must be strings ({bad[0]!r})")
        raw_monitor = self.extra.get(MONITOR_LAYER_KEY)
        if raw_monitor is not None and not (
            re.fullmatch(r"[0-9]{1,6}", raw_monitor) and 1 <= int(raw_monitor) <= self.num_layers
        ):
            raise VectorFileError(
                f"vector {self.name!r}: metadata `{MONITOR_LAYER_KEY}` must be a layer in 1..{self.num_layers}, "
                f"got {raw_monitor[:20]!r}"
            )
        raw = self.extra.get("stats")
        object.__setattr__(self, "_stats", _parse_stats(raw, self.name, self.num_layers) if raw else VectorStats())

    @property
    def monitor_layer(self) -> int:
        """The layer monitoring, screening and alert rules read by default: metadata
        `monitor_layer` (picked by held-out separation, which often peaks later than the best
        steering layer), else the steering layer."""
        raw = self.extra.get(MONITOR_LAYER_KEY)
        return int(raw) if raw is not None else self.layer

    @property
    def num_layers(self) -> int:
        return self.vectors.shape[0] - 1

    @property
    def hidden_size(self) -> int:
        return self.vectors.shape[1]

    @property
    def version(self) -> str:
        """Content hash of the values and metadata: the same in every process that reads the same
        vector, different for any change. Requests pin the version they were admitted with."""
        if not self._version:
            digest = hashlib.sha256(self.vectors.contiguous().numpy().tobytes())
            digest.update(json.dumps(self.metadata(), sort_keys=True).encode())
            self._version.append(digest.hexdigest()[:16])
        return self._version[0]

    def metadata(self) -> dict[str, str]:
        """The safetensors header metadata of this vector's file."""
        return {
            **self.extra,
            "trait": self.trait,
            "model": self.model,
            "hidden_size": str(self.hidden_size),
            "num_layers": str(self.num_layers),
            "layer": str(self.layer),
            "method": self.method,
            "description": self.description,
        }

    def norms(self) -> list[float]:
        return [float(n) for n in self.vectors.norm(dim=1)]

    def stats(self) -> dict[str, Any]:
        """Projection statistics stored with the vector (JSON in metadata key `stats`), if any."""
        raw = self.extra.get("stats")
        stats: dict[str, Any] = json.loads(raw) if raw else {}
        return stats

    def projection_stats(self, layer: int) -> dict[str, float] | None:
        """Projection statistics at `layer` on the extraction's positive and negative answers:
        `pos_mean`, `pos_std`, `neg_mean`, `neg_std` (stored as `stats.projection[layer]`)."""
        stats = self._stats.projection.get(layer)
        return None if stats is None else stats.model_dump()

    def plain_stats(self, layer: int) -> dict[str, float] | None:
        """Projection statistics at `layer` on plain replies (no system prompt: what ordinary
        traffic looks like): `mean`, `std` (stored as `stats.plain[layer]`), if recorded."""
        stats = self._stats.plain.get(layer)
        return None if stats is None else stats.model_dump()

    def check_fits(self, num_layers: int, hidden_size: int) -> None:
        if (self.num_layers, self.hidden_size) != (num_layers, hidden_size):
            raise VectorFileError(
                f"vector {self.name!r} has shape [{self.num_layers + 1}, {self.hidden_size}] "
                f"(extracted on {self.model!r}) but the served model needs "
                f"[{num_layers + 1}, {hidden_size}] (num_layers + 1, hidden_size)"
            )


def vector_bytes(vector: PersonaVector) -> bytes:
    """The vector as a `.safetensors` file's bytes."""
    return save_safetensors_bytes({TENSOR_NAME: vector.vectors.contiguous()}, metadata=vector.metadata())


def save_vector(vector: PersonaVector, path: str | os.PathLike[str]) -> Path:
    """Write atomically (temp file + rename), so a reader never sees half a file."""
    return atomic_write_bytes(path, vector_bytes(vector))


def parse_vector(data: bytes, name: str, source: str = "upload") -> PersonaVector:
    """A vector from a `.safetensors` file's bytes, fully validated in memory (header size,
    metadata, tensor, values): nothing is written anywhere before this succeeds."""
    if len(data) < 8:
        raise VectorFileError(f"{source}: not a safetensors file (shorter than its 8-byte header length)")
    header_len = int.from_bytes(data[:8], "little")
    if 8 + header_len > len(data):
        raise VectorFileError(f"{source}: not a safetensors file (the header runs past the end of the data)")
    if header_len > MAX_HEADER_BYTES:
        raise VectorFileError(
            f"{source}: the safetensors header is {header_len} bytes; at most {MAX_HEADER_BYTES} are accepted"
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (ValueError, RecursionError):
        raise VectorFileError(f"{source}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise VectorFileError(f"{source}: not a safetensors file (its header is not a JSON object)")
    metadata: Any = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise VectorFileError(f"{source}: safetensors metadata must map strings to strings")
    if TENSOR_NAME not in header:
        raise VectorFileError(f"{source}: no tensor named {TENSOR_NAME!r}")
    try:
        tensor = load_safetensors_bytes(data)[TENSOR_NAME]
    except Exception as exc:
        raise VectorFileError(f"{source}: not a readable safetensors file ({exc})") from None
    if not tensor.is_floating_point():
        raise VectorFileError(f"{source}: {TENSOR_NAME} must be floating point, got {tensor.dtype}")
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise VectorFileError(f"{source}: metadata is missing {', '.join(missing)}")
    try:
        declared = (int(metadata["num_layers"]), int(metadata["hidden_size"]))
        layer = int(metadata["layer"])
    except ValueError:
        raise VectorFileError(f"{source}: num_layers, hidden_size and layer must be integers") from None
    if tuple(tensor.shape) != (declared[0] + 1, declared[1]):
        raise VectorFileError(
            f"{source}: tensor shape {tuple(tensor.shape)} disagrees with metadata "
            f"num_layers={declared[0]}, hidden_size={declared[1]}"
        )
    extra = {k: v for k, v in metadata.items() if k not in REQUIRED_METADATA}
    try:
        return PersonaVector(
            name=name,
            vectors=tensor.to(torch.float32),
            trait=metadata["trait"],
            model=metadata["model"],
            layer=layer,
            method=metadata["method"],
            description=metadata["description"],
            extra=extra,
        )
    except VectorFileError as exc:
        raise VectorFileError(f"{source}: {exc}") from None


def load_vector(path: str | os.PathLike[str], name: str | None = None) -> PersonaVector:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise VectorFileError(f"{path}: cannot read ({exc.strerror})") from None
    return parse_vector(data, name or path.stem, source=str(path))
