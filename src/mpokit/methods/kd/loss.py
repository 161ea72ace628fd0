"""Knowledge distillation losses (Hinton et al.): the student matches the teacher's softened logits,
optionally also its hidden states at the block outputs."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["kd_loss", "hidden_mse", "make_kd_loss"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Hinton KD: T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over rows (tokens, for an LM)."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, v) / temperature, dim=-1)  # (N, V)
    t = F.log_softmax(teacher_logits.reshape(-1, v) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def hidden_mse(student_hidden, teacher_hidden) -> torch.Tensor:
    """Mean over blocks of MSE(student, teacher) / mean(teacher^2): each block weighs alike, whatever
    its scale (a few outlier channels would otherwise dominate). Inputs: the models' hidden_states
    tuples; entry 0 (the embeddings) is skipped."""
    if len(student_hidden) != len(teacher_hidden) or len(student_hidden) < 2:
        raise ValueError(f"expected equal numbers (>= 2) of hidden states, got {len(student_hidden)} and "
                         f"{len(teacher_hidden)}")
    terms = [F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12)
             for s, t in zip(student_hidden[1:], teacher_hidden[1:])]  # each (B, T, H)
    return torch.stack(terms).mean()


def _follow(teacher: nn.Module, inputs: dict) -> None:
    """Put the teacher where the batch is: the Trainer moves only the student (to the GPU, say)."""
    device = next(v.device for v in inputs.values() if isinstance(v, torch.Tensor))
    if next(teacher.parameters()).device != device:
        teacher.to(device)


def make_kd_loss(teacher: nn.Module, alpha: float = 0.5, temperature: float = 2.0,
                 extra: Callable[[nn.Module], torch.Tensor] | None = None, hidden_weight: float = 0.0) -> Callable:
    """loss_fn(model, inputs) -> (loss, outputs) for mpokit.train.fit:
    (1 - alpha) * task loss + alpha * KD (+ hidden_weight * hidden_mse of the block outputs)
    (+ extra(model), e.g. OPDF's tensor constraint). Teacher outputs are computed per batch under no_grad."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"expected alpha in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"expected temperature > 0, got {temperature}")
    if not hidden_weight >= 0:
        raise ValueError(f"expected hidden_weight >= 0, got {hidden_weight}")
    teacher.eval().requires_grad_(False)
    hidden = {"output_hidden_states": True} if hidden_weight > 0 else {}

    def loss_fn(model, inputs):
        _follow(teacher, inputs)
        unlabelled = {k: v for k, v in inputs.items() if k != "labels"}  # the teacher's loss is never used
        # alpha 1: no task loss, so no labels (spares the student's cross-entropy over the vocabulary)
        outputs = model(**(unlabelled if alpha == 1 else inputs), **hidden)
        with torch.no_grad():
            t_out = teacher(**unlabelled, **hidden)
        loss = alpha * kd_loss(outputs.logits, t_out.logits, temperature)
        if alpha < 1:
            loss = loss + (1 - alpha) * outputs.loss
        if hidden_weight > 0:
            loss = loss + hidden_weight * hidden_mse(outputs.hidden_states, t_out.hidden_states)
        if extra is not None:
            loss = loss + extra(model)
        return loss, outputs

    return loss_fn
