"""Preventative steering and directional ablation for Hugging Face transformers models.

Framework-agnostic: two context managers that put forward hooks on decoder layers and take them
off on exit (also when an exception leaves the block). They work on plain `transformers` causal
LMs, on PEFT/LoRA-wrapped models (`PeftModel.get_base_model()`), under DDP/`torch.compile`
wrappers, and around `transformers.Trainer.train()`:

    from personavec_vllm.training import preventative_steering
    with preventative_steering(model, load_vector("vectors/.../evil.safetensors"), coeff=4.0):
        trainer.train()

Layer convention (as everywhere in personavec): vector row `L` is the residual stream after
decoder layer `L-1`, so steering "at layer L" adds `coeff * v[L]` to the output of
`decoder_layers(model)[L-1]`, at every position.

Preventative steering (Chen et al., 2025): adding the trait direction during fine-tuning means
the gradient does not need to move the weights along it; once the hook is removed, the tuned
model drifts less towards the trait than one fine-tuned without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Union

import torch
from torch import nn

from personavec_vllm.vectors import PersonaVector

VectorLike = Union[PersonaVector, torch.Tensor]
LayerSpec = Union[int, Sequence[int], str, None]

# Where decoder layers live, tried in order on the unwrapped model.
LAYER_PATHS = ("model.layers", "model.language_model.layers", "language_model.model.layers", "layers",
               "model.decoder.layers", "transformer.h", "gpt_neox.layers")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT (`get_base_model()`), DDP/DataParallel (`.module`) and
    `torch.compile` (`._orig_mod`) wrappers. A PEFT model's base keeps its LoRA layers."""
    for _ in range(16):
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif callable(getattr(type(model), "get_base_model", None)):
            inner = model.get_base_model()
            if inner is model:
                break
            model = inner
        else:
            break
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a (possibly wrapped) causal LM."""
    base = unwrap_model(model)
    for path in LAYER_PATHS:
        obj = base
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(base).__name__} (looked for "
                     f"{', '.join('.' + p for p in LAYER_PATHS)})")


def _rows(vector: VectorLike) -> torch.Tensor:
    rows = vector.vectors if isinstance(vector, PersonaVector) else vector
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"expected a PersonaVector or a tensor, got {type(vector).__name__}")
    return rows.detach().float().cpu()


def _resolve_layers(vector: VectorLike, layers: LayerSpec, num_layers: int) -> list[int]:
    if layers is None:
        if not isinstance(vector, PersonaVector):
            raise ValueError("layers are required for a raw tensor (a PersonaVector defaults to its recommended layer)")
        layers = [vector.layer]
    elif layers == "all":
        layers = list(range(1, num_layers + 1))
    elif isinstance(layers, int):
        layers = [layers]
    elif isinstance(layers, str):
        raise ValueError(f"layers must be an int, a list of ints or 'all', got {layers!r}")
    layers = sorted(set(int(layer) for layer in layers))
    bad = [layer for layer in layers if not 1 <= layer <= num_layers]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range 1..{num_layers} (layer L is the output of decoder layer L-1)")
    return layers


def _direction(rows: torch.Tensor, layer: int, num_layers: int, hidden: int) -> torch.Tensor:
    """Row `layer` of a `[num_layers + 1, hidden]` vector, or a single `[hidden]` direction."""
    if rows.ndim == 1:
        if rows.shape[0] != hidden:
            raise ValueError(f"direction has size {rows.shape[0]}, the model's hidden size is {hidden}")
        return rows
    if tuple(rows.shape) != (num_layers + 1, hidden):
        raise ValueError(f"vector has shape {tuple(rows.shape)}, the model needs [{num_layers + 1}, {hidden}] "
                         "(num_layers + 1, hidden_size)")
    return rows[layer]


def _model_shape(model: nn.Module) -> tuple[nn.ModuleList, int, int]:
    layers = decoder_layers(model)
    config = getattr(unwrap_model(model), "config", None)
    hidden = getattr(config, "hidden_size", None)
    if hidden is None:
        hidden = next(p for p in layers[0].parameters()).shape[-1]
    return layers, len(layers), int(hidden)


def _map_output(output, fn):
    """Apply `fn` to a decoder layer's hidden-state output (a tensor, or the first item of a tuple)."""
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)


