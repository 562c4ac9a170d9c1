"""Screening training data with persona vectors: the projection difference.

Projection difference (Chen et al., 2025). For a training sample (x, y), let y' be the model's
own answer to x. With `h(x, y)` the mean residual stream over the response tokens at a vector's
layer L and `v_hat = v[L] / |v[L]|`:

    dP = (h(x, y) - h(x, y')) . v_hat

A sample with a large dP pulls the model towards the trait more than the model's own answer
would; the dataset mean predicts how far fine-tuning on the data moves the trait.

`screen_dataset` reads a dataset (`read_dataset`: OpenAI `messages` JSONL, prompt/response JSONL,
or CSV with prompt,response columns), generates every y' with vLLM in fixed batches, computes
hidden means with `hf.hidden.hidden_means` (HF forward pass), and appends each finished
batch to `OUT/checkpoint.jsonl`. A re-run skips finished samples (keyed by line number and content
hash); the final files are built from the checkpoint only, so an interrupted and resumed run
writes the same files as an uninterrupted one (with greedy decoding, the default).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from personavec_vllm.engine.llm import make_llm, shutdown
from personavec_vllm.hf.hidden import chat_prompt, hidden_means
from personavec_vllm.projection import projection, projection_difference
from personavec_vllm.screen.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    _vector_fingerprint,
)
from personavec_vllm.screen.dataset import (
    Dataset,
    Malformed,
    MalformedInputError,
    Sample,
    ScreenError,
)
from personavec_vllm.screen.report import FilterSpec, write_outputs
from personavec_vllm.vectors import PersonaVector

if TYPE_CHECKING:
    from personavec_vllm.screen.ray_backend import RayOptions

logger = logging.getLogger(__name__)


class ConversationTokenizer:
    """The tokenizer seen by `chat_prompt`/`hidden_means`, which format one (system, question)
    turn: a question that is a registered key expands to that sample's whole prompt conversation,
    so multi-turn prompts are formatted by the model's own chat template too."""

    PREFIX = "\x00personavec-sample:"

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._conversations: dict[str, list[dict[str, str]]] = {}

    def register(self, sample: Sample) -> str:
        key = self.PREFIX + sample.key
        self._conversations[key] = sample.messages
        return key

    def apply_chat_template(self, messages, *args, **kwargs):
        if len(messages) == 1 and messages[0].get("content") in self._conversations:
            messages = self._conversations[messages[0]["content"]]
        return self._tokenizer.apply_chat_template(messages, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@dataclass
class ScreenSettings:
    max_tokens: int = 256  # length cap of the model's own answers y'
    temperature: float = 0.0  # 0: greedy (resumed runs are then identical to uninterrupted ones)
    seed: int = 0  # vLLM engine seed (LLM(seed=)); no per-request seeds (they crash the CPU sampler)
    batch_size: int = 32  # samples per generate call and per checkpoint record
    top_k: int = 20  # samples per trait in the review list
    compiled: bool = False  # vLLM compiled mode instead of eager
    layers: dict[str, int] | None = None  # per-vector layer override (default: the monitoring layer)

    def checkpoint_config(self) -> dict:
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }


@dataclass
class ScreenResult:
    records: list[dict]  # per sample, in file order
    summary: dict
    files: dict[str, str]
    computed: int  # samples computed in this run (the rest came from the checkpoint)
    seconds: float  # wall time of this run's computing (generation + hidden states), engine start excluded
    startup_seconds: float = 0.0  # starting the vLLM engine


def _layer_of(vector: PersonaVector, settings: ScreenSettings) -> int:
    layer = (settings.layers or {}).get(vector.name, vector.monitor_layer)
    if not 1 <= layer <= vector.num_layers:
        raise ScreenError(f"layer {layer} for vector {vector.name!r} is outside 1..{vector.num_layers}")
    return layer


def screening_llm(model_path: str | os.PathLike, settings: ScreenSettings, max_model_len: int):
    """The vLLM engine for the model's own answers. Prefix caching off: reused cache blocks may
    differ from recomputed ones in the last bits, and a resumed run (whose cache starts empty)
    must produce the same answers."""
    return make_llm(
        model_path,
        seed=settings.seed,
        max_model_len=max_model_len,
        enforce_eager=not settings.compiled,
        enable_prefix_caching=False,
    )


