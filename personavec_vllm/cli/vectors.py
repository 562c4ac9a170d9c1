"""`personavec vectors`: exchange vectors with other tools (GGUF control vectors for llama.cpp)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from personavec_vllm.cli._args import ints


def add_parser(sub: argparse._SubParsersAction) -> None:
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
        type=ints,
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
        help="the model's decoder layer count (default: from the file, else the highest direction + 1)",
    )
    imp.add_argument("--name", default=None, help="vector name (default: the output file's stem)")
    imp.add_argument("--description", default="", help="description to store")
    imp.set_defaults(func=cmd_vectors_import_gguf)


def cmd_vectors_export_gguf(args: argparse.Namespace, extra: list[str]) -> int:
    from personavec_vllm.interop import export_gguf, row_to_direction
    from personavec_vllm.vectors import VectorFileError, load_vector

    try:
        vector = load_vector(args.vector)
        path = export_gguf(vector, args.out, layers=args.layers, coeff=args.coeff, model_hint=args.model_hint)
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
