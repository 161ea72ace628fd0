"""Activation-aware low-rank factorization: whitened SVD (SVD-LLM) and diagonal scaling (ASVD).

With G = X^T X the output error of a replacement M is ||(W - M) S||_F^2 where S S^T = G
(Cholesky). Truncating the SVD of W S and mapping back with S^{-1} is optimal among
rank-r matrices for that error; the discarded singular values give the error exactly.
An output-side factor R (R^T R = G_out, e.g. the K-FAC gradient factor) weights the rows
as well: truncating R W S minimizes ||R (W - M) S||_F, again exactly.
"""
from __future__ import annotations

import torch

__all__ = ["whitening_factor", "output_factor", "apply_left", "whitened_svd", "scaled_svd", "output_error"]


def whitening_factor(gram: torch.Tensor, damp: float = 1e-4) -> torch.Tensor:
    """Lower-triangular S with S S^T = G + damp*mean(diag G)*I (damping keeps S invertible)."""
    g = gram.double()
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    jitter = damp * torch.diagonal(g).mean().clamp_min(1e-12)
    for _ in range(6):  # raise the damping until the factorization succeeds
        s, info = torch.linalg.cholesky_ex(g + jitter * eye)
        if int(info) == 0:
            return s
        jitter *= 10
    raise ValueError("expected a positive semi-definite Gram matrix, got one whose Cholesky factorization failed")


def output_factor(sensitivity: torch.Tensor, damp: float = 1e-2) -> torch.Tensor:
    """Row weighting from output-side second moments G: an upper-triangular R with
    R^T R = G + damp*mean(diag G)*I (G given as an (out, out) matrix), or the vector
    sqrt(diag G + damp*mean) (G given as its diagonal). G's scale is kept: it is what makes
    errors of different layers comparable (in loss units) for a global allocation."""
    g = sensitivity.double()
    if g.dim() == 1:
        return (g + damp * g.mean().clamp_min(1e-30)).sqrt()
    return whitening_factor(g, damp).T


def apply_left(left: torch.Tensor | None, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """R x or R^-1 x for an output factor R (vector = diagonal, matrix = upper triangular)."""
    if left is None:
        return x
    if left.dim() == 1:
        return x / left[:, None] if inverse else x * left[:, None]
    return torch.linalg.solve_triangular(left, x, upper=True) if inverse else left @ x


def whitened_svd(weight: torch.Tensor, factor: torch.Tensor, left: torch.Tensor | None = None,
                 svd_dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of R W S: returns (U, sigma, Vt) with W = U diag(sigma) Vt (U = R^-1 U_w, Vt = Vh S^-1).

    Any leading r terms give the rank-r M minimizing ||R (W - M) S||_F; the error is
    ||sigma[r:]||. R (`left`, see output_factor) defaults to the identity. The products and
    the un-whitening run in float64; svd_dtype=float32 makes the SVD itself ~2x faster.
    """
    w = apply_left(left, weight.double())
    u, s, vh = (t.double() for t in torch.linalg.svd((w @ factor).to(svd_dtype), full_matrices=False))
    # Vt_unwhitened = Vh S^{-1}  <=>  S^T Vt_unwhitened^T = Vh^T
    vt = torch.linalg.solve_triangular(factor.T, vh.T, upper=True).T
    return apply_left(left, u, inverse=True), s, vt


def scaled_svd(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ASVD-style: SVD of W diag(scale), mapped back (scale > 0 per input channel)."""
    scale = scale.double().clamp_min(1e-8)
    u, s, vh = torch.linalg.svd(weight.double() * scale, full_matrices=False)
    return u, s, vh / scale


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative output error sqrt(tr(D G D^T) / tr(W G W^T)), D = W - approx."""
    d = (weight - approx).double()
    w = weight.double()
    g = gram.double()
    num = torch.einsum("oi,ij,oj->", d, g, d)
    den = torch.einsum("oi,ij,oj->", w, g, w)
    return float((num.clamp_min(0) / den).sqrt())
