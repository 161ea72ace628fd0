"""Tensor-train (MPO) decomposition of a matrix: TT-SVD, truncation, reconstruction.

A weight W of shape (O, I) with O = o1*...*on and I = i1*...*in is written as n
cores C_k of shape (r_{k-1}, o_k, i_k, r_k), r_0 = r_n = 1. Left-to-right TT-SVD
keeps every core but the last left-orthonormal, so the squared Frobenius error
equals the sum of the squared discarded singular values of every bond.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = [
    "TTInfo", "check_finite", "pad_matrix", "full_bonds", "core_shapes", "count_params",
    "tt_svd", "tt_svd_to_budget", "tt_to_matrix", "bonds_for_budget", "fill_bonds",
]


@dataclass
class TTInfo:
    """What a truncation did: bonds kept and the discarded Frobenius norm per bond."""

    bonds: list[int]
    discarded: list[float] = field(default_factory=list)  # ||discarded singular values|| per bond
    norm: float = 0.0  # ||W||_F of the (padded) input
    spectra: list[torch.Tensor] = field(default_factory=list, repr=False)  # singular values seen at each bond

    @property
    def error_bound(self) -> float:
        """sqrt(sum_k e_k^2) >= ||W - MPO(W)||_F (equality for exact arithmetic)."""
        return math.sqrt(sum(e * e for e in self.discarded))

    @property
    def relative_error(self) -> float:
        return self.error_bound / self.norm if self.norm > 0 else 0.0


def check_finite(matrix: torch.Tensor, name: str = "weight") -> None:
    if not torch.isfinite(matrix).all():
        bad = (~torch.isfinite(matrix)).sum().item()
        raise ValueError(f"expected finite values in {name}, got {bad} NaN/Inf entries")


def pad_matrix(matrix: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad a (O, I) matrix to (rows, cols)."""
    o, i = matrix.shape
    if (o, i) == (rows, cols):
        return matrix
    if rows < o or cols < i:
        raise ValueError(f"expected padded shape >= {(o, i)}, got {(rows, cols)}")
    return torch.nn.functional.pad(matrix, (0, cols - i, 0, rows - o))


def full_bonds(out_dims: list[int], in_dims: list[int]) -> list[int]:
    """Lossless bond dims r_1..r_{n-1}: min of the sizes on either side of each cut."""
    sizes = [o * i for o, i in zip(out_dims, in_dims)]
    return [min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1:])) for k in range(len(sizes) - 1)]


def core_shapes(out_dims: list[int], in_dims: list[int], bonds: list[int]) -> list[tuple[int, int, int, int]]:
    r = [1, *bonds, 1]
    return [(r[k], out_dims[k], in_dims[k], r[k + 1]) for k in range(len(out_dims))]


def count_params(out_dims: list[int], in_dims: list[int], bonds: list[int]) -> int:
    return sum(math.prod(s) for s in core_shapes(out_dims, in_dims, bonds))


def _check_layout(matrix: torch.Tensor, out_dims: list[int], in_dims: list[int]) -> None:
    if matrix.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    if len(out_dims) != len(in_dims) or not out_dims:
        raise ValueError(f"expected as many out dims as in dims (>=1), got {out_dims} and {in_dims}")
    if math.prod(out_dims) != matrix.shape[0] or math.prod(in_dims) != matrix.shape[1]:
        raise ValueError(
            f"expected local dims multiplying to {tuple(matrix.shape)}, "
            f"got {out_dims} (={math.prod(out_dims)}) x {in_dims} (={math.prod(in_dims)})"
        )


def _rank_for(s: torch.Tensor, cap: int | None, delta: float | None) -> int:
    """Smallest rank whose discarded tail norm is <= delta, capped at cap (at least 1)."""
    rank = s.numel()
    if delta is not None and delta > 0:
        tail = torch.sqrt(torch.flip(torch.cumsum(torch.flip(s * s, [0]), 0), [0]))  # tail[k] = ||s[k:]||
        rank = int((tail > delta).sum().item())
    if cap is not None:
        rank = min(rank, cap)
    return max(rank, 1)


