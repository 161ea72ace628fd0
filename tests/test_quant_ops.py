"""ops/quant: group-wise quantize/dequantize vs a loop reference, bit packing, SQNR, clip search."""
from __future__ import annotations

import math

import pytest
import torch

from mpokit.ops.quant import (DEFAULT_CLIP_RATIOS, SUPPORTED_BITS, dequantize, fake_quantize, pack_bits, quantize,
                              sqnr_db, unpack_bits)


def reference_quantize(w: torch.Tensor, bits: int, group: int, mode: str) -> torch.Tensor:
    """Dequantized weight, one group at a time in plain Python (textbook RTN with 16-bit scales)."""
    out = torch.empty_like(w, dtype=torch.float32)
    qmax = 2 ** bits - 1
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], group):
            g = w[r, start:start + group].float()
            if mode == "symmetric":
                scale = (g.abs().max() / max(2 ** (bits - 1) - 1, 1)).clamp_min(1e-8).half().float()
                q = torch.clamp(torch.round(g / scale) + 2 ** (bits - 1), 0, qmax)
                out[r, start:start + group] = (q - 2 ** (bits - 1)) * scale
            elif mode == "zero_point":  # the range always holds 0; z is an integer code
                lo, hi = min(g.min().item(), 0.0), max(g.max().item(), 0.0)
                scale = torch.tensor((hi - lo) / qmax).clamp_min(1e-8).half().float()
                z = torch.clamp(torch.round(-lo / scale), 0, qmax)
                q = torch.clamp(torch.round(g / scale) + z, 0, qmax)
                out[r, start:start + group] = (q - z) * scale
            else:
                lo = g.min().half().float()
                scale = ((g.max() - g.min()) / qmax).clamp_min(1e-8).half().float()
                q = torch.clamp(torch.round((g - lo) / scale), 0, qmax)
                out[r, start:start + group] = q * scale + lo
    return out


MODES = {"zero_point": {}, "float": {"zero_point": False}, "symmetric": {"symmetric": True}}


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("cols,group", [(64, 32), (72, 32), (40, 128)])  # divisible, ragged tail, one short group
def test_rtn_equals_reference(bits, mode, cols, group):
    w = torch.randn(6, cols)
    q = quantize(w, bits, group, **MODES[mode])
    got = dequantize(q.codes, q.scale, q.offset, bits, group)
    assert q.codes.shape == (6, cols) and q.codes.dtype == torch.uint8
    assert int(q.codes.max()) <= 2 ** bits - 1
    assert q.scale.shape == (6, math.ceil(cols / group)) and q.scale.dtype == torch.float16
    assert (q.offset is None) == (mode == "symmetric")
    if mode == "zero_point":
        assert q.offset.dtype == torch.uint8
    assert torch.allclose(got, reference_quantize(w, bits, group, mode), atol=1e-6)


def test_zero_point_keeps_zero_exact():
    w = torch.randn(8, 64)
    w[:, ::4] = 0.0
    assert (fake_quantize(w, 2, 64)[:, ::4] == 0).all()
    assert not (fake_quantize(w, 2, 64, zero_point=False)[:, ::4] == 0).all()


@pytest.mark.parametrize("bits,floor_db", [(8, 40.0), (4, 17.0), (3, 11.0), (2, 5.0)])
def test_sqnr_floor_and_monotone_in_bits(bits, floor_db):
    w = torch.randn(128, 256)
    s = sqnr_db(w, fake_quantize(w, bits, 64))
    assert s > floor_db
    fewer = {8: 4, 4: 3, 3: 2}.get(bits)
    if fewer:  # each bit fewer costs ~6 dB
        assert s > sqnr_db(w, fake_quantize(w, fewer, 64)) + 3 * (bits - fewer)


def test_sqnr_negative_control_and_exact():
    w = torch.randn(32, 32)
    assert sqnr_db(w, w) == math.inf
    assert sqnr_db(w, torch.zeros_like(w)) == pytest.approx(0.0)
    assert sqnr_db(w, w + 0.1 * torch.randn_like(w)) < 25


def test_clip_search_never_worse_and_helps_at_low_bits():
    w = torch.randn(64, 256) * torch.rand(64, 1)  # rows of different scales
    w[0, 0] = 25.0  # an outlier
    for bits in (2, 3, 4, 8):
        plain = (fake_quantize(w, bits, 64) - w).square().sum()
        clipped = (fake_quantize(w, bits, 64, clip_ratios=DEFAULT_CLIP_RATIOS) - w).square().sum()
        assert clipped <= plain * (1 + 1e-6)
    assert sqnr_db(w, fake_quantize(w, 2, 64, clip_ratios=DEFAULT_CLIP_RATIOS)) > sqnr_db(w, fake_quantize(w, 2, 64)) + 1


def test_smaller_groups_are_more_accurate():
    w = torch.randn(64, 512) * torch.linspace(0.1, 3, 512)  # column scales vary along the row
    assert sqnr_db(w, fake_quantize(w, 4, 32)) > sqnr_db(w, fake_quantize(w, 4, 256))


def test_grid_of_the_same_size_is_lossless_but_a_coarser_one_is_not():
    """Why the benchmarks avoid SmolLM2's own Q4_1 grid (groups of 32): re-quantizing on it is exact."""
    q = quantize(torch.randn(16, 128), 4, 32)
    on_grid = dequantize(q.codes, q.scale, q.offset, 4, 32)
    assert sqnr_db(on_grid, fake_quantize(on_grid, 4, 32)) > 60
    assert sqnr_db(on_grid, fake_quantize(on_grid, 4, 128)) < 40


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("n", [8, 13, 64, 1000])
def test_pack_roundtrip_and_size(bits, n):
    codes = torch.randint(0, 2 ** bits, (3, n), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, math.ceil(n * bits / 8))
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_pack_layout_is_dense_little_endian():
    codes = torch.tensor([1, 2, 3, 0, 1, 2, 3, 0], dtype=torch.uint8)
    assert pack_bits(codes, 2).tolist() == [0b00111001, 0b00111001]
    assert pack_bits(torch.tensor([1, 15], dtype=torch.uint8), 4).tolist() == [0xF1]


def test_bad_inputs():
    with pytest.raises(ValueError, match="expected bits"):
        quantize(torch.randn(4, 4), 5, 4)
    with pytest.raises(ValueError, match="expected a 2-D"):
        quantize(torch.randn(4), 4, 4)
    with pytest.raises(ValueError, match="expected uint8"):
        pack_bits(torch.zeros(8, dtype=torch.int32), 4)
