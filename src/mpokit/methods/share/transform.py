"""Share each weight type's MPO central core across layers (groups of G or all), per-layer auxiliary cores."""
from __future__ import annotations

import contextlib
import math
import re

from torch import nn
from tqdm.auto import tqdm

from mpokit.layers.mpo import MPOLinear, make_layout
from mpokit.methods.base import LayerRecord, Report, register
from mpokit.methods.share.config import ShareConfig
from mpokit.ops.budget import Candidate, best_within
from mpokit.ops.shared_tt import fit_shared_central, shared_params
from mpokit.ops.tt import pad_matrix
from mpokit.surgery.offload import resident
from mpokit.surgery.replace import get_module, set_module
from mpokit.surgery.targets import find_targets, weight_matrix

__all__ = ["share_compress_", "weight_types", "plan_bond"]

LAYER_INDEX = re.compile(r"\.(\d+)\.")


def weight_types(names: list[str]) -> dict[str, list[tuple[int, str]]]:
    """Group module names by type: 'model.layers.3.mlp.up_proj' -> 'model.layers.*.mlp.up_proj', index 3."""
    types: dict[str, list[tuple[int, str]]] = {}
    for name in names:
        m = LAYER_INDEX.search(name)
        if m is None:
            raise ValueError(f"expected targets inside numbered layers for cross-layer sharing, got {name!r}")
        key = name[: m.start()] + ".*." + name[m.end():]
        types.setdefault(key, []).append((int(m.group(1)), name))
    return {k: sorted(v) for k, v in types.items()}


def _groups(members: list, size: int) -> list[list]:
    size = size or len(members)
    return [members[i:i + size] for i in range(0, len(members), size)]


def plan_bond(out_dims, in_dims, group_lengths: list[int], max_params: int) -> int:
    """Largest r (r1 = min(r, n1), r2 = min(r, n3)) whose total over the groups fits max_params.

    The bonds are budget candidates (ops.budget) for one weight type; with no error estimate
    before the fit, a larger bond counts as better (error = the bond units given up).
    """
    n1, n3 = out_dims[0] * in_dims[0], out_dims[2] * in_dims[2]
    top = max(n1, n3)
    ladder = [Candidate(sum(shared_params(out_dims, in_dims, min(r, n1), min(r, n3), g) for g in group_lengths),
                        float(top - r), r) for r in range(1, top + 1)]
    if ladder[0].cost > max_params:
        raise ValueError(f"expected a budget of at least {ladder[0].cost} parameters for {out_dims}x{in_dims}, "
                         f"got {max_params}")
    return best_within(ladder, max_params).choice


def _share_group(model: nn.Module, group: list, shape: tuple[int, int], od, idd, bonds: tuple[int, int],
                 config: ShareConfig, report: Report) -> None:
    """Fit one shared central core to the group's (loaded) weights and swap each member for its MPOLinear."""
    rows, cols = shape
    mats = [pad_matrix(weight_matrix(get_module(model, n)).detach(), math.prod(od), math.prod(idd)) for _, n in group]
    fit = fit_shared_central(mats, od, idd, *bonds, config.sweeps, config.init)
    old0 = get_module(model, group[0][1])
    central = nn.Parameter(fit.central.to(old0.weight.device, old0.weight.dtype))
    for j, ((_, name), left, right, err) in enumerate(zip(group, fit.left, fit.right, fit.relative_errors)):
        old = get_module(model, name)
        new = MPOLinear(cols, rows, od, idd, list(bonds), bias=getattr(old, "bias", None) is not None,
                        forward_mode=config.forward_mode, device=old.weight.device, dtype=old.weight.dtype)
        new.cores = nn.ParameterList([nn.Parameter(left.to(central)), central, nn.Parameter(right.to(central))])
        if new.bias is not None:
            new.bias = nn.Parameter(old.bias.detach().clone())
        new.orig_type, new.shared_with = type(old).__name__, group[0][1]
        set_module(model, name, new)
        own = left.numel() + right.numel()
        share = central.numel() // len(group) + (central.numel() % len(group) if j == 0 else 0)
        report.layers.append(LayerRecord(
            name=name, kind="share", shape=(rows, cols), params_before=rows * cols, params_after=own + share,
            rel_error=err, detail={"group": [n for _, n in group], "bonds": list(bonds), "out_dims": od,
                                   "in_dims": idd}))


@register(ShareConfig)
def share_compress_(model: nn.Module, config: ShareConfig, progress: bool = True) -> Report:
    names = find_targets(model, config.target_modules, config.exclude_modules)
    embeddings = [n for n in names if isinstance(get_module(model, n), nn.Embedding)]
    if embeddings:
        raise ValueError(f"expected linear layers for cross-layer sharing, got embeddings {embeddings}")
    report = Report(method=config.method)
    shared_groups = 0
    for key, members in tqdm(weight_types(names).items(), desc="share: weight types", disable=not progress):
        shapes = [tuple(weight_matrix(get_module(model, n)).shape) for _, n in members]  # a streamed model: meta
        rows, cols = shapes[0]
        if any(shape != (rows, cols) for shape in shapes):
            raise ValueError(f"expected one shape for every {key}, got {sorted(set(shapes))}")
        od, idd = make_layout(rows, cols, 3)
        n1, n3 = od[0] * idd[0], od[2] * idd[2]
        groups = _groups(members, config.groups)
        if config.budget is not None:
            r = plan_bond(od, idd, [len(g) for g in groups], int(config.budget * rows * cols * len(members)))
        else:
            r = config.max_bond or max(n1, n3)
        r1, r2 = min(r, n1), min(r, n3)
        for group in groups:
            with contextlib.ExitStack() as loaded:  # a streamed model holds only this group's layers
                for _, n in group:
                    loaded.enter_context(resident(model, get_module(model, n)))
                _share_group(model, group, (rows, cols), od, idd, (r1, r2), config, report)
            shared_groups += len(group) > 1
    unshared = sum(shared_params(r.detail["out_dims"], r.detail["in_dims"], *r.detail["bonds"], 1)
                   for r in report.layers)
    report.extra.update({"groups": config.groups, "shared_groups": shared_groups,
                         "params_saved": report.params_before - report.params_after,
                         "params_saved_by_sharing": unshared - report.params_after})
    return report

