"""`personavec model`: the embedded default model."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="the embedded default model")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    path = msub.add_parser(
        "path",
        help="print the default model's folder (converting it on first use)",
    )
    path.set_defaults(func=cmd_model_path)


def cmd_model_path(args: argparse.Namespace, extra: list[str]) -> int:
    from personavec_vllm.models import ModelUnavailableError, default_model_path

    try:
        print(default_model_path())
    except ModelUnavailableError as exc:
        print(f"personavec: {exc}", file=sys.stderr)
        return 1
    return 0
