"""MPOE: upcycle dense FFNs into mixtures of MPO experts that share central tensors."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from mpokit.layers.mpoe import MPOEFFN, RoutedMoE, UpcycledMoE
from mpokit.methods.base import LayerRecord, Report, register
from mpokit.methods.mpoe.config import MPOEConfig
from mpokit.surgery.ffn import find_ffns, install_ffn, read_ffn
from mpokit.surgery.offload import resident
from mpokit.surgery.replace import get_module

__all__ = ["mpoe_upcycle_", "moe_aux_loss", "routed_layers"]


def routed_layers(model: nn.Module) -> list[RoutedMoE]:
    return [m for m in model.modules() if isinstance(m, RoutedMoE)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the load-balancing losses stored by the last training forward (0 when none)."""
    losses = [m.aux_loss for m in routed_layers(model) if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else torch.zeros(())


def _experts(dense, kind: str, config: MPOEConfig, i: int, gen: torch.Generator) -> tuple[nn.Module, dict]:
    """The mixture that replaces FFN number i, and its report detail."""
    if config.expert_type == "mpo":
        layer = MPOEFFN.from_dense(dense, config.num_experts, config.top_k, kind, config.num_cores, config.max_bond,
                                   config.grad_mask, config.noise, config.router_std, config.forward_mode,
                                   seed=config.seed + i)
        return layer, {"truncation_error": layer.truncation_error,
                       "central_params": sum(p.numel() for p in layer.central_parameters()),
                       "auxiliary_params": sum(p.numel() for p in layer.auxiliary_parameters()),
                       "bonds": {n: m.bonds for n, m in layer.mpos.items()}}
    layer = UpcycledMoE.from_dense(dense, config.num_experts, config.top_k, kind, config.router_std,
                                   config.forward_mode, seed=config.seed + i)
    if config.noise > 0:
        with torch.no_grad():
            for p in (layer.w_in, layer.w_out):
                p.add_(config.noise * p.std() * torch.randn(p.shape, generator=gen).to(p))
    return layer, {}


@register(MPOEConfig)
def mpoe_upcycle_(model: nn.Module, config: MPOEConfig, progress: bool = True) -> Report:
    sites = find_ffns(model, config.target_modules, config.exclude_modules)
    report = Report(method=config.method)
    gen = torch.Generator().manual_seed(config.seed)
    for i, site in enumerate(tqdm(sites, desc=f"mpoe: {config.expert_type} experts", disable=not progress)):
        with resident(model, get_module(model, site.module_name)):  # a streamed model loads one FFN at a time
            dense = read_ffn(model, site)
            layer, detail = _experts(dense, site.kind, config, i, gen)
            install_ffn(model, site, layer)
        params = sum(p.numel() for p in layer.parameters())
        switch = config.num_experts * dense.numel() + layer.router.weight.numel()
        report.layers.append(LayerRecord(
            name=site.module_name, kind=f"mpoe-{config.expert_type}", shape=(dense.neurons, dense.hidden),
            params_before=dense.numel(), params_after=params,
            detail={"experts": config.num_experts, "top_k": config.top_k, "dense_experts_params": switch,
                    "fewer_than_dense_experts": switch / params, **detail}))
    switch_total = sum(r.detail["dense_experts_params"] for r in report.layers)
    report.extra.update({"experts": config.num_experts, "top_k": config.top_k, "expert_type": config.expert_type,
                         "dense_experts_params": switch_total,
                         "fewer_than_dense_experts": switch_total / max(report.params_after, 1)})
    return report
