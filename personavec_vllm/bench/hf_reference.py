"""The reference approach: HF `transformers` `generate` with a forward hook adding coeff * v.

This is how steering is usually done outside a serving engine (repeng, steering-vectors, the
persona vectors paper's code): a hook on the decoder layer adds the vector to its output. A
hook holds one steering spec, so one batch can carry only one spec; requests with different
specs run as separate batches. Batches are static: left-padded prompts, greedy decoding, and a
batch runs until its longest output is done (a row that reached its length idles).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from personavec_vllm.bench.workload import BenchRequest


class _RowClock(StoppingCriteria):
    """A stopping criterion that stops each row at its own output length and records when the
    first token and each row's last token were produced (`time.perf_counter()`)."""

    def __init__(self, out_lens: Sequence[int], prompt_width: int):
        self.out_lens = torch.tensor(list(out_lens))
        self.width = prompt_width
        self.first: float | None = None
        self.ends: list[float | None] = [None] * len(out_lens)
        self.calls = 0

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        now = time.perf_counter()
        self.calls += 1
        if self.first is None:
            self.first = now
        done = (input_ids.shape[1] - self.width) >= self.out_lens
        for i in done.nonzero().flatten().tolist():
            if self.ends[i] is None:
                self.ends[i] = now
        return done.to(input_ids.device)


class HFReference:
    def __init__(self, model_dir: str | Path, vector_files: dict[str, str | Path], threads: int | None = None):
        from transformers import AutoModelForCausalLM

        from personavec_vllm.vectors import load_vector

        if threads:
            torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        self.model.eval()
        cfg = self.model.config
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
        if isinstance(pad, (list, tuple)):
            pad = pad[0]
        self.pad_id = int(pad if pad is not None else 0)
        self.vectors = {name: load_vector(path).vectors for name, path in vector_files.items()}
        self.layers = self.model.model.layers

    @contextlib.contextmanager
    def steering(self, terms: Sequence[dict[str, Any]]):
        """Forward hooks that add each term's `coeff * v[layer]` at its positions.

        Layer L is the output of decoder module L-1. `response` = the last prompt token (the
        prefill's last position; prompts are left-padded) and every generated token."""
        handles = []

        def make_hook(delta: torch.Tensor, positions: str):
            def hook(module, args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                prefill = hidden.shape[1] > 1
                if positions == "all" or (positions == "prompt" and prefill):
                    hidden = hidden + delta
                elif positions == "response":
                    if prefill:
                        hidden = hidden.clone()
                        hidden[:, -1] += delta
                    else:
                        hidden = hidden + delta
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

            return hook

        try:
            for t in terms:
                v = self.vectors[t["vector"]]
                for layer in t["layers"]:
                    delta = (float(t["coeff"]) * v[layer]).to(torch.float32)
                    handles.append(
                        self.layers[layer - 1].register_forward_hook(make_hook(delta, t.get("positions", "response")))
                    )
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def generate_batch(self, requests: Sequence[BenchRequest], terms: Sequence[dict[str, Any]]):
        """Run one static batch; return `(first_token, end)` per request (perf_counter seconds)
        and the generated tokens per row (lists)."""
        width = max(r.prompt_len for r in requests)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, r in enumerate(requests):
            ids[row, width - r.prompt_len :] = torch.tensor(r.prompt_token_ids)
            mask[row, width - r.prompt_len :] = 1
        longest = max(r.output_len for r in requests)
        clock = _RowClock([r.output_len for r in requests], width)
        with self.steering(terms):
            out = self.model.generate(  # type: ignore[misc]
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=longest,
                # as ignore_eos: end-of-sequence never stops a row early
                min_new_tokens=longest,
                pad_token_id=self.pad_id,
                stopping_criteria=StoppingCriteriaList([clock]),
                use_cache=True,
            )
        generated = out[:, width:]
        if generated.shape[1] != longest or any(e is None for e in clock.ends):
            raise RuntimeError(f"HF generate made {generated.shape[1]} tokens, expected {longest}")
        times = [(clock.first, end) for end in clock.ends]
        return times, [generated[row, : r.output_len].tolist() for row, r in enumerate(requests)]

    def run(
        self,
        requests: Sequence[BenchRequest],
        batches: Sequence[Sequence[int]],
        terms_of: Callable[[int], Sequence[dict[str, Any]]],
        progress: Callable[[int], None] | None = None,
    ) -> list[tuple[float, float]]:
        """Run `batches` (lists of request positions) back to back; every request of a batch
        uses `terms_of(first request's index)`. Returns `(first_token, end)` per request in
        seconds from the start, in request order."""
        out: list[tuple[float, float] | None] = [None] * len(requests)
        t0 = time.perf_counter()
        for batch in batches:
            reqs = [requests[j] for j in batch]
            times, _ = self.generate_batch(reqs, terms_of(reqs[0].index))
            for j, (first, end) in zip(batch, times):
                out[j] = (first - t0, end - t0)
            if progress:
                progress(len(batch))
        if any(o is None for o in out):
            raise ValueError("batches do not cover every request")
        return out  # type: ignore[return-value]


def same_spec_batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def one_per_batch(n: int) -> list[list[int]]:
    return [[i] for i in range(n)]
