"""Import and export llama.cpp / repeng control-vector GGUF files.

A control-vector GGUF holds `general.architecture = "controlvector"`, the string
`controlvector.model_hint`, the integer `controlvector.layer_count` and one 1-D float32 tensor
`direction.N` (length `n_embd`) per steered layer. llama.cpp adds every direction it finds, at
its layer, to every token (prompt and generated) for as long as the vector is loaded.

Layer index mapping
-------------------
**`direction.N` is added to the output of decoder layer N (0-based module index), which is row
`N + 1` of our `[num_layers + 1, hidden]` tensor.** Row L of our file goes to `direction.{L-1}`;
`direction.N` comes back as row `N + 1`. Reasoning, from the sources:

- llama.cpp, `common/common.cpp`, `common_control_vector_load_one`: parses the integer after
  `direction.` as `layer_idx`, rejects `layer_idx == 0` ("invalid (zero) direction tensor layer
  index") and anything not named `direction.<int>`, requires F32 and 1-D, and copies the
  tensor to offset `n_embd * (layer_idx - 1)` of a flat buffer ("layer 1 at [0]"). Directions
  that share a layer index are summed.
- llama.cpp, `src/llama-adapter.cpp`, `llama_adapter_cvec::init` / `apply`: allocates
  `tensors[il]` for `il = 1 .. n_layer - 1` ("there's never a tensor for layer 0") and fills
  `tensors[il]` from buffer offset `n_embd * (il - 1)`, i.e. from `direction.il`.
  `apply_to(ctx, cur, il)` adds `tensors[il]` to `cur` when `layer_start <= il <= layer_end`
  (`common/common.cpp`, `common_init_from_params`, defaults the range to `1 .. n_layer`).
- llama.cpp, `src/models/llama.cpp` (every architecture does the same) and
  `src/llama-graph.cpp`, `llm_graph_context::build_cvec`: inside `for (il = 0; il < n_layer;
  ++il)`, after the FFN residual add, `cur = build_cvec(cur, il); cb(cur, "l_out", il);
  inpL = cur;`. So `il` is the 0-based decoder layer and the direction is added to that
  layer's output, the residual stream the next layer reads: our row `il + 1`.
- repeng (`vgel/repeng`), `repeng/control.py`: `ControlModel.set_control` adds
  `coeff * directions[layer_id]` to the output of `model.model.layers[layer_id]` (0-based);
  `repeng/extract.py`, `batched_get_hiddens`, reads `hidden_states[layer + 1]` for
  `directions[layer]`, and `ControlVector.export_gguf` writes `directions[layer]` as
  `direction.{layer}`. Same convention as llama.cpp: key N = output of decoder module N.
  (repeng's default layers, `range(-1, -num_hidden_layers, -1)`, are modules `1 .. n - 1`,
  exactly the ones llama.cpp can hold.)

Consequences:

- Our row 1 (output of decoder layer 0) would be `direction.0`, which llama.cpp refuses, so it
  cannot be exported; row 0 (embeddings) has no slot at all. Exportable rows are
  `2 .. num_layers` (`direction.1 .. direction.{num_layers - 1}`); the last decoder layer is
  reachable. On import, `direction.0` (repeng can write it) maps to row 1.
- A row exported with `coeff` c makes llama.cpp do what `personavec` steering at that layer with
  coefficient c and positions `all` does (`h <- h + c * v`).

Steering strength
-----------------
llama.cpp applies *every* direction in the file at once. A persona vector has a direction at
every layer, and adding all of them steers far harder than the single layer our steering
uses, so users typically export only the layer(s) they want to steer
(`export_gguf(v, path, layers=[v.layer], coeff=...)`). Note also that llama.cpp's and repeng's
own vectors are unit-norm per layer (PCA / normalised mean), so their usual strengths
(`--control-vector-scaled FILE 0.8`) are not comparable to coefficients on our raw
mean-difference vectors; `coeff` scales ours before writing.

Metadata
--------
Export writes `controlvector.model_hint` (default: the vector's `model`), `controlvector.
layer_count` (uint32, the number of direction tensors, as repeng writes it; llama.cpp does not
read it) and `personavec.*` keys (name, trait, model, num_layers, layer, method, description,
coeff, layers) that llama.cpp ignores. Import uses `personavec.num_layers` when present so a
partial export comes back at the right shape.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from personavec_vllm.files import atomic_output
from personavec_vllm.vectors import PersonaVector, VectorFileError

ARCH = "controlvector"
KEY_ARCH = "general.architecture"
KEY_MODEL_HINT = f"{ARCH}.model_hint"
KEY_LAYER_COUNT = f"{ARCH}.layer_count"
PREFIX = "personavec."
DIRECTION_PATTERN = re.compile(r"^direction\.(\d+)$")
# Float types we read (converted to float32); llama.cpp itself accepts only F32.
_FLOAT_TYPES = ("F32", "F16", "F64")


class GGUFInteropError(VectorFileError):
    """A control-vector GGUF cannot be written or read."""


def row_to_direction(row: int) -> int:
    """Our row L (residual stream after decoder layer L-1) -> llama.cpp/repeng `direction.N`."""
    return row - 1


def direction_to_row(index: int) -> int:
    """llama.cpp/repeng `direction.N` (added to the output of decoder layer N) -> our row N+1."""
    return index + 1


def _parse_layers(layers: Iterable[int] | None, num_layers: int) -> list[int]:
    if layers is None:
        return list(range(2, num_layers + 1))
    rows = sorted({int(x) for x in layers})
    if not rows:
        raise GGUFInteropError("no layers to export (layers is empty)")
    bad = [r for r in rows if not 1 <= r <= num_layers]
    if bad:
        raise GGUFInteropError(
            f"layers {bad} are outside 1..{num_layers} (row L = residual stream after decoder layer L-1)"
        )
    if rows[0] == 1:
        raise GGUFInteropError(
            "layer 1 (the output of decoder layer 0) would be direction.0, which llama.cpp "
            "refuses ('invalid (zero) direction tensor layer index'); export layers "
            f"2..{num_layers}"
        )
    return rows


def export_gguf(
    vector: PersonaVector,
    path: str | os.PathLike,
    layers: list[int] | None = None,
    coeff: float = 1.0,
    *,
    model_hint: str | None = None,
) -> Path:
    """Write `vector` as a llama.cpp/repeng control-vector GGUF file.

    `layers` are rows of our file (row L = residual stream after decoder layer L-1, i.e.
    "steer at layer L"); default: every exportable row, `2..num_layers`. Row L is written as
    `direction.{L-1}`, multiplied by `coeff`. llama.cpp adds every direction in the file, so
    export only the layers you want to steer (usually `[vector.layer]`). Written atomically.
    """
    import gguf

    coeff = float(coeff)
    if not np.isfinite(coeff):
        raise GGUFInteropError(f"coeff must be finite, got {coeff}")
    rows = _parse_layers(layers, vector.num_layers)
    if not rows:
        raise GGUFInteropError(f"vector {vector.name!r} has no exportable layer (num_layers < 2)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = vector.vectors[rows].numpy().copy()
    if coeff != 1.0:
        data = (data.astype(np.float64) * coeff).astype(np.float32)
    if not np.isfinite(data).all():
        raise GGUFInteropError(f"coeff {coeff} overflows float32")

    with atomic_output(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCH)  # sets general.architecture
        writer.add_string(KEY_MODEL_HINT, model_hint if model_hint is not None else vector.model)
        writer.add_uint32(KEY_LAYER_COUNT, len(rows))
        writer.add_string(PREFIX + "name", vector.name)
        writer.add_string(PREFIX + "trait", vector.trait)
        writer.add_string(PREFIX + "model", vector.model)
        writer.add_uint32(PREFIX + "num_layers", vector.num_layers)
        writer.add_uint32(PREFIX + "layer", vector.layer)
        writer.add_string(PREFIX + "method", vector.method)
        writer.add_string(PREFIX + "description", vector.description)
        writer.add_float32(PREFIX + "coeff", coeff)
        writer.add_string(PREFIX + "layers", ",".join(str(r) for r in rows))
        for row, values in zip(rows, data):
            writer.add_tensor(f"direction.{row_to_direction(row)}", np.ascontiguousarray(values))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _field(reader, key: str):
    field = reader.get_field(key)
    if field is None or not field.types:
        return None
    try:
        return field.contents()
    except Exception:
        return None


def import_gguf(
    path: str | os.PathLike,
    *,
    name: str,
    trait: str,
    model: str,
    layer: int | None = None,
    description: str = "",
    num_layers: int | None = None,
) -> PersonaVector:
    """Read a llama.cpp/repeng control-vector GGUF into a `PersonaVector`.

    `direction.N` becomes row N+1; rows the file lacks are zero. `num_layers` (the model's
    decoder layer count) defaults to the file's `personavec.num_layers`, else to the smallest
    count that holds every direction (highest N + 1, exact for llama.cpp `cvector-generator`
    and default repeng files, which cover the last steerable layer). The recommended `layer`
    defaults to the file's `personavec.layer` when that row is present, else to the middle
    present row. Vectors come back as the file holds them (already multiplied by any export
    coeff, which is kept in `extra["gguf_coeff"]`).
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise GGUFInteropError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:
        raise GGUFInteropError(f"{path}: not a readable GGUF file ({exc})") from exc

    arch = _field(reader, KEY_ARCH)
    if arch != ARCH:
        what = "has no general.architecture" if arch is None else f"has general.architecture {arch!r}"
        raise GGUFInteropError(
            f"{path}: not a control-vector GGUF: it {what}, expected {ARCH!r} (a model GGUF is not a control vector)"
        )

    directions: dict[int, np.ndarray] = {}
    hidden = None
    for tensor in reader.tensors:
        match = DIRECTION_PATTERN.match(tensor.name)
        if match is None:
            raise GGUFInteropError(
                f"{path}: tensor {tensor.name!r} is not named direction.<layer> (llama.cpp refuses such files too)"
            )
        ttype = gguf.GGMLQuantizationType(tensor.tensor_type).name
        if ttype not in _FLOAT_TYPES:
            raise GGUFInteropError(f"{path}: tensor {tensor.name!r} has type {ttype}; expected F32 (or F16/F64)")
        shape = [int(s) for s in tensor.shape]
        if len(shape) != 1:
            raise GGUFInteropError(
                f"{path}: tensor {tensor.name!r} has shape {shape}; a direction must be 1-D [hidden_size]"
            )
        if shape[0] < 1:
            raise GGUFInteropError(f"{path}: tensor {tensor.name!r} is empty")
        if hidden is None:
            hidden = shape[0]
        elif shape[0] != hidden:
            raise GGUFInteropError(
                f"{path}: tensor {tensor.name!r} has {shape[0]} elements but earlier directions have {hidden}"
            )
        values = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        row = direction_to_row(int(match.group(1)))
        if row in directions:
            directions[row] = directions[row] + values  # llama.cpp sums same-layer directions
        else:
            directions[row] = values.copy()
    if not directions:
        raise GGUFInteropError(f"{path}: the file has no direction.<layer> tensors")

    declared = _field(reader, PREFIX + "num_layers")
    if num_layers is None:
        num_layers = int(declared) if isinstance(declared, int) else max(directions)
    if max(directions) > num_layers:
        raise GGUFInteropError(
            f"{path}: direction.{row_to_direction(max(directions))} needs at least "
            f"{max(directions)} decoder layers, but num_layers is {num_layers}"
        )

    rows = torch.zeros(num_layers + 1, int(hidden or 0), dtype=torch.float32)
    for row, values in directions.items():
        rows[row] = torch.from_numpy(values)

    present = sorted(directions)
    if layer is None:
        stored = _field(reader, PREFIX + "layer")
        layer = stored if isinstance(stored, int) and stored in directions else present[(len(present) - 1) // 2]
    elif layer not in directions:
        raise GGUFInteropError(
            f"{path}: recommended layer {layer} has no direction in the file (present layers: "
            f"{', '.join(map(str, present))})"
        )

    extra = {"gguf_layers": ",".join(map(str, present))}
    hint = _field(reader, KEY_MODEL_HINT)
    if isinstance(hint, str):
        extra["gguf_model_hint"] = hint
    coeff = _field(reader, PREFIX + "coeff")
    if isinstance(coeff, float):
        extra["gguf_coeff"] = repr(coeff)
    method = _field(reader, PREFIX + "method")
    return PersonaVector(
        name=name,
        vectors=rows,
        trait=trait,
        model=model,
        layer=int(layer),
        method=method if isinstance(method, str) and method else "gguf_control_vector",
        description=description,
        extra=extra,
    )
