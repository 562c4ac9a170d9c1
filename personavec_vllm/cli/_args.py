"""Argument types and option groups shared by several commands (no heavy imports)."""

from __future__ import annotations

import argparse

from personavec_vllm import config


def names(text: str) -> list[str]:
    """A comma-separated list of names."""
    return config.comma_list(text)


def ints(text: str) -> list[int]:
    """A comma-separated list of integers (e.g. layers)."""
    try:
        values = [int(x) for x in config.comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def floats(text: str) -> list[float]:
    """A comma-separated list of numbers (e.g. coefficients)."""
    try:
        values = [float(x) for x in config.comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 100:
        raise argparse.ArgumentTypeError(f"expected a percentage between 0 and 100 (exclusive), got {text!r}")
    return value


def add_vector_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--vectors",
        nargs="+",
        action="extend",
        default=None,
        metavar="DIR_OR_FILE",
        help="vector files and/or library folders (default for the embedded model: its shipped vectors)",
    )
    p.add_argument(
        "--traits",
        type=names,
        default=None,
        help="comma-separated vector names (or traits) to use from --vectors (default: all)",
    )
    p.add_argument(
        "--layer", type=int, default=None, help="layer for every vector (default: each vector's recommended layer)"
    )


def default_vectors(model_arg: str | None) -> list[str]:
    """The shipped library, when the model is the embedded default one."""
    from personavec_vllm.data import vectors_dir
    from personavec_vllm.models import DEFAULT_MODEL_NAME
    from personavec_vllm.screen import ScreenError

    shipped = vectors_dir(DEFAULT_MODEL_NAME)
    if model_arg in (None, "", "default", DEFAULT_MODEL_NAME) and any(shipped.glob("*.safetensors")):
        return [str(shipped)]
    raise ScreenError("--vectors is required (the shipped vectors fit only the default model)")
