"""`personavec shift`: how far fine-tuning moved a model along each persona vector."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from personavec_vllm.cli._args import add_vector_options, default_vectors


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shift",
        help="how far fine-tuning moved a model along persona vectors",
        description="Mean activation at the last prompt token (chat template) on each trait's evaluation "
        "questions, tuned model minus base model, projected on each vector at its layer and at every layer. "
        "Prints a table; writes shift.json, shift.csv, shift.md and shift.png.",
        allow_abbrev=False,
    )
    p.add_argument("--base", default=None, help="base model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--tuned", required=True, help="fine-tuned model folder, or a PEFT adapter folder on top of --base")
    add_vector_options(p)
    p.add_argument(
        "--questions",
        default=None,
        metavar="FILE",
        help="questions to use for every vector, one per line (default: each trait's evaluation questions)",
    )
    p.add_argument("--max-questions", type=int, default=None, help="use only the first N questions")
    p.add_argument("--out", default="shift-report", help="output folder (default: ./shift-report)")
    p.set_defaults(func=cmd_shift)


def cmd_shift(args: argparse.Namespace, extra: list[str]) -> int:
    from personavec_vllm.library import load_vectors
    from personavec_vllm.models import ModelUnavailableError, resolve_model
    from personavec_vllm.screen import ScreenError, measure_shift, shift_table, write_shift_outputs
    from personavec_vllm.screen.shift import load_tuned
    from personavec_vllm.vectors import VectorFileError

    prog = "personavec shift"
    try:
        vectors = load_vectors(args.vectors or default_vectors(args.base), args.traits)
        base = resolve_model(args.base)
        questions = None
        if args.questions:
            questions = [q.strip() for q in Path(args.questions).read_text(encoding="utf-8").splitlines() if q.strip()]
            if not questions:
                raise ScreenError(f"{args.questions}: no questions")
        tuned = load_tuned(base, args.tuned)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base)
        rows = measure_shift(
            base,
            tuned,
            vectors,
            tokenizer=tokenizer,
            questions=questions,
            max_questions=args.max_questions,
            layers={v.name: args.layer for v in vectors} if args.layer else None,
        )
        files = write_shift_outputs(rows, args.out, base=str(base), tuned=str(args.tuned))
    except (FileNotFoundError, ScreenError, VectorFileError, ModelUnavailableError, ImportError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    print(shift_table(rows))
    print()
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0
