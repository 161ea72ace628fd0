"""Metrics after training: classification accuracy (perplexity lives in mpokit.eval)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["accuracy"]


@torch.no_grad()
def accuracy(model: nn.Module, dataset, collator, batch_size: int = 32) -> float:
    """Fraction of rows whose argmax logit equals the label."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    right = 0
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[k] for k in range(start, min(start + batch_size, len(dataset)))])
        labels = batch.pop("labels").to(device)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits  # (B, num_labels)
        right += int((logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return right / len(dataset)
