"""mpokit's quantization grids in compressed-tensors' terms (format pack-quantized, strategy "group").

mpokit stores unsigned codes q in [0, 2^b - 1] and dequantizes (ops/quant.py)
  zero point:   w = (q - z) * s,          z an unsigned code (uint8)
  symmetric:    w = (q - 2^(b-1)) * s
  float offset: w = q * s + m,            m a float16 group minimum
compressed-tensors stores signed codes c in [-2^(b-1), 2^(b-1) - 1], signed zero points zp in the
same range (none when symmetric) and dequantizes w = (c - zp) * s. With h = 2^(b-1):
  c = q - h,  zp = z - h   give   (c - zp) * s = (q - z) * s   and, symmetric, c * s = (q - h) * s,
the same integers for every b <= 8. A float offset is no integer zero point: those layers have no
compressed-tensors grid. Scales are written in float32: the loaders multiply (c - zp) * s in the
scale's dtype, which is exact in float32 (an integer below 2^8 times an 11-bit float16 mantissa) but
not in float16.

Groups: compressed-tensors needs the group size to divide the columns. mpokit's fit_groups already
picks such a size per layer (96 for SmolLM2's 576 columns at 128). A grid with a shorter last group
(fit_groups=False) is written with groups of gcd(group_size, cols), each scale and zero point
repeated over the sub-groups it covers: the same values, more scale bytes.

One scheme or several (`layer_keys`): symmetric layers get one config group per (bits, group size),
which transformers' compressed loading path decodes layer by layer. Asymmetric schemes load only
through its dequantize-while-loading path (compressed_tensors.py says why), and that path decodes
every dense layer with the first config group's scheme; so when any layer is asymmetric, all are
written with one scheme: the largest bit width (a b-bit code is the same integer in more bits),
asymmetric (a symmetric layer gets zero point 0), groups of the gcd of every layer's group size.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from mpokit.layers.quant import QuantizedTensor

__all__ = ["CTGrid", "ct_grid", "layer_keys", "scheme_args", "compact_targets"]


@dataclass
class CTGrid:
    """One layer's grid as compressed-tensors holds it: scale/zero point (rows, cols / group_size)."""

    bits: int
    group_size: int
    symmetric: bool
    scale: torch.Tensor  # float32
    zero_point: torch.Tensor | None  # int8, signed
    how: str

    @property
    def key(self) -> tuple[int, int, bool]:
        return self.bits, self.group_size, self.symmetric


def native_key(q: QuantizedTensor) -> tuple[int, int, bool]:
    """(bits, group size, symmetric) of the smallest scheme holding `q`."""
    return q.bits, math.gcd(q.group_size, q.cols), q.symmetric


def layer_keys(tensors: dict[str, QuantizedTensor]) -> dict[str, tuple[int, int, bool]]:
    """The scheme each layer is written with: its own, or, when any layer is asymmetric, one for all."""
    keys = {name: native_key(q) for name, q in tensors.items()}
    if all(k[2] for k in keys.values()):
        return keys
    one = (max(k[0] for k in keys.values()), math.gcd(*(k[1] for k in keys.values())), False)
    return dict.fromkeys(keys, one)


def ct_grid(q: QuantizedTensor, key: tuple[int, int, bool] | None = None) -> CTGrid | None:
    """The compressed-tensors grid (of scheme `key`, default its own) holding exactly the values of `q`,
    or None (float offsets)."""
    if not q.symmetric and not q.zero_point:
        return None
    bits, group, symmetric = key or native_key(q)
    if bits < q.bits or q.cols % group or math.gcd(q.group_size, q.cols) % group or (symmetric and not q.symmetric):
        raise ValueError(f"expected a scheme holding a {q.bits}-bit grid with groups of {q.group_size} over "
                         f"{q.cols} columns, got (bits, group, symmetric) = {(bits, group, symmetric)}")
    half = 2 ** (q.bits - 1)
    owner = torch.arange(q.cols // group) * group // q.group_size  # mpokit group of each written group
    scale = q.scale.float()[:, owner]  # (rows, cols / group)
    zero = None
    if not symmetric:  # zp = z - 2^(b-1); a symmetric layer has z = 2^(b-1), so zp = 0
        z = torch.full_like(q.scale, half, dtype=torch.int16) if q.symmetric else q.offset.to(torch.int16)
        zero = (z - half).to(torch.int8)[:, owner]
    return CTGrid(bits, group, symmetric, scale, zero, _how(q, bits, group, symmetric))


def _how(q: QuantizedTensor, bits: int, group: int, symmetric: bool) -> str:
    how = ["codes q - 2^(b-1)" + ("" if q.symmetric else ", zero points z - 2^(b-1)")]
    if q.symmetric and not symmetric:
        how.append("symmetric, written with zero point 0")
    if bits != q.bits:
        how.append(f"{q.bits}-bit codes written as {bits}-bit")
    if group != q.group_size:
        short = " (shorter last group)" if q.cols % q.group_size else ""
        how.append(f"groups of {q.group_size} over {q.cols} columns{short} written as groups of {group}, "
                   "scales repeated")
    return "; ".join(how)


def scheme_args(key: tuple[int, int, bool]):
    """compressed-tensors' QuantizationArgs for a grid key (bits, group_size, symmetric)."""
    from compressed_tensors.quantization import QuantizationArgs

    bits, group, symmetric = key
    return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group)


def compact_targets(names: list[str], model: nn.Module) -> list[str]:
    """`names` as compressed-tensors targets: `re:.*\\.LEAF$` where every module of the model with that
    leaf name is in `names` (the usual q_proj/up_proj patterns), the exact name otherwise."""
    chosen = set(names)
    by_leaf: dict[str, list[str]] = {}
    for n, _ in model.named_modules():
        if n:
            by_leaf.setdefault(n.rpartition(".")[2], []).append(n)
    out, done = [], set()
    for n in names:
        leaf = n.rpartition(".")[2]
        if leaf in done:
            continue
        owners = by_leaf[leaf]
        if "." in n and all("." in o and o in chosen for o in owners):
            out.append(rf"re:.*\.{re.escape(leaf)}$")
            done.add(leaf)
        else:
            out.append(n)
    return out
