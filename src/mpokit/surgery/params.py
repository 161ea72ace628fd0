"""Choose what trains: freeze everything, then unfreeze a chosen set of parameters."""
from __future__ import annotations

from typing import Iterable

from torch import nn

__all__ = ["train_only_", "count_trainable", "head_parameters"]


def train_only_(model: nn.Module, params: Iterable[nn.Parameter]) -> int:
    """Set requires_grad on exactly `params` (by identity); returns the trainable count."""
    keep = {id(p) for p in params}
    if not keep:
        raise ValueError("expected at least one parameter to train, got none")
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return count_trainable(model)


def count_trainable(model: nn.Module) -> int:
    seen, n = set(), 0
    for p in model.parameters():  # tied parameters count once
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """A sequence classifier's freshly initialized head (BERT: pooler is pretrained, classifier is new)."""
    head = getattr(model, "classifier", None) or getattr(model, "score", None)
    return list(head.parameters()) if head is not None else []
