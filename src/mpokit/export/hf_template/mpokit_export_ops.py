"""Written by `mpokit export --format hf` (copied verbatim): the tensor math of mpokit's layers, plain torch.

MPO cores and their contraction (mpokit.ops.tt / ops.contract), packed-code unpacking and group-wise
dequantization (ops.quant), and the routed experts' kernels (ops.experts), step for step as mpokit
computes them so that float32 results agree to the bit or to rounding.
"""
import math

import torch
import torch.nn.functional as F


# ---- MPO math: a matrix as cores (r_{k-1}, o_k, i_k, r_k) ----------------------------------------
def core_shapes(out_dims, in_dims, bonds):
    r = [1, *bonds, 1]
    return [(r[k], out_dims[k], in_dims[k], r[k + 1]) for k in range(len(out_dims))]


def tt_to_matrix(cores):
    """The (prod o, prod i) matrix of the cores."""
    n, out_dims, in_dims = len(cores), [c.shape[1] for c in cores], [c.shape[2] for c in cores]
    t = cores[0].reshape(-1, cores[0].shape[-1])  # (o1 i1, r1)
    for c in cores[1:]:
        t = (t @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[-1])  # (o1 i1 .. ok ik, r_k)
    t = t.reshape(*[d for k in range(n) for d in (out_dims[k], in_dims[k])])  # (o1, i1, ..., on, in)
    t = t.permute(*range(0, 2 * n, 2), *range(1, 2 * n, 2))  # (o1..on, i1..in)
    return t.reshape(math.prod(out_dims), math.prod(in_dims))


def _apply_ltr(x, cores):
    b, in_dims, o_done = x.shape[0], [c.shape[2] for c in cores], 1
    t = x.reshape(b, 1, 1, -1)
    for k, c in enumerate(cores):
        r0, ok, ik, r1 = c.shape
        i_rest = math.prod(in_dims[k + 1:])
        t = t.reshape(b, o_done, r0, ik, i_rest).permute(0, 1, 4, 2, 3).reshape(-1, r0 * ik)
        t = t @ c.permute(0, 2, 1, 3).reshape(r0 * ik, ok * r1)  # (B O_done I_rest, o_k r1)
        t = t.reshape(b, o_done, i_rest, ok, r1).permute(0, 1, 3, 4, 2)  # (B, O_done, o_k, r1, I_rest)
        o_done *= ok
    return t.reshape(b, o_done)


def tt_apply(x, cores):
    """x (B, prod i) -> x @ W.T (B, prod o), one core at a time, in the cheaper order."""
    shapes = [tuple(c.shape) for c in cores]
    if contract_flops(1, shapes, "ltr") <= contract_flops(1, shapes, "rtl"):
        return _apply_ltr(x, cores)
    n, b, in_dims, out_dims = len(cores), x.shape[0], [c.shape[2] for c in cores], [c.shape[1] for c in cores]
    xr = x.reshape(b, *in_dims).permute(0, *range(n, 0, -1)).reshape(b, -1)  # (B, i_n..i_1)
    y = _apply_ltr(xr, [c.permute(3, 1, 2, 0) for c in reversed(cores)])  # (B, o_n..o_1)
    return y.reshape(b, *reversed(out_dims)).permute(0, *range(n, 0, -1)).reshape(b, -1)


def tt_rows(indices, cores):
    """Rows W[indices] (N, prod i) without forming W."""
    digits, rem = [], indices
    for d in reversed([c.shape[1] for c in cores]):  # row id -> mixed-radix digits (o1 most significant)
        digits.append(rem % d)
        rem = rem // d
    digits.reverse()
    t = cores[0][0, digits[0]]  # (N, i1, r1)
    for c, dgt in zip(cores[1:], digits[1:]):
        s = c.permute(1, 0, 2, 3)[dgt]  # (N, r0, i_k, r1)
        t = torch.bmm(t, s.reshape(s.shape[0], s.shape[1], -1)).reshape(s.shape[0], -1, s.shape[-1])
    return t.reshape(t.shape[0], -1)


def contract_flops(batch, shapes, order="auto"):
    if order == "auto":
        return min(contract_flops(batch, shapes, "ltr"), contract_flops(batch, shapes, "rtl"))
    if order == "rtl":
        shapes = [(r1, o, i, r0) for r0, o, i, r1 in reversed(shapes)]
    in_dims, total, o_done = [s[2] for s in shapes], 0, 1
    for k, (r0, ok, ik, r1) in enumerate(shapes):
        total += 2 * batch * o_done * math.prod(in_dims[k + 1:]) * r0 * ik * ok * r1
        o_done *= ok
    return total


