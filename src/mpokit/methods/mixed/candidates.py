"""Per-layer candidates of the mixed byte budget: what each layout costs in bytes and what it loses.

Pure tensor math on one weight W (out, in), its input Gram H = X^T X and its output weights r
(out,) (r^2 = damped diag of the output-gradient second moments: errors in loss units). A
candidate's error is tr(diag(r^2) (W - W_hat) H (W - W_hat)^T); its cost the packed bytes.
`build_*` return the quantized pieces, so measuring a candidate and building the chosen one are
the same computation.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from mpokit.ops.budget import Candidate
from mpokit.ops.gptq import gptq_quantize, walk_factor
from mpokit.ops.quant import DEFAULT_CLIP_RATIOS, Quantized, dequantize, fake_quantize, quantized_bytes
from mpokit.ops.whiten import whitened_svd, whitening_factor

__all__ = ["Grid", "LowRankCodes", "weighted_error", "gptq_codes", "lowrank_codes", "lowrank_ranks",
           "dense_cost", "lowrank_cost", "layer_candidates", "dequantized", "estimated_lowrank_error",
           "walk"]

WHITEN_DAMP = 1e-4  # the default method's whitening damping (AwareConfig.damp); its SVDs run in float32


@dataclass(frozen=True)
class Grid:
    """How codes are laid out: the group size for this layer and GPTQ's settings."""

    group_size: int
    damp: float = 0.01
    act_order: bool = True
    clip_search: bool = True

    def dense(self, bits: int, cols: int) -> "Grid":
        """The grid of a dense weight at `bits`: 8-bit weights keep one group per row, the grid of the
        packed int8 CPU kernel (layers/quant.py), with fewer scales to store."""
        return replace(self, group_size=cols) if bits == 8 else self


@dataclass
class LowRankCodes:
    first: Quantized  # B (rank, in): applied first
    second: Quantized  # A (out, rank)


def dequantized(q: Quantized) -> torch.Tensor:
    return dequantize(q.codes, q.scale, q.offset, q.bits, q.group_size)


def weighted_error(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor, rows: torch.Tensor | None) -> float:
    """tr(diag(rows^2) D H D^T), D = W - W_hat: the K-FAC loss estimate (rows=None: plain output error).
    float32 products (D is formed before the product, so nothing cancels), a float64 sum."""
    d = (w.float() - w_hat.float())  # (out, in)
    if rows is not None:
        d = d * rows.float()[:, None]
    return float(((d @ gram.float()) * d).sum(dtype=torch.float64).clamp_min(0))


def gptq_codes(w: torch.Tensor, gram: torch.Tensor, bits: int, grid: Grid, factor=None) -> Quantized:
    """GPTQ on the grid; factor: ops.gptq.walk_factor of this Gram, shared by every weight quantized on it."""
    clip = DEFAULT_CLIP_RATIOS if grid.clip_search else None
    return gptq_quantize(w, gram, bits, grid.group_size, damp=grid.damp, act_order=grid.act_order, clip_ratios=clip,
                         factor=factor)


def walk(gram: torch.Tensor, grid: Grid):
    return walk_factor(gram, grid.damp, grid.act_order)


def _refit(w: torch.Tensor, gram: torch.Tensor, b_hat: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B_hat H B_hat^T): the least-squares A minimising ||(W - A B_hat) X||, and B_hat's output Gram."""
    gb = gram.double() @ b_hat.T  # (in, rank)
    inner = b_hat @ gb  # (rank, rank)
    lam = damp * torch.diagonal(inner).mean().clamp_min(1e-30)
    eye = torch.eye(inner.shape[0], dtype=inner.dtype, device=inner.device)
    return torch.linalg.solve(inner + lam * eye, (w.double() @ gb).T).T, inner  # (out, rank)


def lowrank_codes(w: torch.Tensor, gram: torch.Tensor, rows: torch.Tensor | None, rank: int, bits: int,
                  grid: Grid, svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  factor=None) -> LowRankCodes:
    """W ~ A B at `rank`, both factors GPTQ-quantized at `bits`.

    B = sqrt(s) Vt from the loss-weighted whitened SVD (optimal for the weighted error before
    quantization); B is quantized on H; then A = W H B_hat^T (B_hat H B_hat^T)^-1 is the least-squares
    fit to the quantized B (row weights do not change a per-row fit), quantized on B_hat's output
    Gram. `svd`: whitened_svd(w, whitening_factor(gram), rows), when the caller has it already."""
    u, s, vt = svd if svd is not None else whitened_svd(w, whitening_factor(gram, WHITEN_DAMP), rows, torch.float32)
    root = s[:rank].sqrt()
    b = (root[:, None] * vt[:rank]).float()  # (rank, in)
    first = gptq_codes(b, gram, bits, grid, factor)
    a, inner = _refit(w, gram, dequantized(first).double(), grid.damp)  # inner: the Gram of B_hat x
    second = gptq_codes(a.float(), inner.float(), bits, grid)
    return LowRankCodes(first, second)


