"""Packed storage of KV-cache states: per-token rows or per-channel blocks of tokens.

Both use the group-wise quantizer of `mpokit.ops.quant` with one group per token row (D
values) or per channel of a block of G tokens, and keep the packed codes with a float16
scale and an offset per group. Also the fixed orthonormal mixer the caches rotate rows by, and the
split of a few outlier channels (kept aside in 16 bits) from the channels that get quantized.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from mpokit.ops.quant import dequantize, pack_bits, quantize, unpack_bits

__all__ = ["PackedTokens", "quantize_tokens", "dequantize_tokens", "quantize_channels", "dequantize_channels",
           "orthonormal_mixer", "largest_channels", "split_channels", "merge_channels"]


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


@functools.lru_cache(maxsize=None)
def orthonormal_mixer(d: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(d, d) float32 orthonormal on `device`: the Sylvester Hadamard matrix / sqrt(d) when d is a power
    of 2, else a fixed-seed random rotation (QR of a Gaussian matrix). Cached: every layer shares it."""
    if d & (d - 1) == 0:
        h = torch.ones(1, 1)
        while h.shape[0] < d:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return (h / d ** 0.5).to(device)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float().to(device)


def largest_channels(x: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(outlier, kept) channel indices per head, (H, count) and (H, D - count), both sorted: the `count`
    channels of rows x (B, H, n, D) with the largest magnitude over the batch and the tokens."""
    d = x.shape[-1]
    if not 0 < count < d:
        raise ValueError(f"expected 0 < outlier channels < head size {d}, got {count}")
    peak = x.abs().amax(dim=(0, 2))  # (H, D)
    outlier = peak.topk(count, dim=-1).indices.sort(-1).values  # (H, count)
    mask = torch.ones_like(peak, dtype=torch.bool).scatter_(-1, outlier, False)
    kept = mask.nonzero()[:, 1].reshape(peak.shape[0], d - count)  # (H, D - count), row-major order keeps heads
    return outlier, kept


def split_channels(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, n, D) -> x[..., index[h]] per head: (B, H, n, len(index[h]))."""
    b, _, n, _ = x.shape
    return x.gather(-1, index[None, :, None, :].expand(b, -1, n, -1))


def merge_channels(parts: list[tuple[torch.Tensor, torch.Tensor]], d: int) -> torch.Tensor:
    """Inverse of `split_channels` over a partition of the channels: [(values (B, H, n, c), index (H, c))]."""
    b, h, n, _ = parts[0][0].shape
    out = parts[0][0].new_empty(b, h, n, d)
    for values, index in parts:
        out.scatter_(-1, index[None, :, None, :].expand(b, -1, n, -1), values.to(out.dtype))
    return out
