"""MoEfication: cluster each FFN's neurons into experts, train a router, compute only top-k experts."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from mpokit.calibration.stats import resolve_calibration
from mpokit.data import Calibration, as_calibration
from mpokit.layers.moe import MoEFFN
from mpokit.methods.base import LayerRecord, Report, register
from mpokit.methods.moefication.clustering import balanced_kmeans, neuron_features
from mpokit.methods.moefication.config import MoEficationConfig
from mpokit.methods.moefication.refit import refit_output_
from mpokit.methods.moefication.router import collect_ffn_inputs, fit_router
from mpokit.surgery.ffn import find_ffns, install_ffn, read_ffn
from mpokit.surgery.offload import resident
from mpokit.surgery.replace import get_module

__all__ = ["moefy_", "set_top_k_", "moe_layers"]

CLUSTER_TOKENS = 4096  # calibration tokens used for activation features


@register(MoEficationConfig)
def moefy_(model: nn.Module, config: MoEficationConfig, tokenizer=None, calibration: Calibration | None = None, *,
          calibration_text: str | None = None, batches: list[torch.Tensor] | None = None,
          progress: bool = True) -> Report:
    """Replace every targeted FFN by a MoEFFN in place. calibration: text or (1, L) token id batches
    (default: data.corpus.default_calibration_corpus); the older calibration_text= / batches= still work."""
    calibration = as_calibration(calibration, calibration_text, batches)
    sites = find_ffns(model, config.target_modules, config.exclude_modules)
    for site in sites:
        n = read_ffn(model, site).neurons
        if n % config.num_experts:
            raise ValueError(f"expected num_experts to divide the FFN size {n} of {site.name}, got {config.num_experts}")
    batches = resolve_calibration(calibration, tokenizer, config.calibration_tokens, config.calibration_context,
                                  "moefication")
    inputs = collect_ffn_inputs(model, sites, batches, progress)
    tokens = next(iter(inputs.values())).shape[0]
    report = Report(method=config.method)
    for i, site in enumerate(tqdm(sites, desc="moefication: experts", disable=not progress)):
        with resident(model, get_module(model, site.module_name)):  # a streamed model loads one FFN at a time
            report.layers.append(_moefy_site(model, site, inputs.pop(site.module_name), config, i))
    active = sum(r.detail["active_params"] for r in report.layers)
    report.extra.update({
        "experts": config.num_experts, "shared_experts": config.shared_experts, "top_k": config.top_k,
        "active_fraction": (config.shared_experts + config.top_k) / config.num_experts,
        "ffn_active_params": active, "ffn_active_ratio": active / max(report.params_before, 1),
        "mean_router_recall": sum(r.detail["router_recall"] for r in report.layers) / len(report.layers),
        "calibration_tokens": tokens,
    })
    return report


def _moefy_site(model: nn.Module, site, x: torch.Tensor, config: MoEficationConfig, i: int) -> LayerRecord:
    """One FFN -> MoEFFN from its calibration inputs x (T, d), installed in place; its report row."""
    dense = read_ffn(model, site)
    hidden = None
    if config.cluster_features == "activations" or config.shared_experts:
        with torch.no_grad():
            hidden = dense.hidden_states(x[:CLUSTER_TOKENS].to(dense.up.device, dense.up.dtype))
    labels = assign_experts(dense, hidden, config, seed=config.seed + i)
    with torch.random.fork_rng(devices=[]):  # the router's initial weights: from the seed, not the global RNG
        torch.manual_seed(config.seed + i)
        moe = MoEFFN.from_dense(dense, labels, config.top_k, config.router_hidden, site.kind, config.forward_mode,
                                config.shared_experts)
    quality = fit_router(moe, x, config.router_steps, config.router_lr, config.router_batch, seed=config.seed + i)
    if config.refit:
        quality.update(refit_output_(moe, x, config.refit_ridge))
    install_ffn(model, site, moe)
    return LayerRecord(
        name=site.module_name, kind="moe", shape=(dense.neurons, dense.hidden), params_before=dense.numel(),
        params_after=sum(p.numel() for p in moe.parameters()),
        detail={"experts": moe.num_experts, "expert_size": moe.expert_size, "top_k": moe.top_k,
                "active_params": moe.active_params(), "router_recall": quality["recall"],
                "router_mass": quality["mass"], "router_loss": quality["loss"],
                **{k: v for k, v in quality.items() if k.startswith("rel_error")}})


def assign_experts(dense, hidden: torch.Tensor | None, config: MoEficationConfig, seed: int) -> torch.Tensor:
    """Neuron -> expert labels (N,): experts 0..s-1 hold the s * N / E neurons with the highest
    mean |activation| (hidden (T, N)), the rest are balanced k-means clusters s..E-1."""
    n, s = dense.neurons, config.shared_experts
    size = n // config.num_experts
    labels = torch.empty(n, dtype=torch.long)
    rest = torch.arange(n)
    if s:
        ranked = hidden.detach().abs().float().mean(0).argsort(descending=True).cpu()  # (N,)
        labels[ranked[:s * size]] = torch.arange(s * size) // size
        rest = ranked[s * size:].sort().values
    feats = neuron_features(dense.up[rest], None if dense.gate is None else dense.gate[rest],
                            None if hidden is None else hidden[:, rest.to(hidden.device)], config.cluster_features)
    labels[rest] = balanced_kmeans(feats, config.num_experts - s, config.cluster_backend, seed=seed) + s
    return labels


def moe_layers(model: nn.Module) -> list[MoEFFN]:
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


def set_top_k_(model: nn.Module, top_k: int) -> int:
    """Change how many experts every MoEFFN computes (no re-clustering needed); returns the layer count."""
    layers = moe_layers(model)
    for m in layers:
        if not 1 <= top_k <= m.routed_experts:
            raise ValueError(f"expected 1 <= top_k <= {m.routed_experts} routed experts, got {top_k}")
        m.top_k = top_k
    return len(layers)
