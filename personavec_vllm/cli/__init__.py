"""The `personavec` command.

A plain argparse dispatcher: `main()` builds one parser with a subparser per command; each
command is one module of this package with `add_parser(sub)` and its `cmd_*` functions, which
import what they need when they run (so `personavec --version` and `--help` stay light).
Commands that forward unknown options to another program (`serve`, to vLLM) set
`passthrough=True`; for every other command unknown options are an error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# One module per command, in the order of `personavec --help`.
COMMANDS = ("serve", "model", "vectors", "extract", "sweep", "trait", "screen", "shift", "deploy", "bench")


def build_parser() -> argparse.ArgumentParser:
    from personavec_vllm import __version__

    parser = argparse.ArgumentParser(
        prog="personavec",
        description="Persona vectors for a stock vLLM server.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"personavec_vllm.cli.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.func(args, extra) or 0)
