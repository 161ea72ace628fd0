"""MoEfication: cluster each FFN's neurons into experts, train a router, compute only top-k experts."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from mpokit.calibration.stats import resolve_calibration
from mpokit.layers.moe import MoEFFN
from mpokit.methods.base import LayerRecord, Report, register
from mpokit.methods.moefication.clustering import balanced_kmeans, neuron_features
from mpokit.methods.moefication.config import MoEficationConfig
from mpokit.methods.moefication.router import collect_ffn_inputs, fit_router
from mpokit.surgery.ffn import find_ffns, install_ffn, read_ffn

__all__ = ["moefy", "set_top_k_", "moe_layers"]

CLUSTER_TOKENS = 4096  # calibration tokens used for activation features


@register(MoEficationConfig)
def moefy(model: nn.Module, config: MoEficationConfig, tokenizer=None, calibration_text: str | None = None,
          batches: list[torch.Tensor] | None = None, progress: bool = True) -> Report:
    """Replace every targeted FFN by a MoEFFN in place. batches: (1, L) token id tensors (optional)."""
    sites = find_ffns(model, config.target_modules, config.exclude_modules)
    for site in sites:
        n = read_ffn(model, site).neurons
        if n % config.num_experts:
            raise ValueError(f"expected num_experts to divide the FFN size {n} of {site.name}, got {config.num_experts}")
    batches = resolve_calibration(batches, tokenizer, calibration_text, config.calibration_tokens,
                                  config.calibration_context, "moefication")
    inputs = collect_ffn_inputs(model, sites, batches, progress)
    tokens = next(iter(inputs.values())).shape[0]
    report = Report(method=config.method)
    for i, site in enumerate(tqdm(sites, desc="moefication: experts", disable=not progress)):
        dense = read_ffn(model, site)
        x = inputs.pop(site.module_name)  # (T, d) float32
        hidden = None
        if config.cluster_features == "activations":
            with torch.no_grad():
                hidden = dense.hidden_states(x[:CLUSTER_TOKENS].to(dense.up.device, dense.up.dtype))
        feats = neuron_features(dense.up, dense.gate, hidden, config.cluster_features)
        labels = balanced_kmeans(feats, config.num_experts, config.cluster_backend, seed=config.seed + i)
        moe = MoEFFN.from_dense(dense, labels, config.top_k, config.router_hidden, site.kind, config.forward_mode)
        quality = fit_router(moe, x, config.router_steps, config.router_lr, config.router_batch, seed=config.seed + i)
        install_ffn(model, site, moe)
        report.layers.append(LayerRecord(
            name=site.module_name, kind="moe", shape=(dense.neurons, dense.hidden), params_before=dense.numel(),
            params_after=sum(p.numel() for p in moe.parameters()),
            detail={"experts": moe.num_experts, "expert_size": moe.expert_size, "top_k": moe.top_k,
                    "active_params": moe.active_params(), "router_recall": quality["recall"],
                    "router_mass": quality["mass"], "router_loss": quality["loss"]}))
    active = sum(r.detail["active_params"] for r in report.layers)
    report.extra.update({
        "experts": config.num_experts, "top_k": config.top_k, "active_fraction": config.top_k / config.num_experts,
        "ffn_active_params": active, "ffn_active_ratio": active / max(report.params_before, 1),
        "mean_router_recall": sum(r.detail["router_recall"] for r in report.layers) / len(report.layers),
        "calibration_tokens": tokens,
    })
    return report


def moe_layers(model: nn.Module) -> list[MoEFFN]:
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


def set_top_k_(model: nn.Module, top_k: int) -> int:
    """Change how many experts every MoEFFN computes (no re-clustering needed); returns the layer count."""
    layers = moe_layers(model)
    for m in layers:
        if not 1 <= top_k <= m.num_experts:
            raise ValueError(f"expected 1 <= top_k <= {m.num_experts}, got {top_k}")
        m.top_k = top_k
    return len(layers)
