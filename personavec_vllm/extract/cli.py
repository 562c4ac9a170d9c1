"""`personavec extract` and `personavec sweep`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _add_judge_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("judge (optional; any OpenAI-compatible endpoint)")
    g.add_argument("--judge-base-url", default=os.environ.get("PERSONAVEC_JUDGE_BASE_URL"))
    g.add_argument("--judge-model", default=os.environ.get("PERSONAVEC_JUDGE_MODEL"))
    g.add_argument("--judge-api-key", default=os.environ.get("PERSONAVEC_JUDGE_API_KEY", "none"))


def _judge(args):
    if not args.judge_base_url:
        return None
    if not args.judge_model:
        raise SystemExit("personavec: --judge-model is required with --judge-base-url")
    from personavec_vllm.extract.judge import Judge

    return Judge(args.judge_base_url, args.judge_model, args.judge_api_key)


def add_extract_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract", help="extract persona vectors from trait definitions",
        description="Generate contrasting answers with vLLM, (optionally) judge them, average hidden states "
        "over response tokens, write diff-of-means vectors, sweep steering per layer and coefficient, "
        "and measure held-out separation (ROC AUC).",
    )
    p.add_argument("--trait", action="append", required=True,
                   help="trait name (vectors/traits/NAME.json) or path to a trait file; repeatable; 'all' = every shipped trait")
    p.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="vector library folder to write")
    p.add_argument("--samples", type=int, default=1, help="answers per question and system prompt")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--instruction-placement", choices=["system", "user"], default="system",
                   help="where the trait instructions go: the system prompt (the method's choice) or a sentence "
                   "after the question (for small models that barely follow system prompts)")
    p.add_argument("--heldout-questions", type=int, default=10, help="evaluation questions for the held-out AUC (0: skip)")
    p.add_argument("--max-pairs", type=int, default=None, help="use a seeded sample of at most N answer pairs")
    p.add_argument("--max-heldout-pairs", type=int, default=None, help="likewise for the held-out AUC")
    p.add_argument("--layers", type=_ints, default=None, help="sweep layers, e.g. 4,8,12 (default: every 2nd)")
    p.add_argument("--coeffs", type=_floats, default=None, help="sweep coefficients, e.g. -2,-1,0,1,2")
    p.add_argument("--compiled", action="store_true", help="use vLLM's compiled mode (slower start, faster generation)")
    _add_judge_options(p)
    p.set_defaults(func=cmd_extract)


def _traits(names: list[str]):
    from personavec_vllm.extract.traits import load_trait, shipped_traits

    if "all" in names:
        names = shipped_traits()
    return [load_trait(n) for n in names]


def cmd_extract(args: argparse.Namespace, extra: list[str]) -> int:
    from personavec_vllm.extract.pipeline import ExtractionSettings, extract_traits
    from personavec_vllm.models import DEFAULT_MODEL_NAME, resolve_model

    logging.basicConfig(level=logging.INFO, format="[personavec] %(message)s")
    model = resolve_model(args.model)
    settings = ExtractionSettings(samples=args.samples, max_tokens=args.max_tokens, temperature=args.temperature,
                                  seed=args.seed, placement=args.instruction_placement,
                                  heldout_questions=args.heldout_questions, sweep_layers=args.layers,
                                  max_pairs=args.max_pairs, max_heldout_pairs=args.max_heldout_pairs)
    if args.coeffs:
        settings.sweep_coeffs = tuple(args.coeffs)
    reports = extract_traits(_traits(args.trait), model, args.out, settings, judge=_judge(args),
                             model_name=DEFAULT_MODEL_NAME if args.model is None else args.model,
                             eager=not args.compiled)
    print(_summary_table(reports))
    return 0


def _summary_table(reports: list[dict]) -> str:
    lines = ["| trait | layer | pairs kept | held-out AUC | MC P(trait) at min / 0 / max coeff | monotonic | fluent coeffs |",
             "|---|---:|---:|---:|---|---|---|"]
    for r in reports:
        mc = r["mc_at_recommended"]
        coeffs = sorted(mc, key=float)
        lines.append(
            f"| {r['trait']} | {r['recommended_layer']} | {r['pairs_kept']}/{r['pairs_total']} | "
            f"{r.get('heldout_auc_at_recommended', float('nan')):.3f} | "
            f"{mc[coeffs[0]]:.3f} / {mc.get('0.0', float('nan')):.3f} / {mc[coeffs[-1]]:.3f} | {r['monotonic']} | "
            f"{r['fluent_coeffs'][0]:g} .. {r['fluent_coeffs'][1]:g} |"
        )
    return "\n".join(lines)


def add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="measure steering effect per layer and coefficient; record the recommended layer",
        description="Judge-free multiple-choice measure (mean probability of the trait-expressing answer) "
        "for each layer and coefficient; writes a CSV table and a PNG plot and records the recommended "
        "layer in the vector file's metadata.",
    )
    p.add_argument("vector", help="vector file (.safetensors)")
    p.add_argument("--trait", default=None, help="trait definition (default: the vector's trait)")
    p.add_argument("--model", default=None, help="HF model folder (default: the embedded model)")
    p.add_argument("--layers", type=_ints, default=None)
    p.add_argument("--coeffs", type=_floats, default=[-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0])
    p.add_argument("--out", default=None, help="folder for the table and plot (default: beside the vector, reports/)")
    p.add_argument("--no-record", action="store_true", help="do not rewrite the vector's recommended layer")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace, extra: list[str]) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from personavec_vllm.extract import sweep as sweeping
    from personavec_vllm.extract.traits import load_trait
    from personavec_vllm.models import resolve_model
    from personavec_vllm.vectors import load_vector

    vector_path = Path(args.vector)
    vector = load_vector(vector_path)
    trait = load_trait(args.trait or vector.trait)
    model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    vector.check_fits(len(model.model.layers), model.config.hidden_size)
    layers = args.layers or list(range(2, vector.num_layers - 1, 2))
    rows = sweeping.sweep(model, tokenizer, trait, vector, layers, args.coeffs)
    layer = sweeping.recommend_layer(rows)
    out = Path(args.out) if args.out else vector_path.parent / "reports"
    sweeping.write_table(rows, out / f"{vector.name}.sweep.csv")
    sweeping.plot(rows, trait.name, out / f"{vector.name}.sweep.png", recommended=layer)
    if not args.no_record:
        sweeping.record_layer(vector_path, vector, layer, rows)
    print(json.dumps({"recommended_layer": layer, "effect": sweeping.steering_effect(rows, layer),
                      "table": str(out / f"{vector.name}.sweep.csv"), "plot": str(out / f"{vector.name}.sweep.png")}))
    return 0
