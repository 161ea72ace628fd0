"""Split a global parameter budget over layers from their (weighted) singular value spectra.

Keeping singular value j of layer l removes sigma_lj^2 of output error and costs
(out_l + in_l) parameters: each layer's ranks are a ladder of budget candidates for
ops.budget.plan, which takes components in order of error removed per parameter (optimal
for these convex error curves, spectra being sorted). A layer whose rank reaches
out*in/(out+in) is cheaper stored dense: it is kept dense and the rest re-allocated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mpokit.ops.budget import Candidate, plan

__all__ = ["LayerSpectrum", "allocate_global", "allocate_uniform", "ladder"]


@dataclass
class LayerSpectrum:
    rows: int
    cols: int
    sigma: torch.Tensor  # singular values of the (weighted) matrix, descending

    @property
    def dense_params(self) -> int:
        return self.rows * self.cols

    @property
    def rank_cost(self) -> int:
        return self.rows + self.cols

    @property
    def dense_rank(self) -> int:
        """Smallest rank at which the factorized layer is no smaller than the dense one."""
        return -(-self.dense_params // self.rank_cost)


def allocate_uniform(spectra: dict[str, LayerSpectrum], budget: float) -> dict[str, int | None]:
    """Every layer keeps `budget` of its own parameters (None = keep dense when budget >= 1)."""
    out = {}
    for name, sp in spectra.items():
        rank = int(budget * sp.dense_params // sp.rank_cost)
        out[name] = None if rank >= sp.dense_rank else max(rank, 1)
    return out


def ladder(sp: LayerSpectrum, normalize: bool = False) -> list[Candidate]:
    """Rank r = 1 .. dense_rank as budget candidates: cost r * (rows + cols) parameters, error the
    discarded sum_{j >= r} sigma_j^2 (each layer's relative error when normalize=True)."""
    e = sp.sigma.double() ** 2
    if normalize:
        e = e / e.sum().clamp_min(1e-30)
    tail = torch.flip(torch.cumsum(torch.flip(e, [0]), 0), [0]).tolist()  # tail[r] = sum_{j >= r} e_j
    top = max(min(sp.dense_rank, e.numel()), 1)
    return [Candidate(r * sp.rank_cost, tail[r] if r < len(tail) else 0.0, r) for r in range(1, top + 1)]


def allocate_global(spectra: dict[str, LayerSpectrum], budget: float, normalize: bool = False) -> dict[str, int | None]:
    """Ranks (None = dense) with total parameters <= budget * sum of dense parameters.

    normalize=True divides each layer's spectrum by its total energy, so every layer's
    relative error counts alike; False compares absolute output error.
    """
    names = list(spectra)
    limit = int(budget * sum(sp.dense_params for sp in spectra.values()))
    chosen = plan([ladder(spectra[n], normalize) for n in names], limit,
                  dense=[Candidate(spectra[n].dense_params, 0.0, None) for n in names])
    return {n: c.choice for n, c in zip(names, chosen)}
