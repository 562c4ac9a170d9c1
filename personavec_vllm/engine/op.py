"""The one custom op that steers and captures after a decoder layer.

`torch.ops.personavec.steer_and_capture(hidden, residual, layer)` runs after decoder layer
`layer - 1` (so `layer` follows the vector-file convention). It adds
`coef[layer, token_row[t]] @ lib[layer]` to `residual[t]` (the residual stream is
`hidden + residual`, so this steers without breaking vLLM's fused add+RMSNorm) and writes
`(hidden + residual)[t] . unit[layer, c]` to `proj[layer, t, c]`.

It is a registered op, opaque to torch.compile: Python state read in a layer's `forward` is
frozen at trace time (steering would silently vanish in compiled mode), whereas an op reading
persistent buffers sees their current contents on every call, in eager, compiled and CUDA-graph
replay alike. Outside graph capture, layers with nothing to do return at once.
"""

from __future__ import annotations

import functools

import torch

from personavec_vllm.engine.tables import SteeringTables

# The worker's tables; None until the model is loaded (and in processes without a model).
TABLES: SteeringTables | None = None

_LIB = torch.library.Library("personavec", "DEF")


@functools.cache
def _has_cuda() -> bool:
    return torch.cuda.is_available()


def _capturing_graph() -> bool:
    # is_available() is not free (a py-spy profile of a CPU worker found it at half of this op's
    # time), and it never changes in a running process.
    return _has_cuda() and torch.cuda.is_current_stream_capturing()


def steer_and_capture(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    tables = TABLES
    if tables is None:
        return
    graph = _capturing_graph()
    n = hidden.shape[0]
    # Only the columns that hold vectors (all of them in a captured graph, whose shapes are
    # frozen); the rest are zero.
    k = tables.max_columns if graph else max(tables.active_columns, 1)
    if graph or tables.steer_active[layer]:
        coef = tables.coef[layer, :, :k].index_select(0, tables.token_row[:n])  # [n, k]
        residual.add_((coef @ tables.lib[layer, :k]).to(residual.dtype))
    if graph or tables.capture_active[layer]:
        stream = hidden.float() + residual.float()
        torch.matmul(stream, tables.unit[layer, :k].T, out=tables.proj[layer, :n, :k])


def _steer_and_capture_fake(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    return None


SCHEMA = "(Tensor hidden, Tensor(a!) residual, int layer) -> ()"


def register_op(dispatch_key: str | None = None) -> None:
    """Register `torch.ops.personavec.steer_and_capture` (once per process) for the current
    platform's dispatch key, as vLLM registers its own ops."""
    if hasattr(torch.ops.personavec, "steer_and_capture"):
        return
    if dispatch_key is None:
        from vllm.platforms import current_platform

        dispatch_key = current_platform.dispatch_key
    _LIB.define("steer_and_capture" + SCHEMA)
    _LIB.impl("steer_and_capture", steer_and_capture, dispatch_key)
    _LIB._register_fake("steer_and_capture", _steer_and_capture_fake)
