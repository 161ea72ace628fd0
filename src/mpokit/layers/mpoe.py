"""Routed MoE FFNs with full-size experts, upcycled from a dense FFN.

UpcycledMoE: E dense copies of the FFN (a Switch / sparse-upcycling baseline).
MPOEFFN (Gao et al., COLING 2022): every expert matrix is an MPO whose central core
(most of the parameters) is shared by all experts, each expert keeping its own small
auxiliary cores, so E experts cost about one FFN plus E sets of auxiliary cores.

Routing (both): softmax router, top-k experts per token. top-2 (or more) weights are
renormalized to sum to 1 (as Mixtral does), so an upcycled layer starts equal to the
dense FFN. top-1 (Switch) uses weight p / p.detach(): value 1 (the upcycled start is
exact again) with the router still receiving the gradient of log p. In training mode
each forward stores the Switch load-balancing loss E * sum_e f_e * P_e in `aux_loss`
(f_e: share of routed slots, P_e: mean router probability).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpokit.layers.base import MpokitLayer
from mpokit.layers.ffn import DenseFFN, activation
from mpokit.layers.moe import MOE_FORWARD_MODES
from mpokit.layers.mpo import make_layout
from mpokit.ops.experts import run_experts
from mpokit.ops.tt import core_shapes, pad_matrix, tt_svd, tt_to_matrix

__all__ = ["RoutedMoE", "UpcycledMoE", "MPOEFFN", "ExpertMPO", "mask_grad", "balance_cores"]


class _GradMask(torch.autograd.Function):
    """Identity forward; backward keeps each gradient entry with probability 1 - drop."""

    @staticmethod
    def forward(ctx, x, drop):
        ctx.drop = drop
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        keep = torch.rand_like(grad) >= ctx.drop
        return grad * keep, None


def balance_cores(cores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rescale MPO cores to equal RMS entries, the matrix unchanged (the scales multiply to 1).

    TT-SVD leaves every core but the last orthonormal (RMS ~1e-2 for a central core) and the
    last one carrying the norm, so one optimizer step size would move the cores by very
    different relative amounts; equal scales make Adam's steps comparable across cores.
    """
    rms = [float(c.detach().double().pow(2).mean().sqrt().clamp_min(1e-30)) for c in cores]
    target = math.exp(sum(math.log(r) for r in rms) / len(rms))  # geometric mean
    return [c * (target / r) for c, r in zip(cores, rms)]


def mask_grad(x: torch.Tensor, drop: float) -> torch.Tensor:
    """x unchanged; its gradient entries are zeroed at random with probability `drop`."""
    return _GradMask.apply(x, drop) if drop > 0 else x


