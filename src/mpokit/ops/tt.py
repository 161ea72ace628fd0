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

from mpokit.ops.budget import Candidate, best_within

__all__ = [
    "TTInfo", "check_finite", "pad_matrix", "full_bonds", "core_shapes", "count_params",
    "tt_svd", "tt_svd_to_budget", "tt_truncate", "tt_to_matrix", "bond_ladder", "bond_raises", "bonds_for_budget",
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


def _tails(s: torch.Tensor) -> torch.Tensor:
    """tail[k] = ||s[k:]||: the norm discarded by keeping k singular values."""
    return torch.sqrt(torch.flip(torch.cumsum(torch.flip(s * s, [0]), 0), [0]))


def _rank_for(s: torch.Tensor, cap: int | None, delta: float | None) -> int:
    """Smallest rank whose discarded tail norm is <= delta, capped at cap (at least 1)."""
    rank = s.numel()
    if delta is not None and delta > 0:
        rank = int((_tails(s) > delta).sum().item())
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
    bad_cap = next((c for c in caps if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1)), None)
    if bad_cap is not None:
        raise ValueError(f"expected bond caps >= 1 (or None), got {bad_cap!r}")
    if cutoff is not None and not (math.isfinite(cutoff) and cutoff >= 0):
        raise ValueError(f"expected a finite cutoff >= 0, got {cutoff!r}")
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


def bond_ladder(spectra: list[torch.Tensor], out_dims: list[int], in_dims: list[int]) -> list[Candidate]:
    """Candidates for one MPO from the bond spectra of its full TT-SVD (pure arithmetic, no SVDs).

    One discarded-norm threshold shared by every bond keeps, at each bond, the singular values
    whose tail norm ||s[r:]|| exceeds it (at least one); the ladder holds the bonds of every
    threshold, coarsest first, then the full bonds. error: the squared discarded norm,
    sum_k ||s_k[r_k:]||^2 (an estimate: truncating one bond changes the spectra after it);
    choice: the bonds, as a tuple.
    """
    tails = [_tails(s).tolist() for s in spectra]

    def candidate(bonds: list[int]) -> Candidate:
        error = sum(t[r] ** 2 if r < len(t) else 0.0 for t, r in zip(tails, bonds))
        return Candidate(count_params(out_dims, in_dims, bonds), error, tuple(bonds))

    events = sorted(((v, k) for k, t in enumerate(tails) for v in t if v > 0), key=lambda e: -e[0])
    kept = [0] * len(tails)
    ladder = [candidate([1] * len(tails))]
    for j, (v, k) in enumerate(events):
        kept[k] += 1
        if j + 1 < len(events) and events[j + 1][0] == v:
            continue  # equal tails cross the threshold together
        bonds = [max(r, 1) for r in kept]
        if list(ladder[-1].choice) != bonds:
            ladder.append(candidate(bonds))
    full = [s.numel() for s in spectra]
    if list(ladder[-1].choice) != full:
        ladder.append(candidate(full))
    return ladder


def bond_raises(out_dims: list[int], in_dims: list[int], bonds: list[int], limits: list[int],
                max_params: float) -> list[Candidate]:
    """Candidates from `bonds` up: raise the cheapest bond below its limit by one (ties: the first),
    again and again, while the MPO keeps <= max_params parameters. Without a spectrum every raise
    is worth the same (error = minus the number of raises), so a planner spends its cap on as
    many raises as fit, cheapest first."""
    bonds = list(bonds)
    size = count_params(out_dims, in_dims, bonds)
    raises = [Candidate(size, 0.0, tuple(bonds))]
    while True:
        r = [1, *bonds, 1]  # raising r_{k+1} grows cores k and k+1
        options = [(out_dims[k] * in_dims[k] * r[k] + out_dims[k + 1] * in_dims[k + 1] * r[k + 2], k)
                   for k in range(len(bonds)) if bonds[k] < limits[k]]
        if not options or size + min(options)[0] > max_params:
            return raises
        cost, k = min(options)
        bonds[k] += 1
        size += cost
        raises.append(Candidate(size, -float(len(raises)), tuple(bonds)))


