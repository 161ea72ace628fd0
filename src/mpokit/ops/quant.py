"""Group-wise integer quantization of matrices, bit packing, and the SQNR metric.

A (rows, cols) matrix is split along its columns (the input dimension of a weight,
the feature dimension of a KV row) into groups of `group_size` values; each group
gets its own 16-bit scale and, when asymmetric, an offset:
  zero point (default): w ~ scale * (q - z),       z an integer code (uint8), so 0 is exact
  float offset:         w ~ scale * q + offset,    offset = the 16-bit group minimum
  symmetric:            w ~ scale * (q - 2^(b-1))
When cols is not a multiple of group_size the last group of each row is shorter
(its range is computed on its real values only). Codes are packed densely:
8 codes of b bits fill b bytes, so storage is exactly ceil(n * b / 8) bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["SUPPORTED_BITS", "Quantized", "check_bits", "quantized_bytes", "quantize", "dequantize", "pack_bits",
           "unpack_bits", "sqnr_db", "fake_quantize", "num_groups", "DEFAULT_CLIP_RATIOS"]

SUPPORTED_BITS = (2, 3, 4, 8)
# Range shrink factors tried per group by the data-free MSE clip search (1.0 = plain min/max).
DEFAULT_CLIP_RATIOS = tuple(1.0 - 0.025 * k for k in range(17))  # 1.0 ... 0.6
SCALE_DTYPE = torch.float16  # scales/offsets are stored in 16 bits (counted in storage bytes)
ROWS_PER_CHUNK_NUMEL = 1 << 22  # quantize big matrices a slice of rows at a time


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"expected bits in {SUPPORTED_BITS}, got {bits}")
    return bits


@dataclass
class Quantized:
    """Unpacked result of `quantize`: codes (rows, cols) uint8, scale/offset (rows, groups) float16."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None  # uint8 zero points, float16 offsets, or None when symmetric
    bits: int
    group_size: int


def num_groups(cols: int, group_size: int) -> int:
    return math.ceil(cols / group_size)


