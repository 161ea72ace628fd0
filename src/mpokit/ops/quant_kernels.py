"""Packed low-bit matmuls on torch's CPU weight-only kernels, without dequantizing the weight.

mpokit's codes map onto the kernels' grids exactly (only the 16-bit scales are rounded to the
kernel's bfloat16):
  int4 kernel (`_weight_int4pack_mm_for_cpu`): w = (q - 8) * s + zero per group, q in [0, 15]. Every
  mpokit grid of <= 4 bits fits it: zero point w = (q - z) * s  ->  zero = (8 - z) * s; float offset
  w = q * s + m  ->  zero = m + 8 * s; symmetric w = (q - 2^(b-1)) * s  ->  zero = (8 - 2^(b-1)) * s.
  Groups that are a multiple of 32 (mpokit's 96 for 576 columns) run as kernel groups of 32, 64 or
  128 with each scale repeated.
  int8 kernel (`_weight_int8pack_mm`): one scale per output row. It serves 8-bit layers with one
  group per row; a zero point adds x.sum() * s * (128 - z) to the symmetric product.
The kernels are fast with bfloat16 activations only (float32 inputs are 10x slower than a dense
matmul here), so inputs are cast to bfloat16 and the result back. Everything else takes the
reference path (dequantize, then F.linear); `int4_layout`/`int8_layout` say which applies.
"""
from __future__ import annotations

import torch

__all__ = ["KERNEL_DTYPE", "int4_group", "int4_pack", "int4_mm", "int8_pack", "int8_mm", "kernels_available"]

KERNEL_DTYPE = torch.bfloat16
_INT4_GROUPS = (256, 128, 64, 32)  # group sizes the CPU int4 kernel takes


def kernels_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int4_group(bits: int, group_size: int, cols: int) -> int | None:
    """The kernel group for a <= 4-bit grid with `group_size` over `cols` columns, or None (reference path)."""
    if bits > 4 or cols % group_size:
        return None
    return next((g for g in _INT4_GROUPS if group_size % g == 0 and cols % g == 0), None)


def _zero(scale: torch.Tensor, offset: torch.Tensor | None, bits: int) -> torch.Tensor:
    """The kernel's per-group `zero` (rows, groups) for mpokit's scale/offset, in float32."""
    s = scale.float()
    if offset is None:  # symmetric
        return (8 - 2 ** (bits - 1)) * s
    if offset.dtype == torch.uint8:  # integer zero point
        return (8 - offset.float()) * s
    return offset.float() + 8 * s  # float offset


def int4_pack(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int, group_size: int,
              kernel_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight, scales_and_zeros (cols / kernel_group, rows, 2)) for `int4_mm`; codes (rows, cols)."""
    repeat = group_size // kernel_group
    if bits < 4 and (offset is None or offset.dtype == torch.uint8):
        # q - z (or q - 2^(b-1)) lies in [-8, 7]: write it as the kernel's own code with zero = 0, so
        # the kernel does not cancel two large bfloat16 terms (a 2-bit grid would lose ~3%)
        center = 2 ** (bits - 1) if offset is None else offset.to(torch.int32).repeat_interleave(group_size, dim=1)
        codes = codes.to(torch.int32) - center + 8
        offset, bits = None, 4
    zero = _zero(scale, offset, bits).repeat_interleave(repeat, dim=1)  # (rows, cols / kernel_group)
    s = scale.float().repeat_interleave(repeat, dim=1)
    scales_and_zeros = torch.stack([s.t(), zero.t()], dim=-1).to(KERNEL_DTYPE).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    return packed, scales_and_zeros


def int4_mm(x: torch.Tensor, packed: torch.Tensor, kernel_group: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x (..., cols) @ w.T -> (..., rows), computed in bfloat16, returned in x's dtype."""
    flat = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, kernel_group, scales_and_zeros)
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def int8_pack(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(int8 weight (rows, cols), row scales, row correction or None) for 8-bit codes with one group per row.

    w = (q - 128) * s + c with c = (128 - z) * s (zero point) or m + 128 * s (float offset): the int8
    kernel computes the first term, `int8_mm` adds x.sum() * c.
    """
    weight = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
    s = scale.reshape(-1).float()
    if offset is None:
        correction = None
    elif offset.dtype == torch.uint8:
        correction = s * (128 - offset.reshape(-1).float())
    else:
        correction = offset.reshape(-1).float() + 128 * s
    return weight, s.to(KERNEL_DTYPE), correction


def int8_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, correction: torch.Tensor | None
            ) -> torch.Tensor:
    """x (..., cols) @ w.T -> (..., rows) on the int8 kernel (bfloat16), returned in x's dtype."""
    flat = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE)
    y = torch.ops.aten._weight_int8pack_mm(flat, weight, scales)
    if correction is not None:  # float32: a bfloat16 sum of hundreds of inputs would lose the term
        y = y.float() + flat.float().sum(-1, keepdim=True) * correction
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)
