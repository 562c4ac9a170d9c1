"""`personavec trait`: trait definition files (draft with an LLM, validate, list)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from personavec_vllm import config

ENV_DRAFT_MODEL = config.DRAFT_MODEL


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "trait",
        help="trait definition files: draft with an LLM, validate, list",
        description=(
            "Trait definition files (JSON; schema in vectors/traits/README.md) hold the "
            "instruction pairs, questions, judge prompt and multiple-choice items that "
            "'personavec extract' needs for one trait."
        ),
    )
    tsub = p.add_subparsers(dest="trait_command", metavar="ACTION", required=True)

    new = tsub.add_parser(
        "new",
        help="draft a trait definition with any OpenAI-compatible chat endpoint",
        description=(
            "Ask an OpenAI-compatible chat endpoint to write a trait definition for NAME from "
            "a description, validate it (asking once more with the problems if it is invalid) "
            "and write it atomically. Read the result before extracting with it."
        ),
        allow_abbrev=False,
    )
    new.add_argument("name", metavar="NAME", help="trait name, e.g. 'pessimistic'")
    new.add_argument("--description", required=True, help="what the trait is, in a sentence or two")
    new.add_argument(
        "--base-url",
        default=None,
        help="chat endpoint base URL, e.g. http://127.0.0.1:8000/v1 (default: $OPENAI_BASE_URL, else the OpenAI API)",
    )
    new.add_argument("--model", default=None, help=f"model to ask (default: ${ENV_DRAFT_MODEL}; required)")
    new.add_argument("--api-key", default=None, help="API key (default: $OPENAI_API_KEY)")
    new.add_argument(
        "--out",
        default=None,
        help="file (or folder) to write (default: ./NAME.json); to ship it, put it in vectors/traits/",
    )
    new.add_argument("--force", action="store_true", help="overwrite an existing file")
    new.set_defaults(func=cmd_trait_new)

    val = tsub.add_parser(
        "validate",
        help="check trait definition files; print every problem with its JSON path",
        allow_abbrev=False,
    )
    val.add_argument("paths", nargs="+", metavar="PATH", help="trait file (or shipped trait name)")
    val.set_defaults(func=cmd_trait_validate)

    lst = tsub.add_parser("list", help="list the shipped trait definitions", allow_abbrev=False)
    lst.set_defaults(func=cmd_trait_list)


def cmd_trait_new(args: argparse.Namespace, extra: list[str]) -> int:
    from personavec_vllm.traits import NAME_RE, NAME_RULE, TraitDraftError, draft_trait

    prog = "personavec trait new"
    if not NAME_RE.match(args.name):
        print(f"{prog}: invalid name {args.name!r} ({NAME_RULE})", file=sys.stderr)
        return 2
    model = args.model or os.environ.get(ENV_DRAFT_MODEL)
    if not model:
        print(f"{prog}: --model is required (or set ${ENV_DRAFT_MODEL})", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(f"{args.name}.json")
    if out.is_dir():
        out = out / f"{args.name}.json"
    if out.exists() and not args.force:
        print(f"{prog}: {out} exists (use --force to overwrite)", file=sys.stderr)
        return 2
    base_url = args.base_url or os.environ.get("OPENAI_BASE_URL")
    print(f"drafting trait {args.name!r} with {model} at {base_url or 'the OpenAI API'} ...", file=sys.stderr)
    try:
        trait = draft_trait(
            args.name,
            args.description,
            base_url=base_url,
            model=model,
            api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
        )
    except TraitDraftError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        if exc.last_reply:
            rejected = out.with_name(out.name + ".rejected.txt")
            try:
                rejected.parent.mkdir(parents=True, exist_ok=True)
                rejected.write_text(exc.last_reply, encoding="utf-8")
                print(
                    f"{prog}: the last reply is in {rejected}; fix it and check it with 'personavec trait validate'",
                    file=sys.stderr,
                )
            except OSError:
                pass
        return 1
    trait.save(out)
    print(f"wrote {out}: {trait.summary()}")
    return 0


def cmd_trait_validate(args: argparse.Namespace, extra: list[str]) -> int:
    from personavec_vllm.traits import TraitFileError, resolve_trait_path, validate_file

    failed = 0
    for arg in args.paths:
        try:
            path = resolve_trait_path(arg)
            trait = validate_file(path)
        except FileNotFoundError as exc:
            print(f"{arg}: {exc}" if str(arg) not in str(exc) else str(exc))
            failed += 1
            continue
        except TraitFileError as exc:
            print(f"{arg}: {len(exc.problems)} problem{'s' if len(exc.problems) != 1 else ''}")
            for problem in exc.problems:
                print(f"  - {problem}")
            failed += 1
            continue
        print(f"{arg}: OK ({trait.summary()})")
    return 1 if failed else 0


def cmd_trait_list(args: argparse.Namespace, extra: list[str]) -> int:
    from personavec_vllm.traits import TRAITS_DIR, TraitFileError, shipped_traits, validate_file

    names = shipped_traits()
    if not names:
        print(f"no trait definitions in {TRAITS_DIR}", file=sys.stderr)
        return 0
    width = max(len(n) for n in names)
    failed = 0
    for name in names:
        try:
            trait = validate_file(TRAITS_DIR / f"{name}.json")
        except TraitFileError as exc:
            print(f"{name:<{width}}  INVALID ({len(exc.problems)} problems; run 'personavec trait validate {name}')")
            failed += 1
            continue
        print(f"{name:<{width}}  {trait.summary()}")
    print(f"({TRAITS_DIR})", file=sys.stderr)
    return 1 if failed else 0
