"""Persona vector extraction: the arithmetic (fast) and the pipeline end to end on a tiny model (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from personavec_vllm.extract.judge import weighted_score
from personavec_vllm.extract.pipeline import Answer, ExtractionSettings, _answers_key, keep_pair, pair_up
from personavec_vllm.extract.sweep import (
    SweepRow,
    fluency,
    fluent_range,
    is_monotonic,
    recommend_layer,
    steering_effect,
)
from personavec_vllm.hf.hidden import chat_prompt
from personavec_vllm.projection import diff_mean, projection_stats, roc_auc


def test_diff_mean_by_hand():
    # two positives, one negative, 1 layer + embeddings, hidden 2
    pos = torch.tensor([[[0.0, 0.0], [1.0, 3.0]], [[0.0, 0.0], [3.0, 5.0]]])
    neg = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    v = diff_mean(pos, neg)
    assert v.dtype == torch.float32
    assert v.tolist() == [[0.0, 0.0], [1.0, 3.0]]  # mean(pos) = [2, 4]; minus [1, 1]
    stats = projection_stats(v, pos, neg)["1"]
    unit = torch.tensor([1.0, 3.0]) / 10**0.5
    assert stats["pos_mean"] == pytest.approx(float(torch.tensor([2.0, 4.0]) @ unit))
    assert stats["neg_mean"] == pytest.approx(float(torch.tensor([1.0, 1.0]) @ unit))
    assert stats["pos_std"] == pytest.approx(abs(float(torch.tensor([1.0, 1.0]) @ unit)))


def test_instruction_placement():
    """System placement is the method's; user placement puts the instruction after the question;
    plain replies get neither. Cached answers are keyed by the placement."""
    assert Answer("Q?", 0, True, "Be evil.", "").conversation() == ("Be evil.", "Q?")
    assert Answer("Q?", 0, True, "Be evil.", "", placement="user").conversation() == (None, "Q?\n\nBe evil.")
    assert Answer("Q?", -1, False, "", "", placement="user").conversation() == (None, "Q?")
    assert _answers_key(ExtractionSettings()) != _answers_key(ExtractionSettings(placement="user"))
    with pytest.raises(ValueError, match="placement"):
        ExtractionSettings(placement="assistant")


def test_roc_auc():
    assert roc_auc(np.array([3, 4]), np.array([1, 2])) == 1.0
    assert roc_auc(np.array([1, 2]), np.array([3, 4])) == 0.0
    assert roc_auc(np.array([1, 3]), np.array([2, 2])) == 0.5


def test_judge_score_is_probability_weighted():
    import math

    top = [("70", math.log(0.5)), ("90", math.log(0.5)), ("hello", math.log(0.1))]
    assert weighted_score(top) == pytest.approx(80.0)
    assert weighted_score([("x", 0.0)]) is None
    assert weighted_score([("150", 0.0), ("20", math.log(0.3))]) == pytest.approx(20.0)


def test_pairs_and_judge_filter():
    answers = [Answer("q", 0, True, "p", "evil"), Answer("q", 0, False, "n", "nice"), Answer("r", 1, True, "p", "x")]
    pairs = pair_up(answers)
    assert len(pairs) == 1 and pairs[0][0].text == "evil"
    pos, neg = pairs[0]
    pos.trait_score, neg.trait_score, pos.coherence, neg.coherence = 80, 10, 90, 90
    assert keep_pair(pos, neg)
    neg.trait_score = 60
    assert not keep_pair(pos, neg)
    neg.trait_score, pos.coherence = 10, 20
    assert not keep_pair(pos, neg)


def test_recommended_layer_prefers_monotonic_effect():
    rows = [SweepRow(2, c, p) for c, p in ((-1, 0.2), (0, 0.5), (1, 0.9))]
    rows += [SweepRow(4, c, p) for c, p in ((-1, 0.1), (0, 0.9), (1, 0.95))]  # bigger effect, monotonic
    rows += [SweepRow(6, c, p) for c, p in ((-1, 0.0), (0, 0.9), (1, 0.8))]  # biggest swing, not monotonic
    assert is_monotonic(rows, 2) and not is_monotonic(rows, 6)
    assert recommend_layer(rows) == 4
    # with separation (d'): layer 2 steers at 0.7 / 0.85 = 82% of layer 4 and separates better;
    # layer 6 separates best but is not monotonic
    assert recommend_layer(rows, {2: 9.0, 4: 1.0, 6: 50.0}) == 2
    rows += [SweepRow(8, c, p) for c, p in ((-1, 0.3), (0, 0.5), (1, 0.8))]  # 0.5: under 80% of 0.85
    assert recommend_layer(rows, {2: 1.0, 4: 2.0, 6: 50.0, 8: 99.0}) == 4


def test_effect_and_monotonicity_count_only_the_fluent_range():
    # layer 2: the biggest swing comes from coefficients whose replies are broken
    rows = [
        SweepRow(2, c, p, fluent=f)
        for c, p, f in ((-4, 0.0, False), (-1, 0.45, True), (0, 0.5, True), (1, 0.55, True), (4, 0.3, False))
    ]
    # layer 4: a smaller swing over fluent settings, but all of it usable
    rows += [SweepRow(4, c, p, fluent=True) for c, p in ((-4, 0.3), (-1, 0.4), (0, 0.5), (1, 0.6), (4, 0.7))]
    assert fluent_range(rows, 2) == (-1, 1) and fluent_range(rows, 4) == (-4, 4)
    assert steering_effect(rows, 2) == pytest.approx(0.1) and is_monotonic(rows, 2)
    assert recommend_layer(rows) == 4
    # an island of fluency beyond a broken setting does not count
    rows = [SweepRow(6, c, p, fluent=f) for c, p, f in ((0, 0.5, True), (1, 0.6, False), (2, 0.9, True))]
    assert fluent_range(rows, 6) == (0, 0) and not is_monotonic(rows, 6)


@pytest.fixture(scope="module")
def tiny_hf(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(
        tiny_llama
    )


def test_generation_hook_steers_the_last_prompt_token_and_every_new_token(tiny_hf):
    """`steered_replies` (KV-cached generate) equals greedy decoding step by step with the
    steering added, without a cache, at the last prompt position and every generated one."""
    from personavec_vllm.extract.sweep import steered_replies
    from personavec_vllm.hf.hooks import adder, on_residual

    model, tokenizer = tiny_hf
    torch.manual_seed(0)
    vector = torch.randn(model.config.num_hidden_layers + 1, model.config.hidden_size)
    replies = steered_replies(model, tokenizer, ["Why is the sky blue?"], vector, 2, [0.0, 3.0], max_new_tokens=5)
    (reply,) = replies[3.0]
    ids, start = chat_prompt(tokenizer, None, "Why is the sky blue?")
    expected = []
    for _ in range(5):
        mask = torch.zeros(1, len(ids), 1)
        mask[0, start - 1 :] = 1.0
        with on_residual(model, [(2, adder(3.0 * vector[2], mask=mask))]), torch.no_grad():
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        ids, expected = ids + [token], expected + [token]
    assert reply == expected
    (plain,) = steered_replies(model, tokenizer, ["Why is the sky blue?"], None, 2, [0.0], max_new_tokens=5)[0.0]
    assert replies[0.0] == [plain]  # a row with coefficient 0 in a steered batch is not steered
    assert plain != reply  # the hook did something, and is gone afterwards
    ppl, distinct = fluency(model, tokenizer, ["Why is the sky blue?"], [plain])
    assert ppl > 0 and 0 < distinct <= 1


@pytest.mark.slow
def test_pipeline_end_to_end_on_tiny_model(tmp_path, tiny_llama):
    """Shapes, metadata and determinism (two runs, each with its own engine, same vectors) on a
    tiny random model. Greedy answers: sampled ones are not reproducible across engines on
    vLLM-CPU, whose per-request seeds crash the engine (see pipeline.generate_answers)."""
    from personavec_vllm.extract.pipeline import ExtractionSettings, extract_traits
    from personavec_vllm.library import VectorLibrary
    from personavec_vllm.traits import load_trait
    from personavec_vllm.vectors import load_vector

    full = load_trait("evil")
    trait = full.model_copy(
        update={
            "extraction_questions": full.extraction_questions[:3],
            "evaluation_questions": full.evaluation_questions[:2],
            "multiple_choice": full.multiple_choice[:4],
        }
    )
    settings = ExtractionSettings(
        max_tokens=6, temperature=0.0, heldout_questions=2, sweep_layers=[1, 3], sweep_coeffs=(-2.0, 0.0, 2.0)
    )
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        (report,) = extract_traits([trait], str(tiny_llama), out, settings, model_name="tiny")
        runs.append((out, report))
    (out, report), (out2, _report2) = runs
    v = load_vector(out / "evil.safetensors")
    assert v.vectors.shape == (5, 128) and v.method == "response_avg_diff" and v.model == "tiny"
    assert v.layer == report["recommended_layer"] in (1, 3)
    assert v.extra["instruction_placement"] == "system"
    assert v.extra["judge"].startswith("none") and v.extra["pairs_kept"] == str(len(full.instruction_pairs) * 3)
    assert set(v.projection_stats(v.layer)) == {"pos_mean", "pos_std", "neg_mean", "neg_std"}
    assert set(v.plain_stats(v.layer)) == {"mean", "std"}  # plain replies: the alerting baseline
    assert len((out / "reports" / "evil.plain.jsonl").read_text().splitlines()) == 2
    assert json.loads(v.extra["sweep"])["layers"] == [1, 3]
    for method in ("prompt_avg_diff", "prompt_last_diff"):
        variant = load_vector(out / "variants" / f"evil.{method}.safetensors")
        assert variant.method == method and variant.vectors.shape == (5, 128)
    assert torch.equal(v.vectors, load_vector(out2 / "evil.safetensors").vectors)  # same settings: same vectors
    assert report["heldout_pairs"] == len(full.instruction_pairs) * 2 and "heldout_auc" in report
    assert (out / "reports" / "evil.sweep.png").stat().st_size > 0
    assert VectorLibrary(out, 4, 128).names() == ["evil"]  # variants stay out of the served library
    # the monitoring layer: picked by held-out AUC with the instruction out of context
    assert (
        v.monitor_layer
        == report["monitor_layer"]
        == 1 + max(range(4), key=lambda k: report["heldout_auc_bare"][str(k + 1)])
    )

    # hand labels as the filter (no engine: the saved answers are reused)
    import shutil

    from personavec_vllm.extract.judge import HandLabels, text_digest

    labelled = tmp_path / "labelled"
    shutil.copytree(out, labelled)
    answers = [json.loads(x) for x in (labelled / "reports" / "evil.answers.jsonl").read_text().splitlines()]
    labels = [
        {
            "line": i,
            "question": a["question"],
            "text_sha": text_digest(a["text"]),
            "strength": 3 if a["positive"] and a["pair"] == 0 else 0,
            "coherent": a["question"] != trait.extraction_questions[2],
        }
        for i, a in enumerate(answers)
    ]
    (labelled / "labels").mkdir()
    labels_file = labelled / "labels" / "evil.answers.labels.jsonl"
    labels_file.write_text("".join(json.dumps(x) + "\n" for x in labels))
    (report3,) = extract_traits([trait], str(tiny_llama), labelled, settings, judge=HandLabels(labelled / "labels"))
    kept = [(answers[p], answers[n]) for p, n in report3["kept_pairs"]]
    assert report3["pairs_kept"] == 2 and report3["judge"].startswith("hand labels")
    assert all(p["pair"] == n["pair"] == 0 and p["positive"] and not n["positive"] for p, n in kept)
    assert {p["question"] for p, _ in kept} == set(trait.extraction_questions[:2])
    labels[0]["text_sha"] = "0" * 12  # labels written for other texts are refused, not applied
    labels_file.write_text("".join(json.dumps(x) + "\n" for x in labels))
    with pytest.raises(ValueError, match="another answer"):
        extract_traits([trait], str(tiny_llama), labelled, settings, judge=HandLabels(labelled / "labels"))


def test_batched_hidden_means_equal_one_by_one(tiny_llama):
    """Right padding in a batch leaves each answer's hidden states unchanged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from personavec_vllm.hf.hidden import hidden_means

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    items = [
        ("Be nice.", "Hi?", "Hello there, friend."),
        (None, "What is 2+2?", "4"),
        ("Be evil.", "Advice?", "Lie to everyone you meet, always and without exception."),
        (None, "Empty?", ""),
    ]
    batched = hidden_means(model, tokenizer, items, batch_size=4)
    single = hidden_means(model, tokenizer, items, batch_size=1)
    for key in batched:
        assert batched[key].shape == (4, 5, 128)
        torch.testing.assert_close(batched[key], single[key], rtol=1e-4, atol=1e-5)


