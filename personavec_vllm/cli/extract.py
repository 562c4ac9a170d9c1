"""`personavec extract`: persona vectors from trait definitions."""

from __future__ import annotations

import argparse
import logging

from personavec_vllm import config
from personavec_vllm.cli._args import floats, ints


def _add_judge_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("judge (optional; any OpenAI-compatible endpoint)")
    g.add_argument("--judge-base-url", default=config.get(config.JUDGE_BASE_URL))
    g.add_argument("--judge-model", default=config.get(config.JUDGE_MODEL))
    g.add_argument("--judge-api-key", default=config.get(config.JUDGE_API_KEY) or "none")


def _judge(args):
    if args.labels and args.judge_base_url:
        raise SystemExit("personavec: use either --labels or --judge-base-url, not both")
    if args.labels:
        from personavec_vllm.extract.judge import HandLabels

        return HandLabels(args.labels)
    if not args.judge_base_url:
        return None
    if not args.judge_model:
        raise SystemExit("personavec: --judge-model is required with --judge-base-url")
    from personavec_vllm.extract.judge import Judge

    return Judge(args.judge_base_url, args.judge_model, args.judge_api_key)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract",
        help="extract persona vectors from trait definitions",
        description="Generate contrasting answers with vLLM, (optionally) judge them, average hidden states "
        "over response tokens, write diff-of-means vectors, sweep steering per layer and coefficient, "
        "and measure held-out separation (ROC AUC).",
    )
    p.add_argument(
        "--trait",
        action="append",
        required=True,
        help="trait name (vectors/traits/NAME.json) or path to a trait file; repeatable; 'all' = every shipped trait",
    )
    p.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="vector library folder to write")
    p.add_argument("--samples", type=int, default=1, help="answers per question and system prompt")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the extraction answers")
    p.add_argument(
        "--heldout-temperature",
        type=float,
        default=0.0,
        help="temperature of the held-out and plain replies (default greedy: the same texts on every run)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--instruction-placement",
        choices=["system", "user"],
        default="system",
        help="where the trait instructions go: the system prompt (the method's choice) or a sentence "
        "after the question (for small models that barely follow system prompts)",
    )
    p.add_argument(
        "--heldout-questions", type=int, default=10, help="evaluation questions for the held-out AUC (0: skip)"
    )
    p.add_argument("--max-pairs", type=int, default=None, help="use a seeded sample of at most N answer pairs")
    p.add_argument("--max-heldout-pairs", type=int, default=None, help="likewise for the held-out AUC")
    p.add_argument("--layers", type=ints, default=None, help="sweep layers, e.g. 4,8,12 (default: every 2nd)")
    p.add_argument("--coeffs", type=floats, default=None, help="sweep coefficients, e.g. -2,-1,0,1,2")
    p.add_argument(
        "--answers-only",
        action="store_true",
        help="generate and save the answers under OUT/reports, then stop (to label them by hand)",
    )
    p.add_argument(
        "--labels",
        default=None,
        help="folder of hand labels (<trait>.answers.labels.jsonl, see labels/RUBRIC.md): keep the pairs "
        "whose positive answer expresses the trait and whose negative does not, both coherent (instead of a judge)",
    )
    p.add_argument("--compiled", action="store_true", help="use vLLM's compiled mode (slower start, faster generation)")
    _add_judge_options(p)
    p.set_defaults(func=cmd_extract)


def load_traits(names: list[str]):
    from personavec_vllm.traits import load_trait, shipped_traits

    if "all" in names:
        names = shipped_traits()
    return [load_trait(n) for n in names]


def cmd_extract(args: argparse.Namespace, extra: list[str]) -> int:
    from personavec_vllm.extract.pipeline import ExtractionSettings, extract_traits
    from personavec_vllm.models import DEFAULT_MODEL_NAME, resolve_model

    logging.basicConfig(level=logging.INFO, format="[personavec] %(message)s")
    model = resolve_model(args.model)
    settings = ExtractionSettings(
        samples=args.samples,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        heldout_temperature=args.heldout_temperature,
        seed=args.seed,
        placement=args.instruction_placement,
        heldout_questions=args.heldout_questions,
        sweep_layers=args.layers,
        max_pairs=args.max_pairs,
        max_heldout_pairs=args.max_heldout_pairs,
    )
    if args.coeffs:
        settings.sweep_coeffs = tuple(args.coeffs)
    reports = extract_traits(
        load_traits(args.trait),
        model,
        args.out,
        settings,
        judge=_judge(args),
        model_name=DEFAULT_MODEL_NAME if args.model is None else args.model,
        eager=not args.compiled,
        answers_only=args.answers_only,
    )
    if reports:
        print(summary_table(reports))
    return 0


def summary_table(reports: list[dict]) -> str:
    lines = [
        "| trait | layer | pairs kept | held-out AUC | MC P(trait) at min / 0 / max coeff | monotonic | fluent coeffs |",
        "|---|---:|---:|---:|---|---|---|",
    ]
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
