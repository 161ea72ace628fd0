"""A 3-core MPO fitted to the activation-weighted objective, as an alternative to low rank.

Exact DMRG core solves are out of reach here: with the input weighting G coupling all
input legs, the normal equations of the central core have (r_{k-1} i_k r_k)^2 entries
(~76k^2 for a 1536x576 matrix at 80%). Instead all cores are refined jointly by
L-BFGS on ||(M - W) S_q||_F^2, where S_q keeps the top-q eigen-directions of G (most
of its trace) to make each step cheap; the final error is measured with the full G.
"""
from __future__ import annotations

import math

import torch

from mpokit.layers.mpo import MPOLinear, make_layout
from mpokit.ops.tt import pad_matrix, tt_svd_to_budget, tt_to_matrix
from mpokit.ops.whiten import apply_left

__all__ = ["reduced_factor", "refine_mpo", "mpo_candidate"]


def reduced_factor(factor: torch.Tensor, energy: float = 0.999, max_rank: int = 384) -> torch.Tensor:
    """(in, q) matrix R with R R^T ~ S S^T = G, keeping `energy` of tr(G) (q <= max_rank)."""
    u, s, _ = torch.linalg.svd(factor, full_matrices=False)
    e = torch.cumsum(s ** 2, 0) / (s ** 2).sum().clamp_min(1e-30)
    q = min(int((e < energy).sum()) + 1, max_rank, s.numel())
    return u[:, :q] * s[:q]


def refine_mpo(cores: list[torch.Tensor], weight: torch.Tensor, factor: torch.Tensor, steps: int,
               left: torch.Tensor | None = None) -> list[torch.Tensor]:
    """L-BFGS on ||L (MPO(cores)[:O, :I] - W) R||^2 in float32 (L = left, default I); returns refined cores."""
    o, i = weight.shape
    r = reduced_factor(factor).float()  # (I, q)
    left = None if left is None else left.float()
    target = apply_left(left, weight.float() @ r)  # (O, q)
    params = [c.detach().float().clone().contiguous().requires_grad_(True) for c in cores]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ((apply_left(left, tt_to_matrix(params)[:o, :i] @ r) - target) ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return [p.detach() for p in params]


def _weighted_rel_error(approx: torch.Tensor, weight: torch.Tensor, factor: torch.Tensor, left=None) -> float:
    w = weight.double()
    err = apply_left(left, (approx.double() - w) @ factor)
    return float(torch.linalg.matrix_norm(err) / torch.linalg.matrix_norm(apply_left(left, w @ factor)))


def mpo_candidate(weight: torch.Tensor, factor: torch.Tensor, params: int, lowrank_error: float, steps: int,
                  forward_mode: str = "auto", left: torch.Tensor | None = None) -> tuple[MPOLinear, float] | None:
    """A refined 3-core MPO with <= params parameters, if its (two-sided) weighted error beats lowrank_error."""
    o, i = weight.shape
    od, idd = make_layout(o, i, 3)
    padded = pad_matrix(weight.detach(), math.prod(od), math.prod(idd))
    try:
        cores, _ = tt_svd_to_budget(padded, od, idd, params)
    except ValueError:  # budget below the smallest 3-core MPO
        return None
    cores = refine_mpo(cores, weight, factor, steps, left)
    err = _weighted_rel_error(tt_to_matrix(cores)[:o, :i], weight, factor, left)
    if not err < lowrank_error:
        return None
    layer = MPOLinear(i, o, od, idd, [c.shape[-1] for c in cores[:-1]], bias=False, forward_mode=forward_mode,
                      device=weight.device, dtype=weight.dtype)
    layer.set_cores(cores)
    return layer, err
