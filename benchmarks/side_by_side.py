"""Plain vLLM and personavec servers side by side, the same load on each in turn, with each
server process's CPU use and minor page faults per measurement (from /proc). The instrument
behind the "faster than stock vLLM" explanation in benchmarks/README.md.

    .venv/bin/python benchmarks/side_by_side.py OUT_DIR [--stream] [--chat] [--eager] [--passes 3]

Servers: `plain` (VLLM_PLUGINS without personavec), `plugin` (personavec), `plain-malloc` (plain
with glibc's mmap and trim thresholds fixed, so freed activation buffers are not returned to the
kernel after every step). Load: 32 requests of 64 output tokens at concurrency 32, the
benchmark's seeded prompt lengths, fresh words per measurement, rotated order per pass.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path

from transformers import AutoTokenizer

from personavec_vllm.bench.client import run_level
from personavec_vllm.bench.profile import proc_stat
from personavec_vllm.bench.workload import LengthRange, WorkloadConfig, make_workload, with_fresh_words, word_vocab
from personavec_vllm.cli.serve import default_vllm_plugins, plain_vllm_plugins
from personavec_vllm.data import vectors_dir
from personavec_vllm.models import DEFAULT_MODEL_NAME, resolve_model
from personavec_vllm.testing import free_port, server_process


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--chat", action="store_true")
    p.add_argument("--eager", action="store_true")
    p.add_argument("--passes", type=int, default=3)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = str(resolve_model(None))
    tok = AutoTokenizer.from_pretrained(model)
    vocab = word_vocab(tok)
    work = make_workload(WorkloadConfig(0, LengthRange(32, 512), 0.6, LengthRange(64, 64)), 32, vocab)
    args = ["--model", model, "--served-model-name", "m", "--vectors", str(vectors_dir(DEFAULT_MODEL_NAME))]
    args += ["--dtype", "float32", "--max-model-len", "592", "--seed", "0", "--disable-uvicorn-access-log"]
    args += ["--max-num-seqs", "64", "--no-enable-prefix-caching"] + (["--enforce-eager"] if a.eager else [])
    protocol = {"api": "chat" if a.chat else "completions", "stream": a.stream}
    others = plain_vllm_plugins()
    servers = {
        "plain": {"VLLM_PLUGINS": others},
        "plugin": {"VLLM_PLUGINS": default_vllm_plugins()},
        "plain-malloc": {
            "VLLM_PLUGINS": others,
            "MALLOC_MMAP_THRESHOLD_": str(256 * 2**20),
            "MALLOC_TRIM_THRESHOLD_": str(1024 * 2**20),
        },
    }
    with contextlib.ExitStack() as stack:
        running = {}
        for name, extra in servers.items():
            env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **extra}
            running[name] = stack.enter_context(
                server_process(args, port=free_port(), log_path=out / f"{name}.log", env=env, startup_timeout=1200)
            )
            print(name, "up", flush=True)
        for server in running.values():  # warm-up
            run_level(server.url, "m", "warm-up", 32, work, lambda i: {}, lambda p, i: None, **protocol)
        names = list(running)
        for pass_index in range(a.passes):
            shift = pass_index % len(names)
            for name in names[shift:] + names[:shift]:
                server = running[name]
                reqs = with_fresh_words(work, vocab, 100 * pass_index + len(name), lambda ids: str(tok.decode(ids)))
                before = {pid: proc_stat(pid) for pid in server.group_pids()}
                t = time.perf_counter()
                res = run_level(server.url, "m", name, 32, reqs, lambda i: {}, lambda p, i: None, **protocol)
                wall = time.perf_counter() - t
                usage = []
                for pid, start in before.items():
                    with contextlib.suppress(OSError):
                        end = proc_stat(pid)
                        if start is None or end is None:
                            continue
                        title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()[-20:]
                        cores = (end.cpu_s - start.cpu_s) / wall
                        usage.append(f"{title}: {cores:.2f} cores, {end.minor_faults - start.minor_faults} faults")
                tokens = sum(r.output_tokens for r in res)
                print(f"{name} pass {pass_index}: {tokens / wall:.1f} tok/s; " + "; ".join(usage), flush=True)


if __name__ == "__main__":
    main()
