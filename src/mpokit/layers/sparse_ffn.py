"""NeuronSparseFFN: a dense FFN that computes, per token, only the `keep` neurons a selector picks.

Neuron-level contextual sparsity (Deja Vu, Liu et al. 2023; CATS, Lee et al. 2024) rather than
fixed groups of neurons (MoEFFN): SwiGLU activations are sparse per neuron but the large ones do
not stay together in groups across tokens (docs/benchmarks/experts.md). Selectors:
  predictor  a low-rank network (d -> rank -> N) trained on calibration activations to score each
             neuron (Deja Vu); costs rank * (d + N) multiply-adds per token
  gate       |act(gate x)|, exact: the gate projection runs densely, up and down only for the kept
             neurons (CATS); gated FFNs only
  lowrank    act(g~) * u~ from the inputs' top-r principal directions on calibration (x ~ P P^T x): every
             neuron's pre-activations estimated at rank r, training-free; costs r * (d + g * N)
  gate-lowrank  exact gate times the rank-r estimate of up: |act(gate x) * u~|; gated FFNs only
  static     the same neurons for every token (highest mean |activation| on calibration): the baseline
  oracle     |h| itself, computed densely: the bound a selector can reach (analysis only)
Decode (at most `gather_tokens` tokens) gathers the kept neurons' rows and runs only them; longer
inputs (prefill) run the dense FFN and zero the dropped neurons, so both paths give the same output.
Rows are stored per neuron: w_in (N, g*d) holds [gate | up] of each neuron, down_t (N, d_out) its
output column, so one index_select fetches what a token needs and embedding_bag sums the outputs.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpokit.layers.base import MpokitLayer
from mpokit.layers.ffn import DenseFFN, activation, dense_ffn_module, restore_dense_ffn

__all__ = ["NeuronSparseFFN", "NeuronPredictor", "SELECTORS", "GATED_SELECTORS", "LOWRANK_SELECTORS"]

SELECTORS = ("predictor", "gate", "lowrank", "gate-lowrank", "static", "oracle")
GATED_SELECTORS = ("gate", "gate-lowrank")  # run the gate densely: need one
LOWRANK_SELECTORS = ("lowrank", "gate-lowrank")  # hold a calibration basis (fit_lowrank_)


class NeuronPredictor(nn.Module):
    """Scores (T, N) from FFN inputs (T, d) through a rank-r bottleneck: Linear(d, r) -> Linear(r, N)."""

    def __init__(self, hidden_size: int, neurons: int, rank: int, device=None, dtype=None):
        super().__init__()
        self.rank = rank
        self.down = nn.Linear(hidden_size, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, neurons, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class NeuronSparseFFN(MpokitLayer, nn.Module):
    """Drop-in for a dense FFN (x -> y) that computes `keep` of its N neurons per token."""

    def __init__(self, hidden_size: int, neurons: int, keep: int, act: str, gated: bool,
                 out_features: int | None = None, bias_in: bool = False, bias_out: bool = False,
                 selector: str = "predictor", predictor_rank: int = 128, site_kind: str = "gated",
                 gather_tokens: int = 4, device=None, dtype=None):
        super().__init__()
        if selector not in SELECTORS:
            raise ValueError(f"expected selector in {SELECTORS}, got {selector!r}")
        if selector in GATED_SELECTORS and not gated:
            raise ValueError(f"expected a gated FFN for selector={selector!r} (it ranks neurons by their gate), "
                             "got one without gate weights")
        if not 1 <= keep <= neurons:
            raise ValueError(f"expected 1 <= keep <= {neurons} neurons, got {keep}")
        out_features = out_features or hidden_size
        g = 2 if gated else 1
        self.hidden_size, self.out_features, self.neurons, self.keep = hidden_size, out_features, neurons, keep
        self.act, self.gated, self.selector, self.site_kind = act, gated, selector, site_kind
        self.gather_tokens = gather_tokens
        self.act_fn = activation(act)
        kw = {"device": device, "dtype": dtype}
        self.w_in = nn.Parameter(torch.zeros(neurons, g * hidden_size, **kw))
        self.b_in = nn.Parameter(torch.zeros(neurons, g, **kw)) if bias_in else None
        self.down_t = nn.Parameter(torch.zeros(neurons, out_features, **kw))
        self.b_out = nn.Parameter(torch.zeros(out_features, **kw)) if bias_out else None
        trained = selector == "predictor"
        self.predictor = NeuronPredictor(hidden_size, neurons, predictor_rank, **kw) if trained else None
        self.register_buffer("static_scores", torch.zeros(neurons, **kw))  # mean |h| on calibration
        self.low_rank = predictor_rank if selector in LOWRANK_SELECTORS else 0
        if self.low_rank:  # basis P (r, d) and each neuron's rows projected on it: [gate P^T | up P^T] or up P^T
            parts = 1 if selector == "gate-lowrank" else g
            self.register_buffer("basis", torch.zeros(self.low_rank, hidden_size, **kw))
            self.register_buffer("w_low", torch.zeros(neurons, parts * self.low_rank, **kw))

    # ---- conversion --------------------------------------------------------------
    @classmethod
    def from_dense(cls, ffn: DenseFFN, keep: int, selector: str = "predictor", predictor_rank: int = 128,
                   site_kind: str = "gated", gather_tokens: int = 4) -> "NeuronSparseFFN":
        """The FFN's weights, re-laid out per neuron; the predictor starts untrained."""
        has_in_bias = any(b is not None for b in (ffn.up_bias, ffn.gate_bias))
        layer = cls(ffn.hidden, ffn.neurons, keep, ffn.act, ffn.gated, ffn.down.shape[0], has_in_bias,
                    ffn.down_bias is not None, selector, predictor_rank, site_kind, gather_tokens,
                    device=ffn.up.device, dtype=ffn.up.dtype)
        zeros = torch.zeros(ffn.neurons, device=ffn.up.device, dtype=ffn.up.dtype)
        with torch.no_grad():
            layer.w_in.copy_(torch.cat([ffn.gate, ffn.up], 1) if ffn.gated else ffn.up)
            if layer.b_in is not None:
                biases = [ffn.gate_bias, ffn.up_bias] if ffn.gated else [ffn.up_bias]
                layer.b_in.copy_(torch.stack([zeros if b is None else b for b in biases], 1))
            layer.down_t.copy_(ffn.down.t())
            if layer.b_out is not None:
                layer.b_out.copy_(ffn.down_bias)
        return layer

    @torch.no_grad()
    def fit_lowrank_(self, x: torch.Tensor) -> None:
        """Fit the low-rank estimator on calibration inputs x (T, d): P = top principal directions of x
        (uncentred, as the FFN sees it), each neuron's rows projected on P. Eigen-decomposition in float64."""
        if not self.low_rank:
            raise ValueError(f"expected a low-rank selector {LOWRANK_SELECTORS}, got {self.selector!r}")
        x = x.to(self.w_in.device, torch.float64)
        rank = min(self.low_rank, self.hidden_size)
        _, vectors = torch.linalg.eigh(x.T @ x)
        basis = torch.zeros_like(self.basis, dtype=torch.float64)
        basis[:rank] = vectors[:, -rank:].flip(1).T  # largest first; rows past d stay zero
        d = self.hidden_size
        w = self.w_in.double()
        rows = w[:, d:] if self.selector == "gate-lowrank" else w.view(self.neurons, -1, d)
        self.basis.copy_(basis)
        self.w_low.copy_((rows @ basis.T).reshape(self.neurons, -1))

    def _low_pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """(T, d) -> (T, N, parts): the rank-r estimate of the pre-activations (biases included)."""
        z = F.linear(F.linear(x, self.basis), self.w_low.view(-1, self.low_rank)).view(x.shape[0], self.neurons, -1)
        if self.b_in is not None:
            z = z + (self.b_in[:, 1:] if self.selector == "gate-lowrank" else self.b_in)
        return z

    def _gate(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_fn(F.linear(x, self.w_in[:, :self.hidden_size], None if self.b_in is None else self.b_in[:, 0]))

    def to_dense_ffn(self) -> DenseFFN:
        """The dense FFN this layer computes with every neuron kept (after a refit: the refit one)."""
        d = self.hidden_size
        w = self.w_in.detach()
        b = None if self.b_in is None else self.b_in.detach()
        down = self.down_t.detach().t().contiguous()
        down_bias = None if self.b_out is None else self.b_out.detach().clone()
        if self.gated:
            return DenseFFN(up=w[:, d:].clone(), down=down, act=self.act, gate=w[:, :d].clone(),
                            up_bias=None if b is None else b[:, 1].clone(),
                            gate_bias=None if b is None else b[:, 0].clone(), down_bias=down_bias)
        return DenseFFN(up=w.clone(), down=down, act=self.act, up_bias=None if b is None else b[:, 0].clone(),
                        down_bias=down_bias)

    def to_dense(self) -> nn.Module:
        return dense_ffn_module(self.to_dense_ffn(), self.site_kind).train(self.training)

    def undo_(self, model: nn.Module, name: str) -> None:
        restore_dense_ffn(model, name, self.site_kind, self.to_dense_ffn())

    # ---- compute -----------------------------------------------------------------
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """(T, d) -> (T, N, g): every neuron's [gate, up] pre-activations."""
        z = F.linear(x, self.w_in.view(-1, self.hidden_size)).view(x.shape[0], self.neurons, -1)
        return z if self.b_in is None else z + self.b_in

    def _activate(self, z: torch.Tensor) -> torch.Tensor:
        """(..., g) pre-activations -> activations: act(gate) * up, or act(z) without a gate."""
        return self.act_fn(z[..., 0]) * z[..., 1] if self.gated else self.act_fn(z[..., 0])

    def hidden_states(self, x: torch.Tensor) -> torch.Tensor:
        """(T, d) -> (T, N): every neuron's activation, as the dense FFN computes it."""
        return self._activate(self.pre_activations(x))

    def split_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, d) -> every neuron's activation (T, N), and the same with the neurons the selector drops zeroed.
        The prefill path and the refit both use it, so the refit fits exactly the selection the layer runs."""
        z = self.pre_activations(x)
        gate = self.act_fn(z[..., 0])  # the activation itself when ungated
        h = gate * z[..., 1] if self.gated else gate
        idx = self.scores(x, hidden=h, gate=gate).topk(self.keep, dim=-1).indices
        return h, h * torch.zeros_like(h).scatter_(1, idx, 1.0)

    def scores(self, x: torch.Tensor, hidden: torch.Tensor | None = None,
               gate: torch.Tensor | None = None) -> torch.Tensor:
        """(T, d) -> (T, N): what the selector ranks neurons by (larger = kept); hidden (every neuron's
        activation) and gate (act(gate x)) are reused when the caller already has them."""
        if self.selector == "predictor":
            return self.predictor(x)
        if self.selector == "static":
            return self.static_scores.expand(x.shape[0], -1)
        if self.selector in GATED_SELECTORS:
            gate = self._gate(x) if gate is None else gate
            return (gate if self.selector == "gate" else gate * self._low_pre_activations(x)[..., 0]).abs()
        if self.selector == "lowrank":
            return self._activate(self._low_pre_activations(x)).abs()
        return (self.hidden_states(x) if hidden is None else hidden).abs()  # oracle

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """(T, d) -> (T, keep) indices of the kept neurons."""
        return self.scores(x).topk(self.keep, dim=-1).indices

    def _gathered(self, x: torch.Tensor) -> torch.Tensor:
        """Few tokens: each token's kept neurons only, outputs summed by embedding_bag. Rows are fetched with
        index_select and multiplied with mv, token by token: on CPU, advanced indexing (w[idx]) of a 2-D index
        and einsum over the gathered rows were several times slower than these."""
        d, g = self.hidden_size, 2 if self.gated else 1
        if self.selector in GATED_SELECTORS:  # the gate runs densely to rank the neurons; its values are reused
            gate = self._gate(x)
            idx = self.scores(x, gate=gate).topk(self.keep, dim=-1).indices  # (T, k)
            up_rows = self.w_in[:, d:]  # gathering from this view copies the up halves only: twice as fast
            up = torch.stack([torch.mv(up_rows.index_select(0, i), xt) for i, xt in zip(idx, x)])
            if self.b_in is not None:
                up = up + self.b_in[:, 1][idx]
            h = gate.gather(1, idx) * up
        else:
            idx = self.select(x)  # (T, k)
            z = torch.stack([torch.mv(self.w_in.index_select(0, i).view(-1, d), xt) for i, xt in zip(idx, x)])
            z = z.view(x.shape[0], self.keep, g)
            if self.b_in is not None:
                z = z + torch.stack([self.b_in.index_select(0, i) for i in idx])
            h = self._activate(z)
        return F.embedding_bag(idx, self.down_t, per_sample_weights=h.to(self.down_t.dtype), mode="sum")

    def _masked(self, x: torch.Tensor) -> torch.Tensor:
        """Many tokens: the dense FFN with the dropped neurons zeroed (same result, dense speed)."""
        return self.split_hidden(x)[1] @ self.down_t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"expected input with last dim {self.hidden_size}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.hidden_size)
        few = x2.shape[0] <= self.gather_tokens and self.selector != "oracle"
        y = self._gathered(x2) if few else self._masked(x2)
        if self.b_out is not None:
            y = y + self.b_out
        return y.reshape(*lead, self.out_features)

    # ---- accounting and checkpoints -----------------------------------------------
    def active_params(self) -> int:
        """Weights read per decoded token: the kept neurons' rows, the selector's own, the output bias."""
        g = 2 if self.gated else 1
        kept = self.keep * (g * self.hidden_size + self.out_features)
        if self.selector in GATED_SELECTORS:  # every gate row, then the kept neurons' up rows and down columns
            kept = self.neurons * self.hidden_size + self.keep * (self.hidden_size + self.out_features)
        predictor = sum(p.numel() for p in self.predictor.parameters()) if self.predictor is not None else 0
        if self.low_rank:
            predictor = self.basis.numel() + self.w_low.numel()
        return kept + predictor + (self.out_features if self.b_out is not None else 0)

    def spec(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "hidden_size": self.hidden_size, "neurons": self.neurons,
                "keep": self.keep, "act": self.act, "gated": self.gated, "out_features": self.out_features,
                "bias_in": self.b_in is not None, "bias_out": self.b_out is not None, "selector": self.selector,
                "predictor_rank": self.predictor.rank if self.predictor is not None else self.low_rank,
                "site_kind": self.site_kind, "gather_tokens": self.gather_tokens}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device=None, dtype=None) -> "NeuronSparseFFN":
        return cls(spec["hidden_size"], spec["neurons"], spec["keep"], spec["act"], spec["gated"],
                   spec["out_features"], spec["bias_in"], spec["bias_out"], spec["selector"],
                   spec["predictor_rank"], spec["site_kind"], spec["gather_tokens"], device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"neurons={self.neurons}, keep={self.keep}, selector={self.selector}, act={self.act}, "
                f"gated={self.gated}")
