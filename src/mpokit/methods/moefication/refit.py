"""Refit a MoEFFN's output projection to its own sparse routing (least squares on calibration).

Dropping experts removes part of every token's FFN output. With the selection fixed (the
router's top-k plus the shared experts), the output is linear in the down projection, so
the down projection W (N, d_out) and an output bias b that best reproduce the dense FFN
over calibration tokens solve a ridge least-squares problem:

    min_{W, b}  sum_t || y_t - (keep_t * h_t) W - b ||^2 + ridge * mean(diag(G)) * ||W||^2

with h_t (N,) the intermediate activations, keep_t (N,) 1 for the neurons of the experts
token t computes, y_t the dense output and G the Gram matrix of the masked activations.
The kept neurons then also carry the average part of what the skipped ones would have added
(the bias alone is the mean of the skipped contribution over calibration). The refit layer
is a new FFN: with every expert selected it no longer equals the original dense one, and
unload_ returns this refit dense FFN.
"""
from __future__ import annotations

import torch
from torch import nn

from mpokit.layers.moe import MoEFFN

__all__ = ["refit_output_"]


@torch.no_grad()
def refit_output_(moe: MoEFFN, x: torch.Tensor, ridge: float = 0.01, chunk: int = 1024) -> dict[str, float]:
    """Refit moe.w_out and an output bias in place from calibration inputs x (T, d) under moe's
    current routing (router or oracle). Returns the relative output error before and after."""
    if ridge < 0:
        raise ValueError(f"expected ridge >= 0, got {ridge}")
    E, m, d_out = moe.w_out.shape
    n = E * m
    gram = torch.zeros(n + 1, n + 1, dtype=torch.float64, device=moe.w_in.device)
    cross = torch.zeros(n + 1, d_out, dtype=torch.float64, device=moe.w_in.device)
    target_sq = err_sq_before = 0.0
    w_out = moe.w_out.reshape(n, d_out).double()  # (N, d_out) in expert order
    bias = moe.b_out.double() if moe.b_out is not None else torch.zeros(d_out, dtype=torch.float64,
                                                                         device=moe.w_in.device)
    for i in range(0, x.shape[0], chunk):
        xc = x[i:i + chunk].to(moe.w_in)  # (c, d)
        h = moe.expert_hidden(xc).double()  # (c, E, m)
        keep = torch.zeros(h.shape[0], E, dtype=h.dtype, device=h.device)
        keep[:, :moe.shared_experts] = 1.0
        keep.scatter_(1, moe.select(xc), 1.0)  # (c, E)
        hm = torch.cat([(h * keep[..., None]).reshape(-1, n), torch.ones_like(h[:, 0, :1])], 1)  # (c, N+1)
        y = h.reshape(-1, n) @ w_out + bias  # (c, d_out) dense output
        gram += hm.t() @ hm
        cross += hm.t() @ y
        target_sq += float(y.pow(2).sum())
        err_sq_before += float((y - hm[:, :n] @ w_out - bias).pow(2).sum())
    reg = ridge * gram.diagonal()[:n].mean()
    gram.diagonal()[:n] += reg
    gram[n, n] += 1e-9 * gram[n, n]
    sol = torch.linalg.solve(gram, cross)  # (N+1, d_out)
    # error after, from the normal equations: ||y - Hm s||^2 = |y|^2 - 2 s.c + s.(G0 s), G0 = gram without ridge
    gram.diagonal()[:n] -= reg
    err_sq_after = target_sq - 2 * float((sol * cross).sum()) + float((sol * (gram @ sol)).sum())
    moe.w_out.copy_(sol[:n].reshape(E, m, d_out))
    if moe.b_out is None:
        moe.b_out = nn.Parameter(torch.zeros(d_out, device=moe.w_in.device, dtype=moe.w_out.dtype))
    moe.b_out.copy_(sol[n])
    scale = max(target_sq, 1e-30)
    return {"rel_error_before": (err_sq_before / scale) ** 0.5,
            "rel_error_after": (max(err_sq_after, 0.0) / scale) ** 0.5}
