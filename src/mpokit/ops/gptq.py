"""GPTQ (Frantar et al., ICLR 2023): quantize a weight column by column with error feedback.

For a layer y = W x with calibration inputs X (tokens x in), the output error of a
quantized Q is tr((W - Q) H (W - Q)^T) with H = X^T X. GPTQ walks the input columns in
order, rounds column j to the grid, and spreads its rounding error over the columns not
yet quantized, weighted by the upper Cholesky factor U of H^-1 (the OBS update
W[:, j:] -= err_j / U[j, j] * U[j, j:]). Group scales and zero points are fixed when the
walk reaches a group's first column, from the weights as already updated. Updates are
applied lazily in blocks aligned with the groups (so a group's range is computed on the
exact updated weights). act_order walks columns by decreasing H_jj; groups then stay
contiguous in the original order (the packed format needs that), so their parameters
are computed once up front from the unmodified weight ("static groups").
The result uses the exact grid of `ops.quant` (16-bit scales, integer zero points), so it
packs into QuantLinear like round-to-nearest codes.
"""
from __future__ import annotations

import torch

from mpokit.ops.quant import (SCALE_DTYPE, Quantized, _codes, _dequant_grouped, _mode, _params, check_bits, num_groups,
                              search_range)

__all__ = ["gptq_quantize", "walk_factor", "output_error"]


def _group_params(w: torch.Tensor, bits: int, mode: str, clip_ratios=None, col_weight: torch.Tensor | None = None):
    """Scale and offset (rows, 1) of the columns w (rows, g): the min/max range, or with clip_ratios
    the shrunk range with the least error sum_j h_j (w_j - q_j)^2 per row (h = col_weight (g,), the
    Gram's diagonal: an input-energy weighted version of the reference GPTQ's MSE range search)."""
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)  # (rows, 1)
    if not clip_ratios:
        return _params(lo, hi, bits, mode)
    scale, offset, _ = search_range(w, lo, hi, bits, mode, clip_ratios, col_weight)
    return scale, offset


