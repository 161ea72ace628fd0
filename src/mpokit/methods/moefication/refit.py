"""Refit a MoEFFN's output projection to its own sparse routing (least squares on calibration).

Dropping experts removes part of every token's FFN output. With the selection fixed (the
router's top-k plus the shared experts) the down projection and an output bias are refit by
ridge least squares to the dense outputs (ops/ridge.py). The kept neurons then also carry the
average part of what the skipped ones would have added (the bias alone is the mean of the
skipped contribution over calibration). The refit layer is a new FFN: with every expert selected
it no longer equals the original dense one, and unload_ returns this refit dense FFN.
"""
from __future__ import annotations

import torch
from torch import nn

from mpokit.layers.moe import MoEFFN
from mpokit.ops.ridge import MaskedRidge

__all__ = ["refit_output_"]


@torch.no_grad()
def refit_output_(moe: MoEFFN, x: torch.Tensor, ridge: float = 0.01, chunk: int = 1024) -> dict[str, float]:
    """Refit moe.w_out and an output bias in place from calibration inputs x (T, d) under moe's
    current routing (router or oracle). Returns the relative output error before and after."""
    E, m, d_out = moe.w_out.shape
    n = E * m
    acc = MaskedRidge(moe.w_out.reshape(n, d_out), moe.b_out, ridge)  # (N, d_out) in expert order
    for i in range(0, x.shape[0], chunk):
        xc = x[i:i + chunk].to(moe.w_in)  # (c, d)
        h = moe.expert_hidden(xc)  # (c, E, m)
        keep = torch.zeros(h.shape[0], E, dtype=h.dtype, device=h.device)
        keep[:, :moe.shared_experts] = 1.0
        keep.scatter_(1, moe.select(xc), 1.0)  # (c, E)
        acc.add(h.reshape(-1, n), (h * keep[..., None]).reshape(-1, n))
    w, b, errors = acc.solve()
    moe.w_out.copy_(w.reshape(E, m, d_out))
    if moe.b_out is None:
        moe.b_out = nn.Parameter(torch.zeros(d_out, device=moe.w_in.device, dtype=moe.w_out.dtype))
    moe.b_out.copy_(b)
    return errors
