"""Split a global parameter budget over layers from their (weighted) singular value spectra.

Keeping singular value j of layer l removes sigma_lj^2 of output error and costs
(out_l + in_l) parameters. Taking components in order of error removed per parameter
is optimal for these convex error curves (spectra are sorted), except that a layer
whose rank reaches out*in/(out+in) is cheaper stored dense: such layers are fixed
dense and the rest re-allocated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LayerSpectrum", "allocate_global", "allocate_uniform"]


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


def allocate_global(spectra: dict[str, LayerSpectrum], budget: float, normalize: bool = False) -> dict[str, int | None]:
    """Ranks (None = dense) with total parameters <= budget * sum of dense parameters.

    normalize=True divides each layer's spectrum by its total energy, so every layer's
    relative error counts alike; False compares absolute output error.
    """
    names = list(spectra)
    limit = int(budget * sum(sp.dense_params for sp in spectra.values()))
    dense: set[str] = set()
    for _ in range(len(names) + 1):
        free = limit - sum(spectra[n].dense_params for n in dense) - sum(spectra[n].rank_cost for n in names
                                                                           if n not in dense)  # rank >= 1 each
        ranks = {n: 1 for n in names if n not in dense}
        gains, costs, owners = [], [], []
        for n in ranks:
            sp = spectra[n]
            e = sp.sigma.double() ** 2
            if normalize:
                e = e / e.sum().clamp_min(1e-30)
            cap = min(sp.dense_rank, e.numel())
            gains.append(e[1:cap] / sp.rank_cost)
            costs.append(torch.full((max(cap - 1, 0),), sp.rank_cost, dtype=torch.float64))
            owners.extend([n] * max(cap - 1, 0))
        if owners:
            g, c = torch.cat(gains), torch.cat(costs)
            order = torch.argsort(g, descending=True)
            taken = int((torch.cumsum(c[order], 0) <= free).sum())
            for idx in order[:taken].tolist():
                ranks[owners[idx]] += 1
        newly_dense = {n for n, r in ranks.items() if r >= spectra[n].dense_rank}
        if not newly_dense:
            return {**ranks, **{n: None for n in dense}}
        dense |= newly_dense
    return {**ranks, **{n: None for n in dense}}
