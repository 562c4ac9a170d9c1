"""What per-request steering and monitoring cost inside one vLLM engine, paired round by round.

Ratios between two servers (`personavec bench`) carry the few per cent that each server process
keeps from its start; inside one engine there is no such bias. This runs the serving benchmark's
requests (its prompt and output lengths, its scenario specs, the served vector library) as loads
of one `vllm.LLM` (prefix caching on, compiled mode):

  unsteered        no persona fields (the baseline)
  unsteered_again  the same again: the instrument's own null, whose ratio must come out at 1
  steer_distinct   scenario 4: every request its own steering spec, all 30 layers in use
  monitor3         scenario 5b: every request monitors 3 vectors

Each round runs every load once (all its requests at once), in an order rotated every round;
every load of every round draws its own words, so no load reuses another's prefill from the
prefix cache. A load's ratio in a round is its output tok/s over that round's `unsteered`; the
table gives the mean over rounds with a 95 % bootstrap interval, the median and the range, and
the same for output tokens per CPU second of the whole engine (all processes of this group).
The persona loads are also divided by the geometric mean of the round's two unsteered loads.

Every round is its own paired unit, so `--pool` summarizes the rounds of several earlier runs
(same model, vectors, workload, concurrency and mode) as one, without starting an engine.

    .venv/bin/python -m personavec_vllm.bench.engine_overhead [--rounds 12] [--out DIR]
    .venv/bin/python -m personavec_vllm.bench.engine_overhead --pool DIR1 DIR2 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

LOADS = ("unsteered", "unsteered_again", "steer_distinct", "monitor3")
BASELINE = "unsteered"
PERSONA_LOADS = ("steer_distinct", "monitor3")


@dataclass(frozen=True)
class PairedRatio:
    """Per-round ratios of one load to the baseline: mean with a 95 % bootstrap interval (over
    rounds), median and range."""

    mean: float
    ci_low: float
    ci_high: float
    median: float
    low: float
    high: float
    rounds: int


def paired_ratio(ratios: list[float], reps: int = 10_000, seed: int = 0) -> PairedRatio:
    import numpy as np

    values = np.asarray(ratios, dtype=float)
    means = np.random.default_rng(seed).choice(values, size=(reps, len(values))).mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return PairedRatio(
        float(values.mean()),
        float(lo),
        float(hi),
        float(np.median(values)),
        float(values.min()),
        float(values.max()),
        len(values),
    )


def group_cpu_seconds() -> float:
    """CPU seconds so far of every live process in this process group (this script, the engine
    core and its worker)."""
    from personavec_vllm.bench.profile import proc_stat
    from personavec_vllm.testing import process_group_pids

    stats = (proc_stat(pid) for pid in process_group_pids(os.getpgid(0)))
    return sum(stat.cpu_s for stat in stats if stat)


def rotated(loads: tuple[str, ...], r: int) -> list[str]:
    """Round `r`'s order: no load always goes first or always follows the same one."""
    k = r % len(loads)
    return list(loads[k:] + loads[:k])