def test_leave_one_pair_out_scores_each_answer_without_its_own_pair():
    from personavec_vllm.extract.labelled import leave_one_pair_out
    from personavec_vllm.projection import layer_projections

    gen = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(6, 3, 8, generator=gen), torch.randn(6, 3, 8, generator=gen)
    pairs = [0, 0, 1, 1, 2, 2]
    heldout = torch.randn(4, 3, 8, generator=gen)
    got = leave_one_pair_out(pos, neg, pairs, heldout, [1, 0, -1, 1])
    for row, (left_out, rows) in enumerate(
        ((1, [0, 1, 4, 5]), (0, [2, 3, 4, 5]), (-1, list(range(6))), (1, [0, 1, 4, 5]))
    ):
        vector = diff_mean(pos[rows], neg[rows])
        assert torch.allclose(got[row], layer_projections(heldout[row : row + 1], vector)[0]), left_out


def test_monitoring_layer_is_the_best_held_out_auc_layer():
    from personavec_vllm.projection import best_auc_layer

    pos = torch.tensor([[9.0, 0.0, 1.0, 5.0], [9.0, 1.0, 2.0, 6.0]])
    neg = torch.tensor([[0.0, 2.0, 0.0, 5.5], [0.0, 3.0, 1.5, 0.0]])
    layer, aucs = best_auc_layer(pos, neg)  # layer 0 (embeddings) separates best but is never picked
    assert layer == 2 and aucs[0] == 1.0 and aucs[1] == 0.0 and aucs[2] == 0.75


