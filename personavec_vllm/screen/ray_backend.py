"""Screening on Ray Data (`personavec screen --backend ray`): the batches of a screening run are
the rows of a Ray dataset, mapped by a pool of actors that each hold one vLLM engine (with the
plugin) and one HF model: a `BatchScorer`, as in the single-process run.

The driver (`screen_dataset`) keeps what makes a run resumable and reproducible: it cuts the
batches exactly as the single-process run does, appends each scored batch to the checkpoint as
it streams back, and writes the outputs from the checkpoint. So an interrupted Ray run resumes
(on Ray or locally) with only the unfinished batches, and with greedy decoding its files are
those of a single-process run on the same data.

On a CPU node the actors would otherwise all bind their engine threads to the same cores; each
actor claims a node-local slot (a lock file) and binds to its own `cpus_per_actor` cores.
Ray is an optional extra: `pip install 'personavec-vllm[ray]'`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personavec_vllm.screen.dataset import Sample, ScreenError
from personavec_vllm.screen.score import BatchScorer, ScorerArgs

logger = logging.getLogger(__name__)

INSTALL_HINT = "the Ray backend needs Ray Data: pip install 'personavec-vllm[ray]'"
# Environment the actors need to see as the driver does (vLLM, HF and our own settings).
FORWARDED_ENV_PREFIXES = ("VLLM_", "PERSONAVEC_", "HF_", "TRANSFORMERS_")


@dataclass
class RayOptions:
    actors: int = 2  # actors, each with one engine
    address: str | None = None  # None: start a local Ray; "auto" or "ray://host:10001": a cluster
    cpus_per_actor: int = 1
    gpus_per_actor: float = 0.0  # 1 on GPU nodes: Ray then gives each actor its own GPU


def _claim_cpu_slot(cpus: int) -> tuple[list[int], Any]:
    """This node's next free slot of `cpus` cores (of the ones this process may use) and the
    lock that holds it for the actor's lifetime; ([], None) if every slot is taken."""
    allowed = sorted(os.sched_getaffinity(0))
    folder = Path(tempfile.gettempdir()) / "personavec-ray-cpu-slots"
    folder.mkdir(exist_ok=True)
    for slot in range(len(allowed) // max(1, cpus)):
        handle = open(folder / f"{slot}.lock", "w")  # noqa: SIM115 (held while the actor lives)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        return allowed[slot * cpus : (slot + 1) * cpus], handle
    return [], None


class ScreeningActor:
    """One Ray Data actor: a `BatchScorer` of its own; maps a row (one batch, as JSON) to the
    batch's records (as JSON: floats survive the round trip exactly)."""

    def __init__(self, args: ScorerArgs, cpus: int):
        import torch

        self._slot = None
        if not torch.cuda.is_available() and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            cores, self._slot = _claim_cpu_slot(cpus)
            if cores:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))
                torch.set_num_threads(len(cores))
        self.scorer = BatchScorer(args)

    def __call__(self, rows: dict[str, Any]) -> dict[str, list[str]]:
        out = []
        for text in rows["batch"]:
            batch = [Sample(**d) for d in json.loads(str(text))]
            out.append(json.dumps(self.scorer.score(batch)))
        return {"records": out}

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.scorer.close()


def _forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


def score_on_ray(
    batches: Sequence[Sequence[Sample]],
    args: ScorerArgs,
    options: RayOptions,
    finished: Callable[[list[dict]], None],
) -> None:
    """Score `batches` on `options.actors` Ray Data actors; `finished(records)` gets each batch's
    records, in the order they finish. Starts (and stops) a local Ray unless one is running or
    `options.address` names a cluster (whose nodes must have personavec-vllm installed)."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ScreenError(INSTALL_HINT) from exc
    if options.actors < 1 or options.cpus_per_actor < 1:
        raise ScreenError("--ray-actors and --ray-cpus-per-actor must be at least 1")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=options.address,
            include_dashboard=False,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": _forwarded_env()},
        )
    try:
        rows = [{"batch": json.dumps([dataclasses.asdict(s) for s in batch])} for batch in batches]
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the driver's own bar counts samples
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            ScreeningActor,
            fn_constructor_kwargs={"args": args, "cpus": options.cpus_per_actor},
            batch_size=1,
            concurrency=min(options.actors, len(rows)),
            num_cpus=options.cpus_per_actor,
            num_gpus=options.gpus_per_actor,
        )
        for row in dataset.iter_rows():
            finished(json.loads(row["records"]))
    finally:
        if started_here:
            ray.shutdown()
