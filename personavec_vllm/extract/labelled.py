"""Validation of a vector library against hand-labelled answers (issue #16's ground truth).

The labels (`<library>/labels/<trait>.labels.jsonl`, rubric in `labels/RUBRIC.md`) say, for each
held-out and plain answer of the extraction reports, whether its *text* expresses the trait
(judged blind to the instruction it was written under). Here each answer is re-encoded with the
question alone (the instruction out of context), and each vector's projection of the mean
response activation is scored against the labels:

- `auc`: ROC AUC of label 1 against label 0 at the vector's layer, with a stratified bootstrap
  95 % interval (`bootstrap_ci`);
- baselines on the same answers: the vector's own layer-0 row (mean token-embedding difference:
  word choice) and random unit directions at the same layer (95th percentile of their AUCs);
- `specificity`: each vector's AUC separating its trait's label-1 answers from every other
  trait's label-1 answers (does it track *its* trait, or any trait-laden text?);
- `auc_lopo`: leave-one-instruction-pair-out: each held-out answer is scored by a vector built
  without the instruction pair it was written under (`leave_one_pair_out`), so the AUC cannot
  come from recognising the extraction's own instructions' wording.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from personavec_vllm.projection import layer_projections, roc_auc

BOOTSTRAP_REPS = 2000
RANDOM_DIRECTIONS = 200


@dataclass
class LabelledAnswer:
    trait: str
    source: str  # "heldout" or "plain"
    line: int
    question: str
    text: str
    positive: bool | None  # written under the trait-eliciting prompt (None: plain)
    label: int
    strength: int
    coherent: bool
    pair: int = -1  # the instruction pair it was written under (-1: a plain reply)


def read_labelled(library: str | Path, trait: str) -> list[LabelledAnswer]:
    """The labelled answers of `trait`, joined with their text from the reports."""
    library = Path(library)
    texts = {
        source: (library / "reports" / f"{trait}.{source}.jsonl").read_text(encoding="utf-8").splitlines()
        for source in ("heldout", "plain")
    }
    out = []
    for raw in (library / "labels" / f"{trait}.labels.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(raw)
        answer = json.loads(texts[rec["source"]][rec["line"]])
        if answer["question"] != rec["question"]:
            raise ValueError(f"{trait} labels: line {rec['line']} of {rec['source']} is another question")
        out.append(
            LabelledAnswer(
                trait,
                rec["source"],
                rec["line"],
                rec["question"],
                answer["text"],
                rec["positive"],
                int(rec["label"]),
                int(rec["strength"]),
                bool(rec["coherent"]),
                int(answer.get("pair", -1)),
            )
        )
    return out


def bootstrap_ci(pos: np.ndarray, neg: np.ndarray, reps: int = BOOTSTRAP_REPS, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the AUC, resampling positives and negatives separately."""
    if len(pos) == 0 or len(neg) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    aucs = [roc_auc(rng.choice(pos, len(pos)), rng.choice(neg, len(neg))) for _ in range(reps)]
    low, high = np.percentile(aucs, [2.5, 97.5])
    return (float(low), float(high))


def labelled_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    return roc_auc(pos, neg) if len(pos) and len(neg) else float("nan")