class RoutedMoE(MpokitLayer, nn.Module, register=False):
    """Router + top-k dispatch shared by the upcycled layers; subclasses provide expert_weights()."""

    def __init__(self, hidden_size, neurons, num_experts, top_k, act, gated, out_features=None, bias_in=False,
                 bias_out=False, site_kind="gated", forward_mode="auto", device=None, dtype=None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"expected 1 <= top_k <= num_experts={num_experts}, got {top_k}")
        if forward_mode not in MOE_FORWARD_MODES:
            raise ValueError(f"expected forward_mode in {MOE_FORWARD_MODES}, got {forward_mode!r}")
        self.hidden_size, self.neurons, self.out_features = hidden_size, neurons, out_features or hidden_size
        self.num_experts, self.top_k, self.act, self.gated = num_experts, top_k, act, gated
        self.site_kind, self.forward_mode = site_kind, forward_mode
        self.act_fn = activation(act)
        kw = {"device": device, "dtype": dtype}
        self.router = nn.Linear(hidden_size, num_experts, bias=False, **kw)
        g = 2 if gated else 1
        self.b_in = nn.Parameter(torch.zeros(num_experts, g * neurons, **kw)) if bias_in else None
        self.b_out = nn.Parameter(torch.zeros(self.out_features, **kw)) if bias_out else None
        self.aux_loss: torch.Tensor | None = None
        self.last_load: torch.Tensor | None = None  # (E,) share of routed slots per expert, last forward

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """w_in (E, g*N, d) and w_out (E, N, d_out)."""
        raise NotImplementedError

    def route(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, d) -> expert ids (T, k) and their weights (T, k); stores aux_loss when training."""
        probs = F.softmax(self.router(x2).float(), dim=-1)  # (T, E)
        top, sel = probs.topk(self.top_k, dim=-1)  # (T, k)
        scale = top / top.detach() if self.top_k == 1 else top / top.sum(-1, keepdim=True)
        load = torch.bincount(sel.reshape(-1), minlength=self.num_experts).float() / sel.numel()  # (E,)
        self.last_load = load.detach()
        self.aux_loss = self.num_experts * (load * probs.mean(0)).sum() if self.training else None
        return sel, scale.to(x2.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"expected input with last dim {self.hidden_size}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.hidden_size)  # (T, d)
        sel, scale = self.route(x2)
        w_in, w_out = self.expert_weights()
        y = run_experts(self.forward_mode, x2, sel, w_in, self.b_in, w_out, self.act_fn, self.gated, scale)
        if self.b_out is not None:
            y = y + self.b_out
        return y.reshape(*lead, self.out_features)

    def _copy_routing(self, other: "RoutedMoE") -> None:
        with torch.no_grad():
            self.router.weight.copy_(other.router.weight)
            if self.b_in is not None:
                self.b_in.copy_(other.b_in)
            if self.b_out is not None:
                self.b_out.copy_(other.b_out)

    def _init_from_dense(self, ffn: DenseFFN, router_std: float, generator: torch.Generator) -> None:
        """Router ~ N(0, router_std^2) from `generator` (CPU): the layer is a function of its seed, not of
        whatever drew from torch's global generator before."""
        with torch.no_grad():
            w = self.router.weight
            w.copy_(torch.randn(w.shape, generator=generator, dtype=torch.float32).mul_(router_std))
            if self.b_in is not None:
                zeros = torch.zeros(ffn.neurons, device=ffn.up.device, dtype=ffn.up.dtype)
                parts = [ffn.gate_bias if ffn.gate_bias is not None else zeros] if self.gated else []
                parts.append(ffn.up_bias if ffn.up_bias is not None else zeros)
                self.b_in.copy_(torch.cat(parts).expand_as(self.b_in))
            if self.b_out is not None:
                self.b_out.copy_(ffn.down_bias)

    def base_spec(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "hidden_size": self.hidden_size, "neurons": self.neurons,
                "num_experts": self.num_experts, "top_k": self.top_k, "act": self.act, "gated": self.gated,
                "out_features": self.out_features, "bias_in": self.b_in is not None,
                "bias_out": self.b_out is not None, "site_kind": self.site_kind, "forward_mode": self.forward_mode}

    @staticmethod
    def _base_args(spec: dict[str, Any]) -> tuple:
        return (spec["hidden_size"], spec["neurons"], spec["num_experts"], spec["top_k"], spec["act"], spec["gated"],
                spec["out_features"], spec["bias_in"], spec["bias_out"], spec["site_kind"],
                spec.get("forward_mode", "auto"))

    def extra_repr(self) -> str:
        return f"experts={self.num_experts} x {self.neurons} neurons, top_k={self.top_k}, act={self.act}"


def _has_in_bias(ffn: DenseFFN) -> bool:
    return ffn.up_bias is not None or ffn.gate_bias is not None


