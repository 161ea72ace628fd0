"""Recovery after compression as a training-time method: distillation from the uncompressed model by default.

LM loss on one corpus mostly adapts the compressed model to that corpus's domain: on the default
model it beat dense perplexity on WikiText-2 after tuning on WikiText-2 valid, and got worse than
before tuning on other English text. Matching the uncompressed model's next-token distributions
instead asks the student for what compression took away, on any text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from mpokit.methods.base import option
from mpokit.methods.checks import (check_choice, check_ints, check_number, fraction, nonnegative_float, positive_float,
                                   positive_int)
from mpokit.methods.finetune import FinetuneConfig, Prepared, TrainContext
from mpokit.methods.kd.loss import make_kd_loss
from mpokit.methods.mpop.core import mpo_linears, mpop_

__all__ = ["RecoverConfig", "LOSSES", "TRAINABLE"]

LOSSES = ("kd", "lm")
# 3/4 distillation, 1/4 LM loss: chosen on validation texts only (the held-out tail of the mix and the Vim user
# manual) among 0, 0.25, 0.5, 0.75 and 1 (docs/benchmarks/finetune.md, bench/bench_recovery.py); the LM loss
# lets the student also learn plain text, which the instruct teacher models less well than it could
DEFAULT_ALPHA = 0.75
TRAINABLE = ("cores", "aux", "lora")


@dataclass
class RecoverConfig(FinetuneConfig):
    """Recovery after compression: the compressed model learns back what compression lost.

    loss "kd": alpha * T^2 KL(teacher || student) of the next-token distributions at temperature T
        + (1 - alpha) * LM loss (alpha DEFAULT_ALPHA) + hidden_weight * relative MSE of the block outputs.
        The teacher is the uncompressed model the checkpoint was made from (the source recorded in its
        mpokit.json) or `teacher`; its logits are computed per batch under no_grad.
    loss "lm": the model's own loss on the training labels (next-token loss; for sst2 the labels).
    trainable: "cores" every MPO core; "aux" the auxiliary cores only (MPOP); "lora" PEFT LoRA of
        `rank` on the frozen MPO layers, merged into the cores at the end (bonds grow).
    A freshly added classifier head always trains.
    """

    method: ClassVar[str] = "recover"
    loss: str = option("kd", "recover: kd = distil from the uncompressed model, lm = plain LM loss on --data",
                       flag="--recover-loss", choices=LOSSES)
    teacher: str | None = option(None, "teacher model (same task)")
    alpha: float = option(DEFAULT_ALPHA, f"KD weight, in [0, 1] (default {DEFAULT_ALPHA}; the rest is LM loss)",
                          type=fraction)
    temperature: float = option(1.0, "distillation temperature", type=positive_float)
    hidden_weight: float = option(0.0, "weight of the hidden-state MSE at block outputs (0: off)", flag="--hidden-mse",
                                  type=nonnegative_float)
    trainable: str = option("cores", "recover: cores = every MPO core, aux = auxiliary cores only (MPOP), "
                            "lora = LoRA on the MPO layers, merged at the end", flag="--recover-trainable",
                            choices=TRAINABLE)
    rank: int = option(8, "LoRA rank", flag="--lora-rank", type=positive_int)

    @property
    def default_lr(self) -> float:
        return 1e-3 if self.trainable == "lora" else 1e-4  # LoRA's small adapters take the usual LoRA rate

    def __post_init__(self) -> None:
        check_choice("loss", self.loss, LOSSES)
        check_choice("trainable", self.trainable, TRAINABLE)
        check_number("alpha", self.alpha, 0, 1)
        check_number("temperature", self.temperature, 0, low_open=True)
        check_number("hidden_weight", self.hidden_weight, 0)
        check_ints(self, 1, ["rank"])
        if self.loss == "lm":
            given = [flag for flag, on in (("--teacher", bool(self.teacher)), ("--alpha", self.alpha != DEFAULT_ALPHA),
                                           ("--temperature", self.temperature != 1.0),
                                           ("--hidden-mse", self.hidden_weight > 0)) if on]
            if given:
                raise ValueError(f"expected {', '.join(given)} only with --recover-loss kd, got --recover-loss lm")

    def prepare(self, model: nn.Module, ctx: TrainContext) -> Prepared:
        if not mpo_linears(model):
            raise ValueError("expected a compressed model (MPO layers) for --method recover; compress it first")
        teacher, label = self._teacher(ctx) if self.loss == "kd" else (None, None)
        if self.trainable == "lora":
            from mpokit.methods.lora.config import LoRAConfig

            prepared = LoRAConfig(rank=self.rank).prepare(model, ctx)
        else:
            mpop_(model, extra=ctx.head, all_cores=self.trainable == "cores")
            prepared = Prepared(model)
        if teacher is not None:
            prepared.loss_fn = make_kd_loss(teacher, self.alpha, self.temperature, hidden_weight=self.hidden_weight)
        prepared.info.update({"recover_loss": self.loss, "teacher": label})
        return prepared

    def _teacher(self, ctx: TrainContext) -> tuple[nn.Module, str]:
        if self.teacher:
            return ctx.load_teacher(self.teacher), self.teacher
        if ctx.task != "lm":
            raise ValueError(f"expected --teacher (a trained {ctx.task} model) for --method recover --task {ctx.task}, "
                             "got none: the uncompressed source has no trained head to distil from; or pass "
                             "--recover-loss lm")
        if ctx.load_source is None:
            raise ValueError("expected --teacher for --method recover (this run knows no source model), got none; "
                             "or pass --recover-loss lm")
        return ctx.load_source()

    def finish(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload() if self.trainable == "lora" else model
