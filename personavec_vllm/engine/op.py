"""The one custom op that steers and captures after a decoder layer.

`torch.ops.personavec.steer_and_capture(hidden, residual, layer)` runs after decoder layer
`layer - 1` (so `layer` follows the vector-file convention). In order:

1. `add`: `residual[t] += coef[layer, row(t)] @ lib[layer]` (the residual stream is
   `hidden + residual`, so this steers without breaking vLLM's fused add+RMSNorm);
2. `cap` / `ablate`: the projection on each unit vector is clamped to `[lo, hi]` of the token's
   row, by adding `(clip(p, lo, hi) - p) * unit` (several caps of one token apply together, each
   from the projection after step 1);
3. gates of this layer are decided from the projection before steps 1-2, at each gated request's
   last prompt token (terms of later layers see the decision in the same pass);
4. projections are written: `proj` after steps 1-2, `proj_before` before them, and added to the
   accumulator rows of summed monitored requests (`sums`, `sums_before`).

Terms that depend on a gate are multiplied by the gate's state (0 until it opens).

It is a registered op, opaque to torch.compile: Python state read in a layer's `forward` is
frozen at trace time (steering would silently vanish in compiled mode), whereas an op reading
persistent buffers sees their current contents on every call, in eager, compiled and CUDA-graph
replay alike. Outside graph capture, layers with nothing to do return at once.
"""

from __future__ import annotations

import functools

import torch

from personavec_vllm.engine.tables import GATES_PER_SLOT, ROWS_PER_SLOT, SteeringTables

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
    steer = graph or tables.steer_active[layer]
    cap = graph or tables.cap_active[layer]
    gated = graph or tables.gated_active[layer]
    evaluate = graph or tables.gate_eval[layer]
    capture = graph or tables.capture_active[layer]
    if not (steer or cap or evaluate or capture):
        return
    n = hidden.shape[0]
    # Only the columns that hold vectors (all of them in a captured graph, whose shapes are
    # frozen); the rest are zero.
    k = tables.max_columns if graph else max(tables.active_columns, 1)
    unit = tables.unit[layer, :k]
    before = None
    if capture or cap or evaluate:  # projections before our terms at this layer
        stream = hidden.float() + residual.float()
        before = stream @ unit.T
    if steer or cap:
        rows = tables.token_row[:n]
        opened = None
        if gated:  # each term's gate: 1 once open (column 0 of a slot's gates is always 1)
            local = tables.gate_local[layer, :, :k].index_select(0, rows).long()
            slot = torch.div(rows - 1, ROWS_PER_SLOT, rounding_mode="floor").clamp_min(0)
            opened = tables.slot_gate.view(-1)[slot[:, None] * (GATES_PER_SLOT + 1) + local]
        if steer:
            coef = tables.coef[layer, :, :k].index_select(0, rows)  # [n, k]
            if opened is not None:
                coef = coef * opened
            residual.add_((coef @ tables.lib[layer, :k]).to(residual.dtype))
        if cap:
            after_add = (hidden.float() + residual.float()) @ unit.T
            lo = tables.lo[layer, :, :k].index_select(0, rows)
            hi = tables.hi[layer, :, :k].index_select(0, rows)
            if opened is not None:
                lo = torch.where(opened > 0, lo, -torch.inf)
                hi = torch.where(opened > 0, hi, torch.inf)
            delta = torch.clamp(after_add, lo, hi) - after_add
            residual.add_((delta @ unit).to(residual.dtype))
    if evaluate:  # gates decided here, after this layer's terms (which they therefore never see)
        _decide_gates(tables, stream, layer)
    if capture:
        assert before is not None
        tables.proj_before[layer, :n, :k] = before
        if steer or cap:
            torch.matmul(hidden.float() + residual.float(), unit.T, out=tables.proj[layer, :n, :k])
        else:
            tables.proj[layer, :n, :k] = before
        if graph or tables.accumulate:  # each summed request's rows, on the device
            rows, weight = tables.acc_row[:n], tables.acc_weight[:n, None]
            tables.sums[layer, :, :k].index_add_(0, rows, tables.proj[layer, :n, :k] * weight)
            tables.sums_before[layer, :, :k].index_add_(0, rows, before * weight)


def _decide_gates(tables: SteeringTables, stream: torch.Tensor, layer: int) -> None:
    """Open each gate of `layer` whose slot's last prompt token is in this batch and whose
    projection there (before our terms) crosses the threshold; on the device, no host round trip."""
    deciding = (tables.gate_layer == layer) & (tables.last_tok >= 0)[:, None]  # [slots, gates]
    tokens = tables.last_tok.clamp(0, stream.shape[0] - 1)
    units = tables.unit[layer].index_select(0, tables.gate_col.view(-1)).view(*tables.gate_col.shape, -1)
    value = (stream.index_select(0, tokens)[:, None, :] * units).sum(-1)  # [slots, gates]
    opened = ((value - tables.gate_thr) * tables.gate_sign > 0).to(tables.slot_gate.dtype)
    tables.slot_gate[:, 1:].copy_(torch.where(deciding, opened, tables.slot_gate[:, 1:]))


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
