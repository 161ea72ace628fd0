"""MoEFFN: a dense FFN split into equal experts that runs only the experts a router picks.

Expert e owns m = N / E intermediate neurons: their gate and up rows (gated FFNs) or
up rows (ReLU/GELU FFNs), biases, and their down-projection columns. With all experts
selected the layer equals the dense FFN; with top-k it computes k/E of the FFN work
(see ops/experts.py for the kernels), plus a small router MLP that scores experts per
token by their predicted share of the output (MoEfication, Zhang et al. 2022).

shared_experts s: experts 0..s-1 are always computed (a DeepSeek-MoE style shared expert;
MoEfication puts the neurons with the highest mean |activation| there); the router scores
and top_k counts only the E - s routed experts, so a token computes (s + top_k) / E of the
FFN. (The output projection may also be refit to the sparse routing: methods/moefication/refit.py.)
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mpokit.layers.base import MpokitLayer
from mpokit.layers.ffn import DenseFFN, activation, dense_ffn_module, restore_dense_ffn
from mpokit.ops.experts import KERNELS, expert_activation, run_experts

__all__ = ["ExpertRouter", "MoEFFN", "MOE_FORWARD_MODES"]

MOE_FORWARD_MODES = ("auto", *KERNELS)


class ExpertRouter(nn.Module):
    """Scores (T, E) from inputs (T, d): Linear -> ReLU -> Linear, or one Linear when hidden=0."""

    def __init__(self, hidden_size: int, num_experts: int, router_hidden: int = 64, device=None, dtype=None):
        super().__init__()
        self.router_hidden = router_hidden
        if router_hidden > 0:
            self.net = nn.Sequential(nn.Linear(hidden_size, router_hidden, device=device, dtype=dtype), nn.ReLU(),
                                     nn.Linear(router_hidden, num_experts, device=device, dtype=dtype))
        else:
            self.net = nn.Sequential(nn.Linear(hidden_size, num_experts, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MoEFFN(MpokitLayer, nn.Module):
    """Drop-in for a dense FFN (x -> y). Only the top_k experts per token are computed."""

    def __init__(self, hidden_size: int, num_experts: int, expert_size: int, top_k: int, act: str, gated: bool,
                 out_features: int | None = None, bias_in: bool = False, bias_out: bool = False,
                 router_hidden: int = 64, site_kind: str = "gated", forward_mode: str = "auto",
                 shared_experts: int = 0, device=None, dtype=None):
        super().__init__()
        if not 0 <= shared_experts < num_experts:
            raise ValueError(f"expected 0 <= shared_experts < num_experts={num_experts}, got {shared_experts}")
        if not 1 <= top_k <= num_experts - shared_experts:
            raise ValueError(f"expected 1 <= top_k <= num_experts - shared_experts={num_experts - shared_experts}, "
                             f"got {top_k}")
        if forward_mode not in MOE_FORWARD_MODES:
            raise ValueError(f"expected forward_mode in {MOE_FORWARD_MODES}, got {forward_mode!r}")
        out_features = out_features or hidden_size
        g = 2 if gated else 1
        self.hidden_size, self.out_features = hidden_size, out_features
        self.num_experts, self.expert_size, self.top_k = num_experts, expert_size, top_k
        self.act, self.gated, self.site_kind, self.forward_mode = act, gated, site_kind, forward_mode
        self.shared_experts = shared_experts
        self.act_fn = activation(act)
        kw = {"device": device, "dtype": dtype}
        self.w_in = nn.Parameter(torch.zeros(num_experts, g * expert_size, hidden_size, **kw))
        self.b_in = nn.Parameter(torch.zeros(num_experts, g * expert_size, **kw)) if bias_in else None
        self.w_out = nn.Parameter(torch.zeros(num_experts, expert_size, out_features, **kw))
        self.b_out = nn.Parameter(torch.zeros(out_features, **kw)) if bias_out else None
        self.router = ExpertRouter(hidden_size, num_experts - shared_experts, router_hidden, **kw)
        self.oracle_routing = False
        # neuron_order[j] = index in the dense FFN of the j-th neuron in expert order
        self.register_buffer("neuron_order", torch.arange(num_experts * expert_size, device=device))

    # ---- conversion --------------------------------------------------------------
    @classmethod
    def from_dense(cls, ffn: DenseFFN, labels: torch.Tensor, top_k: int, router_hidden: int = 64,
                   site_kind: str = "gated", forward_mode: str = "auto", shared_experts: int = 0) -> "MoEFFN":
        """Experts from a neuron -> expert assignment `labels` (N,) with equal counts per expert;
        experts 0..shared_experts-1 are the always-computed shared ones."""
        labels = torch.as_tensor(labels, device="cpu").long()
        if labels.shape != (ffn.neurons,):
            raise ValueError(f"expected labels of shape ({ffn.neurons},), got {tuple(labels.shape)}")
        counts = torch.bincount(labels)
        if counts.numel() < 1 or (counts != counts[0]).any() or labels.min() < 0:
            raise ValueError(f"expected every expert to hold the same number of neurons, got counts {counts.tolist()}")
        E, m = counts.numel(), int(counts[0])
        has_in_bias = any(b is not None for b in (ffn.up_bias, ffn.gate_bias))
        layer = cls(ffn.hidden, E, m, top_k, ffn.act, ffn.gated, ffn.down.shape[0], has_in_bias,
                    ffn.down_bias is not None, router_hidden, site_kind, forward_mode, shared_experts,
                    device=ffn.up.device, dtype=ffn.up.dtype)
        order = torch.argsort(labels, stable=True).to(ffn.up.device)  # expert-major neuron order

        def rows(w: torch.Tensor | None, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            w = torch.zeros_like(ffn.up) if w is None else w
            b = torch.zeros(ffn.neurons, device=w.device, dtype=w.dtype) if b is None else b
            return w[order].view(E, m, -1), b[order].view(E, m)  # (E, m, d), (E, m)

        with torch.no_grad():
            up_w, up_b = rows(ffn.up, ffn.up_bias)
            if ffn.gated:
                gate_w, gate_b = rows(ffn.gate, ffn.gate_bias)
                up_w, up_b = torch.cat([gate_w, up_w], 1), torch.cat([gate_b, up_b], 1)  # (E, 2m, d), (E, 2m)
            layer.w_in.copy_(up_w)
            if layer.b_in is not None:
                layer.b_in.copy_(up_b)
            layer.w_out.copy_(ffn.down[:, order].t().reshape(E, m, -1))  # (E, m, d_out)
            if layer.b_out is not None:
                layer.b_out.copy_(ffn.down_bias)
            layer.neuron_order.copy_(order)
        return layer

    def to_dense_ffn(self) -> DenseFFN:
        """The dense FFN (neurons back in their original order); equals this layer at top_k = E."""
        E, m, d = self.num_experts, self.expert_size, self.hidden_size
        inv = torch.argsort(self.neuron_order)  # dense index -> expert-order position
        w_in = self.w_in.detach()
        b_in = None if self.b_in is None else self.b_in.detach()
        parts_w = w_in.chunk(2, dim=1) if self.gated else (w_in,)  # each (E, m, d)
        parts_b = b_in.chunk(2, dim=1) if (self.gated and b_in is not None) else (b_in,)
        dense_w = [p.reshape(E * m, d)[inv].clone() for p in parts_w]
        dense_b = [None if p is None else p.reshape(E * m)[inv].clone() for p in parts_b]
        down = self.w_out.detach().reshape(E * m, self.out_features)[inv].t().contiguous()  # (d_out, N)
        down_bias = None if self.b_out is None else self.b_out.detach().clone()
        if self.gated:
            gate_b, up_b = dense_b if b_in is not None else (None, None)
            return DenseFFN(up=dense_w[1], down=down, act=self.act, gate=dense_w[0], up_bias=up_b, gate_bias=gate_b,
                            down_bias=down_bias)
        return DenseFFN(up=dense_w[0], down=down, act=self.act, up_bias=dense_b[0], down_bias=down_bias)

    def to_dense(self) -> nn.Module:
        """The dense FFN as a module computing x -> FFN(x) (GatedMLP, Conv1DMLP or Linear -> act -> Linear)."""
        return dense_ffn_module(self.to_dense_ffn(), self.site_kind).train(self.training)

    def undo_(self, model: nn.Module, name: str) -> None:
        """The dense FFN back at its site, which may span several modules (BERT: see layers/ffn.py)."""
        restore_dense_ffn(model, name, self.site_kind, self.to_dense_ffn())

    @property
    def routed_experts(self) -> int:
        return self.num_experts - self.shared_experts

    # ---- compute -----------------------------------------------------------------
    def expert_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """(T, d) -> (T, E, m): every expert's intermediate activations."""
        h = torch.einsum("td,egd->teg", x, self.w_in)  # (T, E, g*m)
        if self.b_in is not None:
            h = h + self.b_in
        return expert_activation(h, self.act_fn, self.gated)

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """(T, d) -> (T, E, d_out): every expert's contribution (calibration targets, analysis)."""
        return torch.einsum("tem,emd->ted", self.expert_hidden(x), self.w_out)

    def routing_targets(self, x: torch.Tensor) -> torch.Tensor:
        """(T, d) -> (T, E - shared): the norm of each routed expert's output, what skipping it
        costs: the ranking a router should learn."""
        return self.expert_outputs(x)[:, self.shared_experts:].norm(dim=-1)

    def select(self, x2: torch.Tensor) -> torch.Tensor:
        """(T, d) -> (T, top_k) routed expert ids (in [shared_experts, E)) with the highest router scores.

        With `oracle_routing = True` (analysis only: it computes every expert) the true
        routing targets replace the router's scores, which separates router error from
        the error of dropping experts at all.
        """
        scores = self.routing_targets(x2) if self.oracle_routing else self.router(x2)  # (T, E - shared)
        return scores.topk(self.top_k, dim=-1).indices + self.shared_experts

    def shared_output(self, x2: torch.Tensor) -> torch.Tensor:
        """(T, d) -> (T, d_out): the always-on experts as one dense FFN slice."""
        s, gm = self.shared_experts, self.w_in.shape[1]
        b = None if self.b_in is None else self.b_in[:s].reshape(-1)
        h = torch.nn.functional.linear(x2, self.w_in[:s].reshape(s * gm, -1), b)  # (T, s*g*m)
        h = expert_activation(h.view(-1, s, gm), self.act_fn, self.gated)  # (T, s, m)
        return h.reshape(h.shape[0], -1) @ self.w_out[:s].reshape(-1, self.out_features)  # (T, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"expected input with last dim {self.hidden_size}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.hidden_size)  # (T, d)
        s = self.shared_experts
        sel = self.select(x2)  # (T, k) in [s, E)
        b_in = None if self.b_in is None else self.b_in[s:]
        y = run_experts(self.forward_mode, x2, sel - s, self.w_in[s:], b_in, self.w_out[s:], self.act_fn,
                        self.gated)
        if s:
            y = y + self.shared_output(x2)
        if self.b_out is not None:
            y = y + self.b_out
        return y.reshape(*lead, self.out_features)

    # ---- accounting and checkpoints -----------------------------------------------
    def expert_params(self) -> int:
        return self.w_in[0].numel() + self.w_out[0].numel() + (self.b_in[0].numel() if self.b_in is not None else 0)

    def active_params(self) -> int:
        """Parameters touched per token: shared + top_k experts, the output bias and the router."""
        router = sum(p.numel() for p in self.router.parameters())
        return ((self.shared_experts + self.top_k) * self.expert_params()
                + (self.b_out.numel() if self.b_out is not None else 0) + router)

    def spec(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "hidden_size": self.hidden_size, "out_features": self.out_features,
                "num_experts": self.num_experts, "expert_size": self.expert_size, "top_k": self.top_k,
                "act": self.act, "gated": self.gated, "bias_in": self.b_in is not None,
                "bias_out": self.b_out is not None, "router_hidden": self.router.router_hidden,
                "site_kind": self.site_kind, "forward_mode": self.forward_mode,
                "shared_experts": self.shared_experts}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device=None, dtype=None) -> "MoEFFN":
        return cls(spec["hidden_size"], spec["num_experts"], spec["expert_size"], spec["top_k"], spec["act"],
                   spec["gated"], spec["out_features"], spec["bias_in"], spec["bias_out"], spec["router_hidden"],
                   spec["site_kind"], spec.get("forward_mode", "auto"), spec.get("shared_experts", 0),
                   device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}x{self.expert_size} neurons, top_k={self.top_k}, act={self.act}, "
                f"gated={self.gated}, mode={self.forward_mode}, shared={self.shared_experts}")