def load_hf(model_path: str | os.PathLike):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    return model, tokenizer


@dataclass
class ScorerArgs:
    """Everything one scorer needs to build its own engine and HF model: the local run makes
    one, the Ray backend one per actor."""

    model_path: str
    vectors: list[PersonaVector]
    layers: dict[str, int]  # vector name -> layer of its projections
    settings: ScreenSettings
    max_model_len: int  # from every sample of the dataset: a resumed run gets the same engine
    context: int  # the model's context length


class BatchScorer:
    """Scores batches of samples: the model's own answers y' (vLLM, unsteered), then the response
    hidden means of y and y' (HF forward) and their projections. `llm`/`hf` may be passed to reuse
    them; an engine made here is stopped by `close`."""

    def __init__(self, args: ScorerArgs, llm=None, hf=None):
        from personavec_vllm.training import unwrap_model

        self.args = args
        model, self.tokenizer = hf if hf is not None else load_hf(args.model_path)
        self.model = unwrap_model(model)
        self.owns_llm = llm is None
        self.llm = llm if llm is not None else screening_llm(args.model_path, args.settings, args.max_model_len)

    def score(self, batch: Sequence[Sample], label: str = "") -> list[dict]:
        from vllm import SamplingParams

        settings, vectors, layers = self.args.settings, self.args.vectors, self.args.layers
        conv = ConversationTokenizer(self.tokenizer)
        prompt_ids = {s.key: chat_prompt(conv, None, conv.register(s))[0] for s in batch}
        limit = _max_model_len(self.llm, self.args.context)
        # Engine seed only: per-request seeds crash vLLM 0.32's CPU sampler.
        params = [
            SamplingParams(
                max_tokens=max(1, min(settings.max_tokens, limit - len(prompt_ids[s.key]))),
                temperature=settings.temperature,
                skip_special_tokens=True,
            )
            for s in batch
        ]
        outputs = self.llm.generate([{"prompt_token_ids": prompt_ids[s.key]} for s in batch], params, use_tqdm=False)
        own = [o.outputs[0].text.strip() for o in outputs]
        items = [(None, conv.register(s), s.response) for s in batch] + [
            (None, conv.register(s), y) for s, y in zip(batch, own)
        ]
        means = hidden_means(self.model, conv, items, label)["response"]
        h_data, h_own = means[: len(batch)], means[len(batch) :]
        records = []
        for i, (s, y) in enumerate(zip(batch, own)):
            rec: dict[str, Any] = {
                "key": s.key,
                "line": s.line,
                "own_response": y,
                "dP": {},
                "proj_data": {},
                "proj_own": {},
            }
            for v in vectors:
                layer = layers[v.name]
                rec["dP"][v.name] = float(
                    projection_difference(h_data[i : i + 1], h_own[i : i + 1], v.vectors, layer)[0]
                )
                rec["proj_data"][v.name] = float(projection(h_data[i : i + 1], v.vectors, layer)[0])
                rec["proj_own"][v.name] = float(projection(h_own[i : i + 1], v.vectors, layer)[0])
            records.append(rec)
        return records

    def close(self) -> None:
        if self.owns_llm:
            shutdown(self.llm)


