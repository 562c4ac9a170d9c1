"""Projection maths on hidden states and persona vectors (no model, no engine).

Shapes: a vector is `[L+1, H]` (row L = residual stream after decoder layer L-1); hidden-state
means of N answers are `[N, L+1, H]`. The projection of `h` on `v` is `h . v / |v|` (`h` not
normalised).
"""

from __future__ import annotations

import numpy as np
import torch


def unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    """`[L+1, H]` -> each row divided by its norm (zero rows stay zero)."""
    vectors = vectors.float()
    unit: torch.Tensor = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return unit


def projection(h: torch.Tensor, vector: torch.Tensor, layer: int) -> torch.Tensor:
    """`h . v_hat` at `layer` for hidden means `h` of shape `[N, L+1, H]` -> `[N]`."""
    return h[:, layer].float() @ unit_rows(vector[layer])


def projection_difference(h_data: torch.Tensor, h_own: torch.Tensor, vector: torch.Tensor, layer: int) -> torch.Tensor:
    """dP = (h(x, y) - h(x, y')) . v_hat at `layer`; inputs `[N, L+1, H]` (response means), `[N]` out."""
    return (h_data[:, layer].float() - h_own[:, layer].float()) @ unit_rows(vector[layer])


def diff_mean(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """`[N, L+1, H]` each -> `[L+1, H]`: mean of positives minus mean of negatives, float32."""
    return (positive.float().mean(dim=0) - negative.float().mean(dim=0)).to(torch.float32)


def layer_projections(states: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """`[N, L+1, H]` states, `[L+1, H]` vector -> `[N, L+1]` projections `h . v / |v|` per layer."""
    return torch.einsum("nlh,lh->nl", states.float(), unit_rows(vector))


def projection_stats(
    vector: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor
) -> dict[str, dict[str, float]]:
    """Per layer: mean and sd of `h . v / |v|` over positive and negative answers."""
    pos, neg = layer_projections(positive, vector), layer_projections(negative, vector)
    return {
        str(layer): {
            "pos_mean": float(pos[:, layer].mean()),
            "pos_std": float(pos[:, layer].std(unbiased=False)),
            "neg_mean": float(neg[:, layer].mean()),
            "neg_std": float(neg[:, layer].std(unbiased=False)),
        }
        for layer in range(1, vector.shape[0])
    }


def plain_stats(vector: torch.Tensor, plain: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per layer: mean and sd of `h . v / |v|` over plain replies (no system prompt)."""
    proj = layer_projections(plain, vector)
    return {
        str(layer): {"mean": float(proj[:, layer].mean()), "std": float(proj[:, layer].std(unbiased=False))}
        for layer in range(1, vector.shape[0])
    }


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = np.asarray(positive)[:, None], np.asarray(negative)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def separation(vector: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> dict[int, float]:
    """Per layer, how well the projection separates positives from negatives (d')."""
    stats = projection_stats(vector, positive, negative)
    return {
        int(layer): (s["pos_mean"] - s["neg_mean"]) / max(np.sqrt((s["pos_std"] ** 2 + s["neg_std"] ** 2) / 2), 1e-6)
        for layer, s in stats.items()
    }


def separation_layer(vector: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> int:
    """The layer whose projection best separates positives from negatives (largest d')."""
    scores = separation(vector, positive, negative)
    return max(scores, key=lambda layer: scores[layer])


def best_auc_layer(positive: torch.Tensor, negative: torch.Tensor) -> tuple[int, list[float]]:
    """(the layer 1..L whose projection best separates the positives from the negatives by ROC
    AUC, the AUC of every layer 0..L), from projections `[N, L+1]`: the monitoring layer, picked
    on held-out answers read without their instruction, as a monitor sees replies."""
    aucs = [roc_auc(positive[:, k].numpy(), negative[:, k].numpy()) for k in range(positive.shape[1])]
    return max(range(1, len(aucs)), key=lambda k: aucs[k]), aucs
