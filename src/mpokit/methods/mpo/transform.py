"""Replace targeted Linear/Conv1D/Embedding/Conv2d/LSTM/GRU layers by MPO layers (data-free TT-SVD).

A targeted module holds one weight matrix (Linear, Conv1D, Embedding; a Conv2d's kernel read as
(out, in*kh*kw)) or several (an LSTM's or GRU's weight_ih_l{k} / weight_hh_l{k} per layer and
direction). Each matrix is a unit of the budget, named after its module (a Linear "fc1") or, for
RNNs, "<module>.<torch parameter name>" ("lstm.weight_hh_l0", also the local_dims key).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from mpokit.layers.mpo import MPOEmbedding, MPOLinear, MPOModule, make_layout
from mpokit.layers.mpo_conv import MPOConv2d, check_conv, conv_matrix
from mpokit.layers.mpo_rnn import MPOGRU, MPOLSTM, MPORNN, check_rnn, rnn_matrices
from mpokit.methods.base import LayerRecord, Report, register
from mpokit.methods.mpo.config import MPOConfig
from mpokit.ops.budget import plan
from mpokit.ops.tt import TTInfo, bond_raises, bonds_for_budget, count_params, full_bonds, pad_matrix, tt_svd, tt_truncate
from mpokit.surgery.replace import get_module, set_module, tied_groups
from mpokit.surgery.targets import find_targets, weight_matrix

__all__ = ["mpo_compress_", "target_types", "module_matrices", "layer_layout", "matrix_layout", "plan_bonds",
           "decompose_module", "module_from_cores", "tie_to", "record_for"]

_RNNS = {nn.LSTM: MPOLSTM, nn.GRU: MPOGRU}


def target_types() -> tuple[type, ...]:
    """Module types the data-free MPO method replaces."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, nn.Embedding, Conv1D, nn.Conv2d, nn.LSTM, nn.GRU)


