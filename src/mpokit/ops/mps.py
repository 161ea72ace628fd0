"""Matrix product states (tensor trains of a vector): the pixel layout, TT-SVD, batched contraction.

An MPS of a vector v of length d_1*...*d_n is n cores A_k of shape (r_{k-1}, d_k, r_k),
r_0 = r_n = 1, with v[j_1..j_n] = A_1[:, j_1, :] @ ... @ A_n[:, j_n, :]. It is the MPO
decomposition of ops/tt.py applied to the (d_1*...*d_n, 1) matrix (every input dim 1), so
the TT-SVD, its truncation controls (max_bond, cutoff, a parameter budget) and its error
bound are those of tt_svd: nothing here repeats them.

Image layout ("interleaved", the quantics / quantum-inspired image MPS): an H x W image with
H = h_1*...*h_k and W = w_1*...*w_k (prime factors, most significant first; the shorter list
padded with 1s in front) is read as the digits (row_1, col_1, row_2, col_2, ..., row_k, col_k)
of the pixel's row and column, so site 2j-1 holds row digit j and site 2j column digit j.
The first sites pick a coarse block of the image, the last ones a pixel inside a 2x2 (for
powers of two) neighbourhood: neighbouring pixels share every core but the last few, so a
small bond keeps the coarse picture. 8x8 digits -> 6 sites of dimension 2,
(r1, c1, r2, c2, r3, c3), pixel (row, col) = (4 r1 + 2 r2 + r3, 4 c1 + 2 c2 + c3).
Leading dims (channels) come first as sites of their prime factors; a 1-D sample is its
prime factors in order. "raster" reads pixels row by row instead (same site dims, no interleaving);
on 8x8 digits it reconstructs better at equal bytes (docs/benchmarks/mps-data.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mpokit.ops.factorize import prime_factors
from mpokit.ops.tt import TTInfo, bond_ladder, bonds_for_budget, count_params, full_bonds, tt_svd, tt_truncate

__all__ = ["MPSLayout", "image_layout", "mps_svd", "mps_truncate", "mps_ladder", "mps_bonds_for_budget",
           "mps_params", "mps_full_bonds", "mps_to_vector", "mps_contract_batch", "LAYOUTS"]

LAYOUTS = ("interleaved", "raster")


@dataclass(frozen=True)
class MPSLayout:
    """How one sample of `sample_shape` becomes a vector over `sites`: reshape to `grid`, permute by `perm`."""

    sample_shape: tuple[int, ...]
    grid: tuple[int, ...]
    perm: tuple[int, ...]
    sites: tuple[int, ...]  # the permuted grid without its 1s: the MPS's physical dims

    def to_sites(self, x: torch.Tensor) -> torch.Tensor:
        """(N, *sample_shape) -> (N, prod(sites)), in site order."""
        n = x.shape[0]
        t = x.reshape(n, *self.grid).permute(0, *[p + 1 for p in self.perm])  # (N, *grid[perm])
        return t.reshape(n, -1)

    def from_sites(self, v: torch.Tensor) -> torch.Tensor:
        """(N, prod(sites)) -> (N, *sample_shape), the inverse of to_sites."""
        n = v.shape[0]
        inverse = sorted(range(len(self.perm)), key=lambda i: self.perm[i])
        t = v.reshape(n, *[self.grid[p] for p in self.perm]).permute(0, *[i + 1 for i in inverse])  # (N, *grid)
        return t.reshape(n, *self.sample_shape)

    def to_dict(self) -> dict:
        return {"sample_shape": list(self.sample_shape), "grid": list(self.grid), "perm": list(self.perm),
                "sites": list(self.sites)}

    @classmethod
    def from_dict(cls, d: dict) -> "MPSLayout":
        layout = cls(*(tuple(int(v) for v in d[k]) for k in ("sample_shape", "grid", "perm", "sites")))
        if (math.prod(layout.grid) != math.prod(layout.sample_shape)
                or sorted(layout.perm) != list(range(len(layout.grid)))
                or list(layout.sites) != [layout.grid[p] for p in layout.perm if layout.grid[p] > 1]):
            raise ValueError(f"expected a consistent MPS layout, got {d}")
        return layout


def _digits(n: int) -> list[int]:
    return [] if n == 1 else prime_factors(n)


def image_layout(sample_shape: tuple[int, ...] | list[int], layout: str = "interleaved") -> MPSLayout:
    """The MPS layout of one sample (see the module doc). sample_shape: (D,), (H, W) or (..., H, W)."""
    shape = tuple(int(s) for s in sample_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"expected a sample shape of positive sizes, got {shape}")
    if layout not in LAYOUTS:
        raise ValueError(f"expected a layout in {LAYOUTS}, got {layout!r}")
    if len(shape) == 1 or layout == "raster":
        grid = tuple(_digits(math.prod(shape))) or (1,)
        perm = tuple(range(len(grid)))
    else:
        lead, rows, cols = _digits(math.prod(shape[:-2])), _digits(shape[-2]), _digits(shape[-1])
        k = max(len(rows), len(cols), 1)
        rows, cols = [1] * (k - len(rows)) + rows, [1] * (k - len(cols)) + cols
        grid = (*lead, *rows, *cols)
        a = len(lead)
        perm = (*range(a), *[p for j in range(k) for p in (a + j, a + k + j)])
    sites = tuple(grid[p] for p in perm if grid[p] > 1) or (1,)
    return MPSLayout(shape, grid, perm, sites)


def _ones(sites) -> list[int]:
    return [1] * len(sites)


def mps_svd(vector: torch.Tensor, sites, *, max_bond: int | list[int] | None = None, cutoff: float | None = None,
            compute_dtype: torch.dtype = torch.float64) -> tuple[list[torch.Tensor], TTInfo]:
    """TT-SVD of a vector (prod(sites),) into cores (r_{k-1}, d_k, r_k); tt_svd's controls and info."""
    sites = list(sites)
    cores, info = tt_svd(vector.reshape(-1, 1), sites, _ones(sites), max_bond=max_bond, cutoff=cutoff,
                         compute_dtype=compute_dtype)
    return [c.squeeze(2) for c in cores], info


