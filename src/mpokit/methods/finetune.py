"""The protocol of training-time methods: prepare before training, finish after.

`mpokit finetune` reads: load -> config.prepare -> config.train (Trainer fit) -> config.finish
-> evaluate -> save. A method sees the run only through `TrainContext` (data, batch size, the
classifier head, a teacher loader and the fit function), so methods never import the training
package (`train/` imports methods, not the other way round).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from torch import nn

from mpokit.methods.base import MethodConfig

__all__ = ["FinetuneConfig", "TrainContext", "Prepared", "TrainOutcome"]


@dataclass
class TrainContext:
    """What a method may use of the run: read-only, built by the training recipe."""

    task: str  # "lm" | "sst2"
    train: Any  # a torch Dataset of tokenized rows
    collator: Callable | None  # batches rows (None: default collation)
    batch_size: int
    max_steps: int
    head: list[nn.Parameter]  # a freshly added classifier head (always trained); [] for lm
    load_teacher: Callable[[str], nn.Module]  # model path -> model of the same task
    # fit(model, max_steps=..., loss_fn=..., subdir=..., callbacks=[TrainerCallback]) -> mpokit.train.FitResult
    fit: Callable[..., Any]
    # () -> (model, label): the uncompressed model the checkpoint was made from (its recorded source),
    # same task; raises when none is recorded. None: the run offers no source.
    load_source: Callable[[], tuple[nn.Module, str]] | None = None


@dataclass
class Prepared:
    """The model to train (possibly wrapped), an optional loss, and what to report."""

    model: nn.Module
    loss_fn: Callable | None = None  # loss_fn(model, inputs) -> (loss, outputs); None: the model's loss
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainOutcome:
    result: Any  # the last FitResult
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class FinetuneConfig(MethodConfig):
    """Base of training-time methods. Subclasses set `method` (which registers them) and
    `default_lr`, and override prepare (what trains, what loss) and finish (undo the expansion)."""

    kind: ClassVar[str] = "finetune"
    default_lr: ClassVar[float] = 5e-5

    def prepare(self, model: nn.Module, ctx: TrainContext) -> Prepared:
        """Make the model ready to train; default: every parameter trains on the model's loss."""
        model.requires_grad_(True)
        return Prepared(model)

    @property
    def trains_in_phases(self) -> bool:
        """True where train() splits ctx.max_steps over several Trainer runs (so it needs a step count)."""
        return False

    def train(self, prepared: Prepared, ctx: TrainContext) -> TrainOutcome:
        """One Trainer run for ctx.max_steps (a method with a schedule of its own overrides this)."""
        return TrainOutcome(ctx.fit(prepared.model, max_steps=ctx.max_steps, loss_fn=prepared.loss_fn))

    def finish(self, model: nn.Module) -> nn.Module:
        """The trained model in the form to evaluate and save; default: as trained."""
        return model
