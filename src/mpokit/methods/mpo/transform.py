"""Replace targeted Linear/Conv1D/Embedding/Conv2d/LSTM/GRU layers by MPO layers (data-free TT-SVD).

A targeted module holds one weight matrix (Linear, Conv1D, Embedding; a Conv2d's kernel read as
(out, in*kh*kw)) or several (an LSTM's or GRU's weight_ih_l{k} / weight_hh_l{k} per layer and
direction). Each matrix is a unit of the budget, named after its module (a Linear "fc1") or, for
RNNs, "<module>.<torch parameter name>" ("lstm.weight_hh_l0", also the local_dims key).

On a block-streamed model (io/lazy.py) a budget is planned in two passes over the blocks, each
block resident only while its matrices are read: pass 1 keeps each matrix's budget base (bonds
from its bond spectra), the plan is made, pass 2 repeats each TT-SVD and truncates it to the
planned bonds. TT-SVD is deterministic, so the result is bit-identical to the whole-model path.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

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
from mpokit.surgery.offload import offload_of, resident
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


@dataclass
class _Base:
    """One matrix's share of a budget: what the planner needs once its TT-SVD is gone."""

    out_dims: list[int]
    in_dims: list[int]
    bonds: list[int]  # its own share's bonds (ops.tt.bonds_for_budget)
    limits: list[int]  # full bonds: lengths of its bond spectra
    numel: int  # dense parameters

    @property
    def size(self) -> int:
        return count_params(self.out_dims, self.in_dims, self.bonds)


def _full_tt(w: torch.Tensor, layout: dict) -> tuple[list[torch.Tensor], TTInfo]:
    od, idd = layout["out_dims"], layout["in_dims"]
    return tt_svd(pad_matrix(w.detach(), math.prod(od), math.prod(idd)), od, idd)


def _base(unit: str, w: torch.Tensor, info: TTInfo, layout: dict, budget: float) -> _Base:
    od, idd = layout["out_dims"], layout["in_dims"]
    try:
        bonds = bonds_for_budget(info.spectra, od, idd, int(budget * w.numel()))
    except ValueError as e:
        raise ValueError(f"{unit} ({tuple(w.shape)}): {e}; raise the budget or leave it out "
                         "(exclude_modules)") from None
    return _Base(od, idd, bonds, [s.numel() for s in info.spectra], w.numel())


def _planned_bonds(bases: list[_Base], budget: float) -> list[list[int]]:
    """Bonds per matrix: the leftover of the own shares spent on the cheapest raises (ops.budget.plan)."""
    cap = int(budget * sum(b.numel for b in bases))
    sizes = [b.size for b in bases]
    leftover = cap - sum(sizes)
    raises = [bond_raises(b.out_dims, b.in_dims, b.bonds, b.limits, min(max(b.numel, size), size + leftover))
              for b, size in zip(bases, sizes)]
    return [list(c.choice) for c in plan(raises, cap)]


def plan_bonds(matrices: dict[str, torch.Tensor], layouts: dict[str, dict], budget: float,
               progress: bool) -> dict[str, tuple[list[torch.Tensor], TTInfo]]:
    """Cores per matrix so the targeted matrices keep at most `budget` of their parameters in total.

    One TT-SVD per matrix gives its bond spectra. Each first gets its own share
    (ops.tt.bonds_for_budget), then the leftover goes to the cheapest bond raises over all
    matrices (ops.budget.plan), never past a matrix's dense size; the cores are that same
    TT-SVD truncated (ops.tt.tt_truncate). The untruncated decompositions are held until
    the plan is made (about the targeted weights' size, in float64); a streamed model
    recomputes them instead (_streamed_bonds).
    """
    full, bases = {}, []
    for unit in tqdm(list(matrices), desc="mpo: spectra", disable=not progress):
        full[unit] = _full_tt(matrices[unit], layouts[unit])
        bases.append(_base(unit, matrices[unit], full[unit][1], layouts[unit], budget))
    bonds = _planned_bonds(bases, budget)
    return {unit: tt_truncate(*full[unit], b) for unit, b in zip(matrices, bonds)}


def _block_groups(model: nn.Module, names: list[str]) -> list[tuple[nn.Module | None, list[str]]]:
    """Consecutive targets of one decoder block together, (block, names); targets outside the
    blocks (embeddings, head: loaded with the model) under None. Taken before any module is replaced."""
    block_of = {id(m): b for b in offload_of(model).blocks for m in b.modules()}
    groups: list[tuple[nn.Module | None, list[str]]] = []
    for n in names:
        block = block_of.get(id(get_module(model, n)))
        if groups and groups[-1][0] is block:
            groups[-1][1].append(n)
        else:
            groups.append((block, [n]))
    return groups


def _loaded(model: nn.Module, modules: list[nn.Module]) -> contextlib.ExitStack:
    """Resident those of `modules` still on the meta device (a block's are loaded by its group)."""
    stack = contextlib.ExitStack()
    for m in modules:
        if any(p.is_meta for p in m.parameters()):
            stack.enter_context(resident(model, m))
    return stack


