"""Choose a GGUF type for each tensor and encode it; measure what the file will hold.

Quantized weights map onto a GGUF block type without re-quantization wherever the grids coincide
(every 32-column block inside one mpokit group, so group_size and the row length are multiples of 32):
  bits  mpokit grid                 GGUF type  codes written             exact
  4     float offsets q*s + o       Q4_1       q, d = s, m = o           yes
  4     symmetric (q - 8) * s       Q4_0       q, d = s                  yes
  4     zero point (q - z) * s      Q4_1       q, d = s, m = fp16(-z*s)  only where z*s is a float16
                                    Q5_0       q - z + 16, d = s         yes (int4_zero_point="q5_0")
  2, 3  float offsets               Q4_1       q, d = s, m = o           yes (a 2/3-bit grid is a 4-bit one)
  2, 3  symmetric                   Q4_0       q - 2^(b-1) + 8           yes
  2, 3  zero point                  Q4_0       q - z + 8 (|q - z| <= 7)  yes
  8     symmetric                   Q8_0       q - 128, d = s            yes
  8     asymmetric                  none: converted as `convert` says (F16 by default; with "q8_0":
                                    Q8_0       q - z, d = s in the blocks where q - z fits int8, gguf's
                                               Q8_0 quantizer on the dequantized values elsewhere)
Groups that are not a multiple of 32 are dequantized and converted as `convert` says too.
Exactness is not assumed: every encoding is decoded again with gguf's reference dequantizer and
compared with mpokit's dequantized weight, value by value.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mpokit.export.blocks import (BLOCK, pack_q4_0, pack_q4_1, pack_q5_0, pack_q8_0, per_block, per_column, decode,
                                  reference_quantize)

__all__ = ["Encoded", "encode_quantized", "encode_dense", "measure"]


@dataclass
class Encoded:
    """One tensor as it goes into the file: `data` is block bytes (rows, row bytes) or F16/F32 values."""

    kind: str  # GGUF type name: Q4_0, Q4_1, Q5_0, Q8_0, F16, F32
    data: np.ndarray
    how: str  # what was done, for the report
    exact: bool = False
    max_abs_diff: float = 0.0
    inexact_values: int = 0
    blocks: int | None = None
    inexact_blocks: int | None = None

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def _codes(qt) -> torch.Tensor:
    return qt.codes().to(torch.int16)  # (rows, cols)


def _mode(qt) -> str:
    return "symmetric" if qt.symmetric else ("zero point" if qt.offset.dtype == torch.uint8 else "float offset")


def encode_quantized(qt, int4_zero_point: str = "q4_1", convert: str = "f16") -> Encoded:
    """The GGUF encoding of a QuantizedTensor (codes, scales, offsets), measured against its dequantized values."""
    ref = qt.dequantize(torch.float32)  # (rows, cols): what mpokit computes with
    mode, bits, g, cols = _mode(qt), qt.bits, qt.group_size, qt.cols
    label = f"{bits}-bit {mode}, group {g}"
    if g % BLOCK or cols % BLOCK:
        return measure(_convert(ref, convert, f"{label}: groups straddle 32-value blocks"), ref)
    q, s = _codes(qt), per_block(qt.scale, g, cols)  # (rows, cols), (rows, nb)
    if mode == "symmetric" and bits <= 4:
        enc = Encoded("Q4_0", pack_q4_0(q - 2 ** (bits - 1) + 8, s), f"{label} -> Q4_0, codes as they are")
    elif mode == "float offset" and bits <= 4:
        enc = Encoded("Q4_1", pack_q4_1(q, s, per_block(qt.offset, g, cols)), f"{label} -> Q4_1, d = scale, m = offset")
    elif mode == "zero point" and bits < 4:
        z = per_column(qt.offset, g, cols).to(torch.int16)
        enc = Encoded("Q4_0", pack_q4_0(q - z + 8, s), f"{label} -> Q4_0, q - z + 8")
    elif mode == "zero point" and bits == 4:
        enc = _zero_point_4bit(qt, q, s, int4_zero_point, label)
    elif mode == "symmetric":  # 8 bits
        enc = Encoded("Q8_0", pack_q8_0(q - 128, s), f"{label} -> Q8_0, q - 128")
    elif convert != "q8_0":  # 8-bit asymmetric, asked to convert to a float type
        return measure(_convert(ref, convert, f"{label}: no GGUF type holds an 8-bit offset grid"), ref)
    else:
        enc = _hybrid_q8_0(qt, q, s, ref, label)
    return measure(enc, ref)


def _zero_point_4bit(qt, q, s, int4_zero_point: str, label: str) -> Encoded:
    g, cols = qt.group_size, qt.cols
    z = per_block(qt.offset, g, cols).float()  # (rows, nb)
    m = (-(z * s.float())).to(torch.float16)  # z*s is exact in float32 (<= 19 significant bits); fp16 rounds it
    if int4_zero_point == "q5_0" or not torch.isfinite(m).all():
        why = "" if int4_zero_point == "q5_0" else " (-z*s overflows float16)"
        zc = per_column(qt.offset, g, cols).to(torch.int16)
        return Encoded("Q5_0", pack_q5_0(q - zc + 16, s), f"{label} -> Q5_0, q - z + 16{why}")
    return Encoded("Q4_1", pack_q4_1(q, s, m), f"{label} -> Q4_1, d = scale, m = -z*scale rounded to float16")


def _hybrid_q8_0(qt, q, s, ref, label: str) -> Encoded:
    """Q8_0 with d = s and q - z in the blocks where q - z fits int8; gguf's quantizer in the others."""
    rows, cols = q.shape
    shifted = q - per_column(qt.offset, qt.group_size, cols).to(torch.int16) if qt.offset.dtype == torch.uint8 else None
    ours = pack_q8_0(shifted.clamp(-128, 127), s).reshape(rows, cols // BLOCK, -1) if shifted is not None else None
    theirs = reference_quantize(ref, "Q8_0").reshape(rows, cols // BLOCK, -1)
    if ours is None:
        data, how = theirs, "gguf's Q8_0 quantizer on the dequantized weight (float offsets have no Q8_0 form)"
    else:
        b = shifted.reshape(rows, cols // BLOCK, BLOCK)
        fits = ((b >= -128) & (b <= 127)).all(-1).numpy()  # (rows, nb)
        data = np.where(fits[..., None], ours, theirs)
        how = ("Q8_0, d = scale, q - z where it fits int8, gguf's Q8_0 quantizer on the dequantized weight in the "
               "other blocks")
    return Encoded("Q8_0", data.reshape(rows, -1), f"{label} -> {how}")


def _convert(ref: torch.Tensor, convert: str, why: str) -> Encoded:
    """Dequantized values in another type: gguf's Q8_0 quantizer, or float16/float32."""
    if convert == "q8_0" and ref.shape[-1] % BLOCK == 0:
        return Encoded("Q8_0", reference_quantize(ref, "Q8_0"), f"{why}; dequantized, gguf's Q8_0 quantizer")
    if convert == "f32":
        return Encoded("F32", ref.numpy().astype(np.float32), f"{why}; dequantized to F32")
    note = "" if convert == "f16" else f" (Q8_0 needs rows of a multiple of {BLOCK} values)"
    return Encoded("F16", ref.to(torch.float16).numpy(), f"{why}; dequantized to F16{note}")


def encode_dense(w: torch.Tensor, dense: str = "auto", what: str = "dense") -> Encoded:
    """A float tensor. auto: the smallest exact form (Q8_0 when its values lie on a Q8_0 grid, as the
    default model's embedding does; else F16 when every value is a float16; else F32); 1-D tensors
    (norms, biases) stay F32, as llama.cpp expects."""
    ref = w.detach().float().cpu()
    if ref.dim() == 1 or dense == "f32":
        return measure(Encoded("F32", ref.numpy(), f"{what}, F32"), ref)
    if dense == "f16":
        return measure(Encoded("F16", ref.to(torch.float16).numpy(), f"{what}, F16"), ref)
    if ref.shape[-1] % BLOCK == 0:
        enc = measure(Encoded("Q8_0", reference_quantize(ref, "Q8_0"), f"{what}, Q8_0: its values lie on a Q8_0 grid"),
                      ref)
        if enc.exact:
            return enc
    half = ref.to(torch.float16)
    if torch.equal(half.float(), ref):
        return measure(Encoded("F16", half.numpy(), f"{what}, F16: every value is a float16"), ref)
    return measure(Encoded("F32", ref.numpy(), f"{what}, F32"), ref)


def measure(enc: Encoded, ref: torch.Tensor) -> Encoded:
    """Decode `enc` with gguf's reference dequantizer and compare it with `ref`, value by value."""
    got = decode(enc.data, enc.kind).reshape(ref.shape)
    bad = got != ref
    enc.max_abs_diff = float((got - ref).abs().max()) if ref.numel() else 0.0
    enc.inexact_values = int(bad.sum())
    enc.exact = enc.inexact_values == 0
    if enc.kind.startswith("Q"):
        per = bad.reshape(ref.shape[0], -1, BLOCK).any(-1)  # (rows, nb)
        enc.blocks, enc.inexact_blocks = per.numel(), int(per.sum())
    return enc