def tt_svd(
    matrix: torch.Tensor,
    out_dims: list[int],
    in_dims: list[int],
    *,
    max_bond: int | list[int] | None = None,
    cutoff: float | None = None,
    delta: float | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[list[torch.Tensor], TTInfo]:
    """Decompose matrix (O, I) into MPO cores by sequential SVD.

    max_bond: cap per bond (int for all bonds, or a list of n-1 caps).
    cutoff: relative Frobenius error target for the whole chain (Oseledets' per-bond
        threshold cutoff*||W||/sqrt(n-1), so the bound sqrt(sum e_k^2) <= cutoff*||W||).
    delta: absolute per-bond discarded-norm threshold (overrides cutoff).
    Cores come back in compute_dtype; callers cast.
    """
    _check_layout(matrix, out_dims, in_dims)
    check_finite(matrix)
    n = len(out_dims)
    caps = max_bond if isinstance(max_bond, list) else [max_bond] * (n - 1)
    if len(caps) != n - 1:
        raise ValueError(f"expected {n - 1} bond caps, got {len(caps)}")
    w = matrix.detach().to(compute_dtype)
    norm = torch.linalg.matrix_norm(w).item()
    if delta is None and cutoff is not None:
        if cutoff < 0:
            raise ValueError(f"expected cutoff >= 0, got {cutoff}")
        delta = cutoff * norm / math.sqrt(max(n - 1, 1))

    # (O, I) -> (o1..on, i1..in) -> (o1, i1, o2, i2, ..., on, in)
    t = w.reshape(*out_dims, *in_dims)
    t = t.permute(*[p for k in range(n) for p in (k, n + k)])
    cores, bonds, discarded, spectra = [], [], [], []
    r_prev = 1
    rest = t.reshape(1, -1)
    for k in range(n - 1):
        rest = rest.reshape(r_prev * out_dims[k] * in_dims[k], -1)  # (r_{k-1} o_k i_k, remaining)
        u, s, vh = torch.linalg.svd(rest, full_matrices=False)
        r = _rank_for(s, caps[k], delta)
        spectra.append(s)
        discarded.append(torch.linalg.vector_norm(s[r:]).item())
        cores.append(u[:, :r].reshape(r_prev, out_dims[k], in_dims[k], r))
        rest = s[:r, None] * vh[:r]  # (r, remaining): carry singular values forward, no division
        bonds.append(r)
        r_prev = r
    cores.append(rest.reshape(r_prev, out_dims[-1], in_dims[-1], 1))
    return cores, TTInfo(bonds=bonds, discarded=discarded, norm=norm, spectra=spectra)


def bonds_for_budget(spectra: list[torch.Tensor], out_dims: list[int], in_dims: list[int], max_params: int,
                     iters: int = 60) -> list[int]:
    """Bonds with the most parameters <= max_params, from the bond spectra of a full TT-SVD.

    Bisection on one discarded-norm threshold shared by all bonds (pure arithmetic on
    the spectra, no new SVDs), then `fill_bonds` spends what is left.
    """
    minimum = count_params(out_dims, in_dims, [1] * (len(out_dims) - 1))
    if max_params < minimum:
        raise ValueError(f"expected a parameter budget >= {minimum} for layout {out_dims}x{in_dims}, got {max_params}")
    limits = [s.numel() for s in spectra]
    lo, hi = 0.0, max(float(torch.linalg.vector_norm(s)) for s in spectra) if spectra else 0.0
    bonds = [1] * len(spectra)
    if count_params(out_dims, in_dims, limits) <= max_params:
        return limits
    for _ in range(iters):
        mid = (lo + hi) / 2
        trial = [_rank_for(s, None, mid) for s in spectra]
        if count_params(out_dims, in_dims, trial) <= max_params:
            bonds, hi = trial, mid
        else:
            lo = mid
    return fill_bonds([(out_dims, in_dims, bonds, limits)], max_params)[0]


def fill_bonds(layouts: list[tuple], max_params: int) -> list[list[int]]:
    """Spend leftover budget across one or many MPOs: raise the cheapest bond by one while the
    total stays <= max_params. layouts: (out_dims, in_dims, bonds, bond_limits[, layer_cap]) per
    MPO; layer_cap (e.g. the dense size) bounds that MPO's own parameter count."""
    bonds = [list(lay[2]) for lay in layouts]
    sizes = [count_params(lay[0], lay[1], b) for lay, b in zip(layouts, bonds)]
    caps = [lay[4] if len(lay) > 4 else None for lay in layouts]
    total = sum(sizes)

    def cost(j: int, k: int) -> int:
        o, i = layouts[j][0], layouts[j][1]
        r = [1, *bonds[j], 1]  # raising r_{k+1} grows cores k and k+1
        return o[k] * i[k] * r[k] + o[k + 1] * i[k + 1] * r[k + 2]

    while True:
        options = [(cost(j, k), j, k) for j, lay in enumerate(layouts) for k in range(len(bonds[j]))
                   if bonds[j][k] < lay[3][k]]
        options = [t for t in options if total + t[0] <= max_params
                   and (caps[t[1]] is None or sizes[t[1]] + t[0] <= caps[t[1]])]
        if not options:
            return bonds
        c, j, k = min(options)
        bonds[j][k] += 1
        sizes[j] += c
        total += c


def tt_svd_to_budget(
    matrix: torch.Tensor,
    out_dims: list[int],
    in_dims: list[int],
    max_params: int,
    *,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[list[torch.Tensor], TTInfo]:
    """TT-SVD whose cores hold at most max_params parameters (as many as fit)."""
    full = tt_svd(matrix, out_dims, in_dims, compute_dtype=compute_dtype)
    bonds = bonds_for_budget(full[1].spectra, out_dims, in_dims, max_params)
    if bonds == full[1].bonds:
        return full
    return tt_svd(matrix, out_dims, in_dims, max_bond=bonds, compute_dtype=compute_dtype)


def tt_to_matrix(cores: list[torch.Tensor]) -> torch.Tensor:
    """Contract MPO cores back to the (O, I) matrix."""
    n = len(cores)
    out_dims = [c.shape[1] for c in cores]
    in_dims = [c.shape[2] for c in cores]
    t = cores[0].reshape(-1, cores[0].shape[-1])  # (o1 i1, r1)
    for c in cores[1:]:
        t = t @ c.reshape(c.shape[0], -1)  # (o1 i1 .. ok ik, r_k)  after reshape below
        t = t.reshape(-1, c.shape[-1])
    t = t.reshape(*[d for k in range(n) for d in (out_dims[k], in_dims[k])])  # (o1, i1, ..., on, in)
    t = t.permute(*range(0, 2 * n, 2), *range(1, 2 * n, 2))  # (o1..on, i1..in)
    return t.reshape(math.prod(out_dims), math.prod(in_dims))
