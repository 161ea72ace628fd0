"""Replace targeted Linear/Conv1D/Embedding layers by MPO layers (data-free TT-SVD)."""
from __future__ import annotations

import math

from torch import nn
from tqdm.auto import tqdm

from mpokit.layers.mpo import MPOEmbedding, MPOLinear, MPOModule, make_layout
from mpokit.methods.base import LayerRecord, Report, register
from mpokit.methods.mpo.config import MPOConfig
from mpokit.ops.tt import bonds_for_budget, count_params, fill_bonds, pad_matrix, tt_svd
from mpokit.surgery.replace import get_module, set_module, tied_groups
from mpokit.surgery.targets import find_targets, weight_matrix

__all__ = ["mpo_compress", "layer_layout", "plan_bonds", "decompose_module", "tie_to", "record_for"]


def layer_layout(config: MPOConfig, name: str, module: nn.Module) -> dict:
    """Layout arguments (local dims) for one layer, from the config."""
    rows, cols = weight_matrix(module).shape
    out_dims = in_dims = None
    for key, dims in (config.local_dims or {}).items():
        if name == key or name.endswith("." + key):
            out_dims, in_dims = dims
    od, idd = make_layout(rows, cols, config.num_cores, out_dims, in_dims, config.lowrank)
    return {"out_dims": od, "in_dims": idd}


def plan_bonds(model: nn.Module, names: list[str], layouts: dict[str, dict], budget: float,
               progress: bool) -> dict[str, list[int]]:
    """Bonds per layer so the targeted layers keep at most `budget` of their parameters in total.

    Each layer first gets its own share (bisection on its bond spectra), then the
    leftover is spread over all layers one cheapest bond at a time.
    """
    plans, total = [], 0
    for name in tqdm(names, desc="mpo: spectra", disable=not progress):
        w = weight_matrix(get_module(model, name))
        od, idd = layouts[name]["out_dims"], layouts[name]["in_dims"]
        padded = pad_matrix(w.detach(), math.prod(od), math.prod(idd))
        _, info = tt_svd(padded, od, idd)
        bonds = bonds_for_budget(info.spectra, od, idd, int(budget * w.numel()))
        plans.append((od, idd, bonds, [s.numel() for s in info.spectra], max(w.numel(), count_params(od, idd, bonds))))
        total += w.numel()
    filled = fill_bonds(plans, int(budget * total))
    return dict(zip(names, filled))


def decompose_module(module: nn.Module, **kw) -> MPOModule:
    """An MPO layer equivalent (up to truncation) to a Linear, Conv1D or Embedding."""
    if isinstance(module, nn.Embedding):
        new = MPOEmbedding.from_embedding(module, **kw)
    else:
        new = MPOLinear.from_weight(weight_matrix(module), getattr(module, "bias", None), **kw)
    new.orig_type = type(module).__name__
    return new


def tie_to(source: MPOModule, like: nn.Module, source_name: str) -> MPOModule:
    """An MPO layer standing in for `like` (tied to source's weight) that shares source's cores."""
    if isinstance(like, nn.Embedding):
        new = MPOEmbedding(source.rows, source.cols, source.out_dims, source.in_dims, source.bonds,
                           padding_idx=like.padding_idx, forward_mode=source.forward_mode)
    else:
        new = MPOLinear(source.cols, source.rows, source.out_dims, source.in_dims, source.bonds,
                        bias=getattr(like, "bias", None) is not None, forward_mode=source.forward_mode)
        if new.bias is not None:
            new.bias = nn.Parameter(like.bias.detach().clone())
    new.cores = source.cores  # the same ParameterList: one set of weights
    new.orig_type, new.tied_to = type(like).__name__, source_name
    return new


def record_for(name: str, old_weight, new: MPOModule, kind: str) -> LayerRecord:
    info = new.info
    return LayerRecord(
        name=name, kind=kind, shape=tuple(old_weight.shape), params_before=old_weight.numel(),
        params_after=new.core_params(), rel_error=info.relative_error if info else None,
        detail={"out_dims": new.out_dims, "in_dims": new.in_dims, "bonds": new.bonds},
    )


@register(MPOConfig)
def mpo_compress(model: nn.Module, config: MPOConfig, progress: bool = True) -> Report:
    names = find_targets(model, config.target_modules, config.exclude_modules)
    groups = {n: g for g in tied_groups(model) for n in g}
    primary = [n for n in names if not any(o in names[: names.index(n)] for o in groups.get(n, []) if o != n)]
    layouts = {n: layer_layout(config, n, get_module(model, n)) for n in primary}
    planned = plan_bonds(model, primary, layouts, config.budget, progress) if config.budget is not None else {}
    report, done = Report(method=config.method), {}
    for name in tqdm(primary, desc="mpo: decompose", disable=not progress):
        module = get_module(model, name)
        w = weight_matrix(module)
        kw = {**layouts[name], "forward_mode": config.forward_mode}
        if name in planned:
            kw["max_bond"] = planned[name]
        else:
            kw.update(max_bond=config.max_bond, cutoff=config.cutoff)
        new = decompose_module(module, **kw)
        set_module(model, name, new)
        done[name] = new
        report.layers.append(record_for(name, w, new, "mpo"))
        for other in groups.get(name, []):  # tied weights (embed_tokens <-> lm_head) share the cores
            if other != name and other not in done:
                set_module(model, other, tie_to(new, get_module(model, other), name))
                done[other] = get_module(model, other)
    report.extra["tied"] = {n: m.tied_to for n, m in done.items() if getattr(m, "tied_to", None)}
    return report
