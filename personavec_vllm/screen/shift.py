"""The fine-tuning shift: mean last-prompt-token activation on the traits' evaluation questions,
tuned model minus base model, projected on each vector (at its layer and at every layer)."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from personavec_vllm.files import atomic_output, atomic_write_text
from personavec_vllm.hf.hidden import last_prompt_mean
from personavec_vllm.projection import unit_rows
from personavec_vllm.screen.dataset import ScreenError
from personavec_vllm.screen.score import load_hf
from personavec_vllm.vectors import PersonaVector

logger = logging.getLogger(__name__)


def question_sets(
    vectors: Sequence[PersonaVector], questions: Sequence[str] | None = None, max_questions: int | None = None
) -> dict[str, tuple[str, ...]]:
    """Per vector: `questions` if given, else the evaluation questions of its trait definition."""
    from personavec_vllm.traits import load_trait

    out = {}
    for v in vectors:
        if questions:
            qs = list(questions)
        else:
            try:
                qs = load_trait(v.trait).evaluation_questions
            except FileNotFoundError as exc:
                raise ScreenError(
                    f"vector {v.name!r}: no trait definition for {v.trait!r} ({exc}); pass questions (--questions FILE)"
                ) from None
        out[v.name] = tuple(qs[:max_questions] if max_questions else qs)
    return out


def measure_shift(
    base,
    tuned,
    vectors: Sequence[PersonaVector],
    *,
    tokenizer=None,
    questions: Sequence[str] | None = None,
    max_questions: int | None = None,
    layers: dict[str, int] | None = None,
) -> list[dict]:
    """Fine-tuning shift per vector: mean last-prompt-token activation of `tuned` minus `base` on
    the traits' evaluation questions, projected on the vector's unit row, at its layer
    (`shift`) and at every layer (`shift_per_layer`, index = layer; 0 = embeddings).

    `base` and `tuned` are HF model folders (loaded one after the other) or model objects
    (plain, PEFT-wrapped or merged; then pass `tokenizer`)."""
    qsets = question_sets(vectors, questions, max_questions)
    unique = sorted(set(qsets.values()))

    def means(model_or_path, label: str) -> dict[tuple[str, ...], torch.Tensor]:
        if isinstance(model_or_path, (str, os.PathLike)):
            model, tok = load_hf(model_or_path)
            tok = tokenizer or tok
        else:
            model, tok = model_or_path, tokenizer
            if tok is None:
                raise ScreenError("pass tokenizer= with model objects")
        return {qs: last_prompt_mean(model, tok, qs, f" ({label})") for qs in unique}

    base_means = means(base, "base model")
    num_layers, hidden = base_means[unique[0]].shape[0] - 1, base_means[unique[0]].shape[1]
    for v in vectors:
        v.check_fits(num_layers, hidden)
    tuned_means = means(tuned, "tuned model")
    rows = []
    for v in vectors:
        qs = qsets[v.name]
        layer = (layers or {}).get(v.name, v.monitor_layer)
        unit = unit_rows(v.vectors)
        per_layer = ((tuned_means[qs] - base_means[qs]) * unit).sum(dim=-1)
        rows.append(
            {
                "vector": v.name,
                "trait": v.trait,
                "layer": layer,
                "shift": float(per_layer[layer]),
                "base_projection": float(base_means[qs][layer] @ unit[layer]),
                "tuned_projection": float(tuned_means[qs][layer] @ unit[layer]),
                "vector_norm": float(v.vectors[layer].norm()),
                "questions": len(qs),
                "shift_per_layer": [float(x) for x in per_layer],
            }
        )
    return rows


def shift_table(rows: Sequence[dict]) -> str:
    lines = [
        "| vector | trait | layer | shift (tuned - base) | base proj | tuned proj | |v| | questions |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['vector']} | {r['trait']} | {r['layer']} | {r['shift']:+.4f} | {r['base_projection']:.4f} | "
            f"{r['tuned_projection']:.4f} | {r['vector_norm']:.3f} | {r['questions']} |"
        )
    return "\n".join(lines)


def plot_shift(series: dict[str, Sequence[dict]], path: str | os.PathLike, title: str = "fine-tuning shift") -> Path:
    """One line per (run, vector): shift per layer (1..L), the vector's layer marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    for run, rows in series.items():
        for r in rows:
            ys = r["shift_per_layer"][1:]
            label = f"{r['vector']}" if run == "" else f"{run}: {r['vector']}"
            (line,) = ax.plot(range(1, len(ys) + 1), ys, marker=".", label=label)
            ax.plot(
                [r["layer"]], [r["shift"]], marker="o", markersize=9, color=line.get_color(), markerfacecolor="none"
            )
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("layer (residual stream after decoder layer L-1); circles: the vector's layer")
    ax.set_ylabel("projection of mean activation shift")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_output(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100, metadata={"Software": None})
    finally:
        plt.close(fig)
    return path


def write_shift_outputs(rows: Sequence[dict], out_dir: str | os.PathLike, *, base: str, tuned: str) -> dict[str, str]:
    """shift.json, shift.csv (one row per vector and layer), shift.md and shift.png in `out_dir`."""
    out_dir = Path(out_dir)
    files = {
        "json": str(
            atomic_write_text(
                out_dir / "shift.json",
                json.dumps({"base": base, "tuned": tuned, "vectors": list(rows)}, indent=2) + "\n",
            )
        )
    }
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["vector", "trait", "layer", "shift", "is_vector_layer"])
    for r in rows:
        for layer, value in enumerate(r["shift_per_layer"]):
            if layer:
                writer.writerow([r["vector"], r["trait"], layer, repr(value), int(layer == r["layer"])])
    files["csv"] = str(atomic_write_text(out_dir / "shift.csv", buf.getvalue()))
    files["table"] = str(
        atomic_write_text(out_dir / "shift.md", f"base: {base}\n\ntuned: {tuned}\n\n{shift_table(rows)}\n")
    )
    files["plot"] = str(
        plot_shift({"": rows}, out_dir / "shift.png", title=f"shift: {Path(tuned).name} - {Path(base).name}")
    )
    return files


def load_tuned(base_path: str, tuned: str):
    """A tuned model folder (path returned as is) or a PEFT adapter (loaded on the base)."""
    adapter = Path(tuned) / "adapter_config.json"
    if not adapter.is_file():
        from personavec_vllm.models import resolve_model

        return resolve_model(tuned)
    from peft import PeftModel

    model, _ = load_hf(base_path)
    return PeftModel.from_pretrained(model, tuned).eval()