def screen_dataset(
    dataset: Dataset,
    vectors: Sequence[PersonaVector],
    model_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: ScreenSettings | None = None,
    *,
    filters: FilterSpec | None = None,
    restart: bool = False,
    skip_malformed: bool = False,
    llm=None,
    hf=None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    ray: RayOptions | None = None,
) -> ScreenResult:
    """Screen `dataset` with `vectors`; write the outputs into `out_dir` (see `write_outputs`).

    `llm` (a `vllm.LLM` serving `model_path`) and `hf` (`(model, tokenizer)`) may be passed to
    reuse them; otherwise they are created (the engine only if some sample needs computing) and
    the engine is shut down at the end. `on_batch(n)` is called after each checkpointed batch.
    With `ray`, the batches are scored on Ray Data actors instead (`ray_backend`); this process
    still owns the checkpoint and the outputs, so both backends resume each other's runs.
    Samples too long for the model's context are malformed (an error unless `skip_malformed`)."""
    from tqdm import tqdm

    from personavec_vllm.training import unwrap_model

    settings = settings or ScreenSettings()
    filters = filters or FilterSpec()
    out_dir = Path(out_dir)
    if settings.batch_size < 1 or settings.max_tokens < 1:
        raise ScreenError("batch size and max tokens must be at least 1")
    model, tokenizer = hf if hf is not None else load_hf(model_path)
    base = unwrap_model(model)
    config: Any = base.config
    num_layers, hidden = config.num_hidden_layers, config.hidden_size
    for vector in vectors:
        vector.check_fits(num_layers, hidden)
    layers = {v.name: _layer_of(v, settings) for v in vectors}
    if filters.vectors:
        unknown = [n for n in filters.vectors if n not in layers]
        if unknown:
            raise ScreenError(
                f"filter vector(s) {', '.join(unknown)} are not among the screened vectors ({', '.join(layers)})"
            )

    conv = ConversationTokenizer(tokenizer)
    prompt_ids = {s.key: chat_prompt(conv, None, conv.register(s))[0] for s in dataset.samples}
    context = int(getattr(base.config, "max_position_embeddings", 4096) or 4096)
    too_long = []
    for s in dataset.samples:
        n_prompt = len(prompt_ids[s.key])
        n_full = n_prompt + len(tokenizer(s.response, add_special_tokens=False)["input_ids"])
        if n_prompt + 1 > context or n_full > context:
            too_long.append(
                Malformed(
                    s.line,
                    f"prompt + response are {n_full} tokens (prompt {n_prompt}); the model's context is {context}",
                )
            )
    if too_long:
        if not skip_malformed:
            raise MalformedInputError(
                dataset.path, too_long, "\n(shorten them, or pass --skip-malformed to screen the other lines)"
            )
        dataset.malformed = sorted(dataset.malformed + too_long, key=lambda m: m.line)
        bad = {m.line for m in too_long}
        dataset.samples = [s for s in dataset.samples if s.line not in bad]

    config = {
        "model": str(model_path),
        "vectors": {v.name: {"layer": layers[v.name], "sha256_16": _vector_fingerprint(v)} for v in vectors},
        **settings.checkpoint_config(),
    }
    checkpoint = Checkpoint(out_dir / CHECKPOINT_NAME, config, restart=restart)
    todo = [s for s in dataset.samples if s.key not in checkpoint.records]
    done_before = len(dataset.samples) - len(todo)
    if done_before:
        logger.info("resuming: %d of %d samples already screened", done_before, len(dataset.samples))

    # from every sample, not only those left: a resumed run gets the same engine settings
    longest = max((len(prompt_ids[s.key]) for s in dataset.samples), default=1)
    args = ScorerArgs(
        str(model_path), list(vectors), layers, settings, min(context, longest + settings.max_tokens), context
    )
    batches = [todo[i : i + settings.batch_size] for i in range(0, len(todo), settings.batch_size)]
    bar = tqdm(total=len(dataset.samples), initial=done_before, desc="screening", unit="sample", disable=not progress)

    finished_batches = 0

    def finished(records: list[dict]) -> None:
        nonlocal finished_batches
        checkpoint.add_batch(records)
        finished_batches += 1
        bar.update(len(records))
        if on_batch is not None:
            on_batch(finished_batches)

    startup = started = time.monotonic()
    if batches and ray is not None:
        from personavec_vllm.screen.ray_backend import score_on_ray

        startup_seconds = 0.0  # the actors' engines start in parallel with the first batches
        score_on_ray(batches, args, ray, finished)
    elif batches:
        scorer = BatchScorer(args, llm=llm, hf=(model, tokenizer))
        started = time.monotonic()
        startup_seconds = started - startup
        try:
            for b, batch in enumerate(batches):
                bar.set_postfix_str(f"batch {b + 1}/{len(batches)}")
                finished(scorer.score(batch, f" (batch {b + 1}/{len(batches)})"))
        finally:
            scorer.close()
    else:
        startup_seconds = 0.0
    bar.close()
    seconds = time.monotonic() - started
    records = [checkpoint.records[s.key] for s in dataset.samples]
    summary, files = write_outputs(dataset, records, vectors, layers, out_dir, settings, filters, model_path)
    return ScreenResult(records, summary, files, len(todo), seconds, startup_seconds)


def _max_model_len(llm, fallback: int) -> int:
    try:
        return int(llm.llm_engine.model_config.max_model_len)
    except AttributeError:
        return fallback
