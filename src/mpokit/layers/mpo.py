"""nn.Modules holding a weight as MPO cores: MPOLinear and MPOEmbedding.

Forward paths:
- "contract": apply the cores to the input one at a time (cheap when bonds are small);
- "dense": rebuild W from the cores every call (what the research code always did);
- "auto" (default): pick by FLOP estimate. Outside autograd the rebuilt W is cached
  and reused until a core changes (tracked by tensor version counters), so a layer
  that cannot win by contraction costs the same as nn.Linear at inference.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpokit.layers.base import MpokitLayer, as_replaced
from mpokit.layers.cast import (CastOverflowError, balance_exponents, cast_dtype, check_cast, max_abs, narrower,
                                norm_bound)
from mpokit.ops.contract import contract_flops, dense_flops, reconstruct_flops, tt_apply, tt_rows
from mpokit.ops.factorize import choose_local_dims
from mpokit.ops.tt import TTInfo, check_finite, core_shapes, pad_matrix, tt_svd, tt_svd_to_budget, tt_to_matrix

__all__ = ["MPOCores", "MPOModule", "MPOLinear", "MPOEmbedding", "make_layout", "FORWARD_MODES", "CastOverflowError",
           "cast_dtype", "narrower", "balance_exponents", "check_cast", "norm_bound"]

FORWARD_MODES = ("auto", "contract", "dense")
# Contraction runs several small matmuls with permutes between them; charge it extra.
CONTRACT_OVERHEAD = 2.0
# The low-rank layout contracts as two plain GEMMs (x @ V.T @ U.T): measured ~1.1-1.5x its FLOP share
# when training. Outside autograd it contracts whenever it has fewer FLOPs: the dense path would cache
# a rebuilt weight (more memory than the dense model) and decoding is bound by the bytes it reads.
LOWRANK_OVERHEAD = 1.25


def make_layout(
    out_features: int,
    in_features: int,
    num_cores: int = 3,
    out_dims: list[int] | None = None,
    in_dims: list[int] | None = None,
    lowrank: bool = False,
) -> tuple[list[int], list[int]]:
    """Local dims for an (out, in) weight. lowrank=True gives the 2-core (out,1)x(1,in) layout = U @ V."""
    if lowrank:
        return [out_features, 1], [1, in_features]
    if num_cores < 1:
        raise ValueError(f"expected num_cores >= 1, got {num_cores}")
    out_dims = list(out_dims) if out_dims else choose_local_dims(out_features, num_cores)
    in_dims = list(in_dims) if in_dims else choose_local_dims(in_features, num_cores)
    if len(out_dims) != len(in_dims):
        raise ValueError(f"expected as many out dims as in dims, got {out_dims} and {in_dims}")
    for name, dims, size in (("out", out_dims, out_features), ("in", in_dims, in_features)):
        if any(d < 1 for d in dims) or math.prod(dims) < size:
            raise ValueError(f"expected {name} dims with product >= {size}, got {dims} (product {math.prod(dims)})")
    return out_dims, in_dims


class MPOCores:
    """Storage of one matrix as cores (r_{k-1}, o_k, i_k, r_k) of its padded (prod o, prod i) form: the
    cores, their cache of the rebuilt matrix, decomposition, and dtype casts that keep them finite.
    A mixin placed before nn.Module; MPOModule adds the layer protocol, and mpo_rnn.MPOMatrix (one
    gate matrix of an MPO LSTM/GRU, not a layer of its own) uses it as is."""

    rows: int  # logical matrix rows (before padding)
    cols: int

    def _init_cores(self, out_dims, in_dims, bonds, device=None, dtype=None) -> None:
        self.out_dims, self.in_dims = list(out_dims), list(in_dims)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.zeros(s, device=device, dtype=dtype)) for s in core_shapes(out_dims, in_dims, list(bonds))
        )
        self.info: TTInfo | None = None
        self._cache: tuple[tuple, torch.Tensor] | None = None

    # ---- structure -------------------------------------------------------------
    @property
    def bonds(self) -> list[int]:
        return [c.shape[-1] for c in self.cores][:-1]

    @property
    def num_cores(self) -> int:
        return len(self.cores)

    @property
    def is_lowrank(self) -> bool:
        """The 2-core (out,1)x(1,in) layout, i.e. W = U @ V."""
        return len(self.out_dims) == 2 and self.out_dims[1] == 1 and self.in_dims[0] == 1

    @property
    def central_index(self) -> int:
        """Index of the core with most parameters: the MPO 'central tensor'."""
        return max(range(len(self.cores)), key=lambda k: self.cores[k].numel())

    def auxiliary_parameters(self) -> list[nn.Parameter]:
        c = self.central_index
        return [p for k, p in enumerate(self.cores) if k != c]

    def core_params(self) -> int:
        return sum(c.numel() for c in self.cores)

    def set_cores(self, cores: list[torch.Tensor], info: TTInfo | None = None) -> None:
        """Replace the cores (shapes may change, e.g. after truncation). Cores computed in a wider
        dtype than the layer's are rebalanced first when they would overflow it (see balance_norms_)."""
        dtype, device = self.cores[0].dtype, self.cores[0].device
        cores = [c.detach() for c in cores]
        narrowing = any(narrower(dtype, c.dtype) for c in cores)
        if narrowing and max_abs(cores) > torch.finfo(dtype).max:
            exps = balance_exponents([float(c.double().norm()) for c in cores])
            if exps is not None:
                cores = [c * 2.0 ** e for c, e in zip(cores, exps)]
        self.cores = nn.ParameterList(nn.Parameter(c.to(device=device, dtype=dtype).contiguous()) for c in cores)
        self.info, self._cache = info, None
        if narrowing:
            check_cast(self.layer_label(), dtype, list(self.cores), self._rebuilt, norm_bound(self.cores))

    # ---- weight ----------------------------------------------------------------
    def full_weight(self) -> torch.Tensor:
        """The (rows, cols) matrix, differentiable through the cores."""
        return tt_to_matrix(list(self.cores))[: self.rows, : self.cols]

    def _needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(c.requires_grad for c in self.cores)

    def cached_weight(self) -> torch.Tensor:
        """full_weight() reused across calls while no core has changed (no autograd)."""
        key = tuple((id(c), c._version, c.device, c.dtype) for c in self.cores)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.full_weight().contiguous())
        return self._cache[1]

    def clear_cache(self) -> None:
        self._cache = None

    def layer_label(self) -> str:
        name = getattr(self, "mpokit_name", None)
        desc = f"{type(self).__name__} {self.rows}x{self.cols}"
        return f"layer {name!r} ({desc})" if name else desc

    @torch.no_grad()
    def balance_norms_(self) -> list[int] | None:
        """Scale the cores by powers of two to about equal Frobenius norms (the MPO gauge freedom:
        the product, hence the layer, is unchanged exactly). TT-SVD leaves the whole norm in the
        last core, which overflows float16 for weights of large magnitude while balanced cores fit.
        Refused (CastOverflowError) for cores shared with other layers (method share)."""
        if getattr(self, "shared_with", None):
            raise CastOverflowError(f"{self.layer_label()}: its cores are too large for a 16-bit float and "
                                    f"share a central core with other layers ({self.shared_with}), so their "
                                    "norms cannot be rebalanced alone; keep the model in torch.bfloat16 or "
                                    "torch.float32")
        exps = balance_exponents([float(c.detach().double().norm()) for c in self.cores])
        if exps is not None:
            for c, e in zip(self.cores, exps):
                if e:
                    c.mul_(2.0 ** e)
            self._cache = None
        return exps

    def _apply(self, fn, recurse=True):  # .to()/.half() etc. invalidate the cache
        self._cache = None
        source = self.cores[0].dtype if len(self.cores) else None
        target = cast_dtype(fn, source) if source is not None else None
        narrowing = target is not None and narrower(target, source)
        if narrowing and max_abs(self.cores) > torch.finfo(target).max:  # the cores would overflow: rebalance
            self.balance_norms_()
        out = super()._apply(fn, recurse)
        if narrowing:
            check_cast(self.layer_label(), target, list(self.cores), self._rebuilt, norm_bound(self.cores))
        return out

    @torch.no_grad()
    def _rebuilt(self) -> torch.Tensor:
        return tt_to_matrix([c.detach() for c in self.cores])

    def _decompose(self, weight, *, max_bond=None, cutoff=None, max_params=None) -> None:
        check_finite(weight)
        padded = pad_matrix(weight.detach(), math.prod(self.out_dims), math.prod(self.in_dims))
        if max_params is not None:
            cores, info = tt_svd_to_budget(padded, self.out_dims, self.in_dims, int(max_params))
        else:
            cores, info = tt_svd(padded, self.out_dims, self.in_dims, max_bond=max_bond, cutoff=cutoff)
        self.set_cores(cores, info)