def bonds_for_budget(spectra: list[torch.Tensor], out_dims: list[int], in_dims: list[int],
                     max_params: int) -> list[int]:
    """Bonds with the most parameters <= max_params, from the bond spectra of a full TT-SVD:
    the least-error rung of `bond_ladder` that fits, then the cheapest raises that still fit."""
    minimum = count_params(out_dims, in_dims, [1] * (len(out_dims) - 1))
    if max_params < minimum:
        raise ValueError(f"expected a parameter budget >= {minimum} for layout {out_dims}x{in_dims}, got {max_params}")
    base = best_within(bond_ladder(spectra, out_dims, in_dims), max_params).choice
    limits = [s.numel() for s in spectra]
    return list(best_within(bond_raises(out_dims, in_dims, base, limits, max_params), max_params).choice)


def tt_truncate(cores: list[torch.Tensor], info: TTInfo, bonds: list[int]) -> tuple[list[torch.Tensor], TTInfo]:
    """What tt_svd(W, max_bond=bonds) returns, from the untruncated (cores, info) = tt_svd(W),
    without a second TT-SVD: only SVDs of the small factors the sweep carries.

    The full sweep leaves W's rest after bond k as S_k V_k^T (V_k orthonormal), continued by
    cores k+1.. . The truncated sweep factorizes K_k S_k V_k^T there, with K_k the full core k
    seen through the directions kept at bond k-1: its singular values and left vectors are
    those of K_k S_k, (r_{k-1} o_k i_k, R_k). Equal to the direct sweep up to the signs of
    singular vectors (and rounding).
    """
    n = len(cores)
    if len(bonds) != n - 1:
        raise ValueError(f"expected {n - 1} bonds, got {len(bonds)}")
    if info.bonds != [s.numel() for s in info.spectra]:
        raise ValueError(f"expected the cores of an untruncated tt_svd, got bonds {info.bonds}")
    if all(b >= r for b, r in zip(bonds, info.bonds)):
        return list(cores), info
    out, kept, discarded, spectra = [], [], [], []
    g = None  # (r_{k-1}, R_{k-1}): directions kept at bond k-1, in the full sweep's basis
    for k in range(n - 1):
        m = cores[k] if g is None else torch.tensordot(g, cores[k], dims=1)  # (r_{k-1}, o_k, i_k, R_k)
        r_prev, o, i, full = m.shape
        m = m.reshape(r_prev * o * i, full)  # K_k
        if g is None:  # K_0 is the full sweep's U_1: its SVD is already known
            u, s = m, info.spectra[0]
        else:
            u, s, _ = torch.linalg.svd(m * info.spectra[k], full_matrices=False)
        r = max(min(bonds[k], s.numel()), 1)
        out.append(u[:, :r].reshape(r_prev, o, i, r))
        g = torch.eye(full, dtype=m.dtype, device=m.device)[:r] if k == 0 else u[:, :r].T @ m  # (r, R_k)
        kept.append(r)
        discarded.append(torch.linalg.vector_norm(s[r:]).item())
        spectra.append(s)
    out.append(torch.tensordot(g, cores[-1], dims=1))  # (r_{n-1}, o_n, i_n, 1)
    return out, TTInfo(bonds=kept, discarded=discarded, norm=info.norm, spectra=spectra)


def tt_svd_to_budget(
    matrix: torch.Tensor,
    out_dims: list[int],
    in_dims: list[int],
    max_params: int,
    *,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[list[torch.Tensor], TTInfo]:
    """TT-SVD whose cores hold at most max_params parameters (as many as fit); one sweep."""
    cores, info = tt_svd(matrix, out_dims, in_dims, compute_dtype=compute_dtype)
    return tt_truncate(cores, info, bonds_for_budget(info.spectra, out_dims, in_dims, max_params))


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
