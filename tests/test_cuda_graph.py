"""The steering op inside a captured CUDA graph follows table updates made after capture.

vLLM replays captured graphs for decode batches; the op must read only persistent buffers
(updated in place), so a graph captured once steers each later batch by its own tables: adds,
caps, ablations and conditional terms whose gates are decided on the device during replay. Each
replay is compared with the op run eagerly (host-switched path) on the same inputs and tables.
Needs a CUDA device and torch only (no vLLM): skipped elsewhere. Run on a GPU machine with
`python -m pytest tests/test_cuda_graph.py`; tests/test_op.py checks the graph path on any machine.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

L, H, T = 4, 64, 16

STEPS = [
    [[{"vector": "a", "coeff": 2.0, "layers": [2], "positions": "all"}], None],
    [
        [
            {"vector": "b", "coeff": -1.5, "layers": [2], "positions": "response"},
            {"vector": "a", "op": "cap", "max": 0.0, "layers": [3], "positions": "all"},
        ],
        None,
    ],
    [
        [
            {"vector": "a", "op": "ablate", "layers": [2], "positions": "all"},
            {"vector": "b", "coeff": 3.0, "layers": [4], "when": {"vector": "a", "layer": 3, "above": -1e6}},
        ],
        5,
    ],
    [None, None],  # plain: nothing may change
]


def test_captured_graph_follows_table_updates():
    from personavec_vllm.engine import op
    from personavec_vllm.engine.tables import SteeringTables, TokenSpan
    from personavec_vllm.library import VectorLibrary
    from personavec_vllm.spec import parse_spec
    from personavec_vllm.vectors import PersonaVector

    op.register_op("CUDA")
    gen = torch.Generator().manual_seed(0)
    library = VectorLibrary(None, L, H)
    for name in ("a", "b"):
        library.add(PersonaVector(name, torch.randn(L + 1, H, generator=gen), name, "test", 2))
    tables = SteeringTables(library, max_tokens=T, max_slots=4, max_columns=4, device="cuda", dtype=torch.float32)
    hidden = torch.zeros(T, H, device="cuda")
    residual = torch.zeros(T, H, device="cuda")

    def forward():
        for layer in range(1, L + 1):
            torch.ops.personavec.steer_and_capture(hidden, residual, layer)

    old, op.TABLES = op.TABLES, tables
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside capture, as PyTorch requires
            forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward()

        changes = []
        for step, (steer, last) in enumerate(STEPS):
            for req in list(tables.requests):
                tables.release(req)
            spans, gate_tokens, states = [], [], []
            if steer is not None:
                state = tables.admit(f"r{step}", parse_spec(steer, None, library), {f"r{step}"})
                states.append(state)
                spans = [(TokenSpan(3, 8, 0, 6), state.slot)]  # tokens 3..10: positions 0..7 of a 6-token prompt
                if last is not None:
                    gate_tokens = [(state.slot, 3 + last)]
            tables.set_token_rows(spans, 12)
            tables.set_gate_tokens(gate_tokens)
            x = torch.randn(T, H, generator=gen).cuda()
            r = torch.randn(T, H, generator=gen).cuda()
            hidden.copy_(x)
            residual.copy_(r)
            graph.replay()
            torch.cuda.synchronize()
            replayed, replayed_gates = residual.clone(), tables.slot_gate.clone()
            # the same step eagerly, through the host switches
            tables.slot_gate[:, 1:] = 0.0
            steer_l, cap_l, gated_l = set(), set(), set()
            for s in states:
                steer_l |= s.steer_layers
                cap_l |= s.cap_layers
                gated_l |= s.gated_layers
            gates_l = {g.layer for s in states for g in s.gates} if gate_tokens else set()
            tables.set_active_layers(steer_l, set(), cap_l, gated_l, gates_l)
            hidden.copy_(x)
            residual.copy_(r)
            forward()
            torch.cuda.synchronize()
            torch.testing.assert_close(replayed, residual)
            torch.testing.assert_close(replayed_gates, tables.slot_gate)
            tables.set_active_layers(set(), set())
            changes.append((replayed - r).abs().sum().item())
        assert all(c > 0 for c in changes[:3]) and changes[3] == 0  # steered each time, then plain
    finally:
        op.TABLES = old
