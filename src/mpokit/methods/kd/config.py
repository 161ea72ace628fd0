"""Plain knowledge distillation as a training-time method: every parameter, labels plus teacher logits."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from mpokit.methods.base import option
from mpokit.methods.checks import check_number, fraction
from mpokit.methods.finetune import FinetuneConfig, Prepared, TrainContext
from mpokit.methods.kd.loss import make_kd_loss

__all__ = ["KDConfig", "check_teacher"]


def check_teacher(method: str, teacher: str | None, alpha: float) -> None:
    if not teacher:
        raise ValueError(f"expected --teacher for --method {method}, got none")
    check_number("alpha", alpha, 0, 1)


@dataclass
class KDConfig(FinetuneConfig):
    """Every parameter trains on (1 - alpha) * task loss + alpha * KD from `teacher` (same task)."""

    method: ClassVar[str] = "kd"
    default_lr: ClassVar[float] = 5e-5
    teacher: str | None = option(None, "teacher model (same task; recover: default the uncompressed model the "
                                        "checkpoint was made from)")
    alpha: float = option(0.5, "KD weight, in [0, 1]", type=fraction)

    def __post_init__(self) -> None:
        check_teacher(self.method, self.teacher, self.alpha)

    def prepare(self, model: nn.Module, ctx: TrainContext) -> Prepared:
        model.requires_grad_(True)
        return Prepared(model, make_kd_loss(ctx.load_teacher(self.teacher), self.alpha))