def _inverse_cholesky(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1 in float64 (dead inputs get H_jj = 1)."""
    h = gram.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    lam = damp * torch.diagonal(h).mean()
    h.diagonal().add_(lam)
    mean, added = torch.diagonal(h).mean(), 0.0
    # Damping goes onto the diagonal in place and each intermediate is freed at once: at 8192 inputs every
    # (cols, cols) float64 matrix is 0.5 GB, and an identity plus a damped copy cost 1 GB more per layer.
    for extra in (0.0, 1e-6, 1e-4, 1e-2):  # grow the damping if H is numerically indefinite
        if extra:
            h.diagonal().add_((extra - added) * mean)
            added = extra
        try:
            inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        except RuntimeError:
            continue
        del h
        return torch.linalg.cholesky(inv, upper=True)
    raise ValueError("expected a positive semi-definite input Gram matrix, Cholesky failed even with damping")


@torch.no_grad()
def walk_factor(gram: torch.Tensor, damp: float = 0.01, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, U): the column walk order and the upper Cholesky factor of the damped inverse Gram in that
    order. It depends on the Gram alone: callers quantizing several weights (or bit widths) on one Gram
    compute it once and pass it to gptq_quantize(factor=...)."""
    cols = gram.shape[0]
    perm = torch.argsort(torch.diagonal(gram), descending=True) if act_order else torch.arange(cols, device=gram.device)
    return perm, _inverse_cholesky(gram[perm][:, perm] if act_order else gram, damp)  # no permuted copies unless needed


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                  zero_point: bool = True, damp: float = 0.01, act_order: bool = False,
                  block_size: int = 128, clip_ratios: tuple[float, ...] | None = None,
                  factor: tuple[torch.Tensor, torch.Tensor] | None = None) -> Quantized:
    """GPTQ codes for weight (rows, cols) given the input Gram H = X^T X (cols, cols).

    damp: added to H's diagonal as a fraction of its mean (the paper's 1%).
    block_size: columns per lazy update, rounded to a multiple of group_size.
    clip_ratios: range shrink factors searched per group and row (see `_group_params`); None = min/max.
    factor: walk_factor(gram, damp, act_order), when the caller has it already.
    """
    check_bits(bits)
    if weight.dim() != 2 or gram.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"expected a 2-D weight (rows, cols) and a (cols, cols) Gram, got "
                         f"{tuple(weight.shape)} and {tuple(gram.shape)}")
    if group_size < 1:
        raise ValueError(f"expected group_size >= 1, got {group_size}")
    mode = _mode(symmetric, zero_point)
    rows, cols = weight.shape
    groups = num_groups(cols, group_size)
    w = weight.detach().float().clone()  # (rows, cols), updated in place as errors are fed forward
    w[:, torch.diagonal(gram) == 0] = 0  # inputs never active: any weight there is free
    hdiag = torch.diagonal(gram).float().to(w.device)  # (cols,) input energy, weights the range search
    scale = torch.empty(rows, groups, dtype=SCALE_DTYPE, device=w.device)
    offset = None if mode == "symmetric" else torch.empty(rows, groups, device=w.device)
    if act_order:  # static groups: parameters from the unmodified weight, before any column moves
        for g in range(groups):
            cols_g = slice(g * group_size, (g + 1) * group_size)
            s, o = _group_params(w[:, cols_g], bits, mode, clip_ratios, hdiag[cols_g])
            scale[:, g:g + 1] = s
            if o is not None:
                offset[:, g:g + 1] = o
    perm, u = factor if factor is not None else walk_factor(gram, damp, act_order)  # u: (cols, cols) upper
    perm = perm.to(w.device)
    w = w[:, perm]  # (rows, cols) in walk order
    u = u.to(w.dtype).to(w.device)
    codes = torch.empty(cols, rows, dtype=torch.uint8, device=w.device)  # walk order, one row per column
    scale_f = scale.float()  # float32 copies read by the column loop
    offset_f = None if offset is None else offset.clone()
    group_of = (perm // group_size).tolist()  # group of each walked column
    block = max(group_size, (block_size // group_size) * group_size) if not act_order else block_size
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        w1 = w[:, b0:b1].clone()  # (rows, n)
        err1 = torch.empty_like(w1)
        u1 = u[b0:b1, b0:b1]
        pivots = torch.diagonal(u1).tolist()
        for i in range(b1 - b0):
            j = b0 + i
            g = group_of[j]
            if not act_order and j % group_size == 0:  # a group starts here: its range from updated weights
                walked = perm[j:j + group_size]  # original columns of this group (identity order here)
                s, o = _group_params(w1[:, i:i + group_size], bits, mode, clip_ratios, hdiag[walked])
                scale[:, g:g + 1], scale_f[:, g:g + 1] = s, s.float()
                if o is not None:
                    offset[:, g:g + 1], offset_f[:, g:g + 1] = o, o
            s = scale_f[:, g]  # (rows,)
            o = None if offset is None else offset_f[:, g]
            col = w1[:, i]
            q = _codes(col, s, o, bits, mode)  # (rows,) on the stored 16-bit grid
            codes[j] = q
            err = (col - _dequant_grouped(q, s, o, bits, mode)) / pivots[i]  # (rows,)
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            err1[:, i] = err
        w[:, b1:] -= err1 @ u[b0:b1, b1:]  # lazy batch update of the columns after the block
    codes = codes[torch.argsort(perm)].T.contiguous()  # (rows, cols) in the original column order
    if offset is not None:
        offset = offset.to(torch.uint8 if mode == "zero_point" else SCALE_DTYPE)
    return Quantized(codes, scale, offset, bits, group_size)


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative output error sqrt(tr(E H E^T) / tr(W H W^T)), E = W - approx, over the calibration inputs."""
    h, w = gram.detach().float(), weight.detach().float()  # float32: a diagnostic, not a solve
    e = w - approx.detach().float()  # (rows, cols)
    num = (e @ h * e).sum().double()
    den = (w @ h * w).sum().double()
    return float((num / den.clamp_min(1e-30)).clamp_min(0).sqrt())
