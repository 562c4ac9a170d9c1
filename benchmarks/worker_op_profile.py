"""Where the vLLM worker's CPU goes, op by op: plain vLLM against personavec, one server at a time.

Each server (plain vLLM, then personavec unless --servers says otherwise) starts with vLLM's torch
profiler on (`--profiler-config`) and Inductor's kernel profiling (every fused kernel of the
compiled graph becomes a profiler event; the compile cache is bypassed so the kernels are built
with it), takes an untimed warm-up level, then one profiled level of --requests chat completions at
--concurrency (ignore_eos). vLLM writes the worker's table of self CPU time per op; this script
prints the two side by side, per output token.

    .venv/bin/python benchmarks/worker_op_profile.py --out /tmp/op_profile
    .venv/bin/python benchmarks/worker_op_profile.py --out /tmp/op_profile --compare-only

The servers run one after the other, so a difference in the totals carries each start's own bias
(a few per cent, see benchmarks/README.md); what this is for is attribution: how much of the
worker's time is our op's own, and whether the kernels around it cost more.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import random
import re
import time
import urllib.request
from pathlib import Path

WORDS = "apple river stone cloud mirror garden violin engine forest candle harbor planet silver window thunder meadow"
UNITS_MS = {"s": 1e3, "ms": 1.0, "us": 1e-3, "ns": 1e-6}


def _post(url: str, body: dict, timeout: float = 600) -> bytes:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read()


def _level(base: str, seed: int, requests: int, concurrency: int, max_tokens: int) -> int:
    """Output tokens of `requests` chat completions, `concurrency` at a time (fresh words: no prefix hits)."""
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS.split()) for _ in range(40)) + ". Tell a story." for _ in range(requests)]

    def one(prompt: str) -> int:
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0,
        }
        return json.loads(_post(base + "/v1/chat/completions", body))["usage"]["completion_tokens"]

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        return sum(pool.map(one, prompts))


def profile_server(which: str, out: Path, args: argparse.Namespace) -> None:
    from personavec_vllm import config
    from personavec_vllm.cli.serve import default_vllm_plugins, plain_vllm_plugins
    from personavec_vllm.models import resolve_model
    from personavec_vllm.testing import free_port, server_process

    folder = out / which
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE="1")
    env["VLLM_DISABLE_COMPILE_CACHE"] = "1"  # the kernels must be compiled with profiling on
    if which == "plain":
        env["VLLM_PLUGINS"] = plain_vllm_plugins()
    else:
        env["VLLM_PLUGINS"] = default_vllm_plugins()
        env[config.STEERING] = "off" if which == "plugin_steering_off" else "on"
    profiler = {"profiler": "torch", "torch_profiler_dir": str(folder), "torch_profiler_with_stack": False}
    argv = ["--model", str(resolve_model(args.model)), "--served-model-name", "m", "--dtype", "float32"]
    argv += ["--max-model-len", "512", "--seed", "0", "--disable-uvicorn-access-log"]
    argv += ["--profiler-config", json.dumps(profiler)]
    t = time.monotonic()
    with server_process(argv, port=free_port(), log_path=folder / "server.log", env=env, startup_timeout=600) as proc:
        print(f"[{which}] up after {time.monotonic() - t:.0f} s; warm-up level", flush=True)
        _level(proc.url, 1000, args.requests, args.concurrency, args.max_tokens)
        _post(proc.url + "/start_profile", {})
        t0 = time.perf_counter()
        tokens = _level(proc.url, 0, args.requests, args.concurrency, args.max_tokens)
        wall = time.perf_counter() - t0
        _post(proc.url + "/stop_profile", {})
        print(f"[{which}] profiled level: {tokens} tokens in {wall:.1f} s ({tokens / wall:.1f} tok/s)", flush=True)
        (folder / "tokens.json").write_text(json.dumps({"tokens": tokens, "wall_s": wall}))
        deadline = time.monotonic() + 600
        while not glob.glob(str(folder / "rank0*profiler_out*")) and time.monotonic() < deadline:
            time.sleep(2)  # the worker writes its table after the trace


def worker_table(folder: Path) -> tuple[dict[str, tuple[float, int]], float, int]:
    """{op: (self CPU ms, calls)}, the self CPU total in ms and the output tokens of one server."""
    rows: dict[str, tuple[float, int]] = {}
    total = float("nan")

    def ms(text: str) -> float:
        m = re.fullmatch(r"([\d.]+)(s|ms|us|ns)", text.strip())
        assert m, text
        return float(m[1]) * UNITS_MS[m[2]]

    for path in glob.glob(str(folder / "rank0*profiler_out*")):
        for line in Path(path).read_text().splitlines():
            parts = re.split(r"\s{2,}", line.strip())
            if len(parts) >= 7 and parts[-1].isdigit():
                rows[" ".join(parts[:-6])] = (ms(parts[-5]), int(parts[-1]))
            if line.startswith("Self CPU time total:"):
                total = ms(line.split(":", 1)[1])
    tokens = json.loads((folder / "tokens.json").read_text())["tokens"]
    return rows, total, tokens


def compare(out: Path, a: str, b: str, top: int = 30) -> str:
    ra, ta, ka = worker_table(out / a)
    rb, tb, kb = worker_table(out / b)
    lines = [
        f"worker self CPU: {a} {ta / ka:.3f} ms/token, {b} {tb / kb:.3f} ms/token (ratio {tb / kb / (ta / ka):.3f})",
        "",
        f"| op (self CPU) | {a} ms/token | {b} ms/token | {b} - {a} | calls {a} | calls {b} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    names = sorted(set(ra) | set(rb), key=lambda n: -max(ra.get(n, (0, 0))[0] / ka, rb.get(n, (0, 0))[0] / kb))
    for name in names[:top]:
        (x, cx), (y, cy) = ra.get(name, (0.0, 0)), rb.get(name, (0.0, 0))
        lines.append(f"| `{name[:60]}` | {x / ka:.4f} | {y / kb:.4f} | {y / kb - x / ka:+.4f} | {cx} | {cy} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=None, help="HF folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--servers", default="plain,plugin", help="two of plain, plugin, plugin_steering_off")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--compare-only", action="store_true", help="only print the tables of an earlier run")
    args = parser.parse_args()
    servers = args.servers.split(",")
    if not args.compare_only:
        for which in servers:
            profile_server(which, args.out, args)
    report = compare(args.out, servers[0], servers[1])
    (args.out / "comparison.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
