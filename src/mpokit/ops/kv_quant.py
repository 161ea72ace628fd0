"""Packed storage of KV-cache states: per-token rows or per-channel blocks of tokens.

Both use the group-wise quantizer of `mpokit.ops.quant` with one group per token row (D
values) or per channel of a block of G tokens, and keep the packed codes with a float16
scale and an offset per group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mpokit.ops.quant import dequantize, pack_bits, quantize, unpack_bits

__all__ = ["PackedTokens", "quantize_tokens", "dequantize_tokens", "quantize_channels", "dequantize_channels"]


@dataclass
class PackedTokens:
    """Packed low-bit states with a float16 scale and an offset (float16 minimum or uint8 zero point)
    per group. Per token: packed (B, H, T, ceil(D * bits / 8)), scale/offset (B, H, T), or
    (B, H, T, D / g) with groups of g channels per token. Per channel
    over blocks of G tokens (block > 1): packed (B, H, T/G, D, ceil(G * bits / 8)), scale/offset
    (B, H, T/G, D). Dim 2 runs along the sequence either way."""

    packed: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    block: int = 1  # tokens per entry along dim 2

    @property
    def length(self) -> int:
        return self.packed.shape[2] * self.block

    def cat(self, other: "PackedTokens") -> "PackedTokens":
        return PackedTokens(*(torch.cat([a, b], dim=2) for a, b in
                              ((self.packed, other.packed), (self.scale, other.scale), (self.offset, other.offset))),
                            block=self.block)

    def map(self, fn) -> "PackedTokens":
        return PackedTokens(fn(self.packed), fn(self.scale), fn(self.offset), block=self.block)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.offset))


def quantize_tokens(x: torch.Tensor, bits: int, clip: tuple[float, ...] | None, zero_point: bool,
                    group: int | None = None) -> PackedTokens:
    """Per-token groups of `group` channels (None = the whole row, one scale per token)."""
    b, h, n, d = x.shape
    g = group or d
    if d % g:
        raise ValueError(f"expected a token group dividing the head size {d}, got {g}")
    q = quantize(x.reshape(-1, d), bits, group_size=g, clip_ratios=clip, zero_point=zero_point)  # (BHn, d / g) groups
    packed = pack_bits(q.codes, bits).reshape(b, h, n, -1)  # (B, H, n, ceil(d*bits/8))
    shape = (b, h, n) if g == d else (b, h, n, d // g)
    return PackedTokens(packed, q.scale.reshape(shape), q.offset.reshape(shape))


def dequantize_tokens(p: PackedTokens, bits: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    if p.block > 1:
        return dequantize_channels(p, bits, dtype)
    b, h, n, _ = p.packed.shape
    codes = unpack_bits(p.packed.reshape(b * h * n, -1), bits, d)  # (BHn, d)
    scale = p.scale.reshape(b * h * n, -1)  # (BHn, groups)
    x = dequantize(codes, scale, p.offset.reshape(b * h * n, -1), bits, d // scale.shape[1], dtype=dtype)
    return x.reshape(b, h, n, d)


def quantize_channels(x: torch.Tensor, bits: int, block: int, clip, zero_point: bool) -> PackedTokens:
    """Per-channel groups over blocks of `block` tokens (KIVI's key layout); n must be a multiple of block."""
    b, h, n, d = x.shape
    cols = x.reshape(b, h, n // block, block, d).transpose(-1, -2)  # (B, H, nb, D, G)
    q = quantize(cols.reshape(-1, block), bits, group_size=block, clip_ratios=clip, zero_point=zero_point)
    packed = pack_bits(q.codes, bits).reshape(b, h, n // block, d, -1)  # (B, H, nb, D, ceil(G*bits/8))
    return PackedTokens(packed, q.scale.reshape(b, h, -1, d), q.offset.reshape(b, h, -1, d), block=block)


def dequantize_channels(p: PackedTokens, bits: int, dtype: torch.dtype) -> torch.Tensor:
    b, h, nb, d, _ = p.packed.shape
    codes = unpack_bits(p.packed.reshape(b * h * nb * d, -1), bits, p.block)  # (BH nb D, G)
    x = dequantize(codes, p.scale.reshape(-1, 1), p.offset.reshape(-1, 1), bits, p.block, dtype=dtype)
    return x.reshape(b, h, nb, d, p.block).transpose(-1, -2).reshape(b, h, nb * p.block, d)
