"""MPOConv2d: an nn.Conv2d whose kernel, read as an (out, in * kh * kw) matrix, is stored as MPO cores.

The kernel matrix is the one F.conv2d uses after im2col (F.unfold orders columns as (in, kh, kw)),
so the layer reuses MPOModule's storage, decomposition and casting. Forward paths, picked by FLOPs
as MPOLinear picks them ("auto"), or forced by forward_mode:
- "dense": the rebuilt kernel through F.conv2d (cached outside autograd);
- "contract", low-rank 2-core layout W = U @ V: a conv with `rank` output channels (V as kernels),
  then a 1x1 conv with U and the bias;
- "contract", other layouts: im2col (F.unfold) patches through the cores one at a time (tt_apply).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpokit.layers.mpo import CONTRACT_OVERHEAD, FORWARD_MODES, LOWRANK_OVERHEAD, MPOModule, make_layout
from mpokit.ops.contract import contract_flops, dense_flops, reconstruct_flops, tt_apply

__all__ = ["MPOConv2d", "conv_matrix"]


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)


def conv_matrix(conv: nn.Conv2d) -> torch.Tensor:
    """The (out, in * kh * kw) kernel matrix of a Conv2d (a view of its weight)."""
    return conv.weight.reshape(conv.out_channels, -1)


def check_conv(conv: nn.Module) -> None:
    """What MPOConv2d can stand for: a 2-D convolution with groups=1 and zero padding."""
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"expected an nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(f"expected a Conv2d with groups=1 (a grouped kernel is not one matrix), "
                         f"got groups={conv.groups}")
    if conv.padding_mode != "zeros":
        raise ValueError(f"expected a Conv2d with padding_mode='zeros', got {conv.padding_mode!r}")


class MPOConv2d(MPOModule):
    """Drop-in for nn.Conv2d (groups=1, zero padding) whose kernel matrix (out, in*kh*kw) is MPO cores."""

    def __init__(self, in_channels, out_channels, kernel_size, out_dims, in_dims, bonds, stride=1, padding=0,
                 dilation=1, bias=True, forward_mode="auto", device=None, dtype=None):
        super().__init__()
        if forward_mode not in FORWARD_MODES:
            raise ValueError(f"expected forward_mode in {FORWARD_MODES}, got {forward_mode!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        if isinstance(self.padding, str) and self.padding not in ("same", "valid"):
            raise ValueError(f"expected padding 'same', 'valid' or ints, got {padding!r}")
        if self.padding == "same" and self.stride != (1, 1):
            raise ValueError(f"expected stride 1 with padding='same' (as nn.Conv2d), got {self.stride}")
        self.rows, self.cols = out_channels, in_channels * math.prod(self.kernel_size)
        self.forward_mode = forward_mode
        self._init_cores(out_dims, in_dims, bonds, device, dtype)
        self.bias = nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype)) if bias else None

    # ---- construction ------------------------------------------------------------
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, num_cores=3, out_dims=None, in_dims=None, lowrank=False, max_bond=None,
                  cutoff=None, max_params=None, forward_mode="auto") -> "MPOConv2d":
        """Decompose conv's kernel matrix; max_bond / cutoff / max_params truncate as in MPOLinear."""
        layer = cls.empty_like(conv, *make_layout(conv.out_channels, conv_matrix(conv).shape[1], num_cores,
                                                  out_dims, in_dims, lowrank), forward_mode=forward_mode)
        layer._decompose(conv_matrix(conv), max_bond=max_bond, cutoff=cutoff, max_params=max_params)
        return layer

    @classmethod
    def empty_like(cls, conv: nn.Conv2d, out_dims, in_dims, bonds=None, forward_mode="auto") -> "MPOConv2d":
        """A layer with conv's hyperparameters and bias, cores zero (set_cores fills them)."""
        check_conv(conv)
        w = conv.weight
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, out_dims, in_dims,
                    bonds or [1] * (len(out_dims) - 1), stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, bias=conv.bias is not None, forward_mode=forward_mode,
                    device=w.device, dtype=w.dtype)
        if conv.bias is not None:
            layer.bias.data.copy_(conv.bias.detach())
        return layer

    def kernel(self) -> torch.Tensor:
        """The (out, in, kh, kw) kernel: rebuilt with autograd when training, else cached."""
        w = self.full_weight() if self._needs_grad() else self.cached_weight()
        return w.reshape(self.out_channels, self.in_channels, *self.kernel_size)

    @property
    def weight(self) -> torch.Tensor:
        return self.kernel()

    def to_conv(self) -> nn.Conv2d:
        w = self.full_weight().detach()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, bias=self.bias is not None,
                         device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(w.reshape_as(conv.weight))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def to_dense(self) -> nn.Conv2d:
        return self.to_conv()

    # ---- forward -------------------------------------------------------------------
    def _pads(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) zero padding, as F.conv2d applies it ('same' puts the odd one right)."""
        if self.padding == "valid":
            return 0, 0, 0, 0
        if self.padding == "same":
            th, tw = (d * (k - 1) for d, k in zip(self.dilation, self.kernel_size))
            return tw // 2, tw - tw // 2, th // 2, th - th // 2
        ph, pw = self.padding
        return pw, pw, ph, ph

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        left, right, top, bottom = self._pads(h, w)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        return (h + top + bottom - dh * (kh - 1) - 1) // sh + 1, (w + left + right - dw * (kw - 1) - 1) // sw + 1

    def choose_path(self, positions: int) -> str:
        """"dense" or "contract" for `positions` = batch * output pixels, by FLOPs (as MPOLinear)."""
        if self.forward_mode != "auto":
            return self.forward_mode
        shapes = [tuple(c.shape) for c in self.cores]
        dense = dense_flops(positions, self.rows, self.cols)
        if self._needs_grad():
            dense += reconstruct_flops(shapes)
        if self.is_lowrank:
            rank = self.bonds[0]
            lowrank = dense_flops(positions, rank, self.cols) + dense_flops(positions, self.rows, rank)
            return "contract" if (LOWRANK_OVERHEAD if self._needs_grad() else 1.0) * lowrank < dense else "dense"
        return "contract" if CONTRACT_OVERHEAD * contract_flops(positions, shapes) < dense else "dense"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"expected input (N, {self.in_channels}, H, W) or ({self.in_channels}, H, W), "
                             f"got shape {tuple(x.shape)}")
        if x.dim() == 3:
            return self.forward(x[None])[0]
        n, _, h, w = x.shape
        ho, wo = self.output_size(h, w)
        path = self.choose_path(n * ho * wo)
        if path == "dense":
            return F.conv2d(x, self.kernel(), self.bias, self.stride, self.padding, self.dilation)
        if self.is_lowrank:  # conv to `rank` channels with V as kernels, then a 1x1 conv with U
            rank = self.bonds[0]
            u = self.cores[0].reshape(self.out_dims[0], rank)[: self.rows]  # (out, rank)
            v = self.cores[1].reshape(rank, self.in_dims[1])[:, : self.cols]  # (rank, in*kh*kw)
            mid = F.conv2d(x, v.reshape(rank, self.in_channels, *self.kernel_size), None, self.stride,
                           self.padding, self.dilation)  # (N, rank, Ho, Wo)
            return F.conv2d(mid, u[:, :, None, None], self.bias)  # (N, out, Ho, Wo)
        xp = F.pad(x, self._pads(h, w))
        patches = F.unfold(xp, self.kernel_size, dilation=self.dilation, stride=self.stride)  # (N, in*kh*kw, L)
        flat = patches.transpose(1, 2).reshape(-1, self.cols)  # (N L, in*kh*kw)
        pad_cols = math.prod(self.in_dims) - self.cols
        if pad_cols:
            flat = F.pad(flat, (0, pad_cols))
        y = tt_apply(flat, list(self.cores))[:, : self.rows]  # (N L, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(n, ho * wo, self.rows).transpose(1, 2).reshape(n, self.rows, ho, wo)

    # ---- protocol --------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device=None, dtype=None) -> "MPOConv2d":
        return cls(spec["in_channels"], spec["out_channels"], spec["kernel_size"], spec["out_dims"], spec["in_dims"],
                   spec["bonds"], stride=spec["stride"], padding=spec["padding"], dilation=spec["dilation"],
                   bias=spec["bias"], forward_mode=spec.get("forward_mode", "auto"), device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, out_dims={self.out_dims}, "
                f"in_dims={self.in_dims}, bonds={self.bonds}")
