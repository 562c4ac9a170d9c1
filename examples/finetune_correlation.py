"""The paper's second correlation at 135M scale: does the fine-tuning shift (and the data's dP) predict behaviour?

    .venv/bin/python examples/finetune_correlation.py [--trait evil] [--seeds 3] [--steps 20]

1. Two pools of hand-labelled extraction answers of the trait (`labels/<trait>.answers.labels.jsonl`):
   trait-expressing (label 1) and plain (strength 0, coherent, written under the suppressing
   instruction); stored as user -> assistant conversations without the instruction.
2. Six datasets of graded trait strength per seed: the same size, a share 0, 0.2, .., 1 of it
   drawn from the trait pool, the rest from the plain pool.
3. Per dataset and seed, a LoRA fine-tune (the preventative-steering example's recipe), then,
   without any steering: the fine-tuning shift (`screen.measure_shift`, last prompt token on
   the trait's evaluation questions, at the vector's monitoring layer) and the behaviour change
   (multiple-choice P(trait), tuned minus base: the judge-free measure).
4. The dataset's mean projection difference dP (`personavec screen` over both pools once; a
   dataset's dP is the mean of its samples').
5. Pearson r (bootstrap 95 % interval) between shift and behaviour change, and between the
   dataset's mean dP and behaviour change, over all runs.
6. Preventative steering on the all-trait datasets: the same fine-tunes with the vector added
   while training, judged by the same behaviour change and by perplexity on held-out plain
   replies (the library's plain replies to the evaluation questions of every trait).

Writes `labels/finetune_correlation.{json,md,png}` beside the labels. About 25 minutes on 2 cores.
Needs `pip install -e .[train]` (peft).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from preventative_steering import finetune, tokenize, write_messages_jsonl

from personavec_vllm.data import vectors_dir
from personavec_vllm.extract.controls import pearson_ci
from personavec_vllm.extract.sweep import mc_measure
from personavec_vllm.files import atomic_write_bytes
from personavec_vllm.hf.hidden import chat_prompt
from personavec_vllm.library import load_vectors
from personavec_vllm.models import DEFAULT_MODEL_NAME, resolve_model
from personavec_vllm.screen import ScreenSettings, load_hf, measure_shift, read_dataset, screen_dataset
from personavec_vllm.traits import load_trait

SHARES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
TARGET_R = 0.7


def log(msg: str) -> None:
    print(f"[finetune-correlation] {msg}", file=sys.stderr, flush=True)


def pools(library: Path, trait: str) -> tuple[list[dict], list[dict]]:
    """(trait-expressing, plain) conversations from the labelled extraction answers."""
    answers = [json.loads(x) for x in (library / "reports" / f"{trait}.answers.jsonl").read_text().splitlines() if x]
    labels = [
        json.loads(x) for x in (library / "labels" / f"{trait}.answers.labels.jsonl").read_text().splitlines() if x
    ]
    trait_pool, plain_pool, seen = [], [], set()
    for answer, label in zip(answers, labels, strict=True):
        if not answer["text"] or answer["text"] in seen:
            continue
        seen.add(answer["text"])
        item = {"question": answer["question"], "answer": answer["text"]}
        if label["label"] == 1:
            trait_pool.append(item)
        elif label["strength"] == 0 and label["coherent"] and not answer["positive"]:
            plain_pool.append(item)
    return trait_pool, plain_pool


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[tuple[str, str]]) -> float:
    """Perplexity of (question, reply) replies under `model` (reply tokens only)."""
    nll, count = 0.0, 0
    for question, reply in texts:
        ids, start = chat_prompt(tokenizer, None, question, reply)
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        logp = torch.log_softmax(logits[start - 1 : len(ids) - 1], dim=-1)
        nll -= float(logp.gather(1, torch.tensor(ids[start:])[:, None]).sum())
        count += len(ids) - start
    return float(np.exp(nll / max(count, 1)))


def held_out_replies(library: Path) -> list[tuple[str, str]]:
    out = []
    for path in sorted((library / "reports").glob("*.plain.jsonl")):
        out += [(r["question"], r["text"]) for r in map(json.loads, path.read_text().splitlines()) if r["text"]]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--library", default=str(vectors_dir(DEFAULT_MODEL_NAME)))
    p.add_argument("--trait", default="evil")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--max-len", type=int, default=96)
    p.add_argument("--size", type=int, default=None, help="samples per dataset (default: the trait pool's size)")
    p.add_argument("--preventative-coeff", type=float, default=1.0)
    args = p.parse_args()
    library = Path(args.library)
    out = library / "labels"
    work = out / "finetune_correlation"
    work.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(None)
    base, tokenizer = load_hf(model_path)
    trait = load_trait(args.trait)
    vector = next(v for v in load_vectors([library]) if v.name == args.trait)
    layer = vector.monitor_layer
    trait_pool, plain_pool = pools(library, args.trait)
    size = args.size or min(len(trait_pool), len(plain_pool))
    log(f"pools: {len(trait_pool)} trait-expressing, {len(plain_pool)} plain; {size} samples per dataset")

    # dP of every pooled sample, once (vLLM generates the base model's own answers)
    pool_path = work / "pool.jsonl"
    write_messages_jsonl(trait_pool + plain_pool, pool_path)
    screened = screen_dataset(
        read_dataset(pool_path),
        [vector],
        model_path,
        work / "screen",
        ScreenSettings(max_tokens=64),
        hf=(base, tokenizer),
    )
    dp_of = {
        (item["question"], item["answer"]): rec["dP"][vector.name]
        for item, rec in zip(trait_pool + plain_pool, screened.records, strict=True)
    }

    base_mc = mc_measure(base, tokenizer, trait, None, 1, 0.0)
    heldout = held_out_replies(library)
    base_ppl = perplexity(base, tokenizer, heldout)
    runs = []
    plan = [(share, seed, None) for seed in range(args.seeds) for share in SHARES]
    plan += [(1.0, seed, args.preventative_coeff) for seed in range(args.seeds)]
    for k, (share, seed, coeff) in enumerate(plan):
        rng = random.Random(f"{args.trait}-{seed}")
        n_trait = round(share * size)
        data = rng.sample(trait_pool, n_trait) + rng.sample(plain_pool, size - n_trait)
        rng.shuffle(data)
        run_args = argparse.Namespace(**{**vars(args), "seed": seed})
        t0 = time.monotonic()
        steer = None if coeff is None else (vector, coeff, vector.layer)
        tuned, info = finetune(model_path, tokenize(data, tokenizer, args.max_len), tokenizer, run_args, steer)
        tuned = tuned.merge_and_unload()
        shift = measure_shift(base, tuned, [vector], tokenizer=tokenizer, layers={vector.name: layer})[0]["shift"]
        run = {
            "share": share,
            "seed": seed,
            "preventative_coeff": coeff,
            "samples": len(data),
            "train_loss": info["train_loss"],
            "shift": shift,
            "behaviour_change": mc_measure(tuned, tokenizer, trait, None, 1, 0.0) - base_mc,
            "mean_dP": float(np.mean([dp_of[(d["question"], d["answer"])] for d in data])),
            "heldout_ppl": perplexity(tuned, tokenizer, heldout),
            "seconds": round(time.monotonic() - t0, 1),
        }
        runs.append(run)
        del tuned
        log(
            f"run {k + 1}/{len(plan)}: share {share}, seed {seed}, coeff {coeff}: shift {shift:+.2f}, "
            f"behaviour {run['behaviour_change']:+.4f}, dP {run['mean_dP']:+.2f}, ppl {run['heldout_ppl']:.2f}"
        )
        atomic_write_bytes(work / "runs.json", (json.dumps(runs, indent=1) + "\n").encode())

    graded = [r for r in runs if r["preventative_coeff"] is None]
    behaviour = np.array([r["behaviour_change"] for r in graded])
    report = {
        "trait": args.trait,
        "layer": layer,
        "steering_layer": vector.layer,
        "pools": {"trait": len(trait_pool), "plain": len(plain_pool)},
        "samples_per_dataset": size,
        "training": {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "lora_rank", "max_len")},
        "base": {"mc": base_mc, "heldout_ppl": base_ppl, "heldout_replies": len(heldout)},
        "r_shift_behaviour": pearson_ci(np.array([r["shift"] for r in graded]), behaviour),
        "r_dP_behaviour": pearson_ci(np.array([r["mean_dP"] for r in graded]), behaviour),
        "r_share_behaviour": pearson_ci(np.array([r["share"] for r in graded]), behaviour),
        "runs": runs,
    }
    atomic_write_bytes(out / "finetune_correlation.json", (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(out / "FINETUNE.md", markdown(report).encode())
    plot(report, out / "finetune_correlation.png")
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    def r(key):
        value, low, high = report[key]
        return f"{value:.2f} [{low:.2f}, {high:.2f}]"

    lines = [
        f"Trait `{report['trait']}`, {len([x for x in report['runs'] if x['preventative_coeff'] is None])} LoRA runs "
        f"(6 trait shares x seeds), {report['samples_per_dataset']} samples each, "
        f"{report['training']['steps']} steps x batch {report['training']['batch_size']}, lr {report['training']['lr']}; "
        f"shift at layer {report['layer']}; behaviour = MC P(trait) tuned minus base (base {report['base']['mc']:.3f}).",
        "",
        "| r (95 % CI) | value | target |",
        "|---|---|---|",
        f"| shift vs behaviour change | {r('r_shift_behaviour')} | >= {TARGET_R} |",
        f"| dataset mean dP vs behaviour change | {r('r_dP_behaviour')} | >= {TARGET_R} |",
        f"| trait share vs behaviour change (the design itself) | {r('r_share_behaviour')} | - |",
        "",
        "| share | preventative coeff | seeds | shift (mean) | behaviour change (mean) | mean dP | held-out perplexity |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict = {}
    for run in report["runs"]:
        groups.setdefault((run["share"], run["preventative_coeff"]), []).append(run)
    for (share, coeff), rs in groups.items():
        lines.append(
            f"| {share:g} | {'-' if coeff is None else f'{coeff:g}'} | {len(rs)} | "
            f"{np.mean([x['shift'] for x in rs]):+.2f} | {np.mean([x['behaviour_change'] for x in rs]):+.4f} | "
            f"{np.mean([x['mean_dP'] for x in rs]):+.2f} | {np.mean([x['heldout_ppl'] for x in rs]):.2f} |"
        )
    lines.append(f"| base model | - | - | 0 | 0 | - | {report['base']['heldout_ppl']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graded = [r for r in report["runs"] if r["preventative_coeff"] is None]
    prevent = [r for r in report["runs"] if r["preventative_coeff"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, key, label in ((axes[0], "shift", "fine-tuning shift"), (axes[1], "mean_dP", "dataset mean dP")):
        sc = ax.scatter(
            [r[key] for r in graded],
            [r["behaviour_change"] for r in graded],
            c=[r["share"] for r in graded],
            cmap="viridis",
        )
        ax.scatter(
            [r[key] for r in prevent],
            [r["behaviour_change"] for r in prevent],
            marker="x",
            color="C3",
            label="preventative steering (share 1)",
        )
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("behaviour change (MC P(trait))")
    axes[1].legend(fontsize=7)
    fig.colorbar(sc, ax=axes, label="trait share of the data")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
