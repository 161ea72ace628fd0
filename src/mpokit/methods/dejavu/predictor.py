"""Training a NeuronSparseFFN's predictor on calibration activations (Deja Vu's recipe, low rank).

Labels are each token's top `keep` neurons by |activation| (a binary mask); the predictor's scores
are fit with binary cross-entropy, so their top `keep` approximate the true ones. Held-out tokens
(never trained on) give the recall figures.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mpokit.layers.sparse_ffn import NeuronSparseFFN
from mpokit.methods.moefication.router import routing_quality, train_scorer

__all__ = ["selection_quality", "train_predictor"]


def selection_quality(scores: torch.Tensor, hidden: torch.Tensor, keep: int) -> dict[str, float]:
    """How well scores (T, N) pick the neurons with the largest |hidden| (T, N) at top-`keep`.

    recall: share of the true top-keep neurons picked; mass: |hidden| picked over the true top-keep's."""
    return routing_quality(scores, hidden.abs(), keep)


def train_predictor(layer: NeuronSparseFFN, x: torch.Tensor, hidden: torch.Tensor, steps: int, lr: float,
                    batch: int, seed: int = 0, holdout: float = 0.1) -> dict[str, float]:
    """Fit layer.predictor on inputs x (T, d) and the dense activations hidden (T, N), in float32 on
    x's device, cast back after; returns the loss and held-out selection quality."""
    x, hidden = x.float().cpu(), hidden.float().cpu()
    labels = torch.zeros_like(hidden).scatter_(1, hidden.abs().topk(layer.keep, dim=-1).indices, 1.0)
    device = layer.w_in.device

    def loss(scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(scores, labels[idx].to(device))

    loss_value, eval_idx, scores = train_scorer(layer.predictor, x, loss, steps, lr, batch, device, seed, holdout)
    return {"loss": loss_value, **selection_quality(scores, hidden[eval_idx], layer.keep)}
