"""Per-request steering and projection capture inside a real vLLM engine, checked against an
independent HF transformers reference (forward hooks on the same weights)."""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import get_engine, make_vectors, shutdown_engine
from hf_reference import RefTerm, hf_generate

from personavec_vllm.engine.offline import persona_params, projections
from personavec_vllm.testing import build_tiny_model

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "Write a short poem about the sea:",
    "Question: what is 17 + 25? Answer:",
]


@pytest.fixture(scope="session")
def tiny_vectors(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_vectors")
    return str(directory), make_vectors(directory, num_layers=4, hidden=128)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: str(build_tiny_model(arch, root / arch)) for arch in ("llama", "qwen2", "qwen3", "mistral")}


@pytest.fixture(scope="module", autouse=True)
def _stop_engines():
    yield
    shutdown_engine()


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _tokenize(llm, prompt):
    """Token ids of a prompt (text, or already a list of ids)."""
    return list(prompt) if isinstance(prompt, list) else llm.get_tokenizer()(prompt)["input_ids"]


def _sampling(**kw):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1, **kw)


def _chosen_logprobs(completion):
    return [lp[t].logprob for t, lp in zip(completion.token_ids, completion.logprobs)]


def _run(llm, prompts, specs):
    """Generate `prompts[i]` with persona spec `specs[i]` (None = plain) in one batch."""
    params = [_sampling() if spec is None else persona_params(_sampling(), **spec) for spec in specs]
    outs = llm.generate([{"prompt_token_ids": _tokenize(llm, p)} for p in prompts], params, use_tqdm=False)
    return [(o.outputs[0], projections(o) if spec and "monitor" in spec else {}) for o, spec in zip(outs, specs)]


def _terms(vectors, steer):
    return [
        RefTerm(vectors[t["vector"]], t["coeff"], tuple(t["layers"]), t.get("positions", "response")) for t in steer
    ]


def _assert_matches_reference(vllm_out, ref, monitored):
    completion, proj = vllm_out
    assert list(completion.token_ids) == ref.tokens
    assert _chosen_logprobs(completion) == pytest.approx(ref.logprobs, abs=1e-3)
    for (name, layer), ref_values in ref.projections.items():
        got = proj[name][layer].per_token
        assert len(got) == len(ref_values)
        ref_t, got_t = torch.tensor(ref_values), torch.tensor(got)
        rel = ((got_t - ref_t).abs() / ref_t.abs().clamp_min(1e-2)).max()
        assert rel < 1e-3, f"{name}@{layer}: {got} vs {ref_values}"
        assert proj[name][layer].prompt_last == pytest.approx(ref_values[0], rel=1e-3, abs=1e-5)
        mean = sum(ref_values[1:]) / (len(ref_values) - 1)
        assert proj[name][layer].response_mean == pytest.approx(mean, rel=1e-3, abs=1e-5)
    assert set(proj) == {name for name, _ in monitored}


CASES = {
    # name: (steer terms, monitored (vector, layer))
    "response": ([{"vector": "a", "coeff": 3.0, "layers": [2], "positions": "response"}], [("a", 2), ("b", 3)]),
    "prompt": ([{"vector": "b", "coeff": -3.0, "layers": [1, 3], "positions": "prompt"}], [("b", 1)]),
    "all": ([{"vector": "c", "coeff": 2.5, "layers": [3], "positions": "all"}], [("c", 3)]),
    "multi": (
        [
            {"vector": "a", "coeff": 2.0, "layers": [1], "positions": "all"},
            {"vector": "b", "coeff": -2.5, "layers": [2, 4], "positions": "response"},
        ],
        [("a", 1), ("b", 4)],
    ),
}


def _spec(steer, monitored):
    layers_by_vector = {}
    for name, layer in monitored:
        layers_by_vector.setdefault(name, []).append(layer)
    # One monitor block per request: the vectors share one layer list in the API, so monitored
    # pairs in CASES use one layer per vector.
    names = list(layers_by_vector)
    layers = sorted({l for ls in layers_by_vector.values() for l in ls})
    return {"steer": steer, "monitor": {"vectors": names, "layers": layers, "per_token": True}}