def random_direction_aucs(h: torch.Tensor, labels: np.ndarray, n: int = RANDOM_DIRECTIONS, seed: int = 0) -> np.ndarray:
    """AUCs of `n` random unit directions on hidden means `h` `[N, H]` (fixed signs: the null
    distribution of a direction's one-sided AUC)."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(n, h.shape[1], generator=g)
    directions = directions / directions.norm(dim=1, keepdim=True)
    scores = (h.float() @ directions.T).numpy()
    return np.array([labelled_auc(scores[:, k], labels) for k in range(n)])


def project_all(
    answers: dict[str, Sequence[LabelledAnswer]], hidden: dict[str, torch.Tensor], vectors: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """`"<answers' trait>/<vector>"` -> `[N, L+1]` projections of that trait's answers on that
    vector at every layer: all `validate` needs (and what the library stores beside the labels)."""
    return {
        f"{trait}/{name}": layer_projections(hidden[trait], vector.vectors).contiguous()
        for trait in answers
        for name, vector in vectors.items()
    }


def leave_one_pair_out(
    positive: torch.Tensor,
    negative: torch.Tensor,
    pairs: Sequence[int],
    heldout: torch.Tensor,
    heldout_pairs: Sequence[int],
) -> torch.Tensor:
    """`[M, L+1]` projections of held-out hidden means `heldout` `[M, L+1, H]`, each on the
    diff-of-means vector of the extraction pairs (`positive`, `negative` `[K, L+1, H]`, pair `k`
    written under instruction pair `pairs[k]`) *not* written under its own instruction pair
    (`heldout_pairs`; -1, a plain reply, uses every pair)."""
    from personavec_vllm.projection import diff_mean

    pairs_t = torch.tensor(list(pairs))
    out = torch.empty(heldout.shape[0], heldout.shape[1])
    for p in sorted(set(heldout_pairs)):
        keep = pairs_t != p
        vector = diff_mean(positive[keep], negative[keep])
        rows = [i for i, q in enumerate(heldout_pairs) if q == p]
        out[rows] = layer_projections(heldout[rows], vector)
    return out


def validate(
    answers: dict[str, Sequence[LabelledAnswer]],
    projections: dict[str, torch.Tensor],
    layers: dict[str, int],
    random_p95: dict[str, float],
) -> dict[str, Any]:
    """The report (see the module docstring) from `project_all`'s projections (and, where
    present, `"lopo/<trait>"`: `leave_one_pair_out`'s), each vector's monitoring layer, and the
    random-direction baseline (which needs the hidden states themselves)."""
    report: dict[str, Any] = {"traits": {}, "specificity": {}}
    for trait, items in answers.items():
        labels = np.array([a.label for a in items])
        proj = projections[f"{trait}/{trait}"].numpy()
        layer = layers[trait]
        report["traits"][trait] = {
            "layer": layer,
            "n_label1": int((labels == 1).sum()),
            "n_label0": int((labels == 0).sum()),
            "n_label1_by_source": {
                kind: int(sum(a.label for a in items if _kind(a) == kind)) for kind in ("positive", "negative", "plain")
            },
            "auc": labelled_auc(proj[:, layer], labels),
            "auc_ci95": bootstrap_ci(proj[labels == 1, layer], proj[labels == 0, layer]),
            "auc_layer0": labelled_auc(proj[:, 0], labels),
            "random_auc_p95": random_p95[trait],
            "auc_by_layer": [labelled_auc(proj[:, k], labels) for k in range(proj.shape[1])],
            **_lopo(projections.get(f"lopo/{trait}"), labels, layer),
            # the old measure, for comparison: "written under the eliciting prompt" as the label
            "auc_by_prompt": labelled_auc(
                proj[[a.positive is not None for a in items], layer],
                np.array([int(bool(a.positive)) for a in items if a.positive is not None]),
            ),
        }
    for name, layer in layers.items():
        if name not in answers:
            continue
        own = _label1(answers[name], projections[f"{name}/{name}"][:, layer])
        row = {}
        for other in answers:
            if other != name:
                theirs = _label1(answers[other], projections[f"{other}/{name}"][:, layer])
                row[other] = labelled_auc(np.concatenate([own, theirs]), np.array([1] * len(own) + [0] * len(theirs)))
        report["specificity"][name] = row
    return report


def _lopo(lopo: torch.Tensor | None, labels: np.ndarray, layer: int) -> dict[str, Any]:
    if lopo is None:
        return {}
    scores = lopo[:, layer].numpy()
    return {
        "auc_lopo": labelled_auc(scores, labels),
        "auc_lopo_ci95": bootstrap_ci(scores[labels == 1], scores[labels == 0]),
    }


def _kind(a: LabelledAnswer) -> str:
    return "plain" if a.positive is None else ("positive" if a.positive else "negative")


def _label1(items: Sequence[LabelledAnswer], scores: torch.Tensor) -> np.ndarray:
    return scores.numpy()[[a.label == 1 for a in items]]
