"""QuantMPOLinear: an MPO layer whose chosen cores (central, auxiliary or all) are stored low-bit.

Each quantized core (r0, o, i, r1) is stored as a packed (r0*o, i*r1) matrix with group-wise
16-bit scales; the other cores stay float Parameters (still trainable). The forward dequantizes
the cores and then takes the cheaper of contraction and dense reconstruction, as MPOLinear does.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpokit.layers.base import MpokitLayer, as_replaced
from mpokit.layers.cast import balance_exponents, cast_dtype, check_cast, narrower, norm_bound
from mpokit.layers.mpo import CONTRACT_OVERHEAD, MPOLinear
from mpokit.layers.quant import QuantizedTensor, QuantLinear
from mpokit.ops.quant import SCALE_DTYPE
from mpokit.ops.contract import contract_flops, dense_flops, reconstruct_flops, tt_apply
from mpokit.ops.tt import core_shapes, tt_to_matrix

__all__ = ["QuantMPOLinear", "select_cores"]


def select_cores(shapes: list[tuple[int, ...]], which: str) -> list[int]:
    """Indices of the cores to quantize: "all", "central" (most parameters) or "auxiliary" (the rest)."""
    central = max(range(len(shapes)), key=lambda k: math.prod(shapes[k]))
    if which == "all":
        return list(range(len(shapes)))
    if which == "central":
        return [central]
    if which == "auxiliary":
        return [k for k in range(len(shapes)) if k != central]
    raise ValueError(f"expected which in ('all', 'central', 'auxiliary'), got {which!r}")


class QuantMPOLinear(MpokitLayer, nn.Module):
    """MPO cores, some of them packed low-bit; a drop-in for the nn.Linear the MPO replaced."""

    def __init__(self, in_features: int, out_features: int, out_dims, in_dims, bonds, quantized: list[int],
                 bits: int = 4, group_size: int = 128, symmetric: bool = False, bias: bool = True,
                 zero_point: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.out_dims, self.in_dims, self.bonds = list(out_dims), list(in_dims), list(bonds)
        self.quantized = sorted(quantized)
        self.shapes = core_shapes(self.out_dims, self.in_dims, self.bonds)
        self.compute_dtype = dtype or torch.get_default_dtype()
        self.qcores = nn.ModuleDict({
            str(k): QuantizedTensor(s[0] * s[1], s[2] * s[3], bits, group_size, symmetric, zero_point, device=device)
            for k, s in enumerate(self.shapes) if k in self.quantized})
        self.fcores = nn.ParameterDict({
            str(k): nn.Parameter(torch.zeros(s, device=device, dtype=dtype))
            for k, s in enumerate(self.shapes) if k not in self.quantized})
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.bits, self.group_size, self.symmetric, self.zero_point = bits, group_size, symmetric, zero_point
        self.kernel = "auto"  # as QuantLinear.kernel; used by the two-factor (low-rank) layout only

    def factor_views(self) -> tuple[QuantLinear, QuantLinear] | None:
        """(B, A) as QuantLinear layers sharing this layer's packed cores, for the low-rank layout
        (out,1)x(1,in) with both cores quantized: y = A (B x) runs on the packed kernels where the grid
        allows (QuantLinear.kernel_path). None for any other layout. Not submodules: no state of their own."""
        if not (len(self.shapes) == 2 and self.quantized == [0, 1] and self.in_dims[0] == 1 and self.out_dims[1] == 1):
            return None
        views = self.__dict__.get("_factor_views")
        if views is None:
            rank = self.bonds[0]
            views = []
            for k, (i, o) in (("1", (self.in_features, rank)), ("0", (rank, self.out_features))):
                q = self.qcores[k]
                view = QuantLinear(i, o, q.bits, q.group_size, q.symmetric, bias=False, zero_point=q.zero_point,
                                   device="meta")
                view.qweight = q
                views.append(view)
            self.__dict__["_factor_views"] = views = tuple(views)
        for view in views:
            view.kernel, view.compute_dtype = self.kernel, self.compute_dtype
        return views

    @classmethod
    def from_mpo(cls, layer: MPOLinear, which: str = "all", *, bits: int = 4, group_size: int = 128,
                 symmetric: bool = False, clip_ratios: tuple[float, ...] | None = None,
                 zero_point: bool = True) -> "QuantMPOLinear":
        cores = [c.detach() for c in layer.cores]
        if max(float(c.abs().max()) for c in cores) > torch.finfo(SCALE_DTYPE).max / 2:
            exps = balance_exponents([float(c.double().norm()) for c in cores])  # 16-bit scales would overflow:
            if exps is not None:  # move norm between the cores (exact, the product is unchanged)
                cores = [c * 2.0 ** e for c, e in zip(cores, exps)]
        quantized = select_cores([tuple(c.shape) for c in cores], which)
        new = cls(layer.in_features, layer.out_features, layer.out_dims, layer.in_dims, layer.bonds, quantized,
                  bits, group_size, symmetric, bias=layer.bias is not None, zero_point=zero_point,
                  device=cores[0].device, dtype=cores[0].dtype)
        with torch.no_grad():
            for k, c in enumerate(cores):
                r0, o, i, r1 = c.shape
                if k in quantized:
                    new.qcores[str(k)].set_from(c.reshape(r0 * o, i * r1), clip_ratios)
                else:
                    new.fcores[str(k)].copy_(c)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        return new

    def cores(self) -> list[torch.Tensor]:
        """All cores as float tensors (quantized ones dequantized now)."""
        out = []
        for k, s in enumerate(self.shapes):
            out.append(self.qcores[str(k)].dequantize(self.compute_dtype).reshape(s) if k in self.quantized
                       else self.fcores[str(k)])
        return out

    def full_weight(self) -> torch.Tensor:
        return tt_to_matrix(self.cores())[: self.out_features, : self.in_features]

    @property
    def weight(self) -> torch.Tensor:
        return self.full_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dim {self.in_features}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        views = self.factor_views()
        if views is not None and self.in_features == self.in_dims[1] and self.out_features == self.out_dims[0]:
            y = views[1](views[0](x2))  # (n, out): two packed GEMMs, no dequantized weight kept
            y = y + self.bias.to(y.dtype) if self.bias is not None else y
            return y.reshape(*lead, self.out_features)
        cores = self.cores()
        dense = dense_flops(x2.shape[0], self.out_features, self.in_features) + reconstruct_flops(self.shapes)
        if CONTRACT_OVERHEAD * contract_flops(x2.shape[0], self.shapes) < dense:
            cols = math.prod(self.in_dims)
            xp = F.pad(x2, (0, cols - self.in_features)) if cols != self.in_features else x2
            y = tt_apply(xp, cores)[:, : self.out_features]
            y = y + self.bias if self.bias is not None else y
        else:
            y = F.linear(x2, tt_to_matrix(cores)[: self.out_features, : self.in_features], self.bias)
        return y.reshape(*lead, self.out_features)

    def to_mpo(self) -> MPOLinear:
        """A float MPOLinear with the dequantized cores (the quantization error stays)."""
        new = MPOLinear(self.in_features, self.out_features, self.out_dims, self.in_dims, self.bonds,
                        bias=self.bias is not None, dtype=self.compute_dtype)
        new.set_cores([c.detach() for c in self.cores()])
        if self.bias is not None:
            new.bias.data.copy_(self.bias.detach())
        return new

    def to_linear(self) -> nn.Linear:
        return self.to_mpo().to_linear()

    def to_dense(self) -> nn.Module:
        """The nn.Linear (or transformers Conv1D, for orig_type "Conv1D") with the dequantized cores."""
        return as_replaced(self.to_linear(), getattr(self, "orig_type", None))

    def storage_bytes(self) -> int:
        floats = sum(p.numel() * p.element_size() for p in self.fcores.values())
        bias = self.bias.numel() * self.bias.element_size() if self.bias is not None else 0
        return sum(q.storage_bytes() for q in self.qcores.values()) + floats + bias

    def layer_label(self) -> str:
        name = getattr(self, "mpokit_name", None)
        desc = f"QuantMPOLinear {self.out_features}x{self.in_features}"
        return f"layer {name!r} ({desc})" if name else desc

    def _core_max_abs(self) -> float:
        floats = [float(c.detach().abs().max()) for c in self.fcores.values() if c.numel()]
        return max(floats + [q.abs_bound() for q in self.qcores.values()], default=0.0)

    @torch.no_grad()
    def balance_norms_(self) -> list[int] | None:
        """Scale the cores by powers of two to about equal norms (float cores directly, quantized ones
        through their scales): the product is unchanged exactly (see MPOModule.balance_norms_)."""
        cores = self.cores()
        exps = balance_exponents([float(c.detach().double().norm()) for c in cores])
        if exps is not None:
            for k, e in enumerate(exps):
                if k in self.quantized:
                    self.qcores[str(k)].scale_by_pow2_(e)
                elif e:
                    self.fcores[str(k)].mul_(2.0 ** e)
        return exps

    def _apply(self, fn, recurse=True):
        source = self.compute_dtype
        target = cast_dtype(fn, source)
        narrowing = narrower(target, source)
        if narrowing and self._core_max_abs() > torch.finfo(target).max:  # the cores would overflow: rebalance
            self.balance_norms_()
        out = super()._apply(fn, recurse)
        self.compute_dtype = target
        if narrowing:
            stored = [*self.fcores.values(), *([self.bias] if self.bias is not None else [])]
            check_cast(self.layer_label(), target, stored, self._dequantized_cores,
                       max((q.abs_bound() for q in self.qcores.values()), default=0.0))
            cores = self.cores()
            check_cast(self.layer_label(), target, [], lambda: tt_to_matrix([c.detach() for c in cores]),
                       norm_bound(cores))
        return out

    @torch.no_grad()
    def _dequantized_cores(self) -> torch.Tensor:
        """The quantized cores dequantized into compute_dtype, flattened (for finiteness checks)."""
        return torch.cat([self.qcores[str(k)].dequantize(self.compute_dtype).reshape(-1) for k in self.quantized]
                         or [torch.zeros(0, dtype=self.compute_dtype)])

    def spec(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
                "out_dims": self.out_dims, "in_dims": self.in_dims, "bonds": self.bonds, "quantized": self.quantized,
                "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "zero_point": self.zero_point, "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device=None, dtype=None) -> "QuantMPOLinear":
        return cls(spec["in_features"], spec["out_features"], spec["out_dims"], spec["in_dims"], spec["bonds"],
                   spec["quantized"], spec["bits"], spec["group_size"], spec["symmetric"], bias=spec["bias"],
                   zero_point=spec.get("zero_point", True), device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"{self.out_features}x{self.in_features}, out_dims={self.out_dims}, in_dims={self.in_dims}, "
                f"bonds={self.bonds}, quantized cores={self.quantized}, bits={self.bits}, group_size={self.group_size}")