def _check_reference(llm, model_path, vectors):
    hf = _hf_model(model_path)
    prompts, specs, refs = [], [], []
    for prompt in PROMPTS:
        plain = hf_generate(hf, _tokenize(llm, prompt), MAX_TOKENS)
        prompts.append(prompt)
        specs.append(None)
        refs.append((plain, []))
        for steer, monitored in CASES.values():
            spec = _spec(steer, monitored)
            all_pairs = [(n, l) for n in spec["monitor"]["vectors"] for l in spec["monitor"]["layers"]]
            monitor = {n: (vectors[n], tuple(spec["monitor"]["layers"])) for n in spec["monitor"]["vectors"]}
            ref = hf_generate(hf, _tokenize(llm, prompt), MAX_TOKENS, _terms(vectors, steer), monitor)
            prompts.append(prompt)
            specs.append(spec)
            refs.append((ref, all_pairs))
    outs = _run(llm, prompts, specs)
    changed = 0
    for i, (out, (ref, pairs)) in enumerate(zip(outs, refs)):
        _assert_matches_reference(out, ref, pairs)
        plain_tokens = refs[i - i % (len(CASES) + 1)][0].tokens
        changed += specs[i] is not None and ref.tokens != plain_tokens
    # Steering must actually change outputs (a test that cannot fail proves nothing).
    assert changed >= len(PROMPTS) * len(CASES) // 2


# Tests are ordered to share engines: the eager Llama engine first, then the other
# architectures, then compiled mode, then engines with special configurations.
LLAMA_EAGER = dict(eager=True, block_size=32, enable_prefix_caching=True)


def test_reference_equivalence_llama_eager(tiny_models, tiny_vectors):
    vectors_dir, vectors = tiny_vectors
    llm = get_engine(tiny_models["llama"], vectors_dir, **LLAMA_EAGER)
    _check_reference(llm, tiny_models["llama"], vectors)


MIXED = [
    None,
    {"steer": [{"vector": "a", "coeff": 3.0, "layers": [2]}]},
    {
        "steer": [{"vector": "a", "coeff": -3.0, "layers": [2]}],
        "monitor": {"vectors": ["a"], "layers": [2], "per_token": True},
    },
    {"steer": [{"vector": "b", "coeff": 2.0, "layers": [1, 3], "positions": "all"}]},
    {
        "steer": [{"vector": "c", "coeff": -2.5, "layers": [4], "positions": "prompt"}],
        "monitor": {"vectors": ["c", "a"], "layers": [4], "per_token": True},
    },
    {"monitor": {"vectors": ["a", "b", "c"], "layers": [1, 2], "per_token": True}},
    {
        "steer": [
            {"vector": "a", "coeff": 1.5, "layers": [1]},
            {"vector": "c", "coeff": 2.0, "layers": [3], "positions": "all"},
        ]
    },
    None,
    {"steer": [{"vector": "b", "coeff": -3.0, "layers": [2]}], "monitor": {"vectors": ["b"], "per_token": True}},
    {
        "steer": [{"vector": "a", "coeff": 3.0, "layers": [2]}],
        "monitor": {"vectors": ["a"], "layers": [2], "per_token": True},
    },
]


def _assert_same(batched, solo):
    (c1, p1), (c2, p2) = batched, solo
    assert list(c1.token_ids) == list(c2.token_ids)
    assert _chosen_logprobs(c1) == pytest.approx(_chosen_logprobs(c2), abs=1e-4)
    assert p1.keys() == p2.keys()
    for name in p1:
        for layer in p1[name]:
            assert p1[name][layer].per_token == pytest.approx(p2[name][layer].per_token, rel=1e-4, abs=1e-5)


def test_isolation_mixed_batch(tiny_models, tiny_vectors, engine_kwargs=LLAMA_EAGER):
    """Ten requests mixing vectors, signs, layers, positions, monitoring and no steering, in one
    batch, each get exactly what they get alone. A small token budget forces chunked prefill."""
    vectors_dir, _ = tiny_vectors
    llm = get_engine(tiny_models["llama"], vectors_dir, **engine_kwargs)
    prompts = [PROMPTS[i % len(PROMPTS)] + " " + "word " * i for i in range(len(MIXED))]
    batched = _run(llm, prompts, MIXED)
    solo = [_run(llm, [p], [s])[0] for p, s in zip(prompts, MIXED)]
    for b, s in zip(batched, solo):
        _assert_same(b, s)
    distinct = {tuple(c.token_ids) for c, _ in batched}
    assert len(distinct) >= 6  # the specs really steer differently


