"""The shipped library's hand labels and the validation table computed from them (issue #16).

The table (`labels/validation.json`, `labels/VALIDATION.md`, quoted in the library README) is
recomputed here from the stored per-answer projections (`labels/projections.safetensors`,
written by `examples/validate_labels.py` from an HF forward pass) and the labels: a label, a
projection or a formula that changes makes this fail. The random-direction baseline needs the
hidden states themselves and is taken as recorded.
"""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file

from personavec_vllm.data import vectors_dir
from personavec_vllm.extract.labelled import read_labelled, validate
from personavec_vllm.library import load_vectors
from personavec_vllm.models import DEFAULT_MODEL_NAME

LIBRARY = vectors_dir(DEFAULT_MODEL_NAME)
LABELS = LIBRARY / "labels"
TRAITS = ("evil", "hallucinating", "humorous", "impolite", "sycophantic")


@pytest.fixture(scope="module")
def answers():
    return {trait: read_labelled(LIBRARY, trait) for trait in TRAITS}


def test_every_reported_answer_is_labelled_by_the_rubric(answers):
    assert (LABELS / "RUBRIC.md").is_file()
    for trait, items in answers.items():
        sources = {(a.source, a.line) for a in items}
        for source in ("heldout", "plain"):
            n = len((LIBRARY / "reports" / f"{trait}.{source}.jsonl").read_text().splitlines())
            assert {(source, i) for i in range(n)} <= sources, (trait, source)
        for a in items:
            assert 0 <= a.strength <= 3 and a.label == int(a.strength >= 2), (trait, a.line)
        assert len(items) >= 100


def _close(a, b):
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == pytest.approx(b, abs=1e-9)


def test_the_table_is_what_the_labels_and_projections_give(answers):
    recorded = json.loads((LABELS / "validation.json").read_text())
    projections = load_file(str(LABELS / "projections.safetensors"))
    layers = {v.name: v.monitor_layer for v in load_vectors([LIBRARY], list(TRAITS))}
    random_p95 = {t: r["random_auc_p95"] for t, r in recorded["traits"].items()}
    report = json.loads(json.dumps(validate(answers, projections, layers, random_p95)))
    for trait, row in recorded["traits"].items():
        got = report["traits"][trait]
        for key in ("layer", "n_label1", "n_label0", "n_label1_by_source"):
            assert got[key] == row[key], (trait, key)
        for key in ("auc", "auc_layer0", "auc_by_prompt", "auc_lopo"):
            assert _close(got[key], row[key]), (trait, key)
        assert all(_close(x, y) for x, y in zip(got["auc_ci95"], row["auc_ci95"])), trait
        assert all(_close(x, y) for x, y in zip(got["auc_lopo_ci95"], row["auc_lopo_ci95"])), trait
        assert all(_close(x, y) for x, y in zip(got["auc_by_layer"], row["auc_by_layer"])), trait
    for name, row in recorded["specificity"].items():
        for other, value in row.items():
            assert _close(report["specificity"][name][other], value), (name, other)


def test_the_library_readme_shows_the_table():
    table = (LABELS / "VALIDATION.md").read_text()
    assert table.strip() in (LIBRARY / "README.md").read_text()


def test_every_extraction_answer_is_labelled_and_the_vectors_use_the_labelled_filter():
    """The shipped vectors were built from the pairs the hand labels keep (`extract --labels`)."""
    from personavec_vllm.extract.judge import HandLabels
    from personavec_vllm.extract.pipeline import Answer, keep_pair, pair_up
    from personavec_vllm.traits import load_trait

    for trait in TRAITS:
        lines = (LIBRARY / "reports" / f"{trait}.answers.jsonl").read_text().splitlines()
        answers = [Answer(**json.loads(x)) for x in lines if x]
        HandLabels(str(LABELS)).score(load_trait(trait), answers)  # raises unless every text is labelled
        line = {id(a): i for i, a in enumerate(answers)}
        kept = [[line[id(p)], line[id(n)]] for p, n in pair_up(answers) if keep_pair(p, n)]
        report = json.loads((LIBRARY / "reports" / f"{trait}.json").read_text())
        assert report["kept_pairs"] == kept and report["pairs_kept"] == len(kept) > 0, trait
        vector = next(v for v in load_vectors([LIBRARY], [trait]))
        assert vector.extra["pairs_kept"] == str(len(kept)) and vector.extra["judge"].startswith("hand labels")


def test_the_library_readme_shows_every_result_table():
    readme = (LIBRARY / "README.md").read_text()
    for name in ("STEERING.md", "GRADED.md", "FINETUNE.md"):
        assert (LABELS / name).read_text().strip() in readme, name


@pytest.mark.slow
def test_steering_controls_and_graded_prompts_reproduce():
    """Recompute part of the stored steering-control and graded-prompt results with the HF model."""
    import numpy as np

    from personavec_vllm.extract.controls import graded_prompt_points, steering_controls
    from personavec_vllm.models import resolve_model
    from personavec_vllm.screen import load_hf
    from personavec_vllm.traits import load_trait

    model, tokenizer = load_hf(resolve_model(None))
    evil = load_trait("evil")
    vector = next(v for v in load_vectors([LIBRARY], ["evil"]))
    stored = next(r for r in json.loads((LABELS / "steering_controls.json").read_text()) if r["vector"] == "evil")
    got = steering_controls(
        model, tokenizer, [evil], "evil", vector.vectors, stored["layer"], stored["coeff"], n_random=2
    )
    assert got["on_target_gain"] == pytest.approx(stored["on_target_gain"], abs=1e-4)
    assert got["random_gains"] == pytest.approx(stored["random_gains"][:2], abs=1e-4)
    graded = json.loads((LABELS / "graded_prompts.json").read_text())["evil"]
    points = graded_prompt_points(model, tokenizer, evil, vector.vectors, [graded["instructions"][0]])
    assert float(points["p_trait"].mean()) == pytest.approx(graded["by_level"]["p_trait"][0], abs=1e-4)
    layer = graded["layer"]
    assert float(np.mean(points["projection"][:, layer])) == pytest.approx(
        graded["by_level"]["projection"][0], abs=1e-2
    )