class UpcycledMoE(RoutedMoE):
    """E dense experts, each initialized as a copy of the dense FFN."""

    def __init__(self, *args, device=None, dtype=None, **kw):
        super().__init__(*args, device=device, dtype=dtype, **kw)
        g = 2 if self.gated else 1
        self.w_in = nn.Parameter(torch.zeros(self.num_experts, g * self.neurons, self.hidden_size, device=device,
                                             dtype=dtype))
        self.w_out = nn.Parameter(torch.zeros(self.num_experts, self.neurons, self.out_features, device=device,
                                              dtype=dtype))

    @classmethod
    def from_dense(cls, ffn: DenseFFN, num_experts: int, top_k: int, site_kind: str = "gated",
                   router_std: float = 0.02, forward_mode: str = "auto", seed: int = 0) -> "UpcycledMoE":
        layer = cls(ffn.hidden, ffn.neurons, num_experts, top_k, ffn.act, ffn.gated, ffn.down.shape[0],
                    _has_in_bias(ffn), ffn.down_bias is not None, site_kind, forward_mode,
                    device=ffn.up.device, dtype=ffn.up.dtype)
        layer._init_from_dense(ffn, router_std, torch.Generator().manual_seed(seed))
        w_in = torch.cat([ffn.gate, ffn.up]) if ffn.gated else ffn.up  # (g*N, d)
        with torch.no_grad():
            layer.w_in.copy_(w_in.expand_as(layer.w_in))
            layer.w_out.copy_(ffn.down.t().expand_as(layer.w_out))
        return layer

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w_in, self.w_out

    def to_dense(self) -> "UpcycledMoE":
        """Itself: its experts are dense already, and learned routing has no plain-module equivalent
        (undoing it leaves it in place)."""
        return self

    def spec(self) -> dict[str, Any]:
        return self.base_spec()

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device=None, dtype=None) -> "UpcycledMoE":
        return cls(*cls._base_args(spec), device=device, dtype=dtype)


class ExpertMPO(nn.Module):
    """E matrices (rows, cols) as MPOs: the central core is shared, the other cores belong to one expert."""

    def __init__(self, rows, cols, out_dims, in_dims, bonds, num_experts, device=None, dtype=None):
        super().__init__()
        self.rows, self.cols, self.num_experts = rows, cols, num_experts
        self.out_dims, self.in_dims = list(out_dims), list(in_dims)
        shapes = core_shapes(self.out_dims, self.in_dims, list(bonds))
        self.central_index = max(range(len(shapes)), key=lambda k: math.prod(shapes[k]))
        self.cores = nn.ParameterList(
            nn.Parameter(torch.zeros(s if k == self.central_index else (num_experts, *s), device=device, dtype=dtype))
            for k, s in enumerate(shapes))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, num_experts: int, num_cores: int = 3, max_bond: int | None = None,
                    noise: float = 0.0, generator: torch.Generator | None = None) -> "ExpertMPO":
        """Decompose one (rows, cols) weight; every expert starts with its auxiliary cores (plus noise)."""
        rows, cols = weight.shape
        od, idd = make_layout(rows, cols, num_cores)
        cores, info = tt_svd(pad_matrix(weight.detach(), math.prod(od), math.prod(idd)), od, idd, max_bond=max_bond)
        cores = balance_cores(cores)
        layer = cls(rows, cols, od, idd, info.bonds, num_experts, device=weight.device, dtype=weight.dtype)
        layer.info = info
        with torch.no_grad():
            for k, (param, core) in enumerate(zip(layer.cores, cores)):
                core = core.to(param.dtype)
                if k == layer.central_index:
                    param.copy_(core)
                    continue
                param.copy_(core.expand_as(param))
                if noise > 0:
                    param.add_(noise * core.std() * torch.randn(param.shape, generator=generator).to(param))
        return layer

    @property
    def bonds(self) -> list[int]:
        return [c.shape[-1] for c in self.cores][:-1]

    def central(self) -> nn.Parameter:
        return self.cores[self.central_index]

    def auxiliary_parameters(self) -> list[nn.Parameter]:
        return [p for k, p in enumerate(self.cores) if k != self.central_index]

    def matrices(self, grad_mask: float = 0.0) -> torch.Tensor:
        """(E, rows, cols), differentiable; the central core's gradient is masked with prob grad_mask."""
        c = self.central_index
        central = mask_grad(self.cores[c], grad_mask)
        mats = [tt_to_matrix([central if k == c else core[e] for k, core in enumerate(self.cores)])
                for e in range(self.num_experts)]
        return torch.stack(mats)[:, : self.rows, : self.cols]

    def spec(self) -> dict[str, Any]:
        return {"rows": self.rows, "cols": self.cols, "out_dims": self.out_dims, "in_dims": self.in_dims,
                "bonds": self.bonds}


