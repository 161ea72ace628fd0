"""OPDF as a training-time method: OPF expansion plus distillation with a tensor constraint."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from mpokit.methods.base import option
from mpokit.methods.checks import check_number, nonnegative_float
from mpokit.methods.finetune import Prepared, TrainContext
from mpokit.methods.kd.config import check_teacher
from mpokit.methods.opdf.core import expand_teacher_like_, make_distill_loss
from mpokit.methods.opf.config import OPFConfig

__all__ = ["OPDFConfig"]


@dataclass
class OPDFConfig(OPFConfig):
    """OPDF (NeurIPS 2024): an OPF-expanded student learns from `teacher` (expanded to the same
    layout): (1 - alpha) * task loss + alpha * KD + beta * MSE between matching auxiliary cores."""

    method: ClassVar[str] = "opdf"
    teacher: str | None = None
    alpha: float = 0.5
    beta: float = option(1.0, "tensor constraint weight", type=nonnegative_float)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_teacher(self.method, self.teacher, self.alpha)
        check_number("beta", self.beta, 0)

    def prepare(self, model: nn.Module, ctx: TrainContext) -> Prepared:
        prepared = super().prepare(model, ctx)
        teacher = ctx.load_teacher(self.teacher)
        expand_teacher_like_(teacher, model)
        prepared.loss_fn = make_distill_loss(teacher, self.alpha, self.beta)
        return prepared
