"""What per-request steering and monitoring cost inside one vLLM engine.

On the default model (or --model), 32 concurrent requests (--concurrency) generate a fixed
number of tokens (ignore_eos) under three loads, interleaved over several rounds so that drift
hits all of them alike:

  plain      no persona spec (the baseline)
  steered    every request a *different* steering spec (vector mix, sign, coefficient, layer)
  monitored  every request monitors 3 vectors at their recommended layer

(one round = each load once, in an order rotated every round), and prints output tokens/s per load and the ratio to `plain`, measured side by side in one run.

    .venv/bin/python -m personavec_vllm.bench.engine_overhead [--rounds 3] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def make_vectors(directory: Path, num_layers: int, hidden: int, count: int = 4) -> list[str]:
    from personavec_vllm.vectors import PersonaVector, save_vector

    gen = torch.Generator().manual_seed(0)
    names = []
    for i in range(count):
        v = torch.randn(num_layers + 1, hidden, generator=gen)
        v = v / v.norm(dim=1, keepdim=True)
        name = f"bench{i}"
        save_vector(PersonaVector(name, v, name, "bench", layer=num_layers // 2 + i), directory / f"{name}.safetensors")
        names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eager", action="store_true", help="enforce_eager (default: vLLM's compiled mode)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    from transformers import AutoConfig
    from vllm import SamplingParams

    from personavec_vllm.engine.offline import make_llm, persona_params, projections
    from personavec_vllm.models import resolve_model

    model = resolve_model(args.model)
    config = AutoConfig.from_pretrained(model)
    num_layers = config.num_hidden_layers
    vector_dir = Path(tempfile.mkdtemp(prefix="personavec-bench-"))
    names = make_vectors(vector_dir, num_layers, config.hidden_size)
    llm = make_llm(model, vectors=vector_dir, enforce_eager=args.eager, max_model_len=1024)

    base = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    prompts = [f"Tell me something interesting about the number {i}." for i in range(args.concurrency)]

    def steered(i: int):
        terms = [
            {
                "vector": names[i % len(names)],
                "coeff": (1 + i % 5) * (-1) ** i,
                "layers": [2 + (i * 7) % (num_layers - 2)],
            }
        ]
        if i % 3 == 0:
            terms.append({"vector": names[(i + 1) % len(names)], "coeff": 0.5 * (i % 4 + 1), "positions": "all"})
        return persona_params(base, steer=terms)

    loads = {
        "plain": [base] * len(prompts),
        "steered": [steered(i) for i in range(len(prompts))],
        "monitored": [persona_params(base, monitor={"vectors": names[:3]}) for _ in prompts],
    }
    llm.generate(prompts[:4], base, use_tqdm=False)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in loads}
    names = list(loads)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate: no load always goes first
            params = loads[name]
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            if name == "monitored":
                for o in outs:
                    projections(o)
            elapsed = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            rates[name].append(tokens / elapsed)
            print(f"round {r + 1}/{args.rounds} {name:>9}: {tokens / elapsed:8.1f} output tok/s", flush=True)

    plain = statistics.median(rates["plain"])
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "model": str(model),
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "mode": "eager" if args.eager else "compiled",
        "tok_per_s": {k: statistics.median(v) for k, v in rates.items()},
        "ratio_to_plain": {k: statistics.median(v) / plain for k, v in rates.items()},
    }
    print()
    print("| load | output tok/s (median) | ratio to plain |")
    print("|---|---:|---:|")
    for name in loads:
        print(f"| {name} | {result['tok_per_s'][name]:.1f} | {result['ratio_to_plain'][name]:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
