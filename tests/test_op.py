"""The steering op on its own (torch only, no vLLM): each op against a direct computation, and
the path a captured CUDA graph takes (every branch computed over all columns, whatever the host
switches say) against the host-switched path, on the same tables. The CUDA graph itself is
tests/test_cuda_graph.py (GPU only); this checks on any machine that the graph path computes the
same numbers."""

from __future__ import annotations

import pytest
import torch

from personavec_vllm.engine import op
from personavec_vllm.engine.tables import SteeringTables, TokenSpan
from personavec_vllm.library import VectorLibrary
from personavec_vllm.spec import parse_spec
from personavec_vllm.vectors import PersonaVector

L, H, T = 4, 32, 12


@pytest.fixture
def tables():
    op.register_op("CPU")
    gen = torch.Generator().manual_seed(0)
    library = VectorLibrary(None, L, H)
    for name in ("a", "b", "c"):
        library.add(PersonaVector(name, torch.randn(L + 1, H, generator=gen), name, "test", 2))
    return SteeringTables(library, max_tokens=T, max_slots=4, max_columns=4, device="cpu", dtype=torch.float32)


def _admit(tables, req, steer, monitor=None):
    state = tables.admit(req, parse_spec(steer, monitor, tables.library), {req})
    return state


def _flags(tables, states, deciding):
    steer, cap, gated, gates, capture = set(), set(), set(), set(), set()
    for s in states:
        steer |= s.steer_layers
        cap |= s.cap_layers
        gated |= s.gated_layers
        capture |= {layer for _, layer, _ in s.monitor}
    for s in deciding:
        gates |= {g.layer for g in s.gates}
    tables.set_active_layers(steer, capture, cap, gated, gates)


def _run(tables, hidden, residual, graph: bool, monkeypatch):
    monkeypatch.setattr(op, "_capturing_graph", lambda: graph)
    old, op.TABLES = op.TABLES, tables
    try:
        for layer in range(1, L + 1):
            torch.ops.personavec.steer_and_capture(hidden, residual, layer)
    finally:
        op.TABLES = old
    return residual


def test_graph_path_equals_the_switched_path(tables, monkeypatch):
    steer = [
        {"vector": "a", "coeff": 1.5, "layers": [1, 3], "positions": "all"},
        {"vector": "b", "op": "cap", "max": 0.0, "layers": [2]},
        {"vector": "c", "op": "ablate", "layers": [3], "positions": "all"},
        {"vector": "b", "coeff": -2.0, "layers": [4], "when": {"vector": "a", "layer": 2, "above": -100.0}},
        {"vector": "c", "coeff": 3.0, "layers": [4], "when": {"vector": "b", "layer": 3, "below": -100.0}},
    ]
    s1 = _admit(tables, "r1", steer, {"vectors": ["a", "b", "c"], "layers": [2, 3, 4]})
    s2 = _admit(tables, "r2", [{"vector": "a", "coeff": -1.0, "layers": [2]}])
    tables.set_token_rows([(TokenSpan(0, 6, 0, 6), s1.slot), (TokenSpan(6, 4, 0, 4), s2.slot)], 12)
    tables.set_gate_tokens([(s1.slot, 5)])
    _flags(tables, [s1, s2], [s1])
    gen = torch.Generator().manual_seed(1)
    hidden, residual = torch.randn(T, H, generator=gen), torch.randn(T, H, generator=gen)
    switched = _run(tables, hidden, residual.clone(), False, monkeypatch)
    proj, before, gates = tables.proj.clone(), tables.proj_before.clone(), tables.slot_gate.clone()
    tables.slot_gate[:, 1:] = 0.0  # as before the first pass
    graphed = _run(tables, hidden, residual.clone(), True, monkeypatch)
    torch.testing.assert_close(graphed, switched)
    k = tables.active_columns
    for layer in (2, 3, 4):  # the captured layers
        torch.testing.assert_close(tables.proj[layer, :T, :k], proj[layer, :T, :k])
        torch.testing.assert_close(tables.proj_before[layer, :T, :k], before[layer, :T, :k])
    torch.testing.assert_close(tables.slot_gate, gates)
    assert tables.gate_values(s1.slot, 2) == [True, False]
    assert (graphed - residual).abs().sum() > 0  # the ops did something


