"""Steering ops beyond `add` inside a real vLLM engine: `ablate`, `cap` and conditional terms
(`when`), checked against the independent HF reference (same greedy tokens, close logprobs and
projections, before and after the layer's own terms), in eager and compiled modes, alone and
mixed in one batch with plain and add-steered requests."""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import get_engine, make_vectors, shutdown_engine
from hf_reference import RefGate, RefTerm, hf_generate

from personavec_vllm.engine.offline import persona_params, projections
from personavec_vllm.testing import build_tiny_model

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "Question: what is 17 + 25? Answer:",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ops")
    model = str(build_tiny_model("llama", root / "llama"))
    (root / "vectors").mkdir()
    vectors = make_vectors(root / "vectors", num_layers=4, hidden=128, norm=2.0)
    return model, str(root / "vectors"), vectors


@pytest.fixture(scope="module")
def hf(setup):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(setup[0], dtype=torch.float32).eval()


@pytest.fixture(scope="module", autouse=True)
def _stop_engines():
    yield
    shutdown_engine()


def _ids(hf_tokenizer_path, prompt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_tokenizer_path)(prompt)["input_ids"]


def _plain_projection(hf, ids, vector, layer):
    """The unsteered projection at the last prompt token and over the reply (to set thresholds
    that bind on this model)."""
    ref = hf_generate(hf, ids, MAX_TOKENS, [], {"v": (vector, (layer,))})
    values = ref.projections[("v", layer)]
    return values[0], sorted(values)


def _ref_terms(vectors, steer):
    terms = []
    for t in steer:
        gate = None
        if "when" in t:
            w = t["when"]
            above = "above" in w
            gate = RefGate(vectors[w["vector"]], w["layer"], w["above" if above else "below"], above)
        terms.append(
            RefTerm(
                vectors[t["vector"]],
                t.get("coeff", 0.0),
                tuple(t["layers"]),
                t.get("positions", "response"),
                t.get("op", "add"),
                t.get("min"),
                t.get("max"),
                gate,
            )
        )
    return terms


def _shared_gates(terms):
    """The reference decides each distinct condition once: terms that name equal conditions
    share one RefGate object."""
    seen = {}
    for term in terms:
        if term.when is not None:
            key = (id(term.when.vector), term.when.layer, term.when.threshold, term.when.above)
            term.when = seen.setdefault(key, term.when)
    return terms


def _cases(hf, model_path, vectors):
    """(name, prompt ids, steer, monitored layers of vector a) with thresholds set from the
    model's own projections, so every cap binds and every data-driven gate splits the prompts."""
    ids = [_ids(model_path, p) for p in PROMPTS]
    last_b = [_plain_projection(hf, i, vectors["b"], 2)[0] for i in ids]
    split = sum(last_b) / 2  # above it for one prompt, below for the other
    out = []
    for prompt_ids in ids:
        _, sorted_a = _plain_projection(hf, prompt_ids, vectors["a"], 3)
        median = sorted_a[len(sorted_a) // 2]
        gate = {"vector": "b", "layer": 2, "above": split}
        out += [
            ("ablate", prompt_ids, [{"vector": "a", "op": "ablate", "layers": [3], "positions": "all"}]),
            ("cap_max", prompt_ids, [{"vector": "a", "op": "cap", "max": median, "layers": [3], "positions": "all"}]),
            ("cap_min", prompt_ids, [{"vector": "a", "op": "cap", "min": median, "layers": [3]}]),
            (
                "add_then_cap",
                prompt_ids,
                [
                    {"vector": "a", "coeff": 4.0, "layers": [3], "positions": "all"},
                    {"vector": "a", "op": "cap", "max": median, "layers": [3], "positions": "all"},
                ],
            ),
            ("gated_above_layer", prompt_ids, [{"vector": "a", "coeff": 4.0, "layers": [3], "when": gate}]),
            (
                "gated_at_layer",
                prompt_ids,
                [{"vector": "a", "coeff": 4.0, "layers": [2], "positions": "all", "when": gate}],
            ),
            (
                "gated_cap",
                prompt_ids,
                [
                    {
                        "vector": "a",
                        "op": "cap",
                        "max": median,
                        "layers": [3],
                        "positions": "all",
                        "when": {**gate, "above": -1e6},
                    }
                ],
            ),
            (
                "two_gates",
                prompt_ids,
                [
                    {"vector": "a", "coeff": 3.0, "layers": [3], "when": {"vector": "b", "layer": 2, "above": split}},
                    {"vector": "c", "coeff": -3.0, "layers": [4], "when": {"vector": "c", "layer": 1, "below": 1e6}},
                ],
            ),
        ]
    return out


def _spec(steer):
    return {"steer": steer, "monitor": {"vectors": ["a", "c"], "layers": [2, 3, 4], "per_token": True}}


def _sampling():
    from vllm import SamplingParams

    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1)


