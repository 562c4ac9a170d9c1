"""An independent reference for steering and projections: HF transformers with forward hooks.

Greedy decoding recomputes the whole sequence at every step (no KV cache), so each position's
steering is decided from its absolute position alone, as the method defines it:
`all` = every token, `prompt` = prompt tokens, `response` = last prompt token and every
generated token. Per layer, in order: `add` terms; then `cap` / `ablate` terms, each clamping
the projection on its unit vector computed after the adds (`ablate` = clamp to [0, 0]).
A term with a condition (`when`) applies only if the condition holds, decided from the residual
stream at the last prompt token before the terms of the condition's layer, and only at positions
from the last prompt token on (from the first generated token at layers up to the condition's).
Projections are `h . v / |v|` of the residual stream after the layer's terms (and before them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RefGate:
    vector: torch.Tensor  # [num_layers + 1, hidden]
    layer: int
    threshold: float
    above: bool = True


@dataclass
class RefTerm:
    vector: torch.Tensor  # [num_layers + 1, hidden]
    coeff: float
    layers: tuple[int, ...]
    positions: str = "response"
    op: str = "add"
    low: float | None = None
    high: float | None = None
    when: RefGate | None = None


@dataclass
class RefResult:
    tokens: list[int]
    logprobs: list[float]  # log-probability of each chosen token
    projections: dict[tuple[str, int], list[float]]  # (name, layer) -> per generated token
    before: dict[tuple[str, int], list[float]]  # the same, before the layer's own terms
    gates: list[bool]  # each distinct condition, in the order the terms name them


def _mask(positions: str, seq_len: int, num_prompt: int) -> torch.Tensor:
    idx = torch.arange(seq_len)
    if positions == "all":
        return torch.ones(seq_len, dtype=torch.bool)
    if positions == "prompt":
        return idx < num_prompt
    if positions == "response":
        return idx >= num_prompt - 1
    raise ValueError(positions)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v.float() / v.float().norm()


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
    after: dict[int, torch.Tensor] = {}
    before: dict[int, torch.Tensor] = {}
    gates: list[RefGate] = []
    for term in steer:
        if term.when is not None and not any(term.when is g for g in gates):
            gates.append(term.when)
    decided: dict[int, bool] = {}  # id(gate) -> opened; empty while deciding

    def term_mask(term: RefTerm, layer: int, seq_len: int) -> torch.Tensor | None:
        mask = _mask(term.positions, seq_len, num_prompt)
        if term.when is not None:
            if not decided.get(id(term.when), False):
                return None
            first = num_prompt if layer <= term.when.layer else num_prompt - 1
            mask = mask & (torch.arange(seq_len) >= first)
        return mask

    def make_hook(layer: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output  # [1, T, H]
            seq_len = hidden.shape[1]
            before[layer] = hidden[0].float()
            for term in steer:
                if term.op == "add" and layer in term.layers:
                    mask = term_mask(term, layer, seq_len)
                    if mask is not None:
                        m = mask.to(hidden.dtype)[None, :, None]
                        hidden = hidden + m * (term.coeff * term.vector[layer].to(hidden.dtype))
            delta = torch.zeros_like(hidden, dtype=torch.float32)
            for term in steer:
                if term.op in ("cap", "ablate") and layer in term.layers:
                    mask = term_mask(term, layer, seq_len)
                    if mask is None:
                        continue
                    u = _unit(term.vector[layer])
                    p = hidden[0].float() @ u  # [T]
                    low, high = (0.0, 0.0) if term.op == "ablate" else (term.low, term.high)
                    target = p.clamp(min=low, max=high)
                    delta[0] += (mask.float() * (target - p))[:, None] * u
            hidden = hidden + delta.to(hidden.dtype)
            after[layer] = hidden[0].float()
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    handles = [layers[i].register_forward_hook(make_hook(i + 1)) for i in range(len(layers))]
    tokens, logprobs = [], []
    projections = {(name, layer): [] for name, (_, ls) in monitor.items() for layer in ls}
    befores = {key: [] for key in projections}
    try:
        if gates:  # decide the conditions on the prompt, as the engine does at its last token
            model(torch.tensor([ids]))
            for gate in gates:
                value = float(before[gate.layer][num_prompt - 1] @ _unit(gate.vector[gate.layer]))
                decided[id(gate)] = value > gate.threshold if gate.above else value < gate.threshold
        for _step in range(max_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            token = int(torch.argmax(logits))
            position = len(ids) - 1  # the position whose hidden state produced this token
            for name, layer in projections:
                u = _unit(monitor[name][0][layer])
                projections[(name, layer)].append(float(after[layer][position] @ u))
                befores[(name, layer)].append(float(before[layer][position] @ u))
            tokens.append(token)
            logprobs.append(float(logp[token]))
            ids.append(token)
    finally:
        for h in handles:
            h.remove()
    return RefResult(tokens, logprobs, projections, befores, [decided[id(g)] for g in gates])
