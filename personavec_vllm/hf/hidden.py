"""Hidden states of conversations under a Hugging Face model: chat formatting and the per-layer
means that extraction, screening and the fine-tuning shift all use.

Row 0 is the embeddings, row `L` the residual stream after decoder layer `L-1` (captured by
hooks, before the final norm).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from personavec_vllm.hf.hooks import on_residual, recorder
from personavec_vllm.hf.layers import decoder_layers, unwrap_model

# The means `hidden_means` returns: over response tokens, over prompt tokens, at the last prompt token.
HIDDEN_KINDS = ("response", "prompt", "prompt_last")


def chat_prompt(tokenizer, system: str | None, question: str, answer: str | None = None) -> tuple[list[int], int]:
    """Token ids of the chat-formatted conversation and where the response starts."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if answer is None:
        return prompt_ids, len(prompt_ids)
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, len(prompt_ids)


@torch.no_grad()
def hidden_means(
    model, tokenizer, items: list[tuple[str | None, str, str]], batch_note: str = "", batch_size: int = 16
) -> dict[str, torch.Tensor]:
    """For each (system, question, answer): `[num_layers + 1, hidden]` float32 means of the
    residual stream over response tokens, over prompt tokens, and at the last prompt token.
    Row 0 is the embeddings, row L the output of decoder layer L-1 (captured by hooks, before
    the final norm). Batched with right padding, which leaves real tokens' states unchanged."""
    from tqdm import tqdm

    num_layers = len(decoder_layers(model))
    captured: dict[int, torch.Tensor] = {}

    encoded = []
    for system, question, answer in items:
        ids, start = chat_prompt(tokenizer, system, question, answer)
        if len(ids) <= start:  # empty answer: average over the end-of-turn token instead
            ids = ids + [tokenizer.eos_token_id]
        encoded.append((ids, start))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # little padding per batch
    results: dict[str, list] = {k: [None] * len(encoded) for k in HIDDEN_KINDS}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    hooks = [(layer, recorder(captured, layer)) for layer in range(1, num_layers + 1)]
    with on_residual(model, hooks), tqdm(total=len(encoded), desc=f"hidden states{batch_note}", unit="answer") as bar:
        for b in range(0, len(order), batch_size):
            batch = order[b : b + batch_size]
            width = max(len(encoded[i][0]) for i in batch)
            input_ids = torch.tensor([encoded[i][0] + [pad] * (width - len(encoded[i][0])) for i in batch])
            mask = torch.tensor([[1] * len(encoded[i][0]) + [0] * (width - len(encoded[i][0])) for i in batch])
            outputs = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
            stream = torch.stack(
                [outputs.hidden_states[0].float()] + [captured[i] for i in range(1, num_layers + 1)], dim=1
            )  # [batch, layers + 1, tokens, hidden]
            for row, i in enumerate(batch):
                ids, start = encoded[i]
                results["response"][i] = stream[row, :, start : len(ids)].mean(dim=1)
                results["prompt"][i] = stream[row, :, :start].mean(dim=1)
                results["prompt_last"][i] = stream[row, :, start - 1]
            bar.update(len(batch))
    return {k: torch.stack(v) for k, v in results.items()}


def last_prompt_mean(model, tokenizer, questions: Sequence[str], note: str = "") -> torch.Tensor:
    """Mean over `questions` of the residual stream at the last prompt token, each question
    formatted with the chat template (no system prompt of our own): `[num_layers + 1, hidden]`."""
    base = unwrap_model(model)
    was_training = base.training
    base.eval()
    try:
        return hidden_means(base, tokenizer, [(None, q, "") for q in questions], note)["prompt_last"].mean(dim=0)
    finally:
        base.train(was_training)
