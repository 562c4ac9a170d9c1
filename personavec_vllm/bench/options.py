"""The benchmark's command line (`personavec bench`, `python -m personavec_vllm.bench`); the
options only, so that `personavec --help` stays light. The run is in `bench.run`."""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from personavec_vllm import config

DEFAULT_OUT = Path("benchmarks") / "results"
SERVED_NAME = "personavec-bench"
NUM_VECTORS = 8
RUN_DOC = "What persona steering and monitoring cost on the real HTTP server, and what the usual\nalternative (HF transformers + a forward hook) costs, measured in one run.\n\n    personavec bench                              # or: python -m personavec_vllm.bench\n    personavec bench --concurrency 1,8,32,64 --requests 16,64,64,64 --output-len 64\n\nScenarios (all on the same seeded workload; ratios divide by scenario 1 at the same concurrency):\n\n  1  vLLM without the plugin (VLLM_PLUGINS excluding personavec)       - the baseline\n  1b a second such server: how far two identical servers differ\n  2n personavec with PERSONAVEC_STEERING=off (no op in the model), on a server of its own\n  2  personavec loaded, requests unsteered                            \\\\\n  3  every request steered with the same spec                          | one server start\n  4  every request steered with a different spec                       |\n  5a/5b  every request monitors 1 / 3 vectors                         /\n  6a/6b  HF transformers generate + forward hook: scenario 3's spec (batch = concurrency) and\n         scenario 4's specs (one spec per batch, so one request per batch)\n\nWrites `<out>/<prefix>.md`, `.csv`, `_requests.csv` and PNG plots. See benchmarks/README.md in the repository."


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in config.comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _length(text: str):
    from personavec_vllm.bench.workload import LengthRange

    try:
        return LengthRange.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _env_assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    if name == "VLLM_PLUGINS":
        raise argparse.ArgumentTypeError("VLLM_PLUGINS is what tells the two servers apart; the benchmark sets it")
    return name, value


def _scenario_list(text: str) -> list[str]:
    from personavec_vllm.bench.scenarios import BY_KEY, SCENARIOS

    by_number = {s.number: s.key for s in SCENARIOS}
    keys = []
    for part in config.comma_list(text):
        key = by_number.get(part, part)
        if key not in BY_KEY:
            raise argparse.ArgumentTypeError(
                f"unknown scenario {part!r} (choose from {', '.join(s.number + '/' + s.key for s in SCENARIOS)})"
            )
        keys.append(key)
    return keys


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by `python -m personavec_vllm.bench` and `personavec bench`)."""
    p.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument(
        "--concurrency",
        type=_int_list,
        default=[1, 8, 32, 64],
        help="comma-separated concurrency levels (default 1,8,32,64)",
    )
    p.add_argument(
        "--requests",
        type=_int_list,
        default=[64],
        help="requests per level: one number for every level, or one per level (e.g. 16,64,64,64; default 64)",
    )
    p.add_argument(
        "--prompt-len",
        type=_length,
        default="32:512",
        help="prompt tokens MIN:MAX (log-normal, median sqrt(MIN*MAX)) or N (default 32:512)",
    )
    p.add_argument(
        "--output-len", type=_length, default="32:96", help="output tokens MIN:MAX (uniform) or N (default 32:96)"
    )
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument(
        "--scenarios",
        type=_scenario_list,
        default=None,
        help="comma-separated subset, by number or key (default: all): "
        "1,1b,2,2n,3,4,5a,5b,5c,5d,6a,6b; scenario 1 is always run as the baseline; 1b is a second "
        "plain vLLM server (how far two identical servers differ); 2n the plugin with steering off",
    )
    p.add_argument(
        "--passes",
        type=int,
        default=3,
        help="passes over all scenarios and levels, both servers up side by side, the order rotated "
        "each time (default 3): ratios are medians over passes, with the lowest and highest reported",
    )
    p.add_argument(
        "--instances",
        type=int,
        default=1,
        help="start the servers afresh this many times, each for --passes passes (default 1): a "
        "server keeps what its start gave it for all its passes, so only fresh starts average "
        "that out; scenario 1b measures how much it is",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="after the passes, one more (not in the ratios) with py-spy sampling each server process "
        "(API server, engine core, worker); writes <prefix>_profile/ and a table of the share of "
        "samples in our code",
    )
    p.add_argument(
        "--api",
        choices=("chat", "completions"),
        default="chat",
        help="chat: /v1/chat/completions with text prompts, as most clients call it (default); "
        "completions: /v1/completions with token-id prompts (exact prompt lengths)",
    )
    p.add_argument(
        "--stream", action="store_true", help="streaming requests, with time to first token (default: not streaming)"
    )
    p.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="start both servers with --no-enable-prefix-caching (default: vLLM's default, on; every "
        "measurement sends words of its own, so none reuses another's prefill)",
    )
    p.add_argument(
        "--max-num-seqs", type=int, default=None, help="vLLM's --max-num-seqs for both servers (default: vLLM's)"
    )
    p.add_argument(
        "--enforce-eager", action="store_true", help="start vLLM with --enforce-eager (default: vLLM's compiled mode)"
    )
    p.add_argument(
        "--vectors",
        default=None,
        help="vector library to serve (at least 3 vectors that fit the model); default: the "
        "shipped vectors/<model name>/ of the embedded model if it has 3 or more, else "
        "random directions (steering cost does not depend on the direction)",
    )
    p.add_argument(
        "--random-vectors", action="store_true", help="use random directions even when a shipped library exists"
    )
    p.add_argument(
        "--vector-norm",
        type=float,
        default=0.1,
        help="norm of the random steering directions relative to the model's mean residual "
        "norm at each layer (default 0.1)",
    )
    p.add_argument(
        "--vllm-args",
        default="",
        help="extra options for both vLLM servers, one quoted string (e.g. '--max-num-batched-tokens 4096')",
    )
    p.add_argument(
        "--server-env",
        type=_env_assignment,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for both servers (repeatable), so that they differ only in the "
        "plugin, e.g. LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 (vLLM's advice "
        "for CPU serving) or GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432",
    )
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=1200.0,
        help="seconds to wait for a server (compiled mode on a cold cache can take minutes)",
    )
    p.add_argument(
        "--hf-distinct-requests",
        type=int,
        default=None,
        help="requests scenario 6b runs (default: the largest level's); 6b runs one request "
        "at a time whatever the concurrency, so it is the slowest part of a run",
    )
    p.add_argument(
        "--hf-threads",
        type=int,
        default=None,
        help="torch threads of the HF reference (default: as many as vLLM's CPU worker ran with, "
        "read from the server log; else the usable cores minus one, at least 1)",
    )
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--prefix", default="serving", help="file name prefix (default: serving)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    p.add_argument("--keep-logs", action="store_true", help="keep the servers' logs in the output folder")


def add_bench_parser(sub) -> None:
    """`personavec bench` (the same options and code as `python -m personavec_vllm.bench`)."""
    p = sub.add_parser(
        "bench",
        help="serving benchmark: what steering and monitoring cost vs plain vLLM and HF hooks",
        description=RUN_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add_arguments(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    from personavec_vllm.bench.run import main_from_args

    argv = sys.argv[1:]
    command = shlex.join(["personavec", *argv]) if argv[:1] == ["bench"] else "personavec bench (called from Python)"
    return main_from_args(args, command)


def main(argv: list[str] | None = None) -> int:
    from personavec_vllm.bench.run import main_from_args

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m personavec_vllm.bench",
        description=RUN_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    return main_from_args(args, shlex.join(["python", "-m", "personavec_vllm.bench", *argv]))
