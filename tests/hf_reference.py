"""An independent reference for steering and projections: HF transformers with forward hooks.

Greedy decoding recomputes the whole sequence at every step (no KV cache), so each position's
steering is decided from its absolute position alone, as the method defines it:
`all` = every token, `prompt` = prompt tokens, `response` = last prompt token and every
generated token. Projections are `h . v / |v|` of the (steered) residual stream after the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RefTerm:
    vector: torch.Tensor  # [num_layers + 1, hidden]
    coeff: float
    layers: tuple[int, ...]
    positions: str = "response"


@dataclass
class RefResult:
    tokens: list[int]
    logprobs: list[float]  # log-probability of each chosen token
    projections: dict[tuple[str, int], list[float]]  # (name, layer) -> per generated token


def _mask(positions: str, seq_len: int, num_prompt: int) -> torch.Tensor:
    idx = torch.arange(seq_len)
    if positions == "all":
        return torch.ones(seq_len, dtype=torch.bool)
    if positions == "prompt":
        return idx < num_prompt
    if positions == "response":
        return idx >= num_prompt - 1
    raise ValueError(positions)


@torch.no_grad()
def hf_generate(
    model,
    prompt_ids: list[int],
    max_tokens: int,
    steer: list[RefTerm] = (),
    monitor: dict[str, tuple[torch.Tensor, tuple[int, ...]]] | None = None,
) -> RefResult:
    monitor = monitor or {}
    layers = model.model.layers
    num_prompt = len(prompt_ids)
    ids = list(prompt_ids)
    captured: dict[int, torch.Tensor] = {}

    def make_hook(layer_number: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output  # [1, T, H]
            seq_len = hidden.shape[1]
            for term in steer:
                if layer_number in term.layers:
                    mask = _mask(term.positions, seq_len, num_prompt).to(hidden.dtype)[None, :, None]
                    hidden = hidden + mask * (term.coeff * term.vector[layer_number].to(hidden.dtype))
            captured[layer_number] = hidden[0].float()
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    handles = [layers[i].register_forward_hook(make_hook(i + 1)) for i in range(len(layers))]
    tokens, logprobs = [], []
    projections = {(name, layer): [] for name, (_, ls) in monitor.items() for layer in ls}
    try:
        for _step in range(max_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            token = int(torch.argmax(logits))
            position = len(ids) - 1  # the position whose hidden state produced this token
            for name, layer in projections:
                v = monitor[name][0][layer].float()
                projections[(name, layer)].append(float(captured[layer][position] @ (v / v.norm())))
            tokens.append(token)
            logprobs.append(float(logp[token]))
            ids.append(token)
    finally:
        for h in handles:
            h.remove()
    return RefResult(tokens, logprobs, projections)
