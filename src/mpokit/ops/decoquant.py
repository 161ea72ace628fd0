"""DecoQuant math: split key/value rows into a large core (quantized) and a small 16-bit core.

A (tokens, d) matrix X is viewed as a 2-core MPO with row dims (tokens, 1) and column dims
(d1, d2), d = d1 * d2, at full bond r = d2:
  X.reshape(tokens * d1, d2) = Large @ Small,   Large: (tokens * d1, d2), Small: (d2, d2).
Large has as many entries as X and is quantized per token (one group of d values per row of
X); Small is kept in 16 bits. Small = diag(s^alpha) V^T from the eigen-decomposition of the
Gram matrix of X's d2-column blocks (its singular values s, right vectors V): with alpha = 1/2
the outlier directions' scale moves into Small, so Large's per-token range narrows. The split
is exact before quantization whatever the fitted data (Small is invertible), so a core fitted
on the first tokens of a sequence also serves the tokens that come after.
"""
from __future__ import annotations

import torch

__all__ = ["fit_small_core", "to_large_core", "from_large_core"]

# Singular values below this fraction of the largest are floored, so Small stays invertible
# (rank-deficient data, e.g. a one-token prompt, would otherwise divide by zero).
SINGULAR_FLOOR = 1e-2


@torch.no_grad()
def fit_small_core(x: torch.Tensor, small_dim: int, alpha: float = 0.5) -> torch.Tensor:
    """Small core (..., d2, d2) for rows x (..., n, d): diag(s^alpha) V^T of the d2-blocks of x.

    Leading dims before the last two are batch-like (one core per leading index).
    """
    d = x.shape[-1]
    if small_dim < 1 or d % small_dim:
        raise ValueError(f"expected small_dim dividing the row size {d}, got {small_dim}")
    blocks = x.double().reshape(*x.shape[:-2], -1, small_dim)  # (..., n * d1, d2)
    gram = blocks.transpose(-1, -2) @ blocks  # (..., d2, d2)
    evals, vecs = torch.linalg.eigh(gram)
    s = evals.clamp_min(0).sqrt()
    s = torch.maximum(s, s.amax(-1, keepdim=True) * SINGULAR_FLOOR).clamp_min(1e-12)  # (..., d2)
    return (s.unsqueeze(-1) ** alpha * vecs.transpose(-1, -2)).to(x.dtype)  # (..., d2, d2)


def to_large_core(x: torch.Tensor, small_inv: torch.Tensor) -> torch.Tensor:
    """Large core of rows x (..., n, d) given Small^-1 (..., d2, d2); same shape as x."""
    d2 = small_inv.shape[-1]
    blocks = x.reshape(*x.shape[:-2], -1, d2)  # (..., n * d1, d2)
    return (blocks @ small_inv).reshape(x.shape)


def from_large_core(large: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """Rows (..., n, d) = Large @ Small, the inverse of `to_large_core`."""
    d2 = small.shape[-1]
    blocks = large.reshape(*large.shape[:-2], -1, d2)  # (..., n * d1, d2)
    return (blocks @ small).reshape(large.shape)