def lowrank_ranks(out: int, inp: int, group: int, fraction: float, count: int) -> list[int]:
    """Up to `count` ranks, multiples of the group size (so both factors keep whole groups), spread
    evenly up to `fraction` of full rank."""
    top = int(fraction * min(out, inp)) // group
    if top < 1 or count < 1:
        return []
    steps = sorted({max(1, round(top * k / count)) for k in range(1, count + 1)})
    return [k * group for k in steps]


def dense_cost(out: int, inp: int, bits: int, group: int) -> int:
    return quantized_bytes(out, inp, bits, group)


def lowrank_cost(out: int, inp: int, rank: int, bits: int, group: int) -> int:
    return quantized_bytes(rank, inp, bits, group) + quantized_bytes(out, rank, bits, group)


def _rtn(w: torch.Tensor, bits: int, grid: Grid) -> torch.Tensor:
    """Min/max round to nearest: a fast stand-in whose error, times GPTQ's measured gain over it, estimates
    GPTQ's (no range search here: 17x the work, and the gain absorbs the difference)."""
    return fake_quantize(w, bits, grid.group_size)


def estimated_lowrank_error(w, gram, rows, svd, rank: int, bits: int, grid: Grid, gptq_gain: float) -> float:
    """The low-rank candidate's error without running GPTQ: factors rounded to nearest (A refit to the
    rounded B), and the part of the error that rounding adds scaled by `gptq_gain`, the ratio of GPTQ's
    to round-to-nearest's error measured on the dense weight at the same bits."""
    u, s, vt = svd
    root = s[:rank].sqrt()
    b = (root[:, None] * vt[:rank]).float()  # (rank, in)
    truncated = weighted_error(w, ((u[:, :rank] * root) @ b.double()).float(), gram, rows)
    b_hat = _rtn(b, bits, grid).double()
    a, _ = _refit(w, gram, b_hat, grid.damp)
    rounded = weighted_error(w, _rtn(a.float(), bits, grid).double() @ b_hat, gram, rows)
    return truncated + gptq_gain * max(rounded - truncated, 0.0)


def layer_candidates(w: torch.Tensor, gram: torch.Tensor, rows: torch.Tensor | None, bits_choices, factor_bits,
                     ranks: list[int], grid: Grid, exact: bool = False, factor=None) -> list[Candidate]:
    """Every candidate of one layer, measured: ("gptq", bits) by running GPTQ, ("lowrank", rank, bits) by
    running GPTQ on both factors when `exact`, else estimated (estimated_lowrank_error: about 10x faster).
    factor: walk(gram, grid), shared by the layers that read the same input."""
    out, inp = w.shape
    found, gain = [], {}
    factor = factor if factor is not None else walk(gram, grid)
    for bits in bits_choices:
        dense = grid.dense(bits, inp)
        err = weighted_error(w, dequantized(gptq_codes(w, gram, bits, dense, factor)), gram, rows)
        if ranks and bits in factor_bits and not exact:  # GPTQ's gain over rounding, for the estimates
            gain[bits] = err / max(weighted_error(w, _rtn(w, bits, grid), gram, rows), 1e-300)
        found.append(Candidate(dense_cost(out, inp, bits, dense.group_size), err, ("gptq", bits)))
    if ranks:
        svd = whitened_svd(w, whitening_factor(gram, WHITEN_DAMP), rows, torch.float32)
        for rank in ranks:
            for bits in factor_bits:
                if exact:
                    codes = lowrank_codes(w, gram, rows, rank, bits, grid, svd, factor)
                    err = weighted_error(w, dequantized(codes.second) @ dequantized(codes.first), gram, rows)
                else:
                    err = estimated_lowrank_error(w, gram, rows, svd, rank, bits, grid, gain.get(bits, 1.0))
                found.append(Candidate(lowrank_cost(out, inp, rank, bits, grid.group_size), err,
                                       ("lowrank", rank, bits)))
    return found
