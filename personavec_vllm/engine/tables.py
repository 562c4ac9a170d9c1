"""Persistent steering/capture tables, the worker's per-engine state.

The custom op (`op.py`) only ever reads these buffers; the runner hook (`runner.py`) rewrites
their contents in place before each forward. Nothing changes shape after start-up, so
torch.compile and CUDA graphs see one fixed graph (the LoRA `token_lora_indices` pattern):

- `lib[L, c]`   vector column `c` at layer `L` (raw), `unit[L, c]` the same normalised. A column
  holds one version of one vector. Columns are bounded (`max_columns`), like vLLM's LoRA slots:
  a column that no active request holds stays loaded (idle) until its slot is needed, then the
  least recently used idle column is evicted. Only a table whose every column is held by a
  running request is full, and then the request that needs one more fails alone.
- `coef[L, r, c]` coefficient of column `c` for table row `r` at layer `L`. Row 0 is all
  zeros: padding, dummy runs and plain requests read it. Each steered request owns three rows,
  one per token phase (prompt before the last token / last prompt token / generated token),
  so `positions` = all | prompt | response is just which phases get the coefficient.
- `lo[L, r, c]`, `hi[L, r, c]` the range `cap` / `ablate` terms clamp the projection on column
  `c` to (`-inf` / `+inf`: no clamp; ablation is `[0, 0]`).
- `gate_local[L, r, c]` which of the slot's gates a term there depends on (0: none). Gates are
  per slot (`gate_col`, `gate_layer`, `gate_thr`, `gate_sign`); `slot_gate[s, g]` is 1 once gate `g`
  opened (column 0 is always 1), decided by the op on the device at the gate's layer, at the token
  `last_tok[s]` (the slot's last prompt token when it is in the batch, else -1).
- `token_row[t]` the row of batch token `t`.
- `proj[L, t, c]` projection of token `t`'s residual stream on column `c` after layer `L`, after
  our terms at that layer; `proj_before[L, t, c]` the same before them. Read back every step only
  for requests that asked for per-token values (and offline).
- `sums[L, a, c]`, `sums_before[L, a, c]`: monitoring accumulated on the device. A monitored
  request owns two accumulator rows (`1 + 2*acc_slot`: its last prompt token, `+1`: the sum over
  its generated tokens fed back); `acc_row[t]` / `acc_weight[t]` say where token `t` adds (row 0,
  weight 0: nowhere). Each position is added once (a recomputed one, after preemption, weighs 0),
  and the rows are copied to the host once, when the request leaves the engine.
"""

from __future__ import annotations

import heapq
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from personavec_vllm.library import VectorLibrary
from personavec_vllm.spec import Gate, PersonaSpec

logger = logging.getLogger(__name__)

# Token phases; a steering `positions` mode is the set of phases it applies to.
PROMPT, LAST_PROMPT, GENERATED = 0, 1, 2
PHASES = {
    "all": (PROMPT, LAST_PROMPT, GENERATED),
    "prompt": (PROMPT, LAST_PROMPT),
    "response": (LAST_PROMPT, GENERATED),
}
ROWS_PER_SLOT = 3
GATES_PER_SLOT = 4  # distinct conditions (`when`) one request may use


def _acc_rows(acc_slot: int) -> slice:
    """The two accumulator rows of an accumulator slot: its last prompt token, then its sum."""
    return slice(1 + 2 * acc_slot, 3 + 2 * acc_slot)


class TableFull(RuntimeError):
    """Every vector column is held by a running request."""


class VectorUnavailable(RuntimeError):
    """The version of a vector a request was admitted with cannot be found any more."""


@dataclass(frozen=True, slots=True)
class TokenSpan:
    """One request's tokens in a step's batch: batch positions `start .. start + count - 1` are
    sequence positions `first .. first + count - 1` of a request with `num_prompt` prompt tokens."""

    start: int
    count: int
    first: int
    num_prompt: int

    @property
    def reaches_last_prompt_token(self) -> bool:
        return self.first + self.count >= self.num_prompt


