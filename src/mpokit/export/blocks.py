"""GGUF block encodings (Q4_0, Q4_1, Q5_0, Q8_0) written byte by byte from integer codes.

A GGUF row of `cols` values is cols/32 blocks; each block is a float16 scale d (Q4_1: then a
float16 minimum m) followed by its 32 codes, little-endian:
  Q4_0  d | 16 bytes: code j in the low nibble of byte j, code j+16 in the high nibble   w = d * (q - 8)
  Q4_1  d | m | 16 bytes laid out as Q4_0                                                w = d * q + m
  Q5_0  d | qh: uint32, bit j = bit 4 of code j | 16 bytes of low nibbles as Q4_0        w = d * (q - 16)
  Q8_0  d | 32 int8                                                                     w = d * q
gguf.quants holds the reference decoders (and quantizers); the tests check these encoders
against them. An mpokit group of G columns (G a multiple of 32) is G/32 blocks sharing its scale.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

__all__ = ["BLOCK", "BLOCK_BYTES", "per_block", "per_column", "pack_q4_0", "pack_q4_1", "pack_q5_0", "pack_q8_0",
           "decode", "reference_quantize"]

BLOCK = 32  # values per block in every type used here
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q8_0": 34}


def _check_host() -> None:
    # fp16 scales are written through a byte view of the host's float16: GGUF files are little-endian
    if sys.byteorder != "little":
        raise NotImplementedError("expected a little-endian host for GGUF block packing, got a big-endian one")


def per_block(t: torch.Tensor, group_size: int, cols: int) -> torch.Tensor:
    """(rows, groups) per-group values -> (rows, cols/32) per-block values (group_size a multiple of 32)."""
    starts = torch.arange(0, cols, BLOCK, device=t.device)  # first column of each block
    return t[:, starts // group_size]  # (rows, nb)


def per_column(t: torch.Tensor, group_size: int, cols: int) -> torch.Tensor:
    """(rows, groups) per-group values -> (rows, cols) per-column values (any group_size)."""
    return t[:, torch.arange(cols, device=t.device) // group_size]  # (rows, cols)


def _blocks(q: torch.Tensor, lo: int, hi: int, what: str) -> torch.Tensor:
    rows, cols = q.shape
    if cols % BLOCK:
        raise ValueError(f"expected a row length that is a multiple of {BLOCK}, got {cols}")
    q = q.to(torch.int16)
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"expected {what} codes in [{lo}, {hi}], got values in [{int(q.min())}, {int(q.max())}]")
    return q.reshape(rows, cols // BLOCK, BLOCK)  # (rows, nb, 32)


def _fp16_bytes(x: torch.Tensor, nb: int) -> torch.Tensor:
    """(rows, nb) float16 -> (rows, nb, 2) uint8, little-endian."""
    _check_host()
    if x.dtype != torch.float16 or x.shape[-1] != nb:
        raise ValueError(f"expected (rows, {nb}) float16 block scales, got {tuple(x.shape)} {x.dtype}")
    return x.contiguous().view(torch.uint8).reshape(*x.shape, 2)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(rows, nb, 32) codes < 16 -> (rows, nb, 16) bytes: code j low nibble, code j+16 high nibble."""
    return (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)


def _rows(parts: list[torch.Tensor]) -> np.ndarray:
    out = torch.cat(parts, dim=-1)  # (rows, nb, bytes per block)
    return out.reshape(out.shape[0], -1).cpu().numpy()  # (rows, nb * bytes per block)


def pack_q4_0(q: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """Codes q (rows, cols) in [0, 15] (w = d * (q - 8)) and block scales d (rows, cols/32) float16."""
    b = _blocks(q, 0, 15, "Q4_0")
    return _rows([_fp16_bytes(d, b.shape[1]), _nibbles(b)])


def pack_q4_1(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """Codes q (rows, cols) in [0, 15] (w = d * q + m), block scales d and minimums m (rows, cols/32) float16."""
    b = _blocks(q, 0, 15, "Q4_1")
    return _rows([_fp16_bytes(d, b.shape[1]), _fp16_bytes(m, b.shape[1]), _nibbles(b)])


def pack_q5_0(q: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """Codes q (rows, cols) in [0, 31] (w = d * (q - 16)) and block scales d (rows, cols/32) float16."""
    b = _blocks(q, 0, 31, "Q5_0")
    high = (b >> 4).to(torch.int64)  # (rows, nb, 32): the fifth bit of each code
    word = (high << torch.arange(BLOCK, dtype=torch.int64)).sum(-1, keepdim=True)  # (rows, nb, 1) uint32 value
    qh = ((word >> (8 * torch.arange(4, dtype=torch.int64))) & 0xFF).to(torch.uint8)  # (rows, nb, 4) little-endian
    return _rows([_fp16_bytes(d, b.shape[1]), qh, _nibbles(b & 0x0F)])


def pack_q8_0(q: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """Signed codes q (rows, cols) in [-128, 127] (w = d * q) and block scales d (rows, cols/32) float16."""
    b = _blocks(q, -128, 127, "Q8_0")
    return _rows([_fp16_bytes(d, b.shape[1]), b.to(torch.int8).view(torch.uint8)])


def _qtype(kind: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[kind]


def decode(data: np.ndarray, kind: str) -> torch.Tensor:
    """The float32 values a GGUF reader gets from `data` of type `kind` (gguf's reference dequantizer)."""
    from gguf.quants import dequantize

    if kind in ("F32", "F16"):
        return torch.from_numpy(np.asarray(data, dtype=np.float32).copy())
    return torch.from_numpy(dequantize(data, _qtype(kind)).astype(np.float32))


def reference_quantize(w: torch.Tensor, kind: str) -> np.ndarray:
    """gguf's own quantizer (llama.cpp's reference rounding) on float values w (rows, cols)."""
    from gguf.quants import quantize

    return quantize(w.detach().float().cpu().numpy(), _qtype(kind))
