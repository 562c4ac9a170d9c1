"""`personavec bench`: the serving benchmark (needs the `bench` extra: aiohttp, psutil)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from personavec_vllm.bench.options import add_bench_parser

    add_bench_parser(sub)
