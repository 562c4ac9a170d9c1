"""The benchmark's HF reference scenarios (6a, 6b): transformers generate with a forward hook,
run after the vLLM servers stopped, with latencies from a closed loop over the measured timings."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from personavec_vllm.bench.setup import CpuMeter, Progress, default_hf_threads, log

if TYPE_CHECKING:
    from personavec_vllm.bench.run import Bench


def run_hf(bench: Bench, keys: list[str]) -> None:
    from personavec_vllm.bench.hf_reference import HFReference, one_per_batch, same_spec_batches
    from personavec_vllm.bench.scenarios import hf_terms, label
    from personavec_vllm.bench.stats import RequestResult, closed_loop_times, summarize

    files: dict[str, str | Path] = {n: Path(bench.vectors.directory) / f"{n}.safetensors" for n in bench.vectors.names}
    log("HF reference: loading the model")
    # as many threads as vLLM's CPU worker computes with, unless told otherwise
    bench.hf_threads = bench.args.hf_threads or bench.worker_threads or default_hf_threads()
    log(f"HF reference: {bench.hf_threads} torch thread(s)")
    ref = HFReference(bench.model, files, threads=bench.hf_threads)
    ref.generate_batch(bench.workload[:2], hf_terms("hf_same", 0, bench.vectors))  # warm-up

    def rows(key, c, reqs, measured):
        out = []
        for req, (submit, first, end) in zip(reqs, closed_loop_times(measured, c)):
            out.append(
                RequestResult(
                    key, c, req.index, req.prompt_len, req.output_len, req.output_len, submit, first, end, "", -1
                )
            )
        return out

    def record(key, c, res, other_cpu):
        """Keep the level's results and its summary (measured once: pass index -1)."""
        bench.results.extend(res)
        s = summarize(res)
        s.other_cpu = other_cpu
        bench.measured[(key, c, -1)] = s
        log(
            f"{label(key):<28} c={c:<3} {s.tok_per_s:8.1f} tok/s  latency p50 {s.latency_p50:6.2f} s  "
            f"p99 {s.latency_p99:6.2f} s  TTFT p50 {s.ttft_p50:6.2f} s  other CPU {s.other_cpu:4.2f} cores"
        )

    if "hf_same" in keys:
        for c in bench.levels:
            reqs = bench.workload[: bench.per_level[c]]
            bar = Progress(len(reqs), f"{label('hf_same')} c={c}", not bench.args.no_progress)
            meter = CpuMeter()
            measured = ref.run(
                reqs, same_spec_batches(len(reqs), c), lambda i: hf_terms("hf_same", i, bench.vectors), bar
            )
            bar.close()
            record("hf_same", c, rows("hf_same", c, reqs, measured), meter.stop())
    if "hf_distinct" in keys:
        # Every request is its own batch whatever the concurrency, so the execution is the
        # same at every level: run it once over the longest level's requests and derive each
        # level's latencies with that level's closed loop (queueing included).
        n = max(bench.per_level.values())
        if bench.args.hf_distinct_requests:
            n = min(n, bench.args.hf_distinct_requests)
        reqs = bench.workload[:n]
        bar = Progress(n, f"{label('hf_distinct')} (all levels)", not bench.args.no_progress)
        meter = CpuMeter()
        measured = ref.run(reqs, one_per_batch(n), lambda i: hf_terms("hf_distinct", i, bench.vectors), bar)
        bar.close()
        other = meter.stop()
        for c in bench.levels:
            k = bench.per_level[c]
            record("hf_distinct", c, rows("hf_distinct", c, reqs[:k], measured[:k]), other)
        bench.notes.append(
            f"6b runs one request per batch at every concurrency, so it was executed once ({n} requests "
            "back to back) and each level's latencies follow from that level's closed loop of clients "
            "(a request waits for the ones before it); a level uses the first min(its requests, "
            f"{n}) of them"
            + (
                ", so where that is no more than the concurrency, all are sent at once and "
                "the latencies are those of one burst"
                if n < max(bench.levels)
                else ""
            )
        )
    bench.notes.append(
        "6a/6b latencies: a closed loop of `concurrency` clients over the measured batch "
        "timings (client k's next request is sent when its previous one ends); TTFT is when the "
        "request's batch produced its first token; a batch runs until its longest output is done"
    )
    del ref
