"""OPF (ACL 2023): fine-tune small models as large ones by over-parameterizing selected weights.

A dense (out, in) weight becomes a long MPO whose inserted cores have local dims 1x1, i.e. each
inserted core is an (r, r) matrix (r = the full bond), so the product is exactly W at the start
(lossless TT-SVD) while the trainable parameter count grows. After training, `contract_` merges
every expanded layer back into an nn.Linear: the saved model has the original architecture.
Which weights to expand: Fisher importance (mean squared gradient over a few batches) or stable
rank ||W||_F^2 / ||W||_2^2 (METHODS.md section 10).
"""
from __future__ import annotations

from typing import Iterable

from torch import nn

from mpokit.layers.mpo import MPOLinear, make_layout
from mpokit.methods.selection import select_top, stable_rank_scores  # noqa: F401  (OPF's own API names)
from mpokit.surgery import get_module, set_module

__all__ = ["opf_layout", "expand_linear", "expand_", "contract_", "opf_layers", "fisher_scores",
           "stable_rank_scores", "select_top"]

OPF_FLAG = "_mpokit_opf"  # marks MPOLinear layers made by expand_ (contract_ only merges those)


def opf_layout(out_features: int, in_features: int, base_cores: int = 2, extra: int = 2) -> tuple[list[int], list[int]]:
    """Balanced `base_cores` layout with `extra` local dims of 1 inserted in the middle (both sides)."""
    if extra < 1:
        raise ValueError(f"expected extra >= 1 inserted cores, got {extra}")
    od, idd = make_layout(out_features, in_features, base_cores)
    mid = base_cores // 2
    return od[:mid] + [1] * extra + od[mid:], idd[:mid] + [1] * extra + idd[mid:]


def expand_linear(linear: nn.Linear, base_cores: int = 2, extra: int = 2) -> MPOLinear:
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"expected an nn.Linear to expand, got {type(linear).__name__}")
    od, idd = opf_layout(linear.out_features, linear.in_features, base_cores, extra)
    layer = MPOLinear.from_linear(linear, out_dims=od, in_dims=idd, forward_mode="dense")  # lossless: no cap
    setattr(layer, OPF_FLAG, True)
    return layer


def expand_(model: nn.Module, names: Iterable[str], base_cores: int = 2, extra: int = 2) -> list[str]:
    """Swap each named nn.Linear for its long MPO. Build the optimizer AFTER this call."""
    names = list(names)
    for name in names:
        layer = expand_linear(get_module(model, name), base_cores, extra)
        layer.requires_grad_(True)
        set_module(model, name, layer)
    return names


def opf_layers(model: nn.Module) -> list[tuple[str, MPOLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MPOLinear) and getattr(m, OPF_FLAG, False)]


def contract_(model: nn.Module) -> list[str]:
    """Undo every OPF-expanded layer (the layer protocol's undo; trainability kept). Only the layers
    expand_ made are undone: a compressed model's own MPO layers stay."""
    names = []
    for name, layer in opf_layers(model):
        trainable = layer.cores[0].requires_grad
        layer.undo_(model, name)
        model.get_submodule(name).requires_grad_(trainable)
        names.append(name)
    return names


def fisher_scores(model: nn.Module, names: list[str], batches: Iterable[dict]) -> dict[str, float]:
    """Mean squared gradient of each named weight's entries over the batches (empirical Fisher)."""
    weights = {n: get_module(model, n).weight for n in names}
    flags = {n: w.requires_grad for n, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(True)
    sums = {n: 0.0 for n in names}
    count = 0
    was_training = model.training
    model.eval()  # no dropout noise in the importance estimate
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for n, w in weights.items():
            sums[n] += float(w.grad.pow(2).mean()) if w.grad is not None else 0.0
        count += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    for n, w in weights.items():
        w.requires_grad_(flags[n])
    if count == 0:
        raise ValueError("expected at least one batch for Fisher scores, got none")
    return {n: s / count for n, s in sums.items()}