def test_hand_labels_fill_the_judge_scores(tmp_path):
    from personavec_vllm.extract.judge import HandLabels, text_digest
    from personavec_vllm.traits import load_trait

    answers = [Answer("q", 0, True, "p", "cruel"), Answer("q", 0, False, "n", "kind")]
    rows = [
        {"line": 0, "question": "q", "text_sha": text_digest("cruel"), "strength": 2, "coherent": True},
        {"line": 1, "question": "q", "text_sha": text_digest("kind"), "strength": 1, "coherent": True},
    ]
    (tmp_path / "evil.answers.labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    HandLabels(str(tmp_path)).score(load_trait("evil"), answers)
    assert keep_pair(*answers)  # strength 2 passes the >= 50 filter, strength 1 does not
    assert [a.trait_score for a in answers] == [pytest.approx(200 / 3), pytest.approx(100 / 3)]
    rows[1]["coherent"] = False
    (tmp_path / "evil.answers.labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    HandLabels(str(tmp_path)).score(load_trait("evil"), answers)
    assert not keep_pair(*answers)
    with pytest.raises(ValueError, match="1 labels for 2 answers"):
        (tmp_path / "evil.answers.labels.jsonl").write_text(json.dumps(rows[0]) + "\n")
        HandLabels(str(tmp_path)).score(load_trait("evil"), answers)
    with pytest.raises(FileNotFoundError, match="no hand labels"):
        HandLabels(str(tmp_path / "none")).score(load_trait("evil"), answers)
