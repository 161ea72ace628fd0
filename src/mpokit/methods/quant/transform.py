"""Replace targeted Linear/Conv1D layers by QuantLinear, and MPO layers by QuantMPOLinear."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from mpokit.layers.mpo import MPOLinear
from mpokit.layers.quant import QuantLinear
from mpokit.layers.quant_mpo import QuantMPOLinear
from mpokit.methods.base import LayerRecord, Report, register
from mpokit.methods.quant.config import QuantConfig
from mpokit.ops.quant import DEFAULT_CLIP_RATIOS, sqnr_db
from mpokit.surgery.replace import get_module, set_module
from mpokit.surgery.targets import find_targets, weight_matrix

__all__ = ["quant_compress", "quantize_module", "fitted_group"]


def _target_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D, MPOLinear)


def fitted_group(cols: int, group_size: int) -> int:
    """group_size, else the largest multiple of 32 below it dividing cols (else group_size, ragged)."""
    g = group_size
    while cols % g and g > 32:
        g -= 32
    return g if cols % g == 0 else group_size


def quantize_module(module: nn.Module, config: QuantConfig) -> nn.Module:
    """The quantized stand-in for one Linear, Conv1D or MPOLinear."""
    clip = DEFAULT_CLIP_RATIOS if config.clip_search else None
    group = config.group_size  # MPO cores are (r0*o, i*r1) matrices: their rows may keep a short last group
    if config.fit_groups and not isinstance(module, MPOLinear):
        group = fitted_group(weight_matrix(module).shape[1], config.group_size)
    kw = {"bits": config.bits, "group_size": group, "symmetric": config.symmetric, "clip_ratios": clip,
          "zero_point": config.zero_point}
    if isinstance(module, MPOLinear):
        if getattr(module, "tied_to", None):
            raise ValueError("expected an untied MPO layer, got one sharing its cores with another layer")
        new = QuantMPOLinear.from_mpo(module, config.mpo_cores, **kw)
        new.orig_type = getattr(module, "orig_type", "Linear")
        return new
    new = QuantLinear.from_weight(weight_matrix(module), getattr(module, "bias", None),
                                  cache_weight=config.cache_weight, **kw)
    new.orig_type = type(module).__name__
    return new


def _group_of(layer: nn.Module) -> int:
    return layer.qweight.group_size if isinstance(layer, QuantLinear) else layer.group_size


def _dense_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@register(QuantConfig)
def quant_compress(model: nn.Module, config: QuantConfig, progress: bool = True) -> Report:
    names = find_targets(model, config.target_modules, config.exclude_modules, types=_target_types())
    report = Report(method=config.method)
    bytes_before = bytes_after = 0
    for name in tqdm(names, desc=f"quant: int{config.bits}", disable=not progress):
        module = get_module(model, name)
        with torch.no_grad():
            w = module.full_weight() if isinstance(module, MPOLinear) else weight_matrix(module)
            w = w.detach().clone()
        before = _dense_bytes(module)
        new = quantize_module(module, config)
        set_module(model, name, new)
        with torch.no_grad():
            w_hat = new.weight.detach()
        err = (w - w_hat).norm().item() / max(w.norm().item(), 1e-30)
        after = new.storage_bytes()
        bytes_before, bytes_after = bytes_before + before, bytes_after + after
        kind = "quant-mpo" if isinstance(new, QuantMPOLinear) else "quant"
        report.layers.append(LayerRecord(
            name=name, kind=kind, shape=tuple(w.shape), params_before=w.numel(), params_after=w.numel(),
            rel_error=err, detail={"bits": config.bits, "group_size": _group_of(new), "sqnr_db": sqnr_db(w, w_hat),
                                   "bytes_before": before, "bytes_after": after}))
    report.extra.update(bytes_before=bytes_before, bytes_after=bytes_after,
                        bytes_ratio=bytes_after / bytes_before if bytes_before else 1.0)
    return report
