"""MPOP as a training-time method: which MPO cores train, and dimension squeezing (recovery: recover.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from mpokit.methods.base import option
from mpokit.methods.checks import check_ints, int_at_least, positive_int
from mpokit.methods.finetune import Prepared, TrainContext, TrainOutcome
from mpokit.methods.mpop.core import decompose_, dimension_squeeze_, mpo_linears, mpop_
from mpokit.methods.selection import SelectiveFinetuneConfig
from mpokit.methods.mpop.recover import RecoverConfig  # re-exported: it lived here

__all__ = ["MPOPConfig", "RecoverConfig"]


@dataclass
class MPOPConfig(SelectiveFinetuneConfig):
    """MPOP (ACL 2021): train only the auxiliary MPO cores (and a new classifier head).

    A dense model is first decomposed losslessly into `num_cores`-core MPOs (a compressed one is
    used as it is). squeeze_bond: lower every bond to this in `squeeze_steps` cuts, training
    max_steps / squeeze_steps steps after each cut (dimension squeezing). `select` trains the auxiliary
    cores of a chosen fraction of the matrices only (selection.py): on a dense model only those are
    decomposed; on a compressed one the others' cores stay frozen."""

    method: ClassVar[str] = "mpop"
    default_lr: ClassVar[float] = 1e-3
    num_cores: int = option(3, "cores per matrix when decomposing a dense model", type=int_at_least(2))
    squeeze_bond: int | None = option(None, "squeeze bonds down to this, in steps", type=positive_int)
    squeeze_steps: int = option(2, "cuts to reach --squeeze-bond", type=positive_int)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ints(self, 2, ["num_cores"])
        check_ints(self, 1, ["squeeze_steps"])
        check_ints(self, 1, ["squeeze_bond"], optional=True)
        if self.squeeze_bond and (self.select != "all" or self.start != "off"):
            raise ValueError(f"expected --select all and --start off with --squeeze-bond, got --select {self.select} "
                             f"and --start {self.start}")

    def prepare(self, model: nn.Module, ctx: TrainContext) -> Prepared:
        if self.select == "all":
            decompose_(model, self.target_modules, self.exclude_modules, num_cores=self.num_cores)
            mpop_(model, extra=ctx.head)
            return Prepared(model, info={"selected": [n for n, _ in mpo_linears(model)],
                                         "selection": {"select": "all"}})
        from mpokit.surgery import find_targets
        from mpokit.surgery.params import train_only_

        compressed = bool(mpo_linears(model))
        candidates = [n for n, _ in mpo_linears(model)] if compressed else [
            n for n in find_targets(model, self.target_modules, self.exclude_modules)
            if not isinstance(model.get_submodule(n), nn.Embedding)]
        chosen, record = self.choose(model, candidates, ctx)  # on the dense weights (or the MPO layers' products)
        if not compressed:
            decompose_(model, chosen, None, num_cores=self.num_cores)  # lossless; the rest stays dense and frozen
        cores = [p for n in chosen for p in model.get_submodule(n).auxiliary_parameters()]
        train_only_(model, [*cores, *ctx.head])
        return Prepared(model, info={"selected": chosen, "selection": record})

    @property
    def trains_in_phases(self) -> bool:
        return bool(self.squeeze_bond)  # one run per squeeze cut, each max_steps / squeeze_steps long

    def train(self, prepared: Prepared, ctx: TrainContext) -> TrainOutcome:
        if not self.squeeze_bond:
            return super().train(prepared, ctx)
        model, runs = prepared.model, []
        per_cut = max(1, ctx.max_steps // self.squeeze_steps)
        log = dimension_squeeze_(model, self.squeeze_bond, self.squeeze_steps, lambda: runs.append(
            ctx.fit(model, max_steps=per_cut, subdir=f"squeeze{len(runs)}")), extra=ctx.head)
        return TrainOutcome(runs[-1], {"squeeze": log, "trainable_params": log[-1]["trainable_params"]})
