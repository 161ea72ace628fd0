"""Find the modules a method should edit: exact names, suffixes, regexes, excludes.

Matching follows PEFT: a list entry matches a module whose full name equals it or
ends with "." + entry; a single string is a regular expression that must match the
whole name. Names that match nothing are an error, with the closest real names.
"""
from __future__ import annotations

import difflib
import re
from typing import Iterable

from torch import nn

__all__ = ["DEFAULT_TARGETS", "default_targets", "find_targets", "is_weight_layer", "weight_matrix", "find_blocks"]

# Decoder / encoder linear layers per architecture (embeddings are opt-in).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "bert": ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"],
}
DEFAULT_TARGETS["roberta"] = DEFAULT_TARGETS["bert"]


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(
            f"expected target_modules for model type {model_type!r}: no defaults for it "
            f"(defaults exist for {sorted(DEFAULT_TARGETS)})"
        )
    return DEFAULT_TARGETS[model_type]


def is_weight_layer(module: nn.Module) -> bool:
    """nn.Linear, nn.Embedding or transformers' Conv1D (GPT-2: weight stored (in, out))."""
    return isinstance(module, (nn.Linear, nn.Embedding)) or type(module).__name__ == "Conv1D"


def weight_matrix(module: nn.Module):
    """The (out, in) weight of a Linear/Conv1D, or (num, dim) table of an Embedding."""
    if type(module).__name__ == "Conv1D":
        return module.weight.t()
    return module.weight


def _matches(name: str, targets: str | Iterable[str]) -> bool:
    if isinstance(targets, str):
        try:
            return re.fullmatch(targets, name) is not None
        except re.error as e:
            raise ValueError(f"expected a valid regular expression over module names, got {targets!r} ({e})") from None
    return any(name == t or name.endswith("." + t) for t in targets)


def _check_selector(value, what: str, allow_empty: bool = False) -> None:
    """None, a valid regular expression, or a list of non-empty names (non-empty unless allow_empty)."""
    if value is None:
        return
    if isinstance(value, str):
        if not value:
            raise ValueError(f"expected a regular expression or a list of module names for {what}, got ''")
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"expected a valid regular expression for {what}, got {value!r} ({e})") from None
        return
    names = list(value)
    if not names and not allow_empty:
        raise ValueError(f"expected at least one module name in {what}, got []")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise ValueError(f"expected non-empty module names in {what}, got {bad[0]!r} in {names!r}")


def find_targets(
    model: nn.Module,
    target_modules: str | list[str] | None = None,
    exclude_modules: str | list[str] | None = None,
    types: tuple[type, ...] | None = None,
) -> list[str]:
    """Names of modules to edit, in model order. Raises if a listed name matches nothing."""
    _check_selector(target_modules, "target_modules")
    _check_selector(exclude_modules, "exclude_modules", allow_empty=True)
    targets = default_targets(model) if target_modules is None else target_modules
    names = [n for n, m in model.named_modules() if n and (is_weight_layer(m) if types is None else isinstance(m, types))]
    chosen = [n for n in names if _matches(n, targets)]
    if exclude_modules:
        chosen = [n for n in chosen if not _matches(n, exclude_modules)]
    if not isinstance(targets, str):
        for t in targets:
            if not any(n == t or n.endswith("." + t) for n in names):
                close = difflib.get_close_matches(t, names, n=3, cutoff=0.4)
                hint = f"; close matches: {close}" if close else ""
                raise ValueError(f"unknown module name {t!r}: matches no Linear/Embedding layer of the model{hint}")
    if not chosen:
        raise ValueError(f"expected target_modules to match at least one layer, got none for {targets!r}")
    return chosen


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of repeated transformer blocks (the one holding most parameters)."""
    best, best_size = None, 0
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            size = sum(p.numel() for p in m.parameters())
            if size > best_size:
                best, best_size = (name, m), size
    if best is None:
        raise ValueError("expected a model with a ModuleList of transformer blocks, found none")
    return best