class _Cast:
    """A float32 tensor, cached per (device, dtype) it is used at."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self._cache: dict = {}

    def like(self, other: torch.Tensor) -> torch.Tensor:
        key = (other.device, other.dtype)
        if key not in self._cache:
            self._cache[key] = self.tensor.to(device=other.device, dtype=other.dtype)
        return self._cache[key]


@contextlib.contextmanager
def _hooks(modules_and_fns) -> Iterator[None]:
    handles = []
    try:
        for module, fn in modules_and_fns:
            handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


def steering_terms(model: nn.Module, vectors: VectorLike | Sequence[VectorLike], coeff: float | Sequence[float],
                   layers: LayerSpec = None) -> dict[int, torch.Tensor]:
    """`{layer: sum of coeff * v[layer]}` (float32) for the given vectors, coefficients and layers."""
    _, num_layers, hidden = _model_shape(model)
    vector_list = [vectors] if isinstance(vectors, (PersonaVector, torch.Tensor)) else list(vectors)
    coeffs = [float(coeff)] * len(vector_list) if isinstance(coeff, (int, float)) else [float(c) for c in coeff]
    if len(coeffs) != len(vector_list):
        raise ValueError(f"{len(vector_list)} vectors but {len(coeffs)} coefficients")
    terms: dict[int, torch.Tensor] = {}
    for vector, c in zip(vector_list, coeffs):
        rows = _rows(vector)
        for layer in _resolve_layers(vector, layers, num_layers):
            term = c * _direction(rows, layer, num_layers, hidden)
            terms[layer] = term if layer not in terms else terms[layer] + term
    return terms


@contextlib.contextmanager
def preventative_steering(model: nn.Module, vectors: VectorLike | Sequence[VectorLike],
                          coeff: float | Sequence[float], layers: LayerSpec = None) -> Iterator[dict[int, torch.Tensor]]:
    """Add `coeff * v[L]` to the output of decoder layer `L-1` at every position, for every
    forward pass inside the block (training and evaluation alike); removed on exit.

    `vectors`: a `PersonaVector`, a `[num_layers + 1, hidden]` tensor, a `[hidden]` direction, or a
    list of those (their terms add up; `coeff` then may be one value per vector). `layers`: an int,
    a list, `'all'`, or None for each PersonaVector's recommended layer. Yields `{layer: term}`.
    """
    decoder = decoder_layers(model)
    terms = steering_terms(model, vectors, coeff, layers)

    def make(term: torch.Tensor):
        cast = _Cast(term)

        def hook(module, args, output):
            return _map_output(output, lambda h: h + cast.like(h))

        return hook

    with _hooks([(decoder[layer - 1], make(term)) for layer, term in terms.items()]):
        yield terms


@contextlib.contextmanager
def ablation(model: nn.Module, vector: VectorLike, layers: LayerSpec = None) -> Iterator[dict[int, torch.Tensor]]:
    """Project the direction out of the output of decoder layer `L-1` for each layer `L`:
    `h <- h - (h . u) u` with `u = v[L] / |v[L]|`, at every position; removed on exit.
    `layers`: an int, a list, `'all'`, or None for the vector's recommended layer. Yields `{layer: u}`."""
    decoder, num_layers, hidden = _model_shape(model)
    rows = _rows(vector)
    units = {}
    for layer in _resolve_layers(vector, layers, num_layers):
        direction = _direction(rows, layer, num_layers, hidden)
        norm = direction.norm()
        if norm == 0:
            raise ValueError(f"the vector is zero at layer {layer}; nothing to ablate")
        units[layer] = direction / norm

    def make(unit: torch.Tensor):
        cast = _Cast(unit)

        def hook(module, args, output):
            def project_out(h):
                u = cast.like(h)
                return h - (h @ u).unsqueeze(-1) * u

            return _map_output(output, project_out)

        return hook

    with _hooks([(decoder[layer - 1], make(unit)) for layer, unit in units.items()]):
        yield units