@dataclass
class ActiveRequest:
    """A persona request admitted to the tables."""

    spec: PersonaSpec
    slot: int | None  # owns rows 1 + 3*slot + phase; None when it only monitors
    steer_layers: frozenset[int]  # layers with add terms
    monitor: list[tuple[str, int, int]] = field(default_factory=list)  # (vector, layer, column)
    columns: tuple[int, ...] = ()  # the columns it holds
    cap_layers: frozenset[int] = frozenset()  # layers with cap / ablate terms
    gated_layers: frozenset[int] = frozenset()  # layers with terms that depend on a gate
    gates: tuple[Gate, ...] = ()  # the request's conditions, gate g + 1 of its slot
    gates_reported: bool = False
    acc_slot: int | None = None  # owns accumulator rows 1 + 2*acc_slot (+1) when monitoring is summed
    summed_upto: int = 0  # positions below this are in its sums
    num_prompt: int = 0


class SteeringTables:
    def __init__(
        self,
        library: VectorLibrary,
        *,
        max_tokens: int,
        max_slots: int,
        max_columns: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ):
        self.library = library
        self.num_layers = library.num_layers
        self.hidden_size = library.hidden_size
        self.max_tokens = max_tokens
        self.max_slots = max_slots
        self.max_columns = max_columns
        self.device = torch.device(device)
        self.dtype = dtype
        n_layers, hidden = self.num_layers + 1, self.hidden_size
        f32, dev = torch.float32, self.device
        self.lib = torch.zeros(n_layers, max_columns, hidden, dtype=f32, device=dev)
        self.unit = torch.zeros(n_layers, max_columns, hidden, dtype=f32, device=dev)
        self.coef = torch.zeros(n_layers, 1 + ROWS_PER_SLOT * max_slots, max_columns, dtype=f32, device=dev)
        rows = 1 + ROWS_PER_SLOT * max_slots
        self.lo = torch.full((n_layers, rows, max_columns), -torch.inf, dtype=f32, device=dev)
        self.hi = torch.full((n_layers, rows, max_columns), torch.inf, dtype=f32, device=dev)
        self.gate_local = torch.zeros(n_layers, rows, max_columns, dtype=torch.int8, device=dev)
        self.slot_gate = torch.zeros(max_slots, GATES_PER_SLOT + 1, dtype=f32, device=dev)
        self.slot_gate[:, 0] = 1.0
        self.gate_col = torch.zeros(max_slots, GATES_PER_SLOT, dtype=torch.int64, device=dev)
        self.gate_layer = torch.zeros(max_slots, GATES_PER_SLOT, dtype=torch.int64, device=dev)  # 0: unused
        self.gate_thr = torch.zeros(max_slots, GATES_PER_SLOT, dtype=f32, device=dev)
        self.gate_sign = torch.ones(max_slots, GATES_PER_SLOT, dtype=f32, device=dev)
        self.last_tok = torch.full((max_slots,), -1, dtype=torch.int64, device=dev)
        self._last_tok_host = np.full(max_slots, -1, dtype=np.int64)
        self._last_tok_set = False
        self.token_row = torch.zeros(max_tokens, dtype=torch.int64, device=dev)
        self.proj = torch.zeros(n_layers, max_tokens, max_columns, dtype=f32, device=dev)
        self.proj_before = torch.zeros(n_layers, max_tokens, max_columns, dtype=f32, device=dev)
        self.sums = torch.zeros(n_layers, 1 + 2 * max_slots, max_columns, dtype=f32, device=dev)
        self.sums_before = torch.zeros(n_layers, 1 + 2 * max_slots, max_columns, dtype=f32, device=dev)
        self.acc_row = torch.zeros(max_tokens, dtype=torch.int64, device=dev)
        self.acc_weight = torch.zeros(max_tokens, dtype=f32, device=dev)
        self._acc_row_host = np.zeros(max_tokens, dtype=np.int64)
        self._acc_weight_host = np.zeros(max_tokens, dtype=np.float32)
        self._acc_high = 0  # acc_weight[_acc_high:] is known to be zero
        self.accumulate = False  # host switch: some token of this step adds to the sums
        self._free_acc_slots = list(range(max_slots - 1, -1, -1))
        self._token_row_host = np.zeros(max_tokens, dtype=np.int64)
        self._rows_high = 0  # token_row[_rows_high:] is known to be zero
        # Host-side switches read by the op outside CUDA-graph capture: skip idle layers.
        self.steer_active = [False] * n_layers  # add terms
        self.cap_active = [False] * n_layers  # cap / ablate terms
        self.gated_active = [False] * n_layers  # terms that depend on a gate
        self.gate_eval = [False] * n_layers  # gates decided at this layer in this step
        self.capture_active = [False] * n_layers
        self.columns: dict[tuple[str, str], int] = {}  # (vector, version) -> column
        self._column_key: dict[int, tuple[str, str]] = {}
        self._column_users = [0] * max_columns
        self._idle: OrderedDict[int, None] = OrderedDict()  # loaded, held by nobody; oldest first
        self._free_columns = list(range(max_columns))  # a heap: the lowest free column first
        self.active_columns = 0  # columns >= this are empty: the op reads only [0, active_columns)
        self.requests: dict[str, ActiveRequest | None] = {}  # vLLM req id -> state (None: plain)
        self._free_slots = list(range(max_slots - 1, -1, -1))
        self._slot_owner: dict[int, str] = {}
        for name in library.names()[:max_columns]:  # warm start: the library, loaded and idle
            vector = library.get(name)
            if vector is not None:
                self._idle[self.column(name, vector.version)] = None

    # ---- vector columns -------------------------------------------------------------
    def column(self, name: str, version: str) -> int:
        """Column holding vector `name` at `version`, loading it if needed (evicting the least
        recently used idle column when none is free). Raises `VectorUnavailable`, `TableFull`."""
        key = (name, version)
        col = self.columns.get(key)
        if col is not None:
            return col
        vector = self.library.vector_at(name, version)
        if vector is None:
            raise VectorUnavailable(f"vector {name!r} at version {version} is no longer in the library")
        if self._free_columns:
            col = heapq.heappop(self._free_columns)
        elif self._idle:
            col, _ = self._idle.popitem(last=False)
            del self.columns[self._column_key.pop(col)]
        else:
            raise TableFull(
                f"all {self.max_columns} vector columns are held by running requests; "
                "raise PERSONAVEC_MAX_LIBRARY or retry"
            )
        vecs = vector.vectors.to(self.device)
        self.lib[:, col] = vecs
        norms = vecs.norm(dim=1, keepdim=True)
        self.unit[:, col] = torch.where(norms > 0, vecs / norms.clamp_min(1e-30), torch.zeros_like(vecs))
        self.columns[key] = col
        self._column_key[col] = key
        self.active_columns = max(self.active_columns, col + 1)
        self._idle[col] = None  # loaded, not yet held
        return col

    def _hold(self, col: int) -> None:
        self._column_users[col] += 1
        self._idle.pop(col, None)

    def _unhold(self, col: int) -> None:
        self._column_users[col] -= 1
        if self._column_users[col] == 0:
            self._idle[col] = None  # most recently used idle column

    def column_of(self, name: str, version: str) -> int | None:
        return self.columns.get((name, version))

    # ---- request admission ------------------------------------------------------------
    def admit(self, req_id: str, spec: PersonaSpec | None, batch_req_ids: set[str]) -> ActiveRequest | None:
        """Take a request into the tables: hold the columns of the vector versions it was
        admitted with, and (if it steers) a slot of coefficient rows. On any error nothing is
        held and the request is recorded as plain."""
        self.requests[req_id] = None
        if spec is None or spec.is_empty:
            return None
        versions = dict(spec.versions)
        held: list[int] = []
        gates = tuple(dict.fromkeys(t.when for t in spec.steer if t.when is not None))
        if len(gates) > GATES_PER_SLOT:
            raise ValueError(f"{len(gates)} distinct conditions (when); at most {GATES_PER_SLOT} per request")
        names = [t.vector for t in spec.steer] + [g.vector for g in gates] + [t.vector for t in spec.monitor]
        try:
            cols = {}
            for name in dict.fromkeys(names):
                if name not in versions:
                    raise VectorUnavailable(f"the request names vector {name!r} without its version")
                cols[name] = col = self.column(name, versions[name])
                self._hold(col)
                held.append(col)
            slot = self._take_slot(req_id, batch_req_ids) if spec.steer else None
            acc_slot = None
            if spec.monitor and spec.summed:
                if not self._free_acc_slots:
                    if slot is not None:
                        self._clear_slot(slot)
                    raise TableFull(f"more than {self.max_slots} monitored requests in the engine")
                acc_slot = self._free_acc_slots.pop()
        except BaseException:
            for col in held:
                self._unhold(col)
            raise
        steer_layers: set[int] = set()
        cap_layers: set[int] = set()
        gated_layers: set[int] = set()
        if slot is not None:
            base = 1 + ROWS_PER_SLOT * slot
            for g, gate in enumerate(gates):
                self.gate_col[slot, g] = cols[gate.vector]
                self.gate_layer[slot, g] = gate.layer
                self.gate_thr[slot, g] = gate.threshold
                self.gate_sign[slot, g] = 1.0 if gate.above else -1.0
            for term in spec.steer:
                col = cols[term.vector]
                local = 0 if term.when is None else gates.index(term.when) + 1
                phases = PHASES[term.positions]
                if local:  # a decision is made at the last prompt token: never before it
                    phases = tuple(p for p in phases if p != PROMPT)
                    gated_layers.update(term.layers)
                for layer in term.layers:
                    for phase in phases:
                        row = base + phase
                        self.gate_local[layer, row, col] = local
                        if term.op == "add":
                            self.coef[layer, row, col] += term.coeff
                        else:  # several caps on one vector and layer: their intersection
                            if term.low is not None:
                                self.lo[layer, row, col] = max(float(self.lo[layer, row, col]), term.low)
                            if term.high is not None:
                                self.hi[layer, row, col] = min(float(self.hi[layer, row, col]), term.high)
                (steer_layers if term.op == "add" else cap_layers).update(term.layers)
        monitor = [(t.vector, layer, cols[t.vector]) for t in spec.monitor for layer in t.layers]
        state = ActiveRequest(
            spec,
            slot,
            frozenset(steer_layers),
            monitor,
            tuple(held),
            frozenset(cap_layers),
            frozenset(gated_layers),
            gates,
            acc_slot=acc_slot,
        )
        self.requests[req_id] = state
        return state

    def release(self, req_id: str) -> ActiveRequest | None:
        state = self.requests.pop(req_id, None)
        if state is not None:
            if state.slot is not None:
                self._clear_slot(state.slot)
            if state.acc_slot is not None:
                rows = _acc_rows(state.acc_slot)
                self.sums[:, rows].zero_()
                self.sums_before[:, rows].zero_()
                self._free_acc_slots.append(state.acc_slot)
            for col in state.columns:
                self._unhold(col)
        return state

    def read_sums(self, state: ActiveRequest) -> dict[tuple[str, int], tuple[float | None, float, int]]:
        """A summed request's monitoring: `{(vector, layer): (last prompt token, sum over generated
        tokens, how many)}`, and `(vector, -layer)` the same before its own terms where it steers
        at that layer. One device-to-host copy of its two accumulator rows."""
        assert state.acc_slot is not None
        rows = _acc_rows(state.acc_slot)
        after, before = torch.stack((self.sums[:, rows], self.sums_before[:, rows])).cpu().numpy()
        seen_last = state.summed_upto >= state.num_prompt > 0
        count = max(state.summed_upto - state.num_prompt, 0)
        steered = state.steer_layers | state.cap_layers
        out: dict[tuple[str, int], tuple[float | None, float, int]] = {}
        for vector, layer, col in state.monitor:
            for key, table in (((vector, layer), after), ((vector, -layer), before)):
                if key[1] < 0 and layer not in steered:
                    continue
                last = float(table[layer, 0, col]) if seen_last else None
                out[key] = (last, float(table[layer, 1, col]), count)
        return out

    def _take_slot(self, req_id: str, batch_req_ids: set[str]) -> int:
        if not self._free_slots:
            # Slots of requests not in this batch (preempted/paused) are reclaimed; such a
            # request is re-admitted from its spec when it is scheduled again.
            for owner in [o for o in self._slot_owner.values() if o not in batch_req_ids]:
                self.release(owner)
        if not self._free_slots:
            raise TableFull(f"more than {self.max_slots} steered requests in one batch")
        slot = self._free_slots.pop()
        self._slot_owner[slot] = req_id
        return slot

    def _clear_slot(self, slot: int) -> None:
        base = 1 + ROWS_PER_SLOT * slot
        rows = slice(base, base + ROWS_PER_SLOT)
        self.coef[:, rows].zero_()
        self.lo[:, rows] = -torch.inf
        self.hi[:, rows] = torch.inf
        self.gate_local[:, rows].zero_()
        self.slot_gate[slot, 1:] = 0.0
        self.gate_layer[slot].zero_()
        del self._slot_owner[slot]
        self._free_slots.append(slot)

    # ---- per step ---------------------------------------------------------------------
    def set_token_rows(self, spans: list[tuple[TokenSpan, int]], num_tokens: int) -> None:
        """`spans`: (the tokens, the slot) of each steered request in the batch. Every other
        token, padding included, reads row 0."""
        if not spans:
            num_tokens = 0
        else:
            rows = self._token_row_host
            rows[:num_tokens] = 0
            for span, slot in spans:
                pos = np.arange(span.first, span.first + span.count)
                phase = (pos >= span.num_prompt - 1).astype(np.int64) + (pos >= span.num_prompt)
                rows[span.start : span.start + span.count] = 1 + ROWS_PER_SLOT * slot + phase
            self.token_row[:num_tokens].copy_(torch.from_numpy(rows[:num_tokens]), non_blocking=True)
        if self._rows_high > num_tokens:  # rows a longer earlier batch left behind
            self.token_row[num_tokens : self._rows_high].zero_()
        self._rows_high = num_tokens

    def set_acc_rows(self, spans: list[tuple[TokenSpan, ActiveRequest]], num_tokens: int) -> None:
        """`spans`: (the tokens, the request) of each summed monitored request in the batch. A
        token adds to its request's rows only at a position not summed before: its last prompt
        token, or a generated one fed back."""
        rows, weights = self._acc_row_host, self._acc_weight_host
        active = False
        for span, state in spans:
            base = _acc_rows(state.acc_slot).start  # type: ignore[arg-type]
            lo = max(span.num_prompt - 1, state.summed_upto)  # first position still to add
            first = max(span.first, lo)
            end = span.first + span.count
            if first < end:
                if not active:
                    rows[:num_tokens] = 0
                    weights[:num_tokens] = 0.0
                    active = True
                pos = np.arange(first, end)
                at = slice(span.start + first - span.first, span.start + span.count)
                rows[at] = base + (pos >= span.num_prompt)
                weights[at] = 1.0
            state.num_prompt = span.num_prompt
            state.summed_upto = max(state.summed_upto, end)
        if active:
            self.acc_row[:num_tokens].copy_(torch.from_numpy(rows[:num_tokens]), non_blocking=True)
            self.acc_weight[:num_tokens].copy_(torch.from_numpy(weights[:num_tokens]), non_blocking=True)
        else:
            num_tokens = 0
        if self._acc_high > num_tokens:  # weights a longer earlier batch left behind
            self.acc_weight[num_tokens : self._acc_high].zero_()
        self._acc_high = num_tokens
        self.accumulate = active

    def set_gate_tokens(self, tokens: list[tuple[int, int]]) -> None:
        """`(slot, batch index of its last prompt token)` of the gated requests that decide their
        gates in this step; every other slot reads -1 (no decision)."""
        if not tokens and not self._last_tok_set:
            return
        self._last_tok_host[:] = -1
        for slot, token in tokens:
            self._last_tok_host[slot] = token
        self.last_tok.copy_(torch.from_numpy(self._last_tok_host), non_blocking=True)
        self._last_tok_set = bool(tokens)

    def gate_values(self, slot: int, count: int) -> list[bool]:
        """Whether each of the slot's first `count` gates opened (a device-to-host copy)."""
        return [bool(v) for v in self.slot_gate[slot, 1 : 1 + count].tolist()]

    def set_active_layers(
        self,
        steer: set[int],
        capture: set[int],
        cap: set[int] | None = None,
        gated: set[int] | None = None,
        gate_eval: set[int] | None = None,
    ) -> None:
        cap, gated, gate_eval = cap or set(), gated or set(), gate_eval or set()
        for layer in range(self.num_layers + 1):
            self.steer_active[layer] = layer in steer
            self.capture_active[layer] = layer in capture
            self.cap_active[layer] = layer in cap
            self.gated_active[layer] = layer in gated
            self.gate_eval[layer] = layer in gate_eval
