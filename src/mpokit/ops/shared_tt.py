"""Three-core MPOs of several matrices that share one central core (MPOBERT-style sharing).

Each (O, I) matrix W_l is read as a 3-way tensor T_l (n1, n2, n3) with n_k = o_k * i_k
(the TT-SVD interleaving) and approximated as

    T_l[a, b, c] ~= sum_{r, s} A_l[a, r] C[r, b, s] B_l[s, c]

with C (r1, n2, r2) shared by every matrix of the group and per-matrix auxiliary
factors A_l (n1, r1), B_l (r2, n3): a Tucker-2 model with a shared core. Fitting is
alternating least squares with orthonormal A_l, B_l (then C is the mean of the
projections A_l^T T_l B_l^T, and each A_l, B_l is a polar factor), which lowers
sum_l ||T_l - MPO_l||_F^2 at every step; a last unconstrained least-squares pass lets
each layer rescale its own factors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["SharedFit", "to_three_way", "from_three_way", "fit_shared_central", "shared_params"]


@dataclass
class SharedFit:
    left: list[torch.Tensor]  # per matrix (1, o1, i1, r1)
    central: torch.Tensor  # shared (r1, o2, i2, r2)
    right: list[torch.Tensor]  # per matrix (r2, o3, i3, 1)
    relative_errors: list[float] = field(default_factory=list)  # ||W_l - MPO_l|| / ||W_l|| per matrix
    history: list[float] = field(default_factory=list)  # total squared error after each sweep


def to_three_way(w: torch.Tensor, out_dims: list[int], in_dims: list[int]) -> torch.Tensor:
    """(O, I) -> (o1 i1, o2 i2, o3 i3)."""
    t = w.reshape(*out_dims, *in_dims).permute(0, 3, 1, 4, 2, 5)  # (o1, i1, o2, i2, o3, i3)
    return t.reshape(out_dims[0] * in_dims[0], out_dims[1] * in_dims[1], out_dims[2] * in_dims[2])


def from_three_way(t: torch.Tensor, out_dims: list[int], in_dims: list[int]) -> torch.Tensor:
    """Inverse of to_three_way."""
    t = t.reshape(out_dims[0], in_dims[0], out_dims[1], in_dims[1], out_dims[2], in_dims[2])
    return t.permute(0, 2, 4, 1, 3, 5).reshape(math.prod(out_dims), math.prod(in_dims))


def shared_params(out_dims: list[int], in_dims: list[int], r1: int, r2: int, matrices: int) -> int:
    """Parameters of one shared central core plus `matrices` sets of auxiliary cores."""
    n1, n2, n3 = (o * i for o, i in zip(out_dims, in_dims))
    return r1 * n2 * r2 + matrices * (n1 * r1 + r2 * n3)


def _polar(m: torch.Tensor) -> torch.Tensor:
    """The orthonormal-column matrix closest to m (U V^T of its SVD)."""
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh


def _top_left(m: torch.Tensor, r: int) -> torch.Tensor:
    return torch.linalg.svd(m, full_matrices=False)[0][:, :r]


def _reconstruct(a: torch.Tensor, c: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ar,rbs,sc->abc", a, c, b)  # (n1, n2, n3)


def fit_shared_central(mats: list[torch.Tensor], out_dims: list[int], in_dims: list[int], r1: int, r2: int,
                       sweeps: int = 8, init: str = "mean") -> SharedFit:
    """Fit the group's shared central core and per-matrix auxiliary cores (3-core layout).

    init "mean": start from each matrix's own leading subspaces and the mean projection
    (then `sweeps` ALS sweeps); init "first": the central core of the first matrix alone
    (MPOBERT's start from one decomposed layer), with no sweeps over C, so the others
    adapt only their auxiliary cores.
    """
    if len(out_dims) != 3 or len(in_dims) != 3:
        raise ValueError(f"expected a 3-core layout, got out_dims={out_dims}, in_dims={in_dims}")
    if init not in ("mean", "first"):
        raise ValueError(f"expected init 'mean' or 'first', got {init!r}")
    dtype = mats[0].dtype
    ts = [to_three_way(m.detach().double(), out_dims, in_dims) for m in mats]  # each (n1, n2, n3)
    n1, n2, n3 = ts[0].shape
    if not (1 <= r1 <= n1 and 1 <= r2 <= n3):
        raise ValueError(f"expected 1 <= r1 <= {n1} and 1 <= r2 <= {n3}, got r1={r1}, r2={r2}")
    a = [_top_left(t.reshape(n1, -1), r1) for t in ts]  # (n1, r1)
    b = [_top_left(t.permute(2, 0, 1).reshape(n3, -1), r2).t() for t in ts]  # (r2, n3)

    def project(t, al, bl):  # A^T T B^T: (r1, n2, r2)
        return torch.einsum("ar,abc,sc->rbs", al, t, bl)

    history = []
    if init == "first":
        c = project(ts[0], a[0], b[0])
        sweeps = 0
    else:
        c = sum(project(t, al, bl) for t, al, bl in zip(ts, a, b)) / len(ts)
    for _ in range(sweeps):
        for i, t in enumerate(ts):
            a[i] = _polar(torch.einsum("abc,rbs,sc->ar", t, c, b[i]))  # (n1, r1)
            b[i] = _polar(torch.einsum("abc,ar,rbs->cs", t, a[i], c)).t()  # (r2, n3)
        c = sum(project(t, al, bl) for t, al, bl in zip(ts, a, b)) / len(ts)
        history.append(sum(float((t - _reconstruct(al, c, bl)).pow(2).sum()) for t, al, bl in zip(ts, a, b)))
    errors = []
    for i, t in enumerate(ts):  # unconstrained least squares for each matrix's own factors
        m = torch.einsum("rbs,sc->rbc", c, b[i]).reshape(r1, -1)  # (r1, n2 n3)
        a[i] = torch.linalg.lstsq(m.t(), t.reshape(n1, -1).t()).solution.t()  # (n1, r1)
        m = torch.einsum("ar,rbs->sab", a[i], c).reshape(r2, -1)  # (r2, n1 n2)
        b[i] = torch.linalg.lstsq(m.t(), t.reshape(-1, n3)).solution  # (r2, n3)
        err = torch.linalg.vector_norm(t - _reconstruct(a[i], c, b[i])) / torch.linalg.vector_norm(t).clamp_min(1e-30)
        errors.append(float(err))
    o, i_ = out_dims, in_dims
    return SharedFit(
        left=[al.reshape(1, o[0], i_[0], r1).to(dtype) for al in a],
        central=c.reshape(r1, o[1], i_[1], r2).to(dtype),
        right=[bl.reshape(r2, o[2], i_[2], 1).to(dtype) for bl in b],
        relative_errors=errors, history=history,
    )
