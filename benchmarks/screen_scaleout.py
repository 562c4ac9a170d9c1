"""Screening throughput: the local backend against Ray Data with 1 and 2 actors, side by side.

    .venv/bin/python benchmarks/screen_scaleout.py [--samples 64] [--passes 2] [--max-tokens 128]

Runs `personavec screen` on the first N samples of `examples/results/evil_train.jsonl` with the
shipped vectors and the embedded model, each configuration once per pass (interleaved, so that
background load hits all alike), from scratch (`--restart`). Reports wall time including engine
start-up (what a user waits for) and checks that every run scored the same (max |dP| difference).
Writes benchmarks/results/screen_scaleout/{results.json,results.md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "results" / "evil_train.jsonl"
CONFIGS = {
    "local": [],
    "ray-1-actor": ["--backend", "ray", "--ray-actors", "1"],
    "ray-2-actors": ["--backend", "ray", "--ray-actors", "2"],
}


def run(name: str, extra: list[str], data: Path, out: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "personavec_vllm.cli",
        "screen",
        str(data),
        "--out",
        str(out),
        "--restart",
        "--quiet",
        "--max-tokens",
        str(args.max_tokens),
        "--batch-size",
        str(args.batch_size),
        *extra,
    ]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, start_new_session=True)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    return {"config": name, "wall_s": wall, "samples_per_s": args.samples / wall, "scores": scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "screen_scaleout"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data.jsonl"
    data.write_text("".join(DATA.read_text().splitlines(keepends=True)[: args.samples]))
    runs = []
    for p in range(args.passes):
        for name, extra in CONFIGS.items():
            print(f"pass {p + 1}/{args.passes}: {name} ...", flush=True)
            result = run(name, extra, data, out / "runs" / name, args)
            print(f"  {result['wall_s']:.1f} s, {result['samples_per_s']:.3f} samples/s", flush=True)
            runs.append({**result, "pass": p + 1})
    write_results(runs, args, out)


def largest_dp_difference(runs: list[dict]) -> float:
    """Largest |dP| difference of any sample and vector between any run and the first."""
    reference = {r["key"]: r for r in runs[0]["scores"]}
    worst = 0.0
    for r in runs:
        for rec in r["scores"]:
            for column, value in rec.items():
                if column.startswith("dP."):
                    worst = max(worst, abs(value - reference[rec["key"]][column]))
    return worst


def write_results(runs: list[dict], args: argparse.Namespace, out: Path) -> None:
    worst = largest_dp_difference([r for r in runs if "scores" in r])
    summary = {}
    for name in CONFIGS:
        walls = [r["wall_s"] for r in runs if r["config"] == name]
        summary[name] = {
            "wall_s": walls,
            "median_wall_s": statistics.median(walls),
            "median_samples_per_s": args.samples / statistics.median(walls),
        }
    local = summary["local"]["median_wall_s"]
    for name in CONFIGS:
        summary[name]["speedup_vs_local"] = local / summary[name]["median_wall_s"]
    result = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": f"{__import__('os').cpu_count()} CPU cores",
        "max_abs_dP_difference_between_runs": worst,
        "summary": summary,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Screening throughput ({args.samples} samples, max {args.max_tokens} tokens, batch {args.batch_size}, "
        f"{args.passes} passes, {result['machine']})",
        "",
        "| backend | wall s (each pass) | median samples/s | vs local |",
        "|---|---|---|---|",
    ]
    for name, row in summary.items():
        walls = ", ".join(f"{w:.1f}" for w in row["wall_s"])
        lines.append(f"| {name} | {walls} | {row['median_samples_per_s']:.3f} | {row['speedup_vs_local']:.2f}x |")
    lines += [
        "",
        f"Largest |dP| difference between any two runs: {worst:.3g}. Wall time is the whole command "
        "(Python start, HF model, vLLM engine start-up: about 45 s of each run; Ray's start and "
        "actor placement in the Ray rows), so the rates understate long runs.",
        "",
    ]
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
