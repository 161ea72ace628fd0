"""Parameter and byte counts that count shared tensors once and packed storage honestly."""
from __future__ import annotations

from torch import nn

__all__ = ["count_params", "param_bytes", "size_report"]


def count_params(model: nn.Module) -> int:
    """Parameters, each shared Parameter once (tied embeddings count once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def param_bytes(model: nn.Module) -> int:
    """Bytes of stored weights: parameters once each, except inside modules that report their
    own packed size via `storage_bytes()` (quantized layers), which count that instead."""
    total, covered = 0, set()
    for m in model.modules():
        if hasattr(m, "storage_bytes"):
            total += m.storage_bytes()
            covered.update(id(t) for t in m.parameters())
    for p in model.parameters():
        if id(p) not in covered:
            covered.add(id(p))
            total += p.numel() * p.element_size()
    return total


def size_report(model: nn.Module) -> dict:
    return {"params": count_params(model), "bytes": param_bytes(model)}
