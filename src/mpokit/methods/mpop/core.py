"""MPOP (ACL 2021): fine-tune only the auxiliary MPO cores, central cores frozen; dimension squeezing.

Squeezing lowers bonds in steps: each step re-decomposes the layer's *current* weight with a
smaller bond cap (TT-SVD, so the cut is optimal for that layout) and then trains a little, letting
the auxiliary cores absorb the loss before the next cut (instead of one large truncation).
"""
from __future__ import annotations

from typing import Callable, Iterable

from torch import nn

from mpokit.layers.mpo import MPOLinear
from mpokit.ops.tt import tt_svd, tt_to_matrix
from mpokit.surgery.params import train_only_

__all__ = ["mpo_linears", "decompose_", "auxiliary_parameters", "central_parameters", "mpop_", "squeeze_layer_",
           "squeeze_schedule", "dimension_squeeze_"]


def mpo_linears(model: nn.Module) -> list[tuple[str, MPOLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MPOLinear)]


def decompose_(model: nn.Module, target_modules=None, exclude_modules=None, num_cores: int = 3) -> int:
    """Losslessly decompose the targeted Linear layers (no-op if the model already has MPO layers)."""
    from mpokit.methods.base import compress_
    from mpokit.methods.mpo import MPOConfig

    if not mpo_linears(model):
        compress_(model, MPOConfig(target_modules=target_modules, exclude_modules=exclude_modules,
                                   num_cores=num_cores), progress=False)
    return len(mpo_linears(model))


def auxiliary_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, m in mpo_linears(model) for p in m.auxiliary_parameters()]


def central_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [m.cores[m.central_index] for _, m in mpo_linears(model)]


def mpop_(model: nn.Module, extra: Iterable[nn.Parameter] = (), all_cores: bool = False) -> int:
    """Freeze everything but the auxiliary cores (all cores with all_cores=True) and `extra`; returns count."""
    layers = mpo_linears(model)
    if not layers:
        raise ValueError("expected a model with MPOLinear layers, got none (decompose it first)")
    cores = [p for _, m in layers for p in m.cores] if all_cores else auxiliary_parameters(model)
    return train_only_(model, [*cores, *extra])


def squeeze_layer_(layer: MPOLinear, max_bond: int) -> float:
    """Truncate every bond to <= max_bond by re-decomposing the current weight; returns relative error."""
    if max_bond < 1:
        raise ValueError(f"expected max_bond >= 1, got {max_bond}")
    padded = tt_to_matrix([c.detach() for c in layer.cores])  # (prod o, prod i), padding kept
    cores, info = tt_svd(padded, layer.out_dims, layer.in_dims, max_bond=max_bond)
    layer.set_cores(cores, info)  # new Parameters: re-run mpop_ and rebuild the optimizer afterwards
    return info.relative_error


def squeeze_schedule(start: int, target: int, steps: int) -> list[int]:
    """Bond caps from just below `start` down to `target` in `steps` geometric steps."""
    if steps < 1 or target < 1:
        raise ValueError(f"expected steps >= 1 and target >= 1, got {steps} and {target}")
    if target >= start:
        return [target]
    ratio = (target / start) ** (1 / steps)
    caps = [max(target, int(round(start * ratio ** (k + 1)))) for k in range(steps)]
    return sorted(set(caps), reverse=True)


def dimension_squeeze_(model: nn.Module, target_bond: int, steps: int, train_between: Callable[[], object],
                       extra: Iterable[nn.Parameter] = ()) -> list[dict]:
    """Lower every MPO bond to target_bond in `steps` cuts, calling train_between() after each cut."""
    layers = mpo_linears(model)
    if not layers:
        raise ValueError("expected a model with MPOLinear layers, got none")
    start = max(max(m.bonds) for _, m in layers)
    log = []
    extra = list(extra)
    for cap in squeeze_schedule(start, target_bond, steps):
        errors = [squeeze_layer_(m, cap) for _, m in layers]
        trainable = mpop_(model, extra)
        train_between()
        log.append({"max_bond": cap, "max_rel_error": max(errors), "trainable_params": trainable,
                    "core_params": sum(m.core_params() for _, m in layers)})
    return log


