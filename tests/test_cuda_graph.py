"""The steering op inside a captured CUDA graph follows table updates made after capture.

vLLM replays captured graphs for decode batches; the op must read only persistent buffers
(updated in place), so a graph captured once steers each later batch by its own tables. Needs a
CUDA device and torch only (no vLLM): skipped elsewhere. Run on a GPU machine with
`python -m pytest tests/test_cuda_graph.py`.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

L, H, T = 4, 64, 16


def _eager_reference(tables, hidden, residual, layer):
    rows = tables.token_row[: hidden.shape[0]]
    steered = residual + tables.coef[layer][rows] @ tables.lib[layer]
    proj = (hidden + steered) @ tables.unit[layer].T
    return steered, proj


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
    old, op.TABLES = op.TABLES, tables
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside capture, as PyTorch requires
            torch.ops.personavec.steer_and_capture(hidden, residual, 2)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            torch.ops.personavec.steer_and_capture(hidden, residual, 2)

        specs = [
            [{"vector": "a", "coeff": 2.0, "layers": [2], "positions": "all"}],
            [
                {"vector": "b", "coeff": -1.5, "layers": [2], "positions": "response"},
                {"vector": "a", "coeff": 0.5, "layers": [2], "positions": "prompt"},
            ],
        ]
        seen = []
        for step, steer in enumerate(specs + [None]):
            for req in list(tables.requests):
                tables.release(req)
            spans = []
            if steer is not None:
                state = tables.admit(f"r{step}", parse_spec(steer, None, library), {f"r{step}"})
                spans = [(TokenSpan(3, 8, 0, 6), state.slot)]  # tokens 3..10: positions 0..7 of a 6-token prompt
            tables.set_token_rows(spans, 12)
            x = torch.randn(T, H, generator=gen).cuda()
            r = torch.randn(T, H, generator=gen).cuda()
            hidden.copy_(x)
            residual.copy_(r)
            graph.replay()
            torch.cuda.synchronize()
            want_residual, want_proj = _eager_reference(tables, x, r, 2)
            torch.testing.assert_close(residual, want_residual)
            torch.testing.assert_close(tables.proj[2, :T], want_proj)
            seen.append((residual - r).abs().sum().item())
        assert seen[0] > 0 and seen[1] > 0 and seen[2] == 0  # steered, steered differently, plain
    finally:
        op.TABLES = old