def quantized_bytes(rows: int, cols: int, bits: int, group_size: int, symmetric: bool = False,
                    zero_point: bool = True) -> int:
    """Bytes a packed (rows, cols) matrix takes: the codes, a 16-bit scale per row and group, and an
    offset per group (a uint8 zero point, or a 16-bit float offset; none when symmetric)."""
    groups = rows * num_groups(cols, group_size)
    offset = 0 if symmetric else (1 if zero_point else 2)
    return math.ceil(rows * cols * bits / 8) + groups * (2 + offset)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, cols) -> (rows, groups, group_size); a short last group is padded by repeating its last
    value, which changes neither its min nor its max."""
    rows, cols = w.shape
    pad = num_groups(cols, group_size) * group_size - cols
    if pad:
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
    return w.reshape(rows, -1, group_size)  # (rows, groups, G)


def _params(lo: torch.Tensor, hi: torch.Tensor, bits: int, mode: str):
    """Scale (float16) and offset for groups with range [lo, hi], both (rows, groups, 1).

    mode "zero_point": the range is widened to hold 0 and the offset is an integer code z
    (returned as float here, stored uint8), so w = 0 is exactly representable; "float": the
    offset is the 16-bit group minimum; "symmetric": no offset.
    """
    qmax = 2 ** bits - 1
    if mode == "symmetric":
        absmax = torch.maximum(lo.abs(), hi.abs())
        return (absmax / max(2 ** (bits - 1) - 1, 1)).clamp_min(1e-8).to(SCALE_DTYPE), None
    if mode == "zero_point":
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = ((hi - lo) / qmax).clamp_min(1e-8).to(SCALE_DTYPE)
        return scale, torch.round(-lo / scale.float()).clamp_(0, qmax)
    return ((hi - lo) / qmax).clamp_min(1e-8).to(SCALE_DTYPE), lo.to(SCALE_DTYPE)


def _codes(g: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int, mode: str) -> torch.Tensor:
    """Round-to-nearest codes of grouped values g (rows, groups, G) on the stored (16-bit) grid."""
    s = scale.float()
    if mode == "symmetric":
        q = torch.round(g / s) + 2 ** (bits - 1)
    elif mode == "zero_point":
        q = torch.round(g / s) + offset
    else:
        q = torch.round((g - offset.float()) / s)
    return q.clamp_(0, 2 ** bits - 1)


def _dequant_grouped(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int,
                     mode: str) -> torch.Tensor:
    if mode == "symmetric":
        return (q - 2 ** (bits - 1)) * scale.float()
    if mode == "zero_point":
        return (q - offset.float()) * scale.float()
    return q * scale.float() + offset.float()


def _mode(symmetric: bool, zero_point: bool) -> str:
    return "symmetric" if symmetric else ("zero_point" if zero_point else "float")


def _mode_of(offset: torch.Tensor | None) -> str:
    """Stored layouts tell their mode: no offset, uint8 zero points, or 16-bit float offsets."""
    return "symmetric" if offset is None else ("zero_point" if offset.dtype == torch.uint8 else "float")


@torch.no_grad()
def quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
             clip_ratios: tuple[float, ...] | None = None, zero_point: bool = True) -> Quantized:
    """Round-to-nearest group-wise quantization of a 2-D tensor.

    zero_point (asymmetric only): integer zero point, so 0 stays exact (as torchao and most
      int4 kernels do); False stores a 16-bit float offset (the group minimum) instead.
    clip_ratios: shrink factors for each group's range; the one with the least squared error
      is kept per group (data-free, as in AWQ's clip search but on the weight alone). None or
      (1.0,) is plain min/max RTN.
    """
    check_bits(bits)
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(w.shape)}")
    if group_size < 1:
        raise ValueError(f"expected group_size >= 1, got {group_size}")
    mode = _mode(symmetric, zero_point)
    step = max(1, ROWS_PER_CHUNK_NUMEL // max(w.shape[1], 1))  # bound temporary memory on big tables
    parts = [_quantize_rows(w[r:r + step], bits, group_size, mode, clip_ratios)
             for r in range(0, w.shape[0], step)]
    codes, scale, offset = (torch.cat([p[k] for p in parts]) if parts[0][k] is not None else None for k in range(3))
    return Quantized(codes, scale, offset, bits, group_size)


def _quantize_rows(w: torch.Tensor, bits: int, group_size: int, mode: str, clip_ratios):
    rows, cols = w.shape
    g = _grouped(w.detach().float(), group_size)  # (rows, groups, G)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)  # (rows, groups, 1)
    valid = (torch.arange(g.shape[1] * group_size, device=g.device) < cols).reshape(1, -1, group_size)  # padding
    scale, offset, q = search_range(g, lo, hi, bits, mode, clip_ratios, valid)
    codes = q.reshape(rows, -1)[:, :cols].to(torch.uint8)  # (rows, cols)
    if offset is not None:
        offset = offset.squeeze(-1).to(torch.uint8 if mode == "zero_point" else SCALE_DTYPE)
    return codes, scale.squeeze(-1), offset


def search_range(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, mode: str,
                 clip_ratios: tuple[float, ...] | None, weight: torch.Tensor):
    """Scale, offset and codes of grouped values g (..., G) with ranges [lo, hi] (..., 1): per group,
    the range shrink in clip_ratios (None = min/max only) with the least sum of weight * error^2
    (weight broadcasts against g: a padding mask, or each column's input energy for GPTQ)."""
    best = None
    for ratio in clip_ratios or (1.0,):
        scale, offset = _params(lo * ratio, hi * ratio, bits, mode)
        q = _codes(g, scale, offset, bits, mode)
        err = ((_dequant_grouped(q, scale, offset, bits, mode) - g).square_() * weight).sum(-1, keepdim=True)
        if best is None:
            best = [err, scale, offset, q]
            continue
        better = err < best[0]  # (..., 1)
        best[0] = torch.where(better, err, best[0])
        best[1] = torch.where(better, scale, best[1])
        best[2] = None if offset is None else torch.where(better, offset, best[2])
        best[3] = torch.where(better, q, best[3])
    return best[1], best[2], best[3]


def dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize`: codes (rows, cols), scale/offset (rows, groups) -> (rows, cols) in `dtype`."""
    rows, cols = codes.shape
    groups = scale.shape[-1]
    q = codes.to(torch.float32)
    pad = groups * group_size - cols
    if pad:
        q = torch.nn.functional.pad(q, (0, pad))
    q = q.reshape(rows, groups, group_size)  # (rows, groups, G)
    w = _dequant_grouped(q, scale.unsqueeze(-1), None if offset is None else offset.unsqueeze(-1), bits,
                         _mode_of(offset))
    return w.reshape(rows, -1)[:, :cols].to(dtype)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                  clip_ratios: tuple[float, ...] | None = None, zero_point: bool = True) -> torch.Tensor:
    """dequantize(quantize(w)) in w's dtype: the values a quantized layer computes with."""
    qt = quantize(w, bits, group_size, symmetric, clip_ratios, zero_point)
    return dequantize(qt.codes, qt.scale, qt.offset, bits, group_size, dtype=w.dtype)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last dim of uint8 codes (< 2^bits) densely: (..., n) -> (..., ceil(n * bits / 8)).

    Every 8 codes become `bits` bytes (little-endian bit order); n is zero-padded to a
    multiple of 8 first, so pass n alongside to `unpack_bits`.
    """
    check_bits(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"expected uint8 codes, got {codes.dtype}")
    if bits == 8:
        return codes.contiguous()
    n = codes.shape[-1]
    pad = (-n) % 8
    c = torch.nn.functional.pad(codes, (0, pad)) if pad else codes
    c = c.reshape(*codes.shape[:-1], -1, 8).to(torch.int64)  # (..., n/8, 8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(-1, keepdim=True)  # (..., n/8, 1): 8*bits <= 56 bits, fits int64
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    out = ((word >> byte_shifts) & 0xFF).to(torch.uint8)  # (..., n/8, bits)
    return out.reshape(*codes.shape[:-1], -1)[..., : math.ceil(n * bits / 8)]


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: (..., ceil(n * bits / 8)) uint8 -> (..., n) uint8 codes."""
    check_bits(bits)
    if bits == 8:
        return packed[..., :n]
    full = math.ceil(n / 8) * bits
    pad = full - packed.shape[-1]
    p = torch.nn.functional.pad(packed, (0, pad)) if pad else packed
    p = p.reshape(*packed.shape[:-1], -1, bits).to(torch.int64)  # (..., n/8, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (p << byte_shifts).sum(-1, keepdim=True)  # (..., n/8, 1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = ((word >> shifts) & (2 ** bits - 1)).to(torch.uint8)  # (..., n/8, 8)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n]


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10*log10(||x||^2 / ||x - x_hat||^2) in dB (inf if exact)."""
    x, x_hat = x.detach().double(), x_hat.detach().double()
    noise = (x - x_hat).square().sum().item()
    signal = x.square().sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf
