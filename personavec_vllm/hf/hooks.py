"""Forward hooks that read or change the residual stream of a Hugging Face model, per layer.

`on_residual(model, [(L, fn), ...])` replaces the residual stream `h` after decoder layer `L-1`
by `fn(h)` in every forward pass inside the block, and removes the hooks on exit (also on an
exception). The functions here make the `fn`s that steering, ablation and capture need.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from personavec_vllm.hf.layers import decoder_layers

ResidualFn = Callable[[torch.Tensor], torch.Tensor]


def _map_output(output: Any, fn: ResidualFn) -> Any:
    """Apply `fn` to a decoder layer's hidden-state output (a tensor, or the first item of a tuple)."""
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)


@contextlib.contextmanager
def on_residual(model: nn.Module, fns: Iterable[tuple[int, ResidualFn]]) -> Iterator[None]:
    """Hook `fn` after decoder layer `layer - 1` for each `(layer, fn)` (several per layer apply
    in order)."""
    decoder = decoder_layers(model)
    handles = []

    def hook_of(fn: ResidualFn):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            return _map_output(output, fn)

        return hook

    try:
        for layer, fn in fns:
            handles.append(decoder[layer - 1].register_forward_hook(hook_of(fn)))
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Cast:
    """A float32 tensor, cached per (device, dtype) it is used at."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self._cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def like(self, other: torch.Tensor) -> torch.Tensor:
        key = (other.device, other.dtype)
        if key not in self._cache:
            self._cache[key] = self.tensor.to(device=other.device, dtype=other.dtype)
        return self._cache[key]


def adder(delta: torch.Tensor, positions: str = "all", mask: torch.Tensor | None = None) -> ResidualFn:
    """`h + delta` at the given positions, for `[batch, tokens, hidden]` streams.

    - `mask` (`[batch, tokens, 1]`): where it is 1 (any padding side);
    - else `positions`: `all` (every token), `prompt` (every token of a prefill pass), `response`
      (the last position of a prefill pass, prompts left-padded, and every generated token).
    `delta` is `[hidden]`, or `[batch, 1, hidden]` for one delta per row."""
    cast = _Cast(delta.float())

    def fn(h: torch.Tensor) -> torch.Tensor:
        d = cast.like(h)
        if mask is not None:
            return h + mask.to(h.dtype) * d
        prefill = h.shape[1] > 1
        if positions == "all" or (positions == "prompt" and prefill):
            return h + d
        if positions == "response":
            if not prefill:
                return h + d
            last = h[:, -1:] + (d if d.ndim < 3 else d[:, -1:])
            return torch.cat([h[:, :-1], last], dim=1)
        return h

    return fn


def projector_out(unit: torch.Tensor) -> ResidualFn:
    """`h - (h . u) u` at every position (directional ablation of the unit vector `u`)."""
    cast = _Cast(unit.float())

    def fn(h: torch.Tensor) -> torch.Tensor:
        u = cast.like(h)
        return h - (h @ u).unsqueeze(-1) * u

    return fn


def recorder(store: dict[int, torch.Tensor], layer: int) -> ResidualFn:
    """Keeps the stream (as float32) in `store[layer]`, unchanged."""

    def fn(h: torch.Tensor) -> torch.Tensor:
        store[layer] = h.float()
        return h

    return fn
