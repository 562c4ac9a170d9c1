"""What the steering op costs next to the matmuls of the decoder layer it follows, at a real
model's size (default: Llama-2-7B's hidden 4096, intermediate 11008, a batch of 256 tokens).

Torch only (no vLLM): runs on CPU, and on CUDA when a GPU is there (timed with CUDA events
inside a captured graph, as vLLM replays decode batches). Loads: the op idle (no persona request:
the host switch returns at once), every token steered with a distinct spec at this layer, every
token monitored on 8 vectors, and all of them at once. Reported per load: the op's time, the
layer's matmuls (q, k, v, o, gate, up, down), and their ratio.

    python -m personavec_vllm.bench.op_micro                      # CPU here, CUDA where available
    python -m personavec_vllm.bench.op_micro --hidden 576 --intermediate 1536 --tokens 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch


def _timer(device: torch.device, fn: Callable[[], None], repeats: int, graph: bool) -> list[float]:
    """Seconds per call of `fn`, `repeats` samples (each a median-friendly single call)."""
    if device.type != "cuda":
        fn()
        out = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return out
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    run = fn
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end) / 1000.0)
    return out


def measure(hidden: int, intermediate: int, tokens: int, vectors: int, repeats: int, device: str) -> dict:
    from personavec_vllm.engine import op
    from personavec_vllm.engine.tables import SteeringTables, TokenSpan
    from personavec_vllm.library import VectorLibrary
    from personavec_vllm.spec import parse_spec
    from personavec_vllm.vectors import PersonaVector

    dev = torch.device(device)
    op.register_op("CUDA" if dev.type == "cuda" else "CPU")
    layers, layer = 4, 2
    gen = torch.Generator().manual_seed(0)
    library = VectorLibrary(None, layers, hidden)
    names = [f"v{i}" for i in range(vectors)]
    for name in names:
        library.add(PersonaVector(name, torch.randn(layers + 1, hidden, generator=gen), name, "micro", layer))
    tables = SteeringTables(
        library, max_tokens=tokens, max_slots=2 * tokens, max_columns=2 * vectors, device=dev, dtype=torch.float32
    )
    h = torch.randn(tokens, hidden, generator=gen).to(dev)
    r = torch.randn(tokens, hidden, generator=gen).to(dev)
    weights = [
        torch.randn(hidden, n, generator=gen).to(dev) / hidden**0.5
        for n in (hidden, hidden, hidden, hidden, intermediate, intermediate)
    ] + [torch.randn(intermediate, hidden, generator=gen).to(dev) / intermediate**0.5]

    def matmuls() -> None:
        x = h
        for w in weights[:4]:
            x = h @ w
        g, u = h @ weights[4], h @ weights[5]
        (torch.nn.functional.silu(g) * u) @ weights[6]
        del x

    def op_call() -> None:
        torch.ops.personavec.steer_and_capture(h, r, layer)

    # one request per token: a decode batch of `tokens` sequences
    spans: list[tuple[TokenSpan, int]] = []
    for i in range(tokens):
        spec = parse_spec(
            [{"vector": names[i % vectors], "coeff": 0.5 + 0.01 * i, "layers": [layer], "positions": "all"}],
            {"vectors": names, "layers": [layer]},
            library,
        )
        state = tables.admit(f"r{i}", spec, {f"r{i}" for i in range(tokens)})
        assert state is not None and state.slot is not None
        spans.append((TokenSpan(i, 1, 100, 50), state.slot))
    tables.set_token_rows(spans, tokens)
    loads = {
        "idle (no persona request)": (set(), set()),
        "every token steered, distinct specs": ({layer}, set()),
        f"every token monitoring {vectors} vectors": (set(), {layer}),
        "steered and monitored": ({layer}, {layer}),
    }
    old, op.TABLES = op.TABLES, tables
    loads_out: dict[str, dict[str, float]] = {}
    results: dict = {"device": str(dev), "hidden": hidden, "intermediate": intermediate, "tokens": tokens}
    results["loads"] = loads_out
    try:
        graph = dev.type == "cuda"
        layer_s = statistics.median(_timer(dev, matmuls, repeats, graph))
        results["layer_matmuls_s"] = layer_s
        for name, (steer, capture) in loads.items():
            tables.set_active_layers(steer, capture)
            # a captured graph always runs the full op (the host switches are not read in replay)
            samples = _timer(dev, op_call, repeats, graph and name != "idle (no persona request)")
            loads_out[name] = {
                "op_s": statistics.median(samples),
                "op_over_layer_matmuls": statistics.median(samples) / layer_s,
            }
    finally:
        op.TABLES = old
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m personavec_vllm.bench.op_micro", description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--tokens", type=int, default=256, help="batch tokens (decode: one per sequence)")
    p.add_argument("--vectors", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    res = measure(a.hidden, a.intermediate, a.tokens, a.vectors, a.repeats, a.device)
    print(
        f"{res['device']}: hidden {a.hidden}, intermediate {a.intermediate}, {a.tokens} tokens; "
        f"one decoder layer's matmuls {res['layer_matmuls_s'] * 1e3:.3f} ms",
        file=sys.stderr,
    )
    for name, row in res["loads"].items():
        print(f"  {name:<40} op {row['op_s'] * 1e6:9.1f} us  = {row['op_over_layer_matmuls']:.4f} x", file=sys.stderr)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
