"""OPDF (NeurIPS 2024): distillation into an OPF-expanded student plus a tensor constraint loss.

The constraint is the MSE between the student's and the teacher's auxiliary MPO cores (same
layer name, same core shape). Student cores are read from the live Parameters, never from
state_dict() (which detaches: the research code's constraint therefore had no gradient).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mpokit.layers.mpo import MPOLinear
from mpokit.methods.kd.loss import kd_loss, make_kd_loss

__all__ = ["tensor_constraint_loss", "kd_loss", "make_distill_loss", "expand_teacher_like_"]


def _mpo_by_name(model: nn.Module) -> dict[str, MPOLinear]:
    model = getattr(model, "module", model)  # DDP wrapper
    return {n: m for n, m in model.named_modules() if isinstance(m, MPOLinear)}


def tensor_constraint_loss(student: nn.Module, teacher: nn.Module) -> torch.Tensor:
    """Mean over matching (layer, core) pairs of MSE(student aux core, teacher aux core)."""
    s_layers, t_layers = _mpo_by_name(student), _mpo_by_name(teacher)
    terms = []
    for name, s in s_layers.items():
        t = t_layers.get(name)
        if t is None:
            continue
        central = s.central_index
        for k, core in enumerate(s.cores):  # live nn.Parameter: keeps the graph
            if k != central and k < len(t.cores) and t.cores[k].shape == core.shape:
                terms.append(F.mse_loss(core, t.cores[k].detach()))
    if not terms:
        raise ValueError("expected student and teacher MPO layers with matching auxiliary core shapes, got none")
    return torch.stack(terms).mean()


def make_distill_loss(teacher: nn.Module, alpha: float = 0.5, beta: float = 0.0, temperature: float = 2.0
                      ) -> Callable:
    """loss_fn(model, inputs) -> (loss, outputs) for mpokit.train.fit:
    (1 - alpha) * task loss + alpha * KD + beta * tensor constraint (beta = 0: plain KD)."""
    if beta < 0:
        raise ValueError(f"expected beta >= 0, got {beta}")
    extra = (lambda model: beta * tensor_constraint_loss(model, teacher)) if beta > 0 else None
    return make_kd_loss(teacher, alpha, temperature, extra=extra)


def expand_teacher_like_(teacher: nn.Module, student: nn.Module) -> list[str]:
    """Give the teacher the student's OPF layout on the same-named, same-shaped layers."""
    from mpokit.surgery import get_module, set_module

    done = []
    for name, s in _mpo_by_name(student).items():
        lin = get_module(teacher, name)
        if isinstance(lin, nn.Linear) and (lin.out_features, lin.in_features) == (s.out_features, s.in_features):
            t = MPOLinear.from_linear(lin, out_dims=s.out_dims, in_dims=s.in_dims, forward_mode="dense")
            set_module(teacher, name, t.requires_grad_(False))
            done.append(name)
    return done