def _generate(llm, items):
    params = [_sampling() if spec is None else persona_params(_sampling(), **spec) for _, spec in items]
    outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in items], params, use_tqdm=False)
    return [(o.outputs[0], projections(o) if spec else {}) for o, (_, spec) in zip(outs, items)]


def _close(got, want, what):
    got_t, want_t = torch.tensor(got), torch.tensor(want)
    err = ((got_t - want_t).abs() / want_t.abs().clamp_min(0.05)).max()
    assert err < 2e-3, f"{what}: {got} vs {want}"


def _assert_matches(out, ref, name):
    completion, proj = out
    assert list(completion.token_ids) == ref.tokens, name
    chosen = [lp[t].logprob for t, lp in zip(completion.token_ids, completion.logprobs)]
    assert chosen == pytest.approx(ref.logprobs, abs=1e-3), name
    for (vector, layer), values in ref.projections.items():
        got = proj[vector][layer]
        _close(got.per_token, values, f"{name} {vector}@{layer}")
        if got.before is not None:
            _close(got.before.per_token, ref.before[(vector, layer)], f"{name} {vector}@{layer} before")


def _check(llm, hf, model_path, vectors):
    cases = _cases(hf, model_path, vectors)
    items, refs = [], []
    for name, ids, steer in cases:
        monitor = {n: (vectors[n], (2, 3, 4)) for n in ("a", "c")}
        refs.append((name, hf_generate(hf, ids, MAX_TOKENS, _shared_gates(_ref_terms(vectors, steer)), monitor)))
        items.append((ids, _spec(steer)))
    plain = [(ids, None) for ids in {tuple(i): i for _, i, _ in cases}.values()]
    mixed = _generate(llm, items + plain)  # every case and the plain prompts in one batch
    alone = [_generate(llm, [item])[0] for item in items]
    for (name, ref), together, single in zip(refs, mixed, alone):
        _assert_matches(together, ref, name)
        _assert_matches(single, ref, name)
    by_name = {}
    for (name, ref), out in zip(refs, mixed):
        by_name.setdefault(name, []).append((ref, out))
    # the ops do what they say: ablation zeroes the projection, a cap bounds it, and the data-driven
    # gate opens for one prompt and stays shut for the other
    for _, (_, proj) in by_name["ablate"]:
        assert max(abs(v) for v in proj["a"][3].per_token) < 1e-4
        assert max(abs(v) for v in proj["a"][3].before.per_token) > 0.05
    for (_, _, steer), (_, (_, proj)) in zip([c for c in cases if c[0] == "cap_max"], by_name["cap_max"]):
        bound = steer[0]["max"]
        assert max(proj["a"][3].per_token) <= bound + 1e-4 < max(proj["a"][3].before.per_token)
    assert sorted(ref.gates[0] for ref, _ in by_name["gated_above_layer"]) == [False, True]
    plain_tokens = {tuple(ids): list(o.token_ids) for (ids, _), (o, _) in zip(plain, mixed[len(items) :])}
    changed = sum(list(out[0].token_ids) != plain_tokens[tuple(ids)] for (ids, _), out in zip(items, mixed))
    assert changed >= len(items) // 2  # the ops change outputs: a test that cannot fail proves nothing


def test_ops_match_reference_eager(setup, hf):
    model, vectors_dir, vectors = setup
    llm = get_engine(model, vectors_dir, eager=True)
    _check(llm, hf, model, vectors)


def test_gates_that_always_or_never_fire_equal_the_plain_term_or_none(setup, hf):
    model, vectors_dir, vectors = setup
    llm = get_engine(model, vectors_dir, eager=True)
    ids = _ids(model, PROMPTS[0])
    term = {"vector": "a", "coeff": 4.0, "layers": [3], "positions": "all"}
    for layer in (2, 3):  # a gate below the term's layer, and at it
        always = {**term, "when": {"vector": "b", "layer": layer, "above": -1e9}}
        never = {**term, "when": {"vector": "b", "layer": layer, "below": -1e9}}
        response = {**term, "positions": "response"}
        outs = _generate(
            llm, [(ids, {"steer": [always]}), (ids, {"steer": [response]}), (ids, {"steer": [never]}), (ids, None)]
        )
        tokens = [list(o.token_ids) for o, _ in outs]
        if layer < 3:  # decided before the term's layer: from the last prompt token, like `response`
            assert tokens[0] == tokens[1]
        else:  # decided at the term's layer: from the first generated token
            ref = hf_generate(hf, ids, MAX_TOKENS, _ref_terms(vectors, [always]))
            assert tokens[0] == ref.tokens
        assert tokens[2] == tokens[3] != tokens[1]


def test_ops_match_reference_compiled(setup, hf):
    model, vectors_dir, vectors = setup
    llm = get_engine(model, vectors_dir, eager=False)
    _check(llm, hf, model, vectors)
