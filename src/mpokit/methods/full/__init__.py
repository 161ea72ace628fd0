"""Full fine-tuning: every parameter trains on the task loss (the baseline of every method)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mpokit.methods.finetune import FinetuneConfig

__all__ = ["FullConfig"]


@dataclass
class FullConfig(FinetuneConfig):
    """Every parameter trains; the base class's prepare/finish do exactly that."""

    method: ClassVar[str] = "full"
    default_lr: ClassVar[float] = 5e-5
