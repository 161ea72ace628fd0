"""Ridge least squares of an output projection and bias, accumulated over chunks of tokens.

Sparse FFNs (MoEFFN's experts, NeuronSparseFFN's kept neurons) drop part of every token's
intermediate activations. With the selection fixed, the output is linear in the down projection,
so the W (n, d_out) and bias b that best reproduce the dense outputs y over calibration tokens solve

    min_{W, b}  sum_t || y_t - hm_t W - b ||^2 + ridge * mean(diag(G)) * ||W||^2

with hm_t the masked activations (zeros where a neuron was dropped) and G their Gram matrix.
Accumulated in float64, (n + 1)^2 numbers: a chunk at a time, never the whole (T, n) matrix.
"""
from __future__ import annotations

import torch

__all__ = ["MaskedRidge"]


class MaskedRidge:
    """Refits down (n, d_out) and bias (d_out,) (None: zeros) to the outputs they give with every neuron kept."""

    def __init__(self, down: torch.Tensor, bias: torch.Tensor | None = None, ridge: float = 0.01):
        if ridge < 0:
            raise ValueError(f"expected ridge >= 0, got {ridge}")
        n, outputs = down.shape
        self.n, self.ridge = n, ridge
        self.down = down.detach().double()
        self.bias = torch.zeros_like(self.down[0]) if bias is None else bias.detach().double()
        self.gram = torch.zeros(n + 1, n + 1, dtype=torch.float64, device=down.device)
        self.cross = torch.zeros(n + 1, outputs, dtype=torch.float64, device=down.device)
        self.target_sq = self.err_sq_before = 0.0

    def add(self, hidden: torch.Tensor, masked: torch.Tensor) -> None:
        """hidden (c, n) every neuron's activation, masked (c, n) the same with the dropped neurons zeroed."""
        hm = masked.double()
        y = hidden.double() @ self.down + self.bias  # the dense outputs: the target
        current = hm @ self.down + self.bias  # the sparse outputs before the refit
        hm1 = torch.cat([hm, torch.ones_like(hm[:, :1])], 1)
        self.gram += hm1.t() @ hm1
        self.cross += hm1.t() @ y
        self.target_sq += float(y.pow(2).sum())
        self.err_sq_before += float((y - current).pow(2).sum())

    def solve(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(W (n, d_out), b (d_out,), relative output errors before and after), both float64."""
        n, gram = self.n, self.gram.clone()
        reg = self.ridge * gram.diagonal()[:n].mean()
        gram.diagonal()[:n] += reg
        gram[n, n] += 1e-9 * gram[n, n]
        sol = torch.linalg.solve(gram, self.cross)  # (n + 1, d_out)
        # error after, from the normal equations: ||y - Hm s||^2 = |y|^2 - 2 s.c + s.(G0 s), G0 without the ridge
        err_sq_after = self.target_sq - 2 * float((sol * self.cross).sum()) + float((sol * (self.gram @ sol)).sum())
        scale = max(self.target_sq, 1e-30)
        return sol[:n], sol[n], {"rel_error_before": (self.err_sq_before / scale) ** 0.5,
                                 "rel_error_after": (max(err_sq_after, 0.0) / scale) ** 0.5}
