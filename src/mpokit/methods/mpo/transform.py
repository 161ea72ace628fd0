"""Replace targeted Linear/Conv1D/Embedding layers by MPO layers (data-free TT-SVD)."""
from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from mpokit.layers.mpo import MPOEmbedding, MPOLinear, MPOModule, make_layout
from mpokit.methods.base import LayerRecord, Report, register
from mpokit.methods.mpo.config import MPOConfig
from mpokit.ops.budget import plan
from mpokit.ops.tt import TTInfo, bond_raises, bonds_for_budget, count_params, full_bonds, pad_matrix, tt_svd, tt_truncate
from mpokit.surgery.replace import get_module, set_module, tied_groups
from mpokit.surgery.targets import find_targets, weight_matrix

__all__ = ["mpo_compress_", "layer_layout", "plan_bonds", "decompose_module", "module_from_cores", "tie_to", "record_for"]


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
               progress: bool) -> dict[str, tuple[list[torch.Tensor], TTInfo]]:
    """Cores per layer so the targeted layers keep at most `budget` of their parameters in total.

    One TT-SVD per layer gives its bond spectra. Each layer first gets its own share
    (ops.tt.bonds_for_budget), then the leftover goes to the cheapest bond raises over all
    layers (ops.budget.plan), never past a layer's dense size; the cores are that same
    TT-SVD truncated (ops.tt.tt_truncate). The untruncated decompositions are held until
    the plan is made (about the targeted weights' size, in float64).
    """
    full, bases, total = {}, [], 0
    for name in tqdm(names, desc="mpo: spectra", disable=not progress):
        w = weight_matrix(get_module(model, name))
        od, idd = layouts[name]["out_dims"], layouts[name]["in_dims"]
        full[name] = tt_svd(pad_matrix(w.detach(), math.prod(od), math.prod(idd)), od, idd)
        spectra = full[name][1].spectra
        bonds = bonds_for_budget(spectra, od, idd, int(budget * w.numel()))
        size = count_params(od, idd, bonds)
        bases.append((od, idd, bonds, [s.numel() for s in spectra], size, max(w.numel(), size)))
        total += w.numel()
    cap = int(budget * total)
    leftover = cap - sum(b[4] for b in bases)
    raises = [bond_raises(od, idd, bonds, limits, min(layer_cap, size + leftover))
              for od, idd, bonds, limits, size, layer_cap in bases]
    chosen = plan(raises, cap)
    return {name: tt_truncate(*full[name], list(c.choice)) for name, c in zip(names, chosen)}


def decompose_module(module: nn.Module, **kw) -> MPOModule:
    """An MPO layer equivalent (up to truncation) to a Linear, Conv1D or Embedding."""
    if isinstance(module, nn.Embedding):
        new = MPOEmbedding.from_embedding(module, **kw)
    else:
        new = MPOLinear.from_weight(weight_matrix(module), getattr(module, "bias", None), **kw)
    new.orig_type = type(module).__name__
    return new


def module_from_cores(module: nn.Module, cores: list[torch.Tensor], info: TTInfo, forward_mode: str) -> MPOModule:
    """The MPO layer standing in for a Linear, Conv1D or Embedding, from cores already computed."""
    w = weight_matrix(module)
    od, idd = [c.shape[1] for c in cores], [c.shape[2] for c in cores]
    if isinstance(module, nn.Embedding):
        new = MPOEmbedding(w.shape[0], w.shape[1], od, idd, info.bonds, padding_idx=module.padding_idx,
                           forward_mode=forward_mode, device=w.device, dtype=w.dtype)
    else:
        bias = getattr(module, "bias", None)
        new = MPOLinear(w.shape[1], w.shape[0], od, idd, info.bonds, bias=bias is not None,
                        forward_mode=forward_mode, device=w.device, dtype=w.dtype)
        if bias is not None:
            new.bias.data.copy_(bias.detach())
    new.set_cores(cores, info)
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


def _keeps_dense(config: MPOConfig, module: nn.Module, layout: dict) -> bool:
    """Budget 1.0 means no loss: a layer whose lossless (full-bond) MPO is larger than it stays dense."""
    od, idd = layout["out_dims"], layout["in_dims"]
    return config.budget == 1.0 and count_params(od, idd, full_bonds(od, idd)) > weight_matrix(module).numel()


@register(MPOConfig)
def mpo_compress_(model: nn.Module, config: MPOConfig, progress: bool = True) -> Report:
    names = find_targets(model, config.target_modules, config.exclude_modules)
    groups = {n: g for g in tied_groups(model) for n in g}
    primary = [n for n in names if not any(o in names[: names.index(n)] for o in groups.get(n, []) if o != n)]
    layouts = {n: layer_layout(config, n, get_module(model, n)) for n in primary}
    dense = [n for n in primary if _keeps_dense(config, get_module(model, n), layouts[n])]
    budgeted = config.budget is not None and config.budget < 1
    planned = plan_bonds(model, primary, layouts, config.budget, progress) if budgeted else {}
    report, done = Report(method=config.method), {}
    for name in tqdm(primary, desc="mpo: decompose", disable=not progress):
        module = get_module(model, name)
        w = weight_matrix(module)
        if name in dense:
            report.layers.append(LayerRecord(name, "dense", tuple(w.shape), w.numel(), w.numel(), 0.0))
            continue
        if name in planned:
            new = module_from_cores(module, *planned.pop(name), config.forward_mode)
        else:  # budget None or 1.0: untruncated unless max_bond/cutoff say otherwise
            new = decompose_module(module, **layouts[name], forward_mode=config.forward_mode,
                                   max_bond=config.max_bond, cutoff=config.cutoff)
        set_module(model, name, new)
        done[name] = new
        report.layers.append(record_for(name, w, new, "mpo"))
        for other in groups.get(name, []):  # tied weights (embed_tokens <-> lm_head) share the cores
            if other != name and other not in done:
                set_module(model, other, tie_to(new, get_module(model, other), name))
                done[other] = get_module(model, other)
    report.extra["tied"] = {n: m.tied_to for n, m in done.items() if getattr(m, "tied_to", None)}
    return report
