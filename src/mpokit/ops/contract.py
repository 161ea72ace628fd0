"""Apply an MPO to inputs without forming the matrix, and FLOP estimates for both paths.

Contracting core by core saves work only when bonds are small: a 3-core MPO at 50%
of the parameters costs far more than the dense matmul. Callers compare
`contract_flops` with `dense_flops` (+ `reconstruct_flops` when the weight cannot be
cached) and take the cheaper path.
"""
from __future__ import annotations

import math

import torch

__all__ = ["tt_apply", "tt_rows", "dense_flops", "contract_flops", "reconstruct_flops"]


def _apply_left_to_right(x: torch.Tensor, cores: list[torch.Tensor]) -> torch.Tensor:
    b = x.shape[0]
    in_dims = [c.shape[2] for c in cores]
    # t holds (B, O_done, r, I_rest) with I_rest = i_k..i_n still to contract
    t = x.reshape(b, 1, 1, -1)
    o_done = 1
    for k, c in enumerate(cores):
        r0, ok, ik, r1 = c.shape
        i_rest = math.prod(in_dims[k + 1:])
        t = t.reshape(b, o_done, r0, ik, i_rest)
        t = t.permute(0, 1, 4, 2, 3).reshape(-1, r0 * ik)  # (B O_done I_rest, r0 i_k)
        t = t @ c.permute(0, 2, 1, 3).reshape(r0 * ik, ok * r1)  # (B O_done I_rest, o_k r1)
        t = t.reshape(b, o_done, i_rest, ok, r1).permute(0, 1, 3, 4, 2)  # (B, O_done, o_k, r1, I_rest)
        o_done *= ok
    return t.reshape(b, o_done)


def _reversed_chain(cores: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same operator with site order reversed: core k becomes (r_k, o_k, i_k, r_{k-1})."""
    return [c.permute(3, 1, 2, 0) for c in reversed(cores)]


def tt_apply(x: torch.Tensor, cores: list[torch.Tensor], order: str = "auto") -> torch.Tensor:
    """y = x @ W.T for W = MPO(cores), contracting one core at a time.

    x: (B, I) with I = prod i_k. Returns (B, O). order: "ltr", "rtl" or "auto"
    (cheaper by FLOP count; a low-rank U @ V layout needs right-to-left).
    """
    shapes = [tuple(c.shape) for c in cores]
    if order == "auto":
        order = "ltr" if contract_flops(1, shapes, "ltr") <= contract_flops(1, shapes, "rtl") else "rtl"
    if order == "ltr":
        return _apply_left_to_right(x, cores)
    n, b = len(cores), x.shape[0]
    in_dims = [c.shape[2] for c in cores]
    out_dims = [c.shape[1] for c in cores]
    xr = x.reshape(b, *in_dims).permute(0, *range(n, 0, -1)).reshape(b, -1)  # (B, i_n..i_1)
    y = _apply_left_to_right(xr, _reversed_chain(cores))  # (B, o_n..o_1)
    return y.reshape(b, *reversed(out_dims)).permute(0, *range(n, 0, -1)).reshape(b, -1)


def tt_rows(indices: torch.Tensor, cores: list[torch.Tensor]) -> torch.Tensor:
    """Rows W[indices] of W = MPO(cores) without forming W (embedding lookup).

    indices: (N,) row ids < prod o_k. Returns (N, prod i_k).
    """
    out_dims = [c.shape[1] for c in cores]
    digits, rem = [], indices
    for d in reversed(out_dims):  # row id -> mixed-radix digits (o1 most significant)
        digits.append(rem % d)
        rem = rem // d
    digits.reverse()
    t = cores[0][0, digits[0]]  # (N, i1, r1)
    for c, dgt in zip(cores[1:], digits[1:]):
        s = c.permute(1, 0, 2, 3)[dgt]  # (N, r0, i_k, r1)
        t = torch.bmm(t, s.reshape(s.shape[0], s.shape[1], -1))  # (N, I_done, i_k r1)
        t = t.reshape(t.shape[0], -1, s.shape[-1])
    return t.reshape(t.shape[0], -1)


def dense_flops(batch: int, out_features: int, in_features: int) -> int:
    return 2 * batch * out_features * in_features


def contract_flops(batch: int, shapes: list[tuple[int, int, int, int]], order: str = "auto") -> int:
    """FLOPs of `tt_apply` for cores of the given shapes (the cheaper order when "auto")."""
    if order == "auto":
        return min(contract_flops(batch, shapes, "ltr"), contract_flops(batch, shapes, "rtl"))
    if order == "rtl":
        shapes = [(r1, o, i, r0) for r0, o, i, r1 in reversed(shapes)]
    in_dims = [s[2] for s in shapes]
    total, o_done = 0, 1
    for k, (r0, ok, ik, r1) in enumerate(shapes):
        total += 2 * batch * o_done * math.prod(in_dims[k + 1:]) * r0 * ik * ok * r1
        o_done *= ok
    return total


def reconstruct_flops(shapes: list[tuple[int, int, int, int]]) -> int:
    """FLOPs of contracting the cores back to the full matrix."""
    total, left = 0, shapes[0][1] * shapes[0][2]
    for r0, ok, ik, r1 in shapes[1:]:
        total += 2 * left * r0 * ok * ik * r1
        left *= ok * ik
    return total