def test_prefix_cache_never_shared_with_steered(tiny_models, tiny_vectors):
    """Same prompt plain, steered, plain again; and a steered prompt that is the prefix of a
    later plain one: each gets its own HF-reference output, never the other's cached KV."""
    vectors_dir, vectors = tiny_vectors
    llm = get_engine(tiny_models["llama"], vectors_dir, **LLAMA_EAGER)
    hf = _hf_model(tiny_models["llama"])
    prompt = " ".join(PROMPTS) * 2  # several full blocks
    steer_all = {"steer": [{"vector": "a", "coeff": 3.0, "layers": [1, 2], "positions": "all"}]}
    steer_resp = {"steer": [{"vector": "b", "coeff": -3.0, "layers": [2], "positions": "response"}]}
    plain_ref = hf_generate(hf, _tokenize(llm, prompt), MAX_TOKENS)
    all_ref = hf_generate(hf, _tokenize(llm, prompt), MAX_TOKENS, _terms(vectors, steer_all["steer"]))
    assert all_ref.tokens != plain_ref.tokens
    sequence = [(None, plain_ref), (steer_all, all_ref), (None, plain_ref), (steer_all, all_ref)]
    for spec, ref in sequence:
        ((completion, _),) = _run(llm, [prompt], [spec])
        assert list(completion.token_ids) == ref.tokens
        assert _chosen_logprobs(completion) == pytest.approx(ref.logprobs, abs=1e-3)
    # Response steering touches the last prompt token's KV: a longer plain prompt sharing that
    # prefix must not reuse it.
    short = _tokenize(llm, prompt)[:48]
    longer = short + _tokenize(llm, " and then it continued")
    outs = llm.generate([{"prompt_token_ids": short}], persona_params(_sampling(), **steer_resp), use_tqdm=False)
    assert (
        list(outs[0].outputs[0].token_ids)
        == hf_generate(hf, short, MAX_TOKENS, _terms(vectors, steer_resp["steer"])).tokens
    )
    (after,) = llm.generate([{"prompt_token_ids": longer}], _sampling(), use_tqdm=False)
    assert list(after.outputs[0].token_ids) == hf_generate(hf, longer, MAX_TOKENS).tokens


def test_invalid_spec_is_refused_and_engine_keeps_serving(tiny_models, tiny_vectors):
    from vllm.exceptions import VLLMValidationError

    vectors_dir, _ = tiny_vectors
    llm = get_engine(tiny_models["llama"], vectors_dir, **LLAMA_EAGER)
    bad = [
        ({"steer": [{"vector": "nope", "coeff": 1.0}]}, "persona_steer[0].vector"),
        ({"steer": [{"vector": "a", "coeff": 1.0, "layers": [9]}]}, "persona_steer[0].layers[0]"),
        ({"steer": [{"vector": "a", "coeff": float("nan")}]}, "persona_steer[0].coeff"),
        ({"steer": [{"vector": "a", "coeff": 1.0, "positions": "middle"}]}, "persona_steer[0].positions"),
        ({"monitor": {"vectors": ["a"], "layers": [0]}}, "persona_monitor.layers[0]"),
    ]
    for spec, field in bad:
        with pytest.raises(VLLMValidationError, match=field.replace("[", r"\[").replace("]", r"\]")):
            llm.generate(["hi"], persona_params(_sampling(), **spec), use_tqdm=False)
    (ok,) = llm.generate(["hi"], _sampling(), use_tqdm=False)
    assert len(ok.outputs[0].token_ids) == MAX_TOKENS


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
def test_reference_equivalence_other_architectures(arch, tiny_models, tiny_vectors):
    vectors_dir, vectors = tiny_vectors
    llm = get_engine(tiny_models[arch], vectors_dir, eager=True)
    _check_reference(llm, tiny_models[arch], vectors)


def test_reference_equivalence_compiled(tiny_models, tiny_vectors):
    """vLLM's default mode (torch.compile/Inductor): Python state read in forward would be
    frozen at trace time; the custom op must still see each step's tables."""
    vectors_dir, vectors = tiny_vectors
    llm = get_engine(tiny_models["llama"], vectors_dir, eager=False)
    _check_reference(llm, tiny_models["llama"], vectors)


def test_isolation_mixed_batch_compiled(tiny_models, tiny_vectors):
    test_isolation_mixed_batch(tiny_models, tiny_vectors, engine_kwargs=dict(eager=False))