def module_matrices(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """Budget unit name -> weight matrix of one targeted module (refusing what MPO layers cannot stand for)."""
    if isinstance(module, nn.Conv2d):
        check_conv(module)
        return {name: conv_matrix(module)}
    if isinstance(module, (nn.LSTM, nn.GRU)):
        check_rnn(module, type(module))
        return {f"{name}.{key}": w for key, w in rnn_matrices(module).items()}
    return {name: weight_matrix(module)}


def matrix_layout(config: MPOConfig, unit: str, shape: tuple[int, int]) -> dict:
    """Layout arguments (local dims) for one matrix, from the config (local_dims keys match names or suffixes)."""
    out_dims = in_dims = None
    for key, dims in (config.local_dims or {}).items():
        if unit == key or unit.endswith("." + key):
            out_dims, in_dims = dims
    od, idd = make_layout(*shape, config.num_cores, out_dims, in_dims, config.lowrank)
    return {"out_dims": od, "in_dims": idd}


def layer_layout(config: MPOConfig, name: str, module: nn.Module) -> dict:
    """Layout arguments for a single-matrix layer (Linear, Conv1D, Embedding, Conv2d)."""
    (unit, w), = module_matrices(name, module).items()
    return matrix_layout(config, unit, tuple(w.shape))


def plan_bonds(matrices: dict[str, torch.Tensor], layouts: dict[str, dict], budget: float,
               progress: bool) -> dict[str, tuple[list[torch.Tensor], TTInfo]]:
    """Cores per matrix so the targeted matrices keep at most `budget` of their parameters in total.

    One TT-SVD per matrix gives its bond spectra. Each first gets its own share
    (ops.tt.bonds_for_budget), then the leftover goes to the cheapest bond raises over all
    matrices (ops.budget.plan), never past a matrix's dense size; the cores are that same
    TT-SVD truncated (ops.tt.tt_truncate). The untruncated decompositions are held until
    the plan is made (about the targeted weights' size, in float64).
    """
    full, bases, total = {}, [], 0
    for unit in tqdm(list(matrices), desc="mpo: spectra", disable=not progress):
        w = matrices[unit]
        od, idd = layouts[unit]["out_dims"], layouts[unit]["in_dims"]
        full[unit] = tt_svd(pad_matrix(w.detach(), math.prod(od), math.prod(idd)), od, idd)
        spectra = full[unit][1].spectra
        try:
            bonds = bonds_for_budget(spectra, od, idd, int(budget * w.numel()))
        except ValueError as e:
            raise ValueError(f"{unit} ({tuple(w.shape)}): {e}; raise the budget or leave it out "
                             "(exclude_modules)") from None
        size = count_params(od, idd, bonds)
        bases.append((od, idd, bonds, [s.numel() for s in spectra], size, max(w.numel(), size)))
        total += w.numel()
    cap = int(budget * total)
    leftover = cap - sum(b[4] for b in bases)
    raises = [bond_raises(od, idd, bonds, limits, min(layer_cap, size + leftover))
              for od, idd, bonds, limits, size, layer_cap in bases]
    chosen = plan(raises, cap)
    return {unit: tt_truncate(*full[unit], list(c.choice)) for unit, c in zip(matrices, chosen)}


def decompose_module(module: nn.Module, **kw) -> MPOModule:
    """An MPO layer equivalent (up to truncation) to a Linear, Conv1D, Embedding or Conv2d."""
    if isinstance(module, nn.Embedding):
        new = MPOEmbedding.from_embedding(module, **kw)
    elif isinstance(module, nn.Conv2d):
        new = MPOConv2d.from_conv(module, **kw)
    else:
        new = MPOLinear.from_weight(weight_matrix(module), getattr(module, "bias", None), **kw)
    new.orig_type = type(module).__name__
    return new


def module_from_cores(module: nn.Module, cores: list[torch.Tensor], info: TTInfo, forward_mode: str) -> MPOModule:
    """The MPO layer standing in for a Linear, Conv1D, Embedding or Conv2d, from cores already computed."""
    od, idd = [c.shape[1] for c in cores], [c.shape[2] for c in cores]
    if isinstance(module, nn.Conv2d):
        new = MPOConv2d.empty_like(module, od, idd, info.bonds, forward_mode)
        new.set_cores(cores, info)
        new.orig_type = "Conv2d"
        return new
    w = weight_matrix(module)
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


def rnn_from_cores(name: str, module: nn.RNNBase, planned: dict[str, tuple[list[torch.Tensor], TTInfo]],
                   forward_mode: str) -> MPORNN:
    """The MPOLSTM / MPOGRU standing in for `module`, from the cores of each of its matrices."""
    cores = {key: planned[f"{name}.{key}"] for key in rnn_matrices(module)}
    layouts = {key: {"out_dims": [c.shape[1] for c in cs], "in_dims": [c.shape[2] for c in cs], "bonds": info.bonds}
               for key, (cs, info) in cores.items()}
    new = _RNNS[type(module)].empty_like(module, layouts, forward_mode)
    for key, (cs, info) in cores.items():
        new.mpo[key].set_cores(cs, info)
    new.orig_type = type(module).__name__
    return new


def _cores_for(w: torch.Tensor, layout: dict, config: MPOConfig) -> tuple[list[torch.Tensor], TTInfo]:
    """Budget None or 1.0: untruncated unless max_bond / cutoff say otherwise."""
    od, idd = layout["out_dims"], layout["in_dims"]
    return tt_svd(pad_matrix(w.detach(), math.prod(od), math.prod(idd)), od, idd, max_bond=config.max_bond,
                  cutoff=config.cutoff)


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


def _rnn_record(name: str, mats: dict[str, torch.Tensor], new: MPORNN) -> LayerRecord:
    """One record for an RNN (shape: of weight_ih_l0): its matrices' parameters summed, the relative
    error of all of them together; each matrix's shape, layout and bonds in detail."""
    infos = [m.info for m in new.mpo.values()]
    norm = math.sqrt(sum(i.norm ** 2 for i in infos))
    err = math.sqrt(sum(i.error_bound ** 2 for i in infos))
    first = next(iter(mats.values()))
    return LayerRecord(name=name, kind="mpo", shape=tuple(first.shape),
                       params_before=sum(w.numel() for w in mats.values()), params_after=new.core_params(),
                       rel_error=err / norm if norm > 0 else 0.0,
                       detail={"matrices": {key: {"shape": [m.rows, m.cols], **m.spec()}
                                            for key, m in new.mpo.items()}})


def _keeps_dense(config: MPOConfig, mats: dict[str, torch.Tensor], layouts: dict[str, dict]) -> bool:
    """Budget 1.0 means no loss: a module whose lossless (full-bond) MPOs are larger than it stays dense."""
    if config.budget != 1.0:
        return False
    full = sum(count_params(layouts[u]["out_dims"], layouts[u]["in_dims"],
                            full_bonds(layouts[u]["out_dims"], layouts[u]["in_dims"])) for u in mats)
    return full > sum(w.numel() for w in mats.values())


@register(MPOConfig)
def mpo_compress_(model: nn.Module, config: MPOConfig, progress: bool = True) -> Report:
    names = find_targets(model, config.target_modules, config.exclude_modules, types=target_types())
    groups = {n: g for g in tied_groups(model) for n in g}
    primary = [n for n in names if not any(o in names[: names.index(n)] for o in groups.get(n, []) if o != n)]
    mats = {n: module_matrices(n, get_module(model, n)) for n in primary}  # checks every module before any edit
    layouts = {u: matrix_layout(config, u, tuple(w.shape)) for n in primary for u, w in mats[n].items()}
    dense = [n for n in primary if _keeps_dense(config, mats[n], layouts)]
    budgeted = config.budget is not None and config.budget < 1
    units = {u: w for n in primary for u, w in mats[n].items()}
    planned = plan_bonds(units, layouts, config.budget, progress) if budgeted else {}
    report, done = Report(method=config.method), {}
    for name in tqdm(primary, desc="mpo: decompose", disable=not progress):
        module = get_module(model, name)
        if name in dense:
            before = sum(w.numel() for w in mats[name].values())
            shape = tuple(next(iter(mats[name].values())).shape)
            report.layers.append(LayerRecord(name, "dense", shape, before, before, 0.0))
            continue
        cores = {u: planned.pop(u) if u in planned else _cores_for(w, layouts[u], config)
                 for u, w in mats[name].items()}
        if isinstance(module, (nn.LSTM, nn.GRU)):
            new = rnn_from_cores(name, module, cores, config.forward_mode)
            set_module(model, name, new)
            report.layers.append(_rnn_record(name, mats[name], new))
            continue
        new = module_from_cores(module, *cores[name], config.forward_mode)
        set_module(model, name, new)
        done[name] = new
        report.layers.append(record_for(name, mats[name][name], new, "mpo"))
        for other in groups.get(name, []):  # tied weights (embed_tokens <-> lm_head) share the cores
            if other != name and other not in done:
                set_module(model, other, tie_to(new, get_module(model, other), name))
                done[other] = get_module(model, other)
    report.extra["tied"] = {n: m.tied_to for n, m in done.items() if getattr(m, "tied_to", None)}
    return report
