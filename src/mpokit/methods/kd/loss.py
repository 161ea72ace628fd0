"""Knowledge distillation losses (Hinton et al.): the student matches the teacher's softened logits."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["kd_loss", "make_kd_loss"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Hinton KD: T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over rows."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, v) / temperature, dim=-1)  # (N, V)
    t = F.log_softmax(teacher_logits.reshape(-1, v) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def make_kd_loss(teacher: nn.Module, alpha: float = 0.5, temperature: float = 2.0,
                 extra: Callable[[nn.Module], torch.Tensor] | None = None) -> Callable:
    """loss_fn(model, inputs) -> (loss, outputs) for mpokit.train.fit:
    (1 - alpha) * task loss + alpha * KD (+ extra(model), e.g. OPDF's tensor constraint)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"expected alpha in [0, 1], got {alpha}")
    teacher.eval().requires_grad_(False)

    def loss_fn(model, inputs):
        outputs = model(**inputs)
        with torch.no_grad():
            t_logits = teacher(**inputs).logits
        loss = (1 - alpha) * outputs.loss + alpha * kd_loss(outputs.logits, t_logits, temperature)
        if extra is not None:
            loss = loss + extra(model)
        return loss, outputs

    return loss_fn