def table(summary: dict[str, dict[str, PairedRatio]], rates: dict[str, list[float]]) -> str:
    from personavec_vllm.bench.stats import median

    def interval(r: PairedRatio) -> str:
        return f"{r.mean:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]"

    lines = [
        "| load | output tok/s (median) | tok/s ratio: mean [95 % CI] | median (range) "
        "| over both unsteered: mean [95 % CI] | tokens per CPU s ratio: mean [95 % CI] | median (range) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for load in LOADS:
        t, c = summary["tok_per_s"][load], summary["tok_per_cpu_s"][load]
        both = summary["tok_per_s_vs_both_unsteered"].get(load)
        lines.append(
            f"| {load} | {median(rates[load]):.1f} | {interval(t)} | {t.median:.3f} ({t.low:.3f}-{t.high:.3f}) "
            f"| {interval(both) if both else '-'} | {interval(c)} | {c.median:.3f} ({c.low:.3f}-{c.high:.3f}) |"
        )
    return "\n".join(lines)


def plot(ratios: dict[str, list[float]], summary: dict[str, dict[str, PairedRatio]], path: Path) -> None:
    """Every round's ratio per load (a dot each); the mean and its interval as a black bar, and for
    the persona loads the same over both unsteered loads as a red bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def bar(x: float, s: PairedRatio, colour: str, label: str | None) -> None:
        yerr = [[s.mean - s.ci_low], [s.ci_high - s.mean]]
        ax.errorbar(x, s.mean, yerr=yerr, fmt="_", color=colour, capsize=6, label=label)

    loads = [k for k in LOADS if k != BASELINE]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for x, load in enumerate(loads):
        ax.plot([x] * len(ratios[load]), ratios[load], "o", alpha=0.5)
        bar(x + 0.15, summary["tok_per_s"][load], "black", "over the round's unsteered" if x == 0 else None)
        if load in summary["tok_per_s_vs_both_unsteered"]:
            both = summary["tok_per_s_vs_both_unsteered"][load]
            bar(x + 0.3, both, "tab:red", "over both unsteered" if load == PERSONA_LOADS[0] else None)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(loads)), loads)
    ax.set_ylabel("output tok/s ratio\n(dots: over the round's unsteered)")
    ax.set_title(f"One engine, {len(ratios[BASELINE])} paired rounds (bars: mean, 95 % bootstrap CI)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def over(rates: dict[str, list[float]], base: list[float]) -> dict[str, list[float]]:
    """Each load's per-round rate over the same round's `base`."""
    return {k: [a / b for a, b in zip(v, base)] for k, v in rates.items()}


def summarize(rates: dict[str, list[float]], cpu_rates: dict[str, list[float]]) -> dict[str, dict[str, PairedRatio]]:
    """Every load over its round's baseline, for tok/s and for tokens per CPU second; and the
    persona loads over the geometric mean of the round's two unsteered loads, which halves the
    baseline's own noise."""
    both = [(a * b) ** 0.5 for a, b in zip(rates[BASELINE], rates["unsteered_again"])]
    return {
        measure: {k: paired_ratio(v) for k, v in ratios.items()}
        for measure, ratios in (
            ("tok_per_s", over(rates, rates[BASELINE])),
            ("tok_per_cpu_s", over(cpu_rates, cpu_rates[BASELINE])),
            ("tok_per_s_vs_both_unsteered", over({k: rates[k] for k in PERSONA_LOADS}, both)),
        )
    }


def pooled(folders: list[str]) -> dict:
    """The rounds of earlier runs as one run: every round is its own paired unit, so rounds of
    runs with the same workload, concurrency and mode can be pooled."""
    runs = [json.loads((Path(f) / "engine_overhead.json").read_text()) for f in folders]
    keys = ("model", "vectors", "workload", "mode", "concurrency")
    for f, run in zip(folders, runs):
        differs = [k for k in keys if run.get(k) != runs[0].get(k)]
        if differs:
            raise SystemExit(f"{f}: not the same run as {folders[0]} ({', '.join(differs)} differ)")
    result: dict = {"command": f"python -m personavec_vllm.bench.engine_overhead --pool {' '.join(folders)}"}
    result |= {k: runs[0][k] for k in ("machine", *keys)}
    result["pooled_from"] = [{"folder": f, "command": run["command"]} for f, run in zip(folders, runs)]
    for measure in ("tok_per_s", "tok_per_cpu_s"):
        result[measure] = {load: [x for run in runs for x in run[measure][load]] for load in LOADS}
    return result


def measure(args: argparse.Namespace) -> dict:
    """Start one engine and run `args.rounds` paired rounds; the per-round rates and what ran."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # as the serving benchmark's servers
    from transformers import AutoConfig, AutoTokenizer
    from vllm import SamplingParams

    from personavec_vllm.bench.scenarios import persona_fields
    from personavec_vllm.bench.setup import load_vectors
    from personavec_vllm.bench.workload import LengthRange, WorkloadConfig, make_workload, with_fresh_words, word_vocab
    from personavec_vllm.data import vectors_dir
    from personavec_vllm.engine.llm import make_llm
    from personavec_vllm.engine.offline import persona_params, projections
    from personavec_vllm.models import DEFAULT_MODEL_NAME, resolve_model

    model = resolve_model(args.model)
    config = AutoConfig.from_pretrained(model)
    folder = Path(args.vectors) if args.vectors else vectors_dir(DEFAULT_MODEL_NAME)
    vectors = load_vectors(folder, config.num_hidden_layers, config.hidden_size)
    vocab = word_vocab(AutoTokenizer.from_pretrained(model))
    workload_config = WorkloadConfig(
        prompt_len=LengthRange.parse(args.prompt_len), output_len=LengthRange.parse(args.output_len)
    )
    requests = make_workload(workload_config, args.concurrency, vocab)
    llm = make_llm(model, vectors=folder, enforce_eager=args.eager, max_model_len=1024)

    def params(load: str) -> list:
        out = []
        for r in requests:
            base = SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True)
            fields = persona_fields(load, r.index, vectors)
            has = "persona_steer" in fields or "persona_monitor" in fields
            out.append(
                persona_params(base, fields.get("persona_steer"), fields.get("persona_monitor")) if has else base
            )
        return out

    def run(load: str, words_seed: str) -> tuple[float, float]:
        prompts = [
            {"prompt_token_ids": list(r.prompt_token_ids)} for r in with_fresh_words(requests, vocab, words_seed)
        ]
        cpu0, t0 = group_cpu_seconds(), time.perf_counter()
        outs = llm.generate(prompts, load_params[load], use_tqdm=False)
        if load == "monitor3":
            for o in outs:
                if sorted(projections(o)) != sorted(vectors.names[:3]):
                    raise RuntimeError(f"request {o.request_id}: no projections for every monitored vector")
        wall, cpu = time.perf_counter() - t0, group_cpu_seconds() - cpu0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        if tokens != sum(r.output_len for r in requests):
            raise RuntimeError(f"{load}: {tokens} output tokens, asked for {sum(r.output_len for r in requests)}")
        return tokens / wall, tokens / cpu

    load_params = {load: params(load) for load in LOADS}
    print("warm-up (untimed): every load once", flush=True)
    for load in LOADS:
        run(load, f"warm-{load}")
    rates: dict[str, list[float]] = {load: [] for load in LOADS}
    cpu_rates: dict[str, list[float]] = {load: [] for load in LOADS}
    started = time.monotonic()
    for r in range(args.rounds):
        for load in rotated(LOADS, r):
            tok_s, tok_cpu = run(load, f"round{r}-{load}")
            rates[load].append(tok_s)
            cpu_rates[load].append(tok_cpu)
        ratio = " ".join(f"{k} {rates[k][-1] / rates[BASELINE][-1]:.3f}" for k in LOADS if k != BASELINE)
        print(
            f"round {r + 1}/{args.rounds} ({time.monotonic() - started:.0f} s): unsteered {rates[BASELINE][-1]:.1f} tok/s; {ratio}",
            flush=True,
        )

    return {
        "command": "python -m personavec_vllm.bench.engine_overhead "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False)),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "model": str(model),
        "vectors": str(folder),
        "workload": workload_config.describe(),
        "mode": "eager" if args.eager else "compiled",
        "concurrency": args.concurrency,
        "tok_per_s": rates,
        "tok_per_cpu_s": cpu_rates,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--vectors", default=None, help="vector library (default: the packaged one for the model)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests per load (submitted at once)")
    parser.add_argument("--prompt-len", default="32:512", help="as personavec bench (log-normal, clipped)")
    parser.add_argument("--output-len", default="32:96", help="as personavec bench (uniform)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--eager", action="store_true", help="enforce_eager (default: vLLM's compiled mode)")
    parser.add_argument(
        "--pool",
        nargs="+",
        metavar="DIR",
        help="run nothing: summarize the rounds of these earlier --out folders as one",
    )
    parser.add_argument("--out", default=None, help="folder for engine_overhead.json, .md and .png")
    args = parser.parse_args()

    result = pooled(args.pool) if args.pool else measure(args)
    rates = result["tok_per_s"]
    summary = summarize(rates, result["tok_per_cpu_s"])
    text = table(summary, rates)
    print()
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result["ratio"] = {m: {k: asdict(v) for k, v in s.items()} for m, s in summary.items()}
        (out / "engine_overhead.json").write_text(json.dumps(result, indent=2))
        (out / "engine_overhead.md").write_text(f"`{result['command']}`\n\n{result['workload']}\n\n{text}\n")
        plot(over(rates, rates[BASELINE]), summary, out / "engine_overhead.png")
        print(f"written to {out}", flush=True)


if __name__ == "__main__":
    main()