def test_each_op_against_a_direct_computation(tables, monkeypatch):
    col = {n: tables.column_of(n, tables.library.version(n)) for n in ("a", "b")}
    unit = tables.unit[2, col["a"]]
    s = _admit(
        tables,
        "r",
        [
            {"vector": "a", "coeff": 2.0, "layers": [2], "positions": "all"},
            {"vector": "a", "op": "cap", "min": -0.5, "max": 0.5, "layers": [2], "positions": "all"},
        ],
        {"vectors": ["a"], "layers": [2]},
    )
    tables.set_token_rows([(TokenSpan(0, T, 0, T), s.slot)], T)
    _flags(tables, [s], [])
    gen = torch.Generator().manual_seed(2)
    hidden, residual = torch.randn(T, H, generator=gen), torch.randn(T, H, generator=gen)
    out = _run(tables, hidden, residual.clone(), False, monkeypatch)
    added = hidden + residual + 2.0 * tables.lib[2, col["a"]]
    p = added @ unit
    want = added + (p.clamp(-0.5, 0.5) - p)[:, None] * unit - hidden
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(tables.proj[2, :T, col["a"]], p.clamp(-0.5, 0.5))
    torch.testing.assert_close(tables.proj_before[2, :T, col["a"]], (hidden + residual) @ unit)
    tables.release("r")
    assert tables.coef.abs().sum() == 0 and torch.isinf(tables.lo[:, 1:]).all() and tables.gate_local.abs().sum() == 0


def test_summed_monitoring_adds_each_position_once(tables, monkeypatch):
    """Sums on the device equal the per-token values summed on the host: over chunked prefill,
    decode steps, and a recompute after preemption (positions seen before add nothing), for a
    monitor-only request and one that also steers at the monitored layer (`before` too)."""
    import dataclasses

    monitor = {"vectors": ["a", "b"], "layers": [2]}
    plain = dataclasses.replace(parse_spec(None, monitor, tables.library), summed=True)
    steered = dataclasses.replace(
        parse_spec([{"vector": "c", "coeff": 3.0, "layers": [2], "positions": "all"}], monitor, tables.library),
        summed=True,
    )
    states = [tables.admit(key, spec, {"r1", "r2"}) for key, spec in (("r1", plain), ("r2", steered))]
    num_prompt = 6
    # per step: (first position, count) of r1 and of r2, batched one after the other
    # chunked prefill, decode, then a recompute after preemption (0..5 and 6..8: only 8 is new)
    steps = [(0, 4), (4, 2), (6, 1), (7, 1), (0, 6), (6, 3), (9, 1)]
    expected = {(s.spec.request_key, c, k): [] for s in states for c in ("a", "b") for k in ("after", "before")}
    gen = torch.Generator().manual_seed(1)
    for graph in (False, True):
        for state in states:  # a fresh start for the second pass (the graph path)
            state.summed_upto = 0
        tables.sums.zero_()
        tables.sums_before.zero_()
        for lst in expected.values():
            lst.clear()
        for first, count in steps:
            spans = [(TokenSpan(i * count, count, first, num_prompt), state) for i, state in enumerate(states)]
            seen = [state.summed_upto for state in states]
            n = 2 * count
            tables.set_token_rows([(spans[1][0], states[1].slot)], n)
            tables.set_acc_rows(spans, n)
            tables.set_active_layers({2}, {2})
            hidden, residual = torch.randn(n, H, generator=gen), torch.randn(n, H, generator=gen)
            _run(tables, hidden, residual, graph, monkeypatch)
            for (span, state), done in zip(spans, seen):
                for pos in range(max(first, num_prompt - 1, done), first + count):
                    t = span.start + pos - first
                    for vector, layer, col in state.monitor:
                        after, before = tables.proj[layer, t, col].item(), tables.proj_before[layer, t, col].item()
                        expected[(state.spec.request_key, vector, "after")].append(after)
                        expected[(state.spec.request_key, vector, "before")].append(before)
        for state in states:
            sums = tables.read_sums(state)
            for vector in ("a", "b"):
                after = expected[(state.spec.request_key, vector, "after")]
                assert len(after) == 10 - (num_prompt - 1)  # last prompt token + 4 generated, once each
                last, total, count = sums[(vector, 2)]
                assert count == 4 and last == pytest.approx(after[0], abs=1e-5)
                assert total == pytest.approx(sum(after[1:]), abs=1e-4)
                if state.spec.steer:
                    before = expected[(state.spec.request_key, vector, "before")]
                    last_b, total_b, _ = sums[(vector, -2)]
                    assert last_b == pytest.approx(before[0], abs=1e-5) and total_b == pytest.approx(
                        sum(before[1:]), abs=1e-4
                    )
                    assert abs(total_b - total) > 1e-3  # steering at that layer moved it
                else:
                    assert (vector, -2) not in sums
    slots = [s.acc_slot for s in states]
    for key in ("r1", "r2"):
        tables.release(key)
    assert sorted(slots) == sorted(tables._free_acc_slots[-2:])
    assert not tables.sums.any() and not tables.sums_before.any()
