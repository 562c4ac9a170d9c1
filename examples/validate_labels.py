"""Validate the shipped vectors on the hand-labelled answers (see `personavec_vllm.extract.labelled`).

    .venv/bin/python examples/validate_labels.py [--library DIR]

Re-encodes every labelled answer with its question alone (no system prompt), projects it on
every vector at every layer, and on the vectors rebuilt without each held-out answer's own
instruction pair (from the extraction pairs the vector was built from, `reports/<trait>.json`
`kept_pairs`, re-encoded as extraction did), and writes beside the labels:
`projections.safetensors` (what the tests recompute the table from), `validation.json`,
`VALIDATION.md` (the table) and `validation.png` (labelled AUC per layer against the
baselines). AUCs are read at each vector's monitoring layer. About 5-20 minutes on 2 cores
(the extraction answers' hidden states).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from safetensors.torch import save_file

from personavec_vllm.data import vectors_dir
from personavec_vllm.extract.labelled import (
    leave_one_pair_out,
    project_all,
    random_direction_aucs,
    read_labelled,
    validate,
)
from personavec_vllm.extract.pipeline import Answer, pair_up
from personavec_vllm.files import atomic_write_bytes
from personavec_vllm.hf.hidden import hidden_means
from personavec_vllm.library import load_vectors
from personavec_vllm.models import DEFAULT_MODEL_NAME, resolve_model
from personavec_vllm.screen import load_hf

TRAITS = ("evil", "hallucinating", "humorous", "impolite", "sycophantic")
TARGET_AUC, TARGET_MARGIN, TARGET_SPECIFICITY = 0.90, 0.10, 0.80


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def table(report: dict) -> str:
    lines = [
        "| trait | monitoring layer | label 1 (pos/neg/plain) | label 0 | AUC [95 % CI] | leave-one-pair-out AUC [95 % CI] "
        "| layer-0 | random p95 | target met | AUC by prompt (old) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for trait, r in report["traits"].items():
        by = r["n_label1_by_source"]
        low, high = r["auc_ci95"]
        lopo_low, lopo_high = r.get("auc_lopo_ci95", (math.nan, math.nan))
        auc = min(r["auc"], r.get("auc_lopo", r["auc"]))  # the target holds for both
        met = (
            auc >= TARGET_AUC and auc - r["auc_layer0"] >= TARGET_MARGIN and auc - r["random_auc_p95"] >= TARGET_MARGIN
        )
        lines.append(
            f"| {trait} | {r['layer']} | {r['n_label1']} ({by['positive']}/{by['negative']}/{by['plain']}) | "
            f"{r['n_label0']} | {_fmt(r['auc'])} [{_fmt(low)}, {_fmt(high)}] | "
            f"{_fmt(r.get('auc_lopo', math.nan))} [{_fmt(lopo_low)}, {_fmt(lopo_high)}] | {_fmt(r['auc_layer0'])} | "
            f"{_fmt(r['random_auc_p95'])} | {'yes' if met else 'no'} | {_fmt(r['auc_by_prompt'])} |"
        )
    lines += [
        "",
        "Specificity (row vector: its trait's label-1 answers against the column trait's label-1 answers):",
        "",
    ]
    names = list(report["specificity"])
    lines += ["| vector | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for name, row in report["specificity"].items():
        lines.append(f"| {name} | " + " | ".join("-" if o == name else _fmt(row[o]) for o in names) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report["traits"]), figsize=(4 * len(report["traits"]), 3.4), sharey=True)
    for ax, (trait, r) in zip(axes, report["traits"].items()):
        ax.plot(range(len(r["auc_by_layer"])), r["auc_by_layer"], label="labelled AUC")
        ax.axhline(r["random_auc_p95"], color="grey", ls="--", label="random p95 (at its layer)")
        ax.axhline(r["auc_layer0"], color="orange", ls=":", label="layer-0 row")
        ax.axvline(r["layer"], color="k", lw=0.5)
        ax.set_title(f"{trait} (n1={r['n_label1']})")
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("ROC AUC, instruction out of context")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def extraction_means(model, tokenizer, library: Path, trait: str):
    """(positive, negative hidden means `[K, L+1, H]`, instruction pair of each) of the pairs the
    vector was built from, encoded as the extraction encoded them (instruction in context)."""
    answers = [
        Answer(**json.loads(line))
        for line in (library / "reports" / f"{trait}.answers.jsonl").read_text(encoding="utf-8").splitlines()
        if line
    ]
    report = json.loads((library / "reports" / f"{trait}.json").read_text())
    kept = [(answers[p], answers[n]) for p, n in report["kept_pairs"]] if "kept_pairs" in report else pair_up(answers)
    means = hidden_means(
        model, tokenizer, [(*a.conversation(), a.text) for pair in kept for a in pair], f" ({trait}, extraction)"
    )["response"]
    return means[0::2], means[1::2], [pos.pair for pos, _ in kept]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", default=str(vectors_dir(DEFAULT_MODEL_NAME)))
    args = parser.parse_args()
    library = Path(args.library)
    vectors = {v.name: v for v in load_vectors([library], list(TRAITS))}
    model, tokenizer = load_hf(resolve_model(None))
    answers = {trait: read_labelled(library, trait) for trait in TRAITS}
    hidden = {}
    for trait, items in answers.items():
        hidden[trait] = hidden_means(model, tokenizer, [(None, a.question, a.text) for a in items], f" ({trait})")[
            "response"
        ]
    projections = project_all(answers, hidden, vectors)
    for trait, items in answers.items():
        positive, negative, pairs = extraction_means(model, tokenizer, library, trait)
        projections[f"lopo/{trait}"] = leave_one_pair_out(
            positive, negative, pairs, hidden[trait], [a.pair for a in items]
        ).contiguous()
    random_p95 = {
        trait: float(
            np.percentile(
                random_direction_aucs(
                    hidden[trait][:, vectors[trait].monitor_layer], np.array([a.label for a in items])
                ),
                95,
            )
        )
        for trait, items in answers.items()
    }
    report = validate(answers, projections, {n: v.monitor_layer for n, v in vectors.items()}, random_p95)
    out = library / "labels"
    save_file(projections, str(out / "projections.safetensors"))
    atomic_write_bytes(out / "validation.json", (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(out / "VALIDATION.md", table(report).encode())
    plot(report, out / "validation.png")
    print(table(report))


if __name__ == "__main__":
    main()