def _each_resident(model: nn.Module, groups, partners: dict[str, list[str]], fn, desc: str, progress: bool) -> None:
    """fn(name) for every target, its block (and any tied partner) resident meanwhile: one block's
    weights in memory at a time."""
    bar = tqdm(total=sum(len(g) for _, g in groups), desc=desc, disable=not progress)
    for block, names in groups:
        with resident(model, block) if block is not None else contextlib.nullcontext():
            for n in names:
                with _loaded(model, [get_module(model, n)] + [get_module(model, o) for o in partners.get(n, [])]):
                    fn(n)
                bar.update()
    bar.close()


def _streamed_bonds(model: nn.Module, groups, layouts: dict[str, dict], budget: float,
                    progress: bool) -> dict[str, list[int]]:
    """Pass 1 of a streamed model: each matrix's TT-SVD with its block resident, kept only as its
    budget base (a few ints per bond), then the plan; same bonds as plan_bonds."""
    bases: dict[str, _Base] = {}

    def record(name: str) -> None:
        for unit, w in module_matrices(name, get_module(model, name)).items():
            bases[unit] = _base(unit, w, _full_tt(w, layouts[unit])[1], layouts[unit], budget)

    _each_resident(model, groups, {}, record, "mpo: spectra", progress)
    units = [u for u in layouts if u in bases]  # the order plan_bonds sees (ties in the planner follow it)
    return dict(zip(units, _planned_bonds([bases[u] for u in units], budget)))


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


def _replace(model: nn.Module, name: str, mats: dict[str, torch.Tensor], cores: dict, config: MPOConfig,
             groups: dict[str, list[str]], done: dict[str, nn.Module], report: Report) -> None:
    """Swap the MPO layer (from `cores`, per matrix) in for `name`, and for the layers tied to it."""
    module = get_module(model, name)
    if isinstance(module, (nn.LSTM, nn.GRU)):
        new = rnn_from_cores(name, module, cores, config.forward_mode)
        set_module(model, name, new)
        report.layers.append(_rnn_record(name, mats, new))
        return
    new = module_from_cores(module, *cores[name], config.forward_mode)
    set_module(model, name, new)
    done[name] = new
    report.layers.append(record_for(name, mats[name], new, "mpo"))
    for other in groups.get(name, []):  # tied weights (embed_tokens <-> lm_head) share the cores
        if other != name and other not in done:
            set_module(model, other, tie_to(new, get_module(model, other), name))
            done[other] = get_module(model, other)


@register(MPOConfig)
def mpo_compress_(model: nn.Module, config: MPOConfig, progress: bool = True) -> Report:
    names = find_targets(model, config.target_modules, config.exclude_modules, types=target_types())
    groups = {n: g for g in tied_groups(model) for n in g}
    primary = [n for n in names if not any(o in names[: names.index(n)] for o in groups.get(n, []) if o != n)]
    mats = {n: module_matrices(n, get_module(model, n)) for n in primary}  # checks every module before any edit
    layouts = {u: matrix_layout(config, u, tuple(w.shape)) for n in primary for u, w in mats[n].items()}
    dense = [n for n in primary if _keeps_dense(config, mats[n], layouts)]
    budgeted = config.budget is not None and config.budget < 1
    report, done = Report(method=config.method), {}
    for name in dense:  # shapes only: nothing is read
        before = sum(w.numel() for w in mats[name].values())
        shape = tuple(next(iter(mats[name].values())).shape)
        report.layers.append(LayerRecord(name, "dense", shape, before, before, 0.0))
    todo = [n for n in primary if n not in dense]
    if offload_of(model) is None:
        units = {u: w for n in primary for u, w in mats[n].items()}
        planned = plan_bonds(units, layouts, config.budget, progress) if budgeted else {}
        for name in tqdm(todo, desc="mpo: decompose", disable=not progress):
            cores = {u: planned.pop(u) if u in planned else _cores_for(w, layouts[u], config)
                     for u, w in mats[name].items()}
            _replace(model, name, mats[name], cores, config, groups, done, report)
    else:  # block-streamed: weights are read only inside _each_resident, once per pass
        blocks = _block_groups(model, todo)
        bonds = _streamed_bonds(model, blocks, layouts, config.budget, progress) if budgeted else {}
        partners = {n: [o for o in groups.get(n, []) if o != n] for n in todo}

        def decompose(name: str) -> None:
            live = module_matrices(name, get_module(model, name))
            cores = {u: tt_truncate(*_full_tt(w, layouts[u]), bonds[u]) if u in bonds
                     else _cores_for(w, layouts[u], config) for u, w in live.items()}
            _replace(model, name, live, cores, config, groups, done, report)

        _each_resident(model, blocks, partners, decompose, "mpo: decompose", progress)
    order = {n: i for i, n in enumerate(primary)}
    report.layers.sort(key=lambda r: order[r.name])  # model order, as before dense layers were split off
    report.extra["tied"] = {n: m.tied_to for n, m in done.items() if getattr(m, "tied_to", None)}
    return report
