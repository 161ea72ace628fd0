"""Casting MPO and quantized layers to narrower float dtypes without silent overflow.

MPO cores have a gauge freedom: scaling core k by 2**e_k with sum e_k = 0 leaves their product
unchanged exactly. TT-SVD leaves the whole norm in the last core, which can overflow float16 where
balanced cores fit; these helpers find the exponents and check what a cast would produce.
"""
from __future__ import annotations

import math

import torch

__all__ = ["CastOverflowError", "cast_dtype", "narrower", "balance_exponents", "check_cast", "norm_bound", "max_abs"]


class CastOverflowError(ValueError):
    """A layer's stored tensors do not fit a lower-precision dtype (they would become inf/NaN)."""


def cast_dtype(fn, dtype: torch.dtype) -> torch.dtype:
    """The dtype `fn` (what nn.Module._apply passes: .to(), .half(), .cuda(), ...) turns `dtype` into."""
    try:
        return fn(torch.zeros((), dtype=dtype)).dtype
    except Exception:  # a fn that only makes sense for real tensors: assume it keeps the dtype
        return dtype


def narrower(target: torch.dtype, source: torch.dtype) -> bool:
    """Whether casting source -> target can overflow (e.g. float32 -> float16)."""
    return (target.is_floating_point and source.is_floating_point
            and torch.finfo(target).max < torch.finfo(source).max)


def balance_exponents(norms: list[float]) -> list[int] | None:
    """Integer e_k with sum 0 making norms[k] * 2**e_k about equal (within 2x): scaling MPO cores by
    2**e_k leaves their product unchanged exactly (powers of two are exact in binary floats).
    None when a norm is zero or not finite (nothing to balance)."""
    if not norms or any(not math.isfinite(n) or n <= 0 for n in norms):
        return None
    logs = [math.log2(n) for n in norms]
    mean = sum(logs) / len(logs)
    exps = [round(mean - lg) for lg in logs]
    excess = sum(exps)  # rounding may not sum to 0: move the most over-rounded ones back by 1
    order = sorted(range(len(exps)), key=lambda k: (mean - logs[k]) - exps[k], reverse=excess < 0)
    for k in order[: abs(excess)]:
        exps[k] -= 1 if excess > 0 else -1
    return exps


def max_abs(tensors) -> float:
    return max((float(t.detach().abs().max()) for t in tensors if t.numel()), default=0.0)


def norm_bound(cores: list[torch.Tensor]) -> float:
    """prod_k ||core_k||_F, an upper bound on ||W||_F (hence on every |W_ij|) of the MPO product."""
    return math.prod(float(c.detach().double().norm()) for c in cores)


def check_cast(label: str, dtype: torch.dtype, stored: list[torch.Tensor], weight=None,
               bound: float | None = None) -> None:
    """Raise CastOverflowError unless every stored tensor is finite and, when `weight` (a callable
    rebuilding the weight in `dtype`) is given, that weight is too; it is only rebuilt when `bound`
    (an upper bound on its entries) does not already show it fits."""
    bad = sum(int((~torch.isfinite(t)).sum()) for t in stored if t.is_floating_point())
    what = f"{bad} stored entries became inf/NaN"
    if not bad and weight is not None and not (bound is not None and bound < torch.finfo(dtype).max):
        w = weight()
        bad = int((~torch.isfinite(w)).sum())
        what = f"the weight has {bad} inf/NaN entries (|W| exceeds {torch.finfo(dtype).max:.4g})"
    if bad:
        raise CastOverflowError(f"{label}: cast to {dtype} overflows: {what}; keep this layer in torch.bfloat16 "
                                f"or torch.float32 (e.g. model.to(torch.bfloat16)), which have float32's range")
