"""Swap submodules by dotted name, and find weights tied to each other."""
from __future__ import annotations

from torch import nn

__all__ = ["get_module", "set_module", "tied_groups"]


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(f"unknown module name {name!r}") from e


def set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace model.<name> with new; returns the old module."""
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Groups of module names whose `.weight` is the same Parameter (e.g. embed_tokens and lm_head)."""
    by_id: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        w = getattr(module, "weight", None)
        if isinstance(w, nn.Parameter) and name:
            by_id.setdefault(id(w), []).append(name)
    return [sorted(set(v)) for v in by_id.values() if len(set(v)) > 1]
