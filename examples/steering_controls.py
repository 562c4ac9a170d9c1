"""Steering effect of each shipped vector next to norm-matched random directions and off-target traits.

    .venv/bin/python examples/steering_controls.py [--library DIR] [--random 12]

For every vector at its recommended layer and the largest coefficient of its fluent range (from
its sweep), the change of the multiple-choice P(trait) of its own trait and of every other trait,
and the same change for random directions of the same norm (`personavec_vllm.extract.controls`).
Writes `labels/steering_controls.json`, `labels/STEERING.md` and `labels/steering_controls.png`
beside the labels. About 30 minutes on 2 cores (one forward pass of a trait's items takes ~10 s).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from personavec_vllm.data import vectors_dir
from personavec_vllm.extract.controls import RANDOM_STEERING_DIRECTIONS, steering_controls, unsteered
from personavec_vllm.files import atomic_write_bytes
from personavec_vllm.library import load_vectors
from personavec_vllm.models import DEFAULT_MODEL_NAME, resolve_model
from personavec_vllm.screen import load_hf
from personavec_vllm.traits import load_trait

TRAITS = ("evil", "hallucinating", "humorous", "impolite", "sycophantic")
TARGET_OVER_RANDOM, TARGET_OFF_OVER_ON = 3.0, 1 / 3


def steering_coeff(vector) -> float:
    """The largest coefficient of the vector's fluent range (its sweep summary), else 4."""
    sweep = json.loads(vector.extra.get("sweep", "{}"))
    return float(sweep.get("fluent_coeffs_at_recommended", [0, 4])[1]) or 4.0


def table(rows: list[dict]) -> str:
    names = [r["vector"] for r in rows]
    lines = [
        "| vector | layer | coeff | unsteered P | on-target gain [95 % CI] | random |gain| mean / p95 | gain / random "
        "| largest off-target / on | target met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        low, high = r["on_target_gain_ci95"]
        met = r["on_target_gain"] > 0 and r["gain_over_random"] >= TARGET_OVER_RANDOM
        met = met and r["largest_off_over_on"] <= TARGET_OFF_OVER_ON
        lines.append(
            f"| {r['vector']} | {r['layer']} | {r['coeff']:g} | {r['mc_unsteered']:.3f} | "
            f"{r['on_target_gain']:+.3f} [{low:+.3f}, {high:+.3f}] | {r['random_abs_gain_mean']:.3f} / "
            f"{r['random_abs_gain_p95']:.3f} | {r['gain_over_random']:.1f}x | {r['largest_off_over_on']:.2f} | "
            f"{'yes' if met else 'no'} |"
        )
    lines += ["", "Change of each trait's MC P(trait) (columns) when steering with a vector (rows):", ""]
    lines += ["| vector | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for r in rows:
        cells = [
            f"**{r['on_target_gain']:+.3f}**" if n == r["vector"] else f"{r['off_target_gains'][n]:+.3f}" for n in names
        ]
        lines.append(f"| {r['vector']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for i, r in enumerate(rows):
        ax.scatter(
            [i] * len(r["random_gains"]),
            r["random_gains"],
            color="grey",
            s=10,
            label="random (same norm)" if i == 0 else None,
        )
        low, high = r["on_target_gain_ci95"]
        ax.errorbar(
            i,
            r["on_target_gain"],
            yerr=[[r["on_target_gain"] - low], [high - r["on_target_gain"]]],
            fmt="o",
            color="C0",
            capsize=4,
            label="the vector, own trait (95 % CI)" if i == 0 else None,
        )
        offs = list(r["off_target_gains"].values())
        ax.scatter(
            [i + 0.2] * len(offs), offs, marker="x", color="C3", label="the vector, other traits" if i == 0 else None
        )
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(range(len(rows)), [f"{r['vector']}\nL{r['layer']} c={r['coeff']:g}" for r in rows], fontsize=8)
    ax.set_ylabel("change of MC P(trait)")
    ax.set_title("steering gain vs norm-matched random directions")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", default=str(vectors_dir(DEFAULT_MODEL_NAME)))
    parser.add_argument("--random", type=int, default=RANDOM_STEERING_DIRECTIONS, help="random directions per vector")
    args = parser.parse_args()
    library = Path(args.library)
    vectors = {v.name: v for v in load_vectors([library], list(TRAITS))}
    traits = [load_trait(t) for t in TRAITS]
    model, tokenizer = load_hf(resolve_model(None))
    base = unsteered(model, tokenizer, traits)
    rows = []
    for name in tqdm(TRAITS, desc="vectors", unit="vector"):
        v = vectors[name]
        rows.append(
            steering_controls(
                model, tokenizer, traits, name, v.vectors, v.layer, steering_coeff(v), n_random=args.random, base=base
            )
        )
    out = library / "labels"
    atomic_write_bytes(out / "steering_controls.json", (json.dumps(rows, indent=1) + "\n").encode())
    atomic_write_bytes(out / "STEERING.md", table(rows).encode())
    plot(rows, out / "steering_controls.png")
    print(table(rows))


if __name__ == "__main__":
    main()
