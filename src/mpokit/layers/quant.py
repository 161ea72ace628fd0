"""QuantLinear: a Linear whose weight is stored as packed low-bit codes + 16-bit group scales.

Storage is real: `packed` holds ceil(out * in * bits / 8) bytes, `scale` (and `offset` when
asymmetric) one float16 per group of `group_size` input columns per output row.

Forward paths (`kernel_path()` says which a layer can take): on the CPU, outside autograd, layers
of <= 4 bits whose groups are a multiple of 32 run torch's packed int4 kernel, and 8-bit layers
with one group per row its int8 kernel (ops/quant_kernels.py; the kernel's copy of the codes is
built on the first call and costs 0.5 or 1 byte per weight). The kernels compute in bfloat16, so
`kernel="auto"` (default) uses them for bfloat16 inputs only and float32 models keep their exact
numerics; `kernel="fast"` also casts float32 inputs of at most FAST_MAX_ROWS rows (decoding) to
bfloat16 for them and keeps larger inputs (prefill) on the reference path, where the dequantized
float32 GEMM is faster here; `kernel="always"` takes the kernels for every input (bfloat16
rounding). The reference path, and every layer with `kernel="reference"`, dequantizes the weight
on each call (or once, with `cache_weight=True`, which trades memory for speed) and runs F.linear.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpokit.layers.base import MpokitLayer, as_replaced
from mpokit.layers.cast import CastOverflowError, cast_dtype, check_cast, narrower
from mpokit.ops import quant_kernels as kernels
from mpokit.ops.quant import (SCALE_DTYPE, Quantized, check_bits, dequantize, num_groups, pack_bits, quantize,
                              unpack_bits)

__all__ = ["QuantLinear", "QuantizedTensor", "QuantizedWeight", "KERNELS", "set_kernel_", "kernel_paths"]

KERNELS = ("auto", "fast", "always", "reference")  # auto: packed kernels for bfloat16 inputs where the grid allows
# "fast": float32 inputs up to this many rows take the kernels. Measured on SmolLM2 int4 g64, 1 thread
# (docs/benchmarks/deploy.md): decode 17.6x faster on the kernel, a 512-token prefill 1.7x slower.
FAST_MAX_ROWS = 32
# The reference path dequantizes weights above this many entries a slice of rows at a time (a tied
# 49152x576 lm_head would otherwise take 113 MB of float32, plus the unpacking, at every prefill).
CHUNK_NUMEL = 1 << 22


class QuantizedTensor(nn.Module):
    """Packed storage of one (rows, cols) matrix; `dequantize()` rebuilds it (used for MPO cores too)."""

    def __init__(self, rows: int, cols: int, bits: int, group_size: int, symmetric: bool = False,
                 zero_point: bool = True, device=None):
        super().__init__()
        check_bits(bits)
        self.rows, self.cols, self.bits, self.group_size, self.symmetric = rows, cols, bits, group_size, symmetric
        self.zero_point = zero_point and not symmetric
        groups = num_groups(cols, group_size)
        offset_dtype = torch.uint8 if self.zero_point else SCALE_DTYPE  # integer zero points or 16-bit offsets
        self.register_buffer("packed", torch.zeros(math.ceil(rows * cols * bits / 8), dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(rows, groups, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("offset", None if symmetric else torch.zeros(rows, groups, dtype=offset_dtype, device=device))

    @torch.no_grad()
    def set_from(self, matrix: torch.Tensor, clip_ratios: tuple[float, ...] | None = None) -> None:
        if tuple(matrix.shape) != (self.rows, self.cols):
            raise ValueError(f"expected a ({self.rows}, {self.cols}) matrix, got {tuple(matrix.shape)}")
        self.set_quantized(quantize(matrix, self.bits, self.group_size, self.symmetric, clip_ratios,
                                    self.zero_point))

    @torch.no_grad()
    def set_quantized(self, q: Quantized) -> None:
        """Store codes computed elsewhere (e.g. by GPTQ) in this tensor's layout."""
        layout = (q.bits, q.group_size, q.offset is None, q.offset is not None and q.offset.dtype == torch.uint8)
        if tuple(q.codes.shape) != (self.rows, self.cols) or layout != (self.bits, self.group_size, self.symmetric,
                                                                         self.zero_point):
            raise ValueError(f"expected codes ({self.rows}, {self.cols}) with bits={self.bits}, group_size="
                             f"{self.group_size}, symmetric={self.symmetric}, zero_point={self.zero_point}; got "
                             f"{tuple(q.codes.shape)} with (bits, group, symmetric, zero_point) = {layout}")
        for kind, t in (("scales", q.scale), ("offsets", q.offset)):  # 16-bit: large weights overflow them
            if t is not None and t.is_floating_point() and not torch.isfinite(t).all():
                raise CastOverflowError(f"{self.layer_label()}: {int((~torch.isfinite(t)).sum())} of its "
                                        f"{t.dtype} quantization {kind} overflow (they hold at most "
                                        f"{torch.finfo(t.dtype).max:.4g}: the weights are too large); quantize a "
                                        "rescaled weight or keep this layer unquantized")
        self.packed = pack_bits(q.codes.reshape(-1), self.bits)  # (ceil(rows*cols*bits/8),)
        self.scale = q.scale
        if not self.symmetric:
            self.offset = q.offset

    def abs_bound(self) -> float:
        """An upper bound on |entries| of the dequantized matrix, from scales and offsets alone."""
        scale = float(self.scale.float().abs().max())
        if self.symmetric:
            return scale * 2 ** (self.bits - 1)
        if self.offset.dtype == torch.uint8:  # |code - zero point| < 2**bits
            return scale * (2 ** self.bits - 1)
        return scale * (2 ** self.bits - 1) + float(self.offset.float().abs().max())

    def layer_label(self) -> str:
        name = getattr(self, "mpokit_name", None)
        desc = f"quantized {self.rows}x{self.cols} matrix"
        return f"layer {name!r} ({desc})" if name else desc

    @torch.no_grad()
    def scale_by_pow2_(self, exponent: int) -> None:
        """Multiply the represented matrix by 2**exponent exactly: scales (and 16-bit float offsets)
        are scaled, the codes and integer zero points stay."""
        if not exponent:
            return
        self.scale.mul_(2.0 ** exponent)
        if self.offset is not None and self.offset.is_floating_point():
            self.offset.mul_(2.0 ** exponent)
        check_cast(self.layer_label(), self.scale.dtype, [t for t in (self.scale, self.offset) if t is not None])

    def codes(self) -> torch.Tensor:
        """The unpacked (rows, cols) uint8 codes."""
        return unpack_bits(self.packed, self.bits, self.rows * self.cols).reshape(self.rows, self.cols)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes(), self.scale, self.offset, self.bits, self.group_size, dtype=dtype)

    def dequantize_rows(self, rows, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows `rows` (index tensor or slice) of the dequantized matrix, unpacking only those rows."""
        if (self.cols * self.bits) % 8:  # rows do not start on a byte: no row slicing of the codes
            return self.dequantize(dtype)[rows]
        packed = self.packed.view(self.rows, self.cols * self.bits // 8)[rows]  # (n, row bytes)
        offset = None if self.offset is None else self.offset[rows]
        return dequantize(unpack_bits(packed, self.bits, self.cols), self.scale[rows], offset, self.bits,
                          self.group_size, dtype=dtype)

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.offset) if t is not None)

    def _apply(self, fn, recurse=True):
        # .to(dtype)/.half() must not re-type the 16-bit scales or the uint8 codes; devices still move
        saved = {k: getattr(self, k) for k in ("scale", "offset") if getattr(self, k) is not None}
        out = super()._apply(fn, recurse)
        for k, t in saved.items():
            cur = getattr(self, k)
            if cur.dtype != t.dtype:
                setattr(self, k, t.to(cur.device))
        return out

    def extra_repr(self) -> str:
        return (f"{self.rows}x{self.cols}, bits={self.bits}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}, zero_point={self.zero_point}")


class QuantizedWeight:
    """The grid of a layer's `qweight` (QuantLinear, QuantEmbedding)."""

    qweight: QuantizedTensor

    @property
    def bits(self) -> int:
        return self.qweight.bits

    @property
    def group_size(self) -> int:
        return self.qweight.group_size

    @property
    def symmetric(self) -> bool:
        return self.qweight.symmetric


class QuantLinear(QuantizedWeight, MpokitLayer, nn.Module):
    """Drop-in for nn.Linear with a group-wise quantized weight (2/3/4/8 bits)."""

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128,
                 symmetric: bool = False, bias: bool = True, cache_weight: bool = False, zero_point: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qweight = QuantizedTensor(out_features, in_features, bits, group_size, symmetric, zero_point, device=device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.compute_dtype = dtype or torch.get_default_dtype()
        self.cache_weight = cache_weight
        self.kernel = "auto"
        self._cached: tuple[tuple, torch.Tensor] | None = None
        self._packed_for_kernel: tuple[tuple, tuple] | None = None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, bits: int = 4,
                    group_size: int = 128, symmetric: bool = False, clip_ratios: tuple[float, ...] | None = None,
                    cache_weight: bool = False, zero_point: bool = True) -> "QuantLinear":
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, bits, group_size, symmetric, bias=bias is not None, cache_weight=cache_weight,
                    zero_point=zero_point, device=weight.device, dtype=weight.dtype)
        layer.qweight.set_from(weight, clip_ratios)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    @classmethod
    def from_quantized(cls, q: Quantized, bias: torch.Tensor | None = None, *, cache_weight: bool = False,
                       dtype=None) -> "QuantLinear":
        """A layer holding codes computed elsewhere (GPTQ), in the same packed layout."""
        out_f, in_f = q.codes.shape
        symmetric, zero_point = q.offset is None, q.offset is not None and q.offset.dtype == torch.uint8
        layer = cls(in_f, out_f, q.bits, q.group_size, symmetric, bias=bias is not None, cache_weight=cache_weight,
                    zero_point=zero_point, device=q.codes.device, dtype=dtype)
        layer.qweight.set_quantized(q)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "QuantLinear":
        return cls.from_weight(linear.weight, linear.bias, **kwargs)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (out, in) weight, for code that reads `.weight`."""
        if self.cache_weight:
            p = self.qweight.packed
            key = (id(p), p._version, p.device)
            if self._cached is None or self._cached[0] != key:
                self._cached = (key, self.qweight.dequantize(self.compute_dtype))
            return self._cached[1]
        return self.qweight.dequantize(self.compute_dtype)

    def kernel_path(self) -> str:
        """"int4", "int8" or "reference": the path a CPU forward outside autograd takes."""
        q = self.qweight
        if self.kernel == "reference" or q.packed.device.type != "cpu" or not kernels.kernels_available():
            return "reference"
        if kernels.int4_group(q.bits, q.group_size, q.cols):
            return "int4"
        if q.bits == 8 and q.group_size >= q.cols:
            return "int8"
        return "reference"

    def _kernel_weights(self, path: str) -> tuple:
        """The kernel's copy of the codes, built once per change of the packed codes."""
        q = self.qweight
        key = (path, id(q.packed), q.packed._version, q.scale._version)
        if self._packed_for_kernel is None or self._packed_for_kernel[0] != key:
            codes = q.codes()
            if path == "int4":
                group = kernels.int4_group(q.bits, q.group_size, q.cols)
                packed, scales_and_zeros = kernels.int4_pack(codes, q.scale, q.offset, q.bits, q.group_size, group)
                weights = (packed, group, scales_and_zeros)
            else:
                weights = kernels.int8_pack(codes, q.scale, q.offset)
            self._packed_for_kernel = (key, weights)
        return self._packed_for_kernel[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dim {self.in_features}, got shape {tuple(x.shape)}")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        path = self.kernel_path()
        rows = x.numel() // self.in_features
        wanted = x.dtype == kernels.KERNEL_DTYPE or (x.is_floating_point() and (
            self.kernel == "always" or (self.kernel == "fast" and rows <= FAST_MAX_ROWS)))
        autograd = torch.is_grad_enabled() and x.requires_grad  # the kernels have no backward
        if path != "reference" and wanted and x.device.type == "cpu" and not autograd:
            mm = kernels.int4_mm if path == "int4" else kernels.int8_mm
            y = mm(x, *self._kernel_weights(path))
            return y if bias is None else y + bias
        if self.cache_weight or autograd or self.out_features * self.in_features <= CHUNK_NUMEL:
            return F.linear(x, self.weight.to(x.dtype), bias)
        step = max(1, CHUNK_NUMEL // self.in_features)  # a large head: never the whole dense weight at once
        return torch.cat([F.linear(x, self.qweight.dequantize_rows(slice(i, i + step), x.dtype),
                                   None if bias is None else bias[i:i + step])
                          for i in range(0, self.out_features, step)], dim=-1)

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the dequantized weight (the quantization error stays)."""
        w = self.qweight.dequantize(self.compute_dtype)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def to_dense(self) -> nn.Module:
        """The nn.Linear (or transformers Conv1D, for orig_type "Conv1D") with the dequantized weight."""
        return as_replaced(self.to_linear(), getattr(self, "orig_type", None))

    def storage_bytes(self) -> int:
        """Bytes of packed codes + 16-bit scales/offsets + bias."""
        bias = self.bias.numel() * self.bias.element_size() if self.bias is not None else 0
        return self.qweight.storage_bytes() + bias

    def _apply(self, fn, recurse=True):
        self._cached = self._packed_for_kernel = None
        source = self.compute_dtype
        out = super()._apply(fn, recurse)
        if self.bias is not None:
            self.compute_dtype = self.bias.dtype
        else:  # follow a dtype conversion through a probe tensor
            self.compute_dtype = cast_dtype(fn, self.compute_dtype)
        if narrower(self.compute_dtype, source):  # the weight is now dequantized into a narrower dtype
            label = getattr(self, "mpokit_name", None)
            label = f"layer {label!r} (QuantLinear)" if label else f"QuantLinear {self.out_features}x{self.in_features}"
            check_cast(label, self.compute_dtype, [t for t in (self.bias,) if t is not None],
                       lambda: self.qweight.dequantize(self.compute_dtype), self.qweight.abs_bound())
        return out

    def spec(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "zero_point": self.qweight.zero_point, "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device=None, dtype=None) -> "QuantLinear":
        return cls(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"], spec["symmetric"],
                   bias=spec["bias"], zero_point=spec.get("zero_point", True), device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, bias={self.bias is not None}")


def _kernel_layers(model: nn.Module) -> list[QuantLinear]:
    """Every QuantLinear, and the factor views of low-rank QuantMPOLinear layers (quant_mpo.py)."""
    out = []
    for m in model.modules():
        if isinstance(m, QuantLinear):
            out.append(m)
        elif hasattr(m, "factor_views") and m.factor_views() is not None:
            out.extend(m.factor_views())
    return out


def set_kernel_(model: nn.Module, kernel: str) -> dict[str, int]:
    """Set every quantized layer's kernel choice (KERNELS); returns {path: layers} it allows."""
    if kernel not in KERNELS:
        raise ValueError(f"expected kernel in {KERNELS}, got {kernel!r}")
    for m in model.modules():
        if hasattr(m, "factor_views"):  # a low-rank layer's views copy its choice on every call
            m.kernel = kernel
    for m in _kernel_layers(model):
        m.kernel = kernel
        m._packed_for_kernel = None
    return kernel_paths(model)


def kernel_paths(model: nn.Module) -> dict[str, int]:
    """How many quantized matrices take each forward path (int4, int8, reference); a low-rank layer's
    two factors count as two."""
    return dict(Counter(m.kernel_path() for m in _kernel_layers(model)))
