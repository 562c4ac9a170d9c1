"""The benchmark's fixed, seeded workload: prompts of given token lengths and output lengths.

Every scenario and every concurrency level sends requests of the same shapes (level `c` with
`n` requests sends the first `n` of the stream) with `ignore_eos`, so every scenario computes
the same number of prompt and output tokens. Each measurement draws its own words for those
shapes (`with_fresh_words`): with prefix caching on, no measurement may reuse the prefill of an
earlier one.

- Prompt lengths: log-normal with median sqrt(min * max) and shape `sigma`, clipped to
  [min, max] (most prompts short, a tail of long ones).
- Output lengths: uniform integers in [min, max].
- Prompt tokens: drawn from `vocab` (ordinary word tokens of the model's tokenizer), so
  prompts read as word salad rather than control characters; cost does not depend on them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LengthRange:
    """An inclusive integer range; `min == max` means a fixed length."""

    min: int
    max: int

    def __post_init__(self):
        if self.min < 1 or self.max < self.min:
            raise ValueError(f"bad length range {self.min}:{self.max} (need 1 <= min <= max)")

    @classmethod
    def parse(cls, text: str) -> LengthRange:
        """`"64"` (fixed) or `"32:96"`."""
        try:
            parts = [int(p) for p in str(text).split(":")]
        except ValueError:
            raise ValueError(f"expected N or MIN:MAX, got {text!r}") from None
        if len(parts) == 1:
            return cls(parts[0], parts[0])
        if len(parts) == 2:
            return cls(parts[0], parts[1])
        raise ValueError(f"expected N or MIN:MAX, got {text!r}")

    def __str__(self) -> str:
        return str(self.min) if self.min == self.max else f"{self.min}:{self.max}"


@dataclass(frozen=True)
class WorkloadConfig:
    seed: int = 0
    prompt_len: LengthRange = LengthRange(32, 512)
    prompt_sigma: float = 0.6
    output_len: LengthRange = LengthRange(32, 96)

    def describe(self) -> str:
        return (
            f"seed {self.seed}; prompt tokens log-normal, median "
            f"{math.sqrt(self.prompt_len.min * self.prompt_len.max):.0f}, sigma {self.prompt_sigma}, "
            f"clipped to [{self.prompt_len.min}, {self.prompt_len.max}]; output tokens uniform in "
            f"[{self.output_len.min}, {self.output_len.max}] (ignore_eos, greedy)"
        )


@dataclass(frozen=True)
class BenchRequest:
    index: int
    prompt_token_ids: tuple[int, ...]
    output_len: int
    text: str = ""  # the prompt as text, for the chat API (its tokens are `prompt_token_ids`)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def prompt_length(rng: random.Random, cfg: WorkloadConfig) -> int:
    lo, hi = cfg.prompt_len.min, cfg.prompt_len.max
    if lo == hi:
        return lo
    median = math.sqrt(lo * hi)
    value = round(rng.lognormvariate(math.log(median), cfg.prompt_sigma))
    return min(hi, max(lo, value))


def make_workload(cfg: WorkloadConfig, count: int, vocab: Sequence[int]) -> list[BenchRequest]:
    """The first `count` requests of the seeded stream (a prefix of any longer one)."""
    if not vocab:
        raise ValueError("vocab is empty")
    vocab = list(vocab)
    rng = random.Random(cfg.seed)
    out = []
    for i in range(count):
        n_prompt = prompt_length(rng, cfg)
        n_out = rng.randint(cfg.output_len.min, cfg.output_len.max)
        tokens = tuple(rng.choice(vocab) for _ in range(n_prompt))
        out.append(BenchRequest(i, tokens, n_out))
    return out


def with_fresh_words(
    requests: Sequence[BenchRequest],
    vocab: Sequence[int],
    seed: int | str,
    decode: Callable[[list[int]], str] | None = None,
) -> list[BenchRequest]:
    """The same prompt and output lengths with other words (seeded): what one measurement sends.
    `decode` (token ids -> text) fills `text` for the chat API."""
    rng = random.Random(seed)
    vocab = list(vocab)
    out = []
    for r in requests:
        tokens = tuple(rng.choice(vocab) for _ in range(r.prompt_len))
        out.append(BenchRequest(r.index, tokens, r.output_len, decode(list(tokens)).strip() if decode else ""))
    return out


def word_vocab(tokenizer, limit: int = 5000) -> list[int]:
    """Ids of ordinary word tokens (a space then 2+ ASCII letters), lowest ids first."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = []
    for token, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if idx in special:
            continue
        word = token[1:] if token.startswith(("Ġ", "▁")) else None
        if word and len(word) >= 2 and word.isascii() and word.isalpha():
            ids.append(idx)
            if len(ids) >= limit:
                break
    return ids


def chat_template_tokens(tokenizer) -> int:
    """Tokens the chat API adds around a prompt (the chat template's system prompt and role
    markers, with a one-token message); 0 without a template. Servers must leave room for them
    beside the longest prompt and output, or those requests come back short."""
    if not getattr(tokenizer, "chat_template", None):
        return 0
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