class MPOModule(MPOCores, MpokitLayer, nn.Module, register=False):
    """An mpokit layer whose weight is MPOCores storage (MPOLinear, MPOEmbedding, MPOConv2d)."""

    def spec(self) -> dict[str, Any]:
        spec = {
            "type": type(self).__name__, "out_dims": self.out_dims, "in_dims": self.in_dims,
            "bonds": self.bonds, "forward_mode": self.forward_mode,
        }
        if getattr(self, "shared_with", None):  # cores shared across layers (method share): kept on load
            spec["shared_with"] = self.shared_with
        return spec

    def extra_repr(self) -> str:
        return f"{self.rows}x{self.cols}, out_dims={self.out_dims}, in_dims={self.in_dims}, bonds={self.bonds}"


class MPOLinear(MPOModule):
    """Drop-in for nn.Linear whose weight (out, in) is stored as MPO cores."""

    def __init__(self, in_features, out_features, out_dims, in_dims, bonds, bias=True,
                 forward_mode="auto", device=None, dtype=None):
        super().__init__()
        if forward_mode not in FORWARD_MODES:
            raise ValueError(f"expected forward_mode in {FORWARD_MODES}, got {forward_mode!r}")
        self.in_features, self.out_features = in_features, out_features
        self.rows, self.cols, self.forward_mode = out_features, in_features, forward_mode
        self._init_cores(out_dims, in_dims, bonds, device, dtype)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, num_cores=3, out_dims=None,
                    in_dims=None, lowrank=False, max_bond=None, cutoff=None, max_params=None,
                    forward_mode="auto") -> "MPOLinear":
        """Decompose a (out, in) weight. max_params truncates to a parameter budget."""
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
        o, i = weight.shape
        od, idd = make_layout(o, i, num_cores, out_dims, in_dims, lowrank)
        layer = cls(i, o, od, idd, [1] * (len(od) - 1), bias=bias is not None, forward_mode=forward_mode,
                    device=weight.device, dtype=weight.dtype)
        layer._decompose(weight, max_bond=max_bond, cutoff=cutoff, max_params=max_params)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "MPOLinear":
        return cls.from_weight(linear.weight, linear.bias, **kwargs)

    def to_linear(self) -> nn.Linear:
        """Contract back to a plain nn.Linear (merge)."""
        w = self.full_weight().detach()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def to_dense(self) -> nn.Module:
        """The nn.Linear (or transformers Conv1D, for orig_type "Conv1D") this layer stands for."""
        return as_replaced(self.to_linear(), getattr(self, "orig_type", None))

    @property
    def weight(self) -> torch.Tensor:
        """Dense weight view for code that reads `.weight` (rebuilt, differentiable)."""
        return self.full_weight() if self._needs_grad() else self.cached_weight()

    def choose_path(self, batch: int) -> str:
        if self.forward_mode != "auto":
            return self.forward_mode
        shapes = [tuple(c.shape) for c in self.cores]
        dense = dense_flops(batch, self.out_features, self.in_features)
        if self._needs_grad():
            dense += reconstruct_flops(shapes)
        overhead = (1.0 if not self._needs_grad() else LOWRANK_OVERHEAD) if self.is_lowrank else CONTRACT_OVERHEAD
        return "contract" if overhead * contract_flops(batch, shapes) < dense else "dense"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dim {self.in_features}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        path = self.choose_path(x2.shape[0])
        if path == "contract" and self.is_lowrank:  # two GEMMs on views of the cores
            u, v = self.cores[0].reshape(self.out_dims[0], -1), self.cores[1].reshape(-1, self.in_dims[1])
            y = F.linear(F.linear(x2, v[:, : self.in_features]), u[: self.out_features], self.bias)
        elif path == "contract":
            cols = math.prod(self.in_dims)
            xp = F.pad(x2, (0, cols - self.in_features)) if cols != self.in_features else x2
            y = tt_apply(xp, list(self.cores))[:, : self.out_features]
            if self.bias is not None:
                y = y + self.bias
        else:
            w = self.full_weight() if self._needs_grad() else self.cached_weight()
            y = F.linear(x2, w, self.bias)
        return y.reshape(*lead, self.out_features)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device=None, dtype=None) -> "MPOLinear":
        layer = cls(spec["in_features"], spec["out_features"], spec["out_dims"], spec["in_dims"], spec["bonds"],
                    bias=spec["bias"], forward_mode=spec.get("forward_mode", "auto"), device=device, dtype=dtype)
        if spec.get("shared_with"):
            layer.shared_with = spec["shared_with"]
        return layer


