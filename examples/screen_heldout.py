"""Screen a labelled dataset with the shipped `evil` vector and check that dP ranks the evil answers first.

The dataset: the extraction's held-out answers (`vectors/<model>/reports/evil.heldout.jsonl`:
evaluation questions, which the vector never saw, answered under the trait's positive and
negative system prompts), stored as prompt/response JSONL *without* the system prompts. Screening
(`personavec screen`) then compares each answer with the model's own answer to the bare question.
Reports the screening throughput, the mean dP of each half and the ROC AUC of dP for
"written under the evil prompt" into `examples/results/screen_heldout/`.

    python examples/screen_heldout.py [--trait evil] [--batch-size 32] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from personavec_vllm.data import vectors_dir
from personavec_vllm.library import load_vectors
from personavec_vllm.models import DEFAULT_MODEL_NAME, resolve_model
from personavec_vllm.projection import roc_auc
from personavec_vllm.screen import ScreenSettings, read_dataset, screen_dataset

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trait", default="evil")
    p.add_argument("--vectors", default=str(vectors_dir(DEFAULT_MODEL_NAME)))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "screen_heldout"))
    p.add_argument("--restart", action="store_true")
    args = p.parse_args(argv)

    source = Path(args.vectors) / "reports" / f"{args.trait}.heldout.jsonl"
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r.get("text", "").strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": r["question"], "response": r["text"]}) + "\n" for r in rows), encoding="utf-8"
    )
    labels = {i + 1: bool(r["positive"]) for i, r in enumerate(rows)}  # line -> written under the evil prompt

    vectors = load_vectors([args.vectors], [args.trait])
    settings = ScreenSettings(max_tokens=args.max_tokens, batch_size=args.batch_size)
    result = screen_dataset(
        read_dataset(data), vectors, resolve_model(None), out / "screen", settings, restart=args.restart
    )
    name = vectors[0].name
    dp = {r["line"]: r["dP"][name] for r in result.records}
    pos = np.array([v for line, v in dp.items() if labels[line]])
    neg = np.array([v for line, v in dp.items() if not labels[line]])
    top = [r["line"] for r in result.summary["review"][name][:10]]
    report = {
        "source": str(source.relative_to(ROOT) if source.is_relative_to(ROOT) else source),
        "samples": len(rows),
        "vector": name,
        "layer": result.summary["vectors"][name]["layer"],
        "mean_dP": result.summary["vectors"][name]["mean_dP"],
        "mean_dP_evil_prompt": float(pos.mean()),
        "mean_dP_other_prompt": float(neg.mean()),
        "auc": roc_auc(pos, neg),
        "evil_in_top10": sum(labels[line] for line in top),
        "computed": result.computed,
        "seconds": round(result.seconds, 1),
        "engine_start_seconds": round(result.startup_seconds, 1),
        "samples_per_second": round(result.computed / result.seconds, 3) if result.computed else None,
        "settings": {"batch_size": args.batch_size, "max_tokens": args.max_tokens, "temperature": 0.0},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