def reconstruct_flops(shapes):
    total, left = 0, shapes[0][1] * shapes[0][2]
    for r0, ok, ik, r1 in shapes[1:]:
        total += 2 * left * r0 * ok * ik * r1
        left *= ok * ik
    return total


# ---- quantization: codes packed 8 per `bits` bytes, little-endian; 16-bit group scales -----------
def unpack_bits(packed, bits, n):
    """(..., ceil(n * bits / 8)) uint8 -> (..., n) uint8 codes."""
    if bits == 8:
        return packed[..., :n]
    lead, full = packed.shape[:-1], math.ceil(n / 8) * bits
    p = F.pad(packed, (0, full - packed.shape[-1])).reshape(*lead, -1, bits).to(torch.int64)  # (..., n/8, bits)
    word = (p << (torch.arange(bits, device=p.device) * 8)).sum(-1, keepdim=True)  # (..., n/8, 1)
    codes = (word >> (torch.arange(8, device=p.device) * bits)) & (2 ** bits - 1)  # (..., n/8, 8)
    return codes.to(torch.uint8).reshape(*lead, -1)[..., :n]


def dequantize(codes, scale, offset, bits, group_size):
    """codes (rows, cols), scale/offset (rows, groups) -> float32 (rows, cols)."""
    rows, cols = codes.shape
    groups = scale.shape[-1]
    q = F.pad(codes.to(torch.float32), (0, groups * group_size - cols)).reshape(rows, groups, group_size)
    s = scale.unsqueeze(-1).float()
    if offset is None:  # symmetric: codes centred on 2^(b-1)
        w = (q - 2 ** (bits - 1)) * s
    elif offset.dtype == torch.uint8:  # integer zero points
        w = (q - offset.unsqueeze(-1).float()) * s
    else:  # 16-bit float offsets
        w = q * s + offset.unsqueeze(-1).float()
    return w.reshape(rows, -1)[:, :cols]


# ---- routed experts: stacked as w_in (E, g*m, d), w_out (E, m, d_out); g = 2 when gated ----------
def expert_hidden(h, act, gated):
    if gated:
        gate, up = h.chunk(2, dim=-1)
        return act(gate) * up
    return act(h)


def run_experts(mode, x, sel, w_in, b_in, w_out, act, gated, scale=None):
    """sum over each token's selected experts of scale * expert(x); mpokit's "loop" and "dense" kernels."""
    T, k = sel.shape
    E = w_in.shape[0]
    if mode == "auto":  # as mpokit chooses: "dense" when many experts would each see only a few tokens
        active = E * (1 - (1 - k / E) ** T)
        mode = "dense" if T * k <= 8 * E and k >= 0.2 * E and active >= E / 2 else "loop"
    if mode == "dense":
        gm, d = w_in.shape[1], w_in.shape[2]
        h = F.linear(x, w_in.reshape(E * gm, d), None if b_in is None else b_in.reshape(-1))  # (T, E*g*m)
        h = expert_hidden(h.view(-1, E, gm), act, gated)  # (T, E, m)
        weight = torch.zeros(T, E, dtype=x.dtype, device=x.device)
        weight.scatter_(1, sel, torch.ones_like(sel, dtype=x.dtype) if scale is None else scale.to(x.dtype))
        return torch.einsum("tem,emd->td", h * weight.unsqueeze(-1), w_out)
    flat = sel.reshape(-1)
    order, counts = torch.argsort(flat, stable=True), torch.bincount(flat, minlength=E).tolist()
    out, start = x.new_zeros(T, w_out.shape[-1]), 0
    for e, count in enumerate(counts):  # the "loop" kernel (mpokit's "gather" equals it up to rounding)
        if count == 0:
            continue
        slots = order[start:start + count]
        start += count
        tokens = torch.div(slots, k, rounding_mode="floor")
        h = F.linear(x.index_select(0, tokens), w_in[e], None if b_in is None else b_in[e])  # (c, g*m)
        ye = expert_hidden(h, act, gated) @ w_out[e]  # (c, d_out)
        if scale is not None:
            ye = ye * scale.reshape(-1).index_select(0, slots).unsqueeze(1)
        out.index_add_(0, tokens, ye)
    return out

