"""Finding a Hugging Face causal LM's decoder layers, through any wrapper.

The one place that knows where decoder layers live (`model.model.layers` for Llama-like models,
elsewhere for others, inside PEFT, DDP and `torch.compile` wrappers). Layer convention: vector
row `L` is the residual stream after `decoder_layers(model)[L-1]`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# Where decoder layers live, tried in order on the unwrapped model.
LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "layers",
    "model.decoder.layers",
    "transformer.h",
    "gpt_neox.layers",
)


def unwrap_model(model: Any) -> nn.Module:
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
    raise ValueError(
        f"cannot find the decoder layers of {type(base).__name__} (looked for "
        f"{', '.join('.' + p for p in LAYER_PATHS)})"
    )


def model_shape(model: nn.Module) -> tuple[nn.ModuleList, int, int]:
    """(decoder layers, number of layers, hidden size)."""
    layers = decoder_layers(model)
    config = getattr(unwrap_model(model), "config", None)
    hidden = getattr(config, "hidden_size", None)
    if hidden is None:
        hidden = next(p for p in layers[0].parameters()).shape[-1]
    return layers, len(layers), int(hidden)