class MPOEmbedding(MPOModule):
    """Drop-in for nn.Embedding whose table (num_embeddings, dim) is stored as MPO cores."""

    def __init__(self, num_embeddings, embedding_dim, out_dims, in_dims, bonds, padding_idx=None,
                 forward_mode="auto", device=None, dtype=None):
        super().__init__()
        if forward_mode not in FORWARD_MODES:
            raise ValueError(f"expected forward_mode in {FORWARD_MODES}, got {forward_mode!r}")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.rows, self.cols, self.forward_mode = num_embeddings, embedding_dim, forward_mode
        self._init_cores(out_dims, in_dims, bonds, device, dtype)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, *, num_cores=3, out_dims=None, in_dims=None, lowrank=False,
                       max_bond=None, cutoff=None, max_params=None, forward_mode="auto") -> "MPOEmbedding":
        v, d = emb.weight.shape
        od, idd = make_layout(v, d, num_cores, out_dims, in_dims, lowrank)
        layer = cls(v, d, od, idd, [1] * (len(od) - 1), padding_idx=emb.padding_idx, forward_mode=forward_mode,
                    device=emb.weight.device, dtype=emb.weight.dtype)
        layer._decompose(emb.weight, max_bond=max_bond, cutoff=cutoff, max_params=max_params)
        return layer

    @property
    def weight(self) -> torch.Tensor:
        return self.full_weight() if self._needs_grad() else self.cached_weight()

    def to_embedding(self) -> nn.Embedding:
        w = self.full_weight().detach()
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                           device=w.device, dtype=w.dtype)
        with torch.no_grad():
            emb.weight.copy_(w)
        return emb

    def to_dense(self) -> nn.Embedding:
        return self.to_embedding()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.forward_mode == "dense" or (self.forward_mode == "auto" and not self._needs_grad()):
            w = self.full_weight() if self._needs_grad() else self.cached_weight()
            return F.embedding(ids, w, self.padding_idx)
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"expected token ids in [0, {self.num_embeddings}), got range "
                             f"[{int(flat.min())}, {int(flat.max())}]")
        rows = tt_rows(flat, list(self.cores))[:, : self.embedding_dim]  # drop padded columns
        return rows.reshape(*ids.shape, self.embedding_dim)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device=None, dtype=None) -> "MPOEmbedding":
        layer = cls(spec["num_embeddings"], spec["embedding_dim"], spec["out_dims"], spec["in_dims"], spec["bonds"],
                    padding_idx=spec.get("padding_idx"), forward_mode=spec.get("forward_mode", "auto"),
                    device=device, dtype=dtype)
        if spec.get("shared_with"):
            layer.shared_with = spec["shared_with"]
        return layer
