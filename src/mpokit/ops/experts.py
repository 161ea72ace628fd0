"""Mixture-of-experts FFN math: run only the experts each token selected.

Experts are stacked tensors. w_in (E, g*m, d) holds each expert's first-layer rows
(g = 2 for gated FFNs: its m gate rows, then its m up rows; g = 1 otherwise), b_in
(E, g*m) their biases, w_out (E, m, d) its second-layer columns, transposed so that
`h @ w_out[e]` is a plain row-major matmul. A token's output is the sum over its
selected experts of scale * expert(x) (scale None = 1, as in MoEfication).

Three kernels, equal up to float rounding:
- experts_loop: group the routed (token, expert) slots by expert, then one gather +
  two matmuls + one index_add per expert. Work is proportional to the slots, and the
  matmuls stay large enough to be efficient: the fast path.
- experts_gather: gather every token's own expert weights and use batched
  matrix-vector products. No per-expert loop, but it copies T*k expert matrices.
- experts_dense: compute every expert and mask: the reference (what the research code
  did, so it saves nothing), and the fastest choice when many experts would each get only
  a few tokens (choose_kernel).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["expert_activation", "experts_loop", "experts_gather", "experts_dense", "run_experts", "choose_kernel",
           "KERNELS"]


def expert_activation(h: torch.Tensor, act: Callable, gated: bool) -> torch.Tensor:
    """(..., g*m) pre-activations -> (..., m) hidden: act(gate) * up when gated, else act(h)."""
    if gated:
        gate, up = h.chunk(2, dim=-1)
        return act(gate) * up
    return act(h)


def _check(x: torch.Tensor, sel: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> None:
    if x.dim() != 2 or sel.dim() != 2 or sel.shape[0] != x.shape[0]:
        raise ValueError(f"expected x (T, d) and sel (T, k), got {tuple(x.shape)} and {tuple(sel.shape)}")
    if w_in.shape[0] != w_out.shape[0] or w_in.shape[-1] != x.shape[-1]:
        raise ValueError(f"expected w_in (E, g*m, {x.shape[-1]}) and w_out (E, m, d), got "
                         f"{tuple(w_in.shape)} and {tuple(w_out.shape)}")


def experts_loop(x, sel, w_in, b_in, w_out, act, gated, scale=None) -> torch.Tensor:
    """x (T, d), sel (T, k) expert ids, scale (T, k) or None -> (T, d_out)."""
    _check(x, sel, w_in, w_out)
    T, k = sel.shape
    E = w_in.shape[0]
    flat = sel.reshape(-1)  # (T*k,) slot -> expert
    order = torch.argsort(flat, stable=True)  # slots grouped by expert
    counts = torch.bincount(flat, minlength=E).tolist()  # one host sync for all experts
    flat_scale = None if scale is None else scale.reshape(-1)
    out = x.new_zeros(T, w_out.shape[-1])
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        slots = order[start:start + count]
        start += count
        tokens = torch.div(slots, k, rounding_mode="floor")  # (c,)
        xe = x.index_select(0, tokens)  # (c, d)
        h = F.linear(xe, w_in[e], None if b_in is None else b_in[e])  # (c, g*m)
        ye = expert_activation(h, act, gated) @ w_out[e]  # (c, d_out)
        if flat_scale is not None:
            ye = ye * flat_scale.index_select(0, slots).unsqueeze(1)
        out.index_add_(0, tokens, ye)
    return out


def experts_gather(x, sel, w_in, b_in, w_out, act, gated, scale=None) -> torch.Tensor:
    """Same result as experts_loop via per-token weight gathers (T*k expert copies in memory)."""
    _check(x, sel, w_in, w_out)
    wi = w_in[sel]  # (T, k, g*m, d)
    h = torch.matmul(wi, x[:, None, :, None]).squeeze(-1)  # (T, k, g*m)
    if b_in is not None:
        h = h + b_in[sel]
    h = expert_activation(h, act, gated)  # (T, k, m)
    y = torch.matmul(h.unsqueeze(-2), w_out[sel]).squeeze(-2)  # (T, k, d_out)
    if scale is not None:
        y = y * scale.unsqueeze(-1)
    return y.sum(1)


def experts_dense(x, sel, w_in, b_in, w_out, act, gated, scale=None) -> torch.Tensor:
    """Every expert computed, unselected ones masked to zero (no saving; the reference)."""
    _check(x, sel, w_in, w_out)
    E, gm, d = w_in.shape
    h = F.linear(x, w_in.reshape(E * gm, d), None if b_in is None else b_in.reshape(-1))  # (T, E*g*m)
    h = expert_activation(h.view(-1, E, gm), act, gated)  # (T, E, m)
    weight = torch.zeros(x.shape[0], E, dtype=x.dtype, device=x.device)  # (T, E)
    weight.scatter_(1, sel, torch.ones_like(sel, dtype=x.dtype) if scale is None else scale.to(x.dtype))
    return torch.einsum("tem,emd->td", h * weight.unsqueeze(-1), w_out)


KERNELS: dict[str, Callable[..., torch.Tensor]] = {"loop": experts_loop, "gather": experts_gather,
                                                   "dense": experts_dense}


def choose_kernel(tokens: int, top_k: int, num_experts: int) -> str:
    """"loop" unless many experts would each run on only a few tokens, where the per-expert
    overhead of the loop costs more than computing every expert ("dense").

    Measured on the 2-core CPU (bench/bench_moe.py --kernels, SmolLM2 shapes, E=32): the loop
    wins at 128+ tokens and at small k; "dense" wins from 4 to 16 tokens at k >= 8 and for a
    single token at k = 16; the gathers never win.
    """
    active = num_experts * (1 - (1 - top_k / num_experts) ** tokens)  # expected distinct experts
    crowded = tokens * top_k <= 8 * num_experts and top_k >= 0.2 * num_experts
    return "dense" if crowded and active >= num_experts / 2 else "loop"


def run_experts(mode: str, x, sel, w_in, b_in, w_out, act, gated, scale=None) -> torch.Tensor:
    """Dispatch by mode: "auto" (choose_kernel), "loop", "gather" or "dense"."""
    if mode == "auto":
        mode = choose_kernel(sel.shape[0], sel.shape[1], w_in.shape[0])
    if mode not in KERNELS:
        raise ValueError(f"expected forward mode in {['auto', *KERNELS]}, got {mode!r}")
    return KERNELS[mode](x, sel, w_in, b_in, w_out, act, gated, scale)
