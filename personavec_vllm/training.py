"""Preventative steering and directional ablation for Hugging Face transformers models.

Framework-agnostic: two context managers that put forward hooks on decoder layers and take them
off on exit (also when an exception leaves the block). They work on plain `transformers` causal
LMs, on PEFT/LoRA-wrapped models (`PeftModel.get_base_model()`), under DDP/`torch.compile`
wrappers, and around `transformers.Trainer.train()`:

    from personavec_vllm.training import preventative_steering
    with preventative_steering(model, load_vector("evil.safetensors"), coeff=4.0):
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

import torch
from torch import nn

from personavec_vllm.hf.hooks import adder, on_residual, projector_out
from personavec_vllm.hf.layers import decoder_layers, model_shape, unwrap_model
from personavec_vllm.vectors import PersonaVector

__all__ = ["ablation", "decoder_layers", "preventative_steering", "steering_terms", "unwrap_model"]

VectorLike = PersonaVector | torch.Tensor
LayerSpec = int | Sequence[int] | str | None


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
    layers = sorted({int(layer) for layer in layers})
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
        raise ValueError(
            f"vector has shape {tuple(rows.shape)}, the model needs [{num_layers + 1}, {hidden}] "
            "(num_layers + 1, hidden_size)"
        )
    return rows[layer]


def steering_terms(
    model: nn.Module,
    vectors: VectorLike | Sequence[VectorLike],
    coeff: float | Sequence[float],
    layers: LayerSpec = None,
) -> dict[int, torch.Tensor]:
    """`{layer: sum of coeff * v[layer]}` (float32) for the given vectors, coefficients and layers."""
    _, num_layers, hidden = model_shape(model)
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
def preventative_steering(
    model: nn.Module,
    vectors: VectorLike | Sequence[VectorLike],
    coeff: float | Sequence[float],
    layers: LayerSpec = None,
) -> Iterator[dict[int, torch.Tensor]]:
    """Add `coeff * v[L]` to the output of decoder layer `L-1` at every position, for every
    forward pass inside the block (training and evaluation alike); removed on exit.

    `vectors`: a `PersonaVector`, a `[num_layers + 1, hidden]` tensor, a `[hidden]` direction, or a
    list of those (their terms add up; `coeff` then may be one value per vector). `layers`: an int,
    a list, `'all'`, or None for each PersonaVector's recommended layer. Yields `{layer: term}`.
    """
    terms = steering_terms(model, vectors, coeff, layers)
    with on_residual(model, [(layer, adder(term)) for layer, term in terms.items()]):
        yield terms


@contextlib.contextmanager
def ablation(model: nn.Module, vector: VectorLike, layers: LayerSpec = None) -> Iterator[dict[int, torch.Tensor]]:
    """Project the direction out of the output of decoder layer `L-1` for each layer `L`:
    `h <- h - (h . u) u` with `u = v[L] / |v[L]|`, at every position; removed on exit.
    `layers`: an int, a list, `'all'`, or None for the vector's recommended layer. Yields `{layer: u}`."""
    _, num_layers, hidden = model_shape(model)
    rows = _rows(vector)
    units = {}
    for layer in _resolve_layers(vector, layers, num_layers):
        direction = _direction(rows, layer, num_layers, hidden)
        norm = direction.norm()
        if norm == 0:
            raise ValueError(f"the vector is zero at layer {layer}; nothing to ablate")
        units[layer] = direction / norm

    with on_residual(model, [(layer, projector_out(unit)) for layer, unit in units.items()]):
        yield units
