"""OPF and OPDF as training-time methods: expand selected weights before training, contract after."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from mpokit.methods.base import option
from mpokit.methods.checks import check_choice, check_ints, positive_int
from mpokit.methods.finetune import FinetuneConfig, Prepared, TrainContext
from mpokit.methods.opf.core import contract_, expand_, fisher_scores, select_top, stable_rank_scores

__all__ = ["OPFConfig", "SELECTIONS"]

SELECTIONS = ("fisher", "stable-rank")


def _candidates(model: nn.Module) -> list[str]:
    from mpokit.surgery import find_targets

    return [n for n in find_targets(model) if type(model.get_submodule(n)) is nn.Linear]


def _batches(ctx: TrainContext) -> list[dict]:
    """The first two batches of training rows: enough for a Fisher importance estimate."""
    from transformers import default_data_collator

    collate = ctx.collator or default_data_collator
    rows = [ctx.train[k] for k in range(min(len(ctx.train), 2 * ctx.batch_size))]
    return [collate(rows[k:k + ctx.batch_size]) for k in range(0, len(rows), ctx.batch_size)]


@dataclass
class OPFConfig(FinetuneConfig):
    """OPF (ACL 2023): the `count` most important weights (Fisher or stable rank) become long MPOs
    with `extra` inserted r x r cores, the whole model trains, and the MPOs are contracted back to
    plain weights afterwards (the saved model has the original architecture)."""

    method: ClassVar[str] = "opf"
    default_lr: ClassVar[float] = 5e-5
    select: str = option("fisher", "how to choose the weights to expand", choices=SELECTIONS)
    count: int = option(4, "how many weights to expand", flag="--opf-count", type=positive_int)
    extra: int = option(2, "inserted r x r cores per weight", flag="--opf-extra", type=positive_int)

    def __post_init__(self) -> None:
        check_choice("select", self.select, SELECTIONS)
        check_ints(self, 1, ["count", "extra"])

    def prepare(self, model: nn.Module, ctx: TrainContext) -> Prepared:
        names = _candidates(model)
        scores = fisher_scores(model, names, _batches(ctx)) if self.select == "fisher" else \
            stable_rank_scores(model, names)
        selected = expand_(model, select_top(scores, min(self.count, len(names))), extra=self.extra)
        model.requires_grad_(True)
        return Prepared(model, info={"selected": selected})

    def finish(self, model: nn.Module) -> nn.Module:
        contract_(model)  # back to the original architecture
        return model
