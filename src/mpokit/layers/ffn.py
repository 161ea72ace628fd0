"""A dense FFN as plain tensors, and the small modules that put one back into a model.

DenseFFN is the architecture-neutral form that MoE layers are built from and convert
back to: y = down @ act(gate x) * (up x) for gated (SwiGLU) FFNs, y = down @ act(up x)
otherwise. GatedMLP and Conv1DMLP hold a dense FFN under the attribute names of the
Hugging Face modules they stand in for (LlamaMLP, GPT2MLP), so state-dict keys match;
restore_dense_ffn puts a dense FFN back where a routed FFN of a given site kind stands
(surgery/ffn.py describes the site kinds).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpokit.layers.base import MpokitLayer, replace_module

__all__ = ["DenseFFN", "activation", "linear_from", "GatedMLP", "Conv1DMLP", "Passthrough", "BERT_SUFFIX",
           "dense_ffn_module", "restore_dense_ffn"]

BERT_SUFFIX = ".intermediate.dense"  # where a routed FFN stands in a BERT-style layer


def activation(name: str) -> nn.Module:
    """transformers' activation module for a config name ("silu", "gelu_new", "relu", ...)."""
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise ValueError(f"expected an activation known to transformers, got {name!r}")
    return ACT2FN[name]


@dataclass
class DenseFFN:
    """Weights of one FFN. up/gate: (N, d) rows per neuron; down: (d_out, N) columns per neuron."""

    up: torch.Tensor
    down: torch.Tensor
    act: str
    gate: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, d = self.up.shape
        if self.down.dim() != 2 or self.down.shape[1] != n:
            raise ValueError(f"expected down of shape (d_out, {n}), got {tuple(self.down.shape)}")
        if self.gate is not None and self.gate.shape != self.up.shape:
            raise ValueError(f"expected gate of shape {tuple(self.up.shape)}, got {tuple(self.gate.shape)}")

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def neurons(self) -> int:
        return self.up.shape[0]

    @property
    def hidden(self) -> int:
        return self.up.shape[1]

    def numel(self) -> int:
        return sum(t.numel() for t in (self.up, self.down, self.gate, self.up_bias, self.gate_bias, self.down_bias)
                   if t is not None)

    def hidden_states(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., N) intermediate activations."""
        h = activation(self.act)(F.linear(x, self.gate, self.gate_bias)) if self.gated else None
        u = F.linear(x, self.up, self.up_bias)
        return h * u if h is not None else activation(self.act)(u)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.hidden_states(x), self.down, self.down_bias)


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


class GatedMLP(nn.Module):
    """down_proj(act_fn(gate_proj(x)) * up_proj(x)) with LlamaMLP's attribute names."""

    def __init__(self, ffn: DenseFFN):
        super().__init__()
        if not ffn.gated:
            raise ValueError("expected a gated FFN (with gate weights), got one without")
        self.gate_proj = linear_from(ffn.gate, ffn.gate_bias)
        self.up_proj = linear_from(ffn.up, ffn.up_bias)
        self.down_proj = linear_from(ffn.down, ffn.down_bias)
        self.act_fn = activation(ffn.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Conv1DMLP(nn.Module):
    """dropout(c_proj(act(c_fc(x)))) with GPT2MLP's attribute names and Conv1D (in, out) weights."""

    def __init__(self, ffn: DenseFFN, dropout: float = 0.0):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_fc, self.c_proj = Conv1D(ffn.neurons, ffn.hidden), Conv1D(ffn.down.shape[0], ffn.neurons)
        with torch.no_grad():
            for conv, w, b in ((self.c_fc, ffn.up, ffn.up_bias), (self.c_proj, ffn.down, ffn.down_bias)):
                conv.to(device=w.device, dtype=w.dtype)
                conv.weight.copy_(w.t())
                conv.bias.copy_(b if b is not None else torch.zeros_like(conv.bias))
        self.act = activation(ffn.act)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


def dense_ffn_module(ffn: DenseFFN, site_kind: str) -> nn.Module:
    """x -> ffn(x) as plain modules: GatedMLP, Conv1DMLP for GPT-2 sites, else Linear -> act -> Linear."""
    if ffn.gated:
        return GatedMLP(ffn)
    if site_kind == "gpt2":
        return Conv1DMLP(ffn)
    return nn.Sequential(linear_from(ffn.up, ffn.up_bias), activation(ffn.act), linear_from(ffn.down, ffn.down_bias))


def restore_dense_ffn(model: nn.Module, module_name: str, site_kind: str, ffn: DenseFFN) -> None:
    """Put `ffn` back where the routed FFN `model.<module_name>` of a `site_kind` site stands (gated,
    gpt2: the whole MLP; bert: intermediate.dense and the Passthroughs after it), in its train/eval mode."""
    training = model.get_submodule(module_name).training
    site = module_name
    if site_kind == "gated":
        replace_module(model, site, GatedMLP(ffn))
    elif site_kind == "gpt2":
        replace_module(model, site, Conv1DMLP(ffn, getattr(model.config, "resid_pdrop", 0.0)))
    elif site_kind == "bert":
        if not module_name.endswith(BERT_SUFFIX):
            raise ValueError(f"expected a BERT routed FFN name ending in {BERT_SUFFIX!r}, got {module_name!r}")
        site = module_name[: -len(BERT_SUFFIX)]
        layer = model.get_submodule(site)
        layer.intermediate.dense = linear_from(ffn.up, ffn.up_bias)
        layer.intermediate.intermediate_act_fn = activation(ffn.act)
        layer.output.dense = linear_from(ffn.down, ffn.down_bias)
    else:
        raise ValueError(f"expected site kind gated/gpt2/bert, got {site_kind!r}")
    model.get_submodule(site).train(training)


class Passthrough(MpokitLayer, nn.Identity):
    """Stands where a routed FFN absorbed a model's own module (BERT's activation and output.dense);
    undoing that routed FFN puts those modules back."""

    def spec(self) -> dict[str, Any]:
        return {"type": type(self).__name__}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device=None, dtype=None) -> "Passthrough":
        return cls()

    def to_dense(self) -> nn.Identity:
        return nn.Identity()