class MPOEFFN(RoutedMoE):
    """Experts whose gate/up/down matrices are MPOs sharing one central core per matrix type."""

    MATRICES = ("gate", "up", "down")

    def __init__(self, *args, layouts: dict[str, dict[str, Any]], grad_mask: float = 0.0, device=None, dtype=None,
                 **kw):
        super().__init__(*args, device=device, dtype=dtype, **kw)
        if not 0 <= grad_mask < 1:
            raise ValueError(f"expected grad_mask in [0, 1), got {grad_mask}")
        self.grad_mask = grad_mask
        self.mpos = nn.ModuleDict({name: ExpertMPO(lay["rows"], lay["cols"], lay["out_dims"], lay["in_dims"],
                                                   lay["bonds"], self.num_experts, device=device, dtype=dtype)
                                   for name, lay in layouts.items()})
        self._cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def from_dense(cls, ffn: DenseFFN, num_experts: int, top_k: int, site_kind: str = "gated", num_cores: int = 3,
                   max_bond: int | None = None, grad_mask: float = 0.0, noise: float = 0.0, router_std: float = 0.02,
                   forward_mode: str = "auto", seed: int = 0) -> "MPOEFFN":
        gen = torch.Generator().manual_seed(seed)
        weights = {"gate": ffn.gate, "up": ffn.up, "down": ffn.down}
        mpos = {n: ExpertMPO.from_weight(w, num_experts, num_cores, max_bond, noise, gen)
                for n, w in weights.items() if w is not None}
        layer = cls(ffn.hidden, ffn.neurons, num_experts, top_k, ffn.act, ffn.gated, ffn.down.shape[0],
                    _has_in_bias(ffn), ffn.down_bias is not None, site_kind, forward_mode,
                    layouts={n: m.spec() for n, m in mpos.items()}, grad_mask=grad_mask,
                    device=ffn.up.device, dtype=ffn.up.dtype)
        layer._init_from_dense(ffn, router_std, gen)
        layer.mpos.load_state_dict(nn.ModuleDict(mpos).state_dict())
        layer.truncation_error = {n: m.info.relative_error for n, m in mpos.items()}
        return layer

    def _build(self) -> tuple[torch.Tensor, torch.Tensor]:
        drop = self.grad_mask if self.training else 0.0
        mats = {n: m.matrices(drop) for n, m in self.mpos.items()}
        w_in = torch.cat([mats["gate"], mats["up"]], dim=1) if self.gated else mats["up"]  # (E, g*N, d)
        return w_in, mats["down"].transpose(1, 2)  # (E, N, d_out)

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.mpos.parameters()):
            return self._build()
        key = tuple((id(p), p._version, p.device, p.dtype) for p in self.mpos.parameters())
        if self._cache is None or self._cache[0] != key:  # rebuilt once per weight change at inference
            with torch.no_grad():
                w_in, w_out = self._build()
                self._cache = (key, (w_in.contiguous(), w_out.contiguous()))
        return self._cache[1]

    def _apply(self, fn, recurse=True):
        self._cache = None
        return super()._apply(fn, recurse)

    def central_parameters(self) -> list[nn.Parameter]:
        return [m.central() for m in self.mpos.values()]

    def auxiliary_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.mpos.values() for p in m.auxiliary_parameters()]

    def to_dense_experts(self) -> UpcycledMoE:
        """The same layer with each expert's matrices contracted (dense experts, same routing)."""
        p = next(self.parameters())
        dense = UpcycledMoE(*self._base_args(self.base_spec()), device=p.device, dtype=p.dtype)
        dense._copy_routing(self)
        with torch.no_grad():
            w_in, w_out = self._build()
            dense.w_in.copy_(w_in)
            dense.w_out.copy_(w_out)
        return dense.train(self.training)

    def to_dense(self) -> UpcycledMoE:
        return self.to_dense_experts()

    def spec(self) -> dict[str, Any]:
        return {**self.base_spec(), "grad_mask": self.grad_mask,
                "layouts": {n: m.spec() for n, m in self.mpos.items()}}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device=None, dtype=None) -> "MPOEFFN":
        return cls(*cls._base_args(spec), layouts=spec["layouts"], grad_mask=spec.get("grad_mask", 0.0),
                   device=device, dtype=dtype)