def mps_truncate(cores: list[torch.Tensor], info: TTInfo, bonds: list[int]) -> tuple[list[torch.Tensor], TTInfo]:
    """The cores mps_svd(v, max_bond=bonds) returns, from the untruncated mps_svd(v) (ops.tt.tt_truncate)."""
    out, info = tt_truncate([c.unsqueeze(2) for c in cores], info, bonds)
    return [c.squeeze(2) for c in out], info


def mps_ladder(info: TTInfo, sites):
    """Budget candidates (cost: parameters, error: squared discarded norm) from an untruncated sweep."""
    return bond_ladder(info.spectra, list(sites), _ones(sites))


def mps_bonds_for_budget(info: TTInfo, sites, max_params: int) -> list[int]:
    """Bonds with the most parameters <= max_params (ops.tt.bonds_for_budget)."""
    return bonds_for_budget(info.spectra, list(sites), _ones(sites), max_params)


def mps_params(sites, bonds) -> int:
    return count_params(list(sites), _ones(sites), list(bonds))


def mps_full_bonds(sites) -> list[int]:
    return full_bonds(list(sites), _ones(sites))


def mps_to_vector(cores: list[torch.Tensor]) -> torch.Tensor:
    """Contract cores (r_{k-1}, d_k, r_k) to the vector (prod d_k,)."""
    t = cores[0].reshape(-1, cores[0].shape[-1])  # (d_1, r_1)
    for c in cores[1:]:
        t = (t @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[-1])  # (d_1..d_k, r_k)
    return t.reshape(-1)


def mps_contract_batch(samples: list[list[torch.Tensor]], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Contract B MPSs with the same sites and any bonds to (B, prod d_k).

    Cores are zero-padded to the largest bond of each cut (zero rows and columns add nothing,
    so this is exact) and contracted for the whole batch with one bmm per site.
    """
    n = len(samples[0])
    dims = [c.shape[1] for c in samples[0]]
    caps = [max(s[k].shape[2] for s in samples) for k in range(n)]
    t = None
    for k in range(n):
        r_in = 1 if k == 0 else caps[k - 1]
        padded = torch.zeros(len(samples), r_in, dims[k], caps[k], dtype=dtype)  # (B, R_{k-1}, d_k, R_k)
        for b, s in enumerate(samples):
            c = s[k]
            padded[b, : c.shape[0], :, : c.shape[2]] = c
        if t is None:
            t = padded.reshape(len(samples), dims[k], caps[k])  # (B, d_1, R_1)
        else:
            t = torch.bmm(t, padded.reshape(len(samples), r_in, -1))  # (B, d_1..d_{k-1}, d_k R_k)
            t = t.reshape(len(samples), -1, caps[k])  # (B, d_1..d_k, R_k)
    return t.reshape(len(samples), -1)
