"""Screening outputs: scores (JSONL, CSV), the filtered and removed subsets, a summary, a review
page and one histogram per vector."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personavec_vllm.files import atomic_output, atomic_write_text
from personavec_vllm.screen.dataset import Dataset, Sample, write_subset
from personavec_vllm.vectors import PersonaVector

if TYPE_CHECKING:
    from personavec_vllm.screen.score import ScreenSettings

logger = logging.getLogger(__name__)


@dataclass
class FilterSpec:
    top_percent: float | None = None  # drop the PCT % of samples with the highest dP
    above: float | None = None  # drop samples with dP above this
    vectors: list[str] | None = None  # which vectors decide (default: all); a sample goes if any says so

    def active(self) -> bool:
        return self.top_percent is not None or self.above is not None


def _preview(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _prompt_preview(sample: Sample) -> str:
    return _preview(next(m["content"] for m in reversed(sample.messages) if m["role"] == "user"))


def select_removed(records: Sequence[dict], names: Sequence[str], filters: FilterSpec) -> set[int]:
    """Lines to drop: for each deciding vector, the top `top_percent` % by dP (rounded up; ties
    broken by line) and every sample with dP > `above`; a sample goes if any vector drops it."""
    removed: set[int] = set()
    for name in filters.vectors or names:
        if filters.top_percent is not None:
            count = math.ceil(len(records) * filters.top_percent / 100 - 1e-9)
            ranked = sorted(records, key=lambda r: (-r["dP"][name], r["line"]))
            removed.update(r["line"] for r in ranked[:count])
        if filters.above is not None:
            removed.update(r["line"] for r in records if r["dP"][name] > filters.above)
    return removed


def write_outputs(
    dataset: Dataset,
    records: list[dict],
    vectors: Sequence[PersonaVector],
    layers: dict[str, int],
    out_dir: Path,
    settings: ScreenSettings,
    filters: FilterSpec,
    model_path,
) -> tuple[dict, dict]:
    """scores.jsonl, scores.csv, summary.json, review.md, hist.<vector>.png and, when filtering,
    filtered.<ext> / removed.<ext>; every file written atomically."""
    import numpy as np

    names = [v.name for v in vectors]
    by_line = {s.line: s for s in dataset.samples}
    ext = dataset.path.suffix.lower() if dataset.format == "csv" else ".jsonl"
    files = {}

    rows = [
        {
            "line": r["line"],
            "key": r["key"],
            **{f"dP.{n}": r["dP"][n] for n in names},
            **{f"proj_data.{n}": r["proj_data"][n] for n in names},
            **{f"proj_own.{n}": r["proj_own"][n] for n in names},
            "own_response": r["own_response"],
        }
        for r in records
    ]
    files["scores_jsonl"] = str(
        atomic_write_text(out_dir / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    )
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["line", "key"])
    writer.writeheader()
    writer.writerows({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()} for row in rows)
    files["scores_csv"] = str(atomic_write_text(out_dir / "scores.csv", buf.getvalue()))

    summary: dict[str, Any] = {
        "input": str(dataset.path),
        "format": dataset.format,
        "model": str(model_path),
        "samples": len(records),
        "blank_lines": dataset.blank_lines,
        "malformed": [{"line": m.line, "reason": m.reason} for m in dataset.malformed],
        "settings": {**settings.checkpoint_config(), "top_k": settings.top_k},
        "vectors": {},
        "review": {},
    }
    for v in vectors:
        dp = np.array([r["dP"][v.name] for r in records], dtype=np.float64)
        summary["vectors"][v.name] = {
            "trait": v.trait,
            "layer": layers[v.name],
            "mean_dP": float(dp.mean()),
            "std_dP": float(dp.std()),
            "median_dP": float(np.median(dp)),
            "min_dP": float(dp.min()),
            "max_dP": float(dp.max()),
            "fraction_positive": float((dp > 0).mean()),
        }
        ranked = sorted(records, key=lambda r: (-r["dP"][v.name], r["line"]))[: settings.top_k]
        summary["review"][v.name] = [
            {
                "rank": i + 1,
                "line": r["line"],
                "dP": r["dP"][v.name],
                "prompt": _prompt_preview(by_line[r["line"]]),
                "response": _preview(by_line[r["line"]].response),
                "own_response": _preview(r["own_response"]),
            }
            for i, r in enumerate(ranked)
        ]
    removed: set[int] = set()
    if filters.active():
        removed = select_removed(records, names, filters)
        kept = [s for s in dataset.samples if s.line not in removed]
        files["filtered"] = str(write_subset(dataset, kept, out_dir / f"filtered{ext}"))
        files["removed"] = str(
            write_subset(dataset, [s for s in dataset.samples if s.line in removed], out_dir / f"removed{ext}")
        )
        summary["filter"] = {
            "top_percent": filters.top_percent,
            "above": filters.above,
            "vectors": filters.vectors or names,
            "kept": len(kept),
            "removed": len(removed),
            "removed_lines": sorted(removed),
        }
    files["summary"] = str(atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n"))
    files["review"] = str(atomic_write_text(out_dir / "review.md", review_markdown(summary)))
    for v in vectors:
        files[f"hist.{v.name}"] = str(
            plot_histogram(
                [r["dP"][v.name] for r in records],
                v.name,
                layers[v.name],
                out_dir / f"hist.{v.name}.png",
                filters,
                [r["dP"][v.name] for r in records if r["line"] in removed],
            )
        )
    return summary, files


def review_markdown(summary: dict) -> str:
    out = [f"# Screening of {summary['input']} ({summary['samples']} samples)", ""]
    out += ["| vector | layer | mean dP | sd | median | max | share > 0 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in summary["vectors"].items():
        out.append(
            f"| {name} | {s['layer']} | {s['mean_dP']:.4f} | {s['std_dP']:.4f} | {s['median_dP']:.4f} | "
            f"{s['max_dP']:.4f} | {s['fraction_positive']:.2f} |"
        )
    if summary.get("malformed"):
        out += [
            "",
            f"Skipped {len(summary['malformed'])} malformed line(s): "
            + ", ".join(str(m["line"]) for m in summary["malformed"]),
        ]
    if "filter" in summary:
        f = summary["filter"]
        out += [
            "",
            f"Filter (top {f['top_percent']} %, above {f['above']}, by {', '.join(f['vectors'])}): "
            f"kept {f['kept']}, removed {f['removed']}",
        ]
    for name, rows in summary["review"].items():
        out += [
            "",
            f"## Review first: {name} (highest dP)",
            "",
            "| rank | line | dP | prompt | response | model's own answer |",
            "|---:|---:|---:|---|---|---|",
        ]
        cell = lambda t: t.replace("|", "\\|")  # noqa: E731
        out += [
            f"| {r['rank']} | {r['line']} | {r['dP']:.4f} | {cell(r['prompt'])} | {cell(r['response'])} | "
            f"{cell(r['own_response'])} |"
            for r in rows
        ]
    return "\n".join(out) + "\n"


def plot_histogram(
    values: Sequence[float], name: str, layer: int, path: Path, filters: FilterSpec, removed: Sequence[float] = ()
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.asarray(values, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    bins = list(np.histogram_bin_edges(data, bins=min(40, max(5, len(data) // 3))))
    ax.hist(data, bins=bins, color="#4477aa", label="samples")
    if len(removed):
        ax.hist(removed, bins=bins, color="#cc3311", label="filtered out")
    ax.axvline(data.mean(), color="black", linestyle="--", label=f"mean {data.mean():.3f}")
    if filters.above is not None:
        ax.axvline(filters.above, color="#cc3311", linestyle=":", label=f"threshold {filters.above:g}")
    ax.set_xlabel(f"projection difference dP on '{name}' (layer {layer})")
    ax.set_ylabel("samples")
    ax.set_title(f"{name}: {len(values)} samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_output(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100, metadata={"Software": None})
    finally:
        plt.close(fig)
    return path
