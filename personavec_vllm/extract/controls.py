"""Is a vector's steering effect its own? Controls for the judge-free multiple-choice measure.

A steering effect only means something next to what any push of the same size does. For a
vector `v` steered at layer `L` with coefficient `c`:

- on-target gain: change of its own trait's MC probability (`sweep.mc_item_probabilities`),
  steered minus unsteered, with a bootstrap 95 % interval over the trait's items;
- random gain: the same change for random directions of the same norm `|c * v[L]|` at the same
  layer (norm-matched: a bigger push moves any measure more); the target compares the
  on-target gain with the mean absolute random gain, and the 95th percentile is reported;
- off-target gains: the change of every *other* trait's MC probability under the same steering
  (does it move its trait, or everything?).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from personavec_vllm.extract.sweep import answer_probabilities, mc_batch, mc_item_probabilities
from personavec_vllm.hf.hooks import on_residual, recorder
from personavec_vllm.hf.layers import decoder_layers
from personavec_vllm.projection import layer_projections
from personavec_vllm.traits import TraitDefinition

RANDOM_STEERING_DIRECTIONS = 12
BOOTSTRAP_REPS = 2000


def _gain_ci(delta: np.ndarray, reps: int = BOOTSTRAP_REPS, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean per-item change (items resampled)."""
    rng = np.random.default_rng(seed)
    means = [rng.choice(delta, len(delta)).mean() for _ in range(reps)]
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def norm_matched_random(vector: torch.Tensor, n: int, seed: int = 0) -> list[torch.Tensor]:
    """`n` random directions with the norm of `vector` (`[H]`), seeded."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        r = torch.randn(vector.shape[0], generator=g)
        out.append(r / r.norm() * vector.norm())
    return out


def unsteered(model, tokenizer, traits: Sequence[TraitDefinition]) -> dict[str, np.ndarray]:
    """Each trait's multiple-choice item probabilities without steering."""
    return {t.name: mc_item_probabilities(model, tokenizer, t, None, 1, 0.0).numpy() for t in traits}


@torch.no_grad()
def steering_controls(
    model,
    tokenizer,
    traits: Sequence[TraitDefinition],
    name: str,
    vector: torch.Tensor,
    layer: int,
    coeff: float,
    n_random: int = RANDOM_STEERING_DIRECTIONS,
    seed: int = 0,
    base: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """On-target, random and off-target gains of steering `coeff * vector[layer]` (`vector`
    `[L+1, H]`), `name` being the trait in `traits` whose vector it is (`base`: the unsteered
    item probabilities of every trait, `unsteered`, if already computed)."""
    by_name = {t.name: t for t in traits}
    own = by_name[name]
    base = base or unsteered(model, tokenizer, traits)
    steered = {t.name: mc_item_probabilities(model, tokenizer, t, vector, layer, coeff).numpy() for t in traits}
    delta = steered[name] - base[name]
    one_layer = torch.zeros_like(vector)
    random_gains = []
    for r in norm_matched_random(vector[layer].float(), n_random, seed):
        one_layer[layer] = r
        p = mc_item_probabilities(model, tokenizer, own, one_layer, layer, coeff).numpy()
        random_gains.append(float((p - base[name]).mean()))
    on = float(delta.mean())
    random_abs = np.abs(random_gains)
    off = {t: float((steered[t] - base[t]).mean()) for t in by_name if t != name}
    return {
        "vector": name,
        "layer": layer,
        "coeff": coeff,
        "push_norm": float(abs(coeff) * vector[layer].norm()),
        "mc_unsteered": float(base[name].mean()),
        "on_target_gain": on,
        "on_target_gain_ci95": _gain_ci(delta),
        "random_gains": random_gains,
        "random_abs_gain_mean": float(random_abs.mean()),
        "random_abs_gain_p95": float(np.percentile(random_abs, 95)),
        "gain_over_random": on / float(random_abs.mean()) if random_abs.mean() > 0 else float("inf"),
        "off_target_gains": off,
        "largest_off_over_on": max((abs(g) for g in off.values()), default=0.0) / abs(on) if on else float("inf"),
    }


@torch.no_grad()
def graded_prompt_points(
    model, tokenizer, trait: TraitDefinition, vector: torch.Tensor, instructions: Sequence[str]
) -> dict[str, np.ndarray]:
    """The paper's first correlation, judge-free: for every instruction (graded from suppressing
    to eliciting the trait, `""` = none) and every multiple-choice item, the projection of the
    last prompt token on the vector (`[L+1, H]`) at every layer (the instruction placed after the
    question, as the shipped vectors were extracted) and the probability of the trait-expressing
    answer under that prompt. Returns `level` and `p_trait` `[levels * items]`, `projection`
    `[levels * items, L+1]`."""
    num_layers = len(decoder_layers(model))
    levels, projections, probabilities = [], [], []
    for level, instruction in enumerate(instructions):
        input_ids, attention, spans = mc_batch(tokenizer, trait, instruction)
        captured: dict[int, torch.Tensor] = {}
        with on_residual(model, [(k, recorder(captured, k)) for k in range(1, num_layers + 1)]):
            out = model(input_ids=input_ids, attention_mask=attention, output_hidden_states=True)
        p = answer_probabilities(out.logits, input_ids, spans)
        # the last prompt token's residual stream (row 0: embeddings; rows 1..L captured by hooks
        # before the final norm, as hf.hidden does), read from the trait-answer rows
        stream = torch.stack([out.hidden_states[0].float()] + [captured[k] for k in range(1, num_layers + 1)], dim=1)
        last = torch.stack([stream[i, :, spans[i][0] - 1] for i in range(0, len(spans), 2)])
        levels += [level] * len(trait.multiple_choice)
        projections.append(layer_projections(last, vector).numpy())
        probabilities.append(p.numpy())
    return {
        "level": np.array(levels),
        "projection": np.concatenate(projections),
        "p_trait": np.concatenate(probabilities),
    }


def pearson_ci(x: np.ndarray, y: np.ndarray, reps: int = BOOTSTRAP_REPS, seed: int = 0) -> tuple[float, float, float]:
    """(Pearson r, bootstrap 95 % interval) over points resampled together."""
    r = float(np.corrcoef(x, y)[0, 1])
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(reps):
        idx = rng.integers(0, len(x), len(x))
        if np.std(x[idx]) > 0 and np.std(y[idx]) > 0:
            boot.append(np.corrcoef(x[idx], y[idx])[0, 1])
    low, high = np.percentile(boot, [2.5, 97.5])
    return r, float(low), float(high)
