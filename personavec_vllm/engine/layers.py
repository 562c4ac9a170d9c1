"""Put the steering op after every decoder layer of a vLLM model.

Each decoder layer instance gets its `__class__` swapped for a subclass whose `forward` calls
the original and then `steer_and_capture`. Parameter names and weight loading are untouched
(no wrapper module), and the original class stays as it is for other models in the process
(e.g. a speculative drafter).
"""

from __future__ import annotations

import torch
from torch import nn

_STEERED_CLASSES: dict[type, type] = {}


def _steered_class(layer_cls: type) -> type:
    cls = _STEERED_CLASSES.get(layer_cls)
    if cls is None:

        def forward(self, *args, **kwargs):
            out = layer_cls.forward(self, *args, **kwargs)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    f"personavec: {layer_cls.__name__}.forward returned {type(out).__name__}, "
                    "expected (hidden_states, residual); this architecture is not supported"
                )
            hidden_states, residual = out
            torch.ops.personavec.steer_and_capture(hidden_states, residual, self.personavec_layer)
            return hidden_states, residual

        cls = type(f"Steered{layer_cls.__name__}", (layer_cls,), {"forward": forward})
        _STEERED_CLASSES[layer_cls] = cls
    return cls


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a vLLM causal LM (`model.model.layers` for the common ones)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise RuntimeError(
            f"personavec: {type(model).__name__} has no `model.layers` ModuleList; "
            "cannot place persona steering after its decoder layers"
        )
    return layers


def install_steering(model: nn.Module) -> int:
    """Swap every real decoder layer (pipeline-parallel placeholders are skipped). Returns
    the number of decoder layers (the model's `num_layers`)."""
    from personavec_vllm.engine.op import register_op

    register_op()
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        if type(layer).__name__ == "PPMissingLayer":
            continue
        layer.personavec_layer = index + 1  # type: ignore[assignment]  # vector-file row: residual stream after this layer
        layer.__class__ = _steered_class(type(layer))
    return len(layers)


def steerable(base: type) -> type:
    """A subclass of a vLLM causal-LM class that installs steering when constructed."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):  # vLLM inspects this signature
        base.__init__(self, vllm_config=vllm_config, prefix=prefix, **kwargs)  # type: ignore[misc]
        install_steering(self)

    return type(base.__name__, (base,), {"__init__": __init__})