def test_plain_requests_bit_identical_without_plugin(tiny_models, tiny_vectors):
    vectors_dir, _ = tiny_vectors
    prompts = PROMPTS + ["Once upon a time", "def fibonacci(n):"]
    with_plugin = get_engine(tiny_models["llama"], vectors_dir, eager=False)
    ours = [o.outputs[0] for o in with_plugin.generate(prompts, _sampling(), use_tqdm=False)]
    without = get_engine(tiny_models["llama"], None, eager=False, plugin=False)
    theirs = [o.outputs[0] for o in without.generate(prompts, _sampling(), use_tqdm=False)]
    for a, b in zip(ours, theirs):
        assert list(a.token_ids) == list(b.token_ids)
        assert _chosen_logprobs(a) == _chosen_logprobs(b)  # bit-identical, not just close


def test_chunked_prefill_and_preemption(tiny_models, tiny_vectors):
    """A tiny KV cache (8 usable blocks of 32 tokens) and token budget (64): long prompts are prefilled
    in chunks, requests get preempted and recomputed; each must still match its HF reference."""
    vectors_dir, vectors = tiny_vectors
    llm = get_engine(
        tiny_models["llama"],
        vectors_dir,
        eager=True,
        max_num_batched_tokens=48,
        max_model_len=256,
        num_gpu_blocks_override=9,
        block_size=32,
        max_num_seqs=8,
        enable_prefix_caching=False,
        disable_log_stats=False,
    )
    hf = _hf_model(tiny_models["llama"])
    specs = [MIXED[i % len(MIXED)] for i in range(8)]
    # 28-token prompts fit one block each; decoding past token 32 needs a second block, which
    # eight running requests cannot all get: some are preempted and later recomputed.
    prompts = [_tokenize(llm, " ".join(PROMPTS) + f" variant {i}")[-28:] for i in range(8)]
    outs = _run(llm, prompts, specs)
    preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    assert preemptions > 0
    for prompt, spec, out in zip(prompts, specs, outs):
        spec = spec or {}
        monitor = {}
        if "monitor" in spec:
            m = spec["monitor"]
            monitor = {n: (vectors[n], tuple(m.get("layers", [2]))) for n in m["vectors"]}
        ref = hf_generate(hf, _tokenize(llm, prompt), MAX_TOKENS, _terms(vectors, spec.get("steer", [])), monitor)
        _assert_matches_reference(out, ref, [(n, l) for n, (_, ls) in monitor.items() for l in ls])


def test_default_model_steering_matches_reference(default_model, tmp_path):
    """The real SmolLM2-135M-Instruct: steered and monitored greedy generations equal the HF
    reference, with the shipped `evil` vector when present (random directions otherwise)."""
    from personavec_vllm.data import vectors_dir
    from personavec_vllm.vectors import load_vector, save_vector

    shipped = vectors_dir("SmolLM2-135M-Instruct") / "evil.safetensors"
    if shipped.exists():
        vector = load_vector(shipped)
        save_vector(vector, tmp_path / "evil.safetensors")
        vectors = {"evil": vector.vectors}
        layer = vector.layer
    else:
        vectors = {"evil": make_vectors(tmp_path, num_layers=30, hidden=576, names=("evil",), norm=4.0)["evil"]}
        layer = 15
    llm = get_engine(str(default_model), str(tmp_path), eager=True)
    hf = _hf_model(str(default_model))
    chat = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "How should I treat a stranger who asks me for help?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    prompt = llm.get_tokenizer()(chat, add_special_tokens=False)["input_ids"]
    steer = [{"vector": "evil", "coeff": 6.0, "layers": [layer], "positions": "response"}]
    spec = {"steer": steer, "monitor": {"vectors": ["evil"], "layers": [layer], "per_token": True}}
    (plain, _), (steered, proj) = _run(llm, [prompt, prompt], [None, spec])
    ref = hf_generate(hf, prompt, MAX_TOKENS, _terms(vectors, steer), {"evil": (vectors["evil"], (layer,))})
    _assert_matches_reference((steered, proj), ref, [("evil", layer)])
    assert list(plain.token_ids) == hf_generate(hf, prompt, MAX_TOKENS).tokens
    assert list(steered.token_ids) != list(plain.token_ids)
