"""Where and when lightweight fine-tuning applies: stable-rank calibration (LREC-COLING 2024, METHODS.md 10).

Where: of the candidate weight matrices (LoRA's targets, MPOP's decomposed layers) only a fraction
is adapted, chosen by stable rank ||W||_F^2 / ||W||_2^2 (lowest or highest), by a seeded random
draw of the same size (the control), or by Fisher importance (summed squared gradient of the task
loss over a few calibration batches).
When: with `start="stable-rank"` the LR stays at `start_lr_scale` times the schedule (a warmup of
adaptive length) until the mean stable rank of the adapted weights (W + BA for LoRA, the cores'
product for MPOP) changes by less than `start_threshold` (relative) over `start_window` steps.
"""
from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from mpokit.methods.base import option
from mpokit.methods.checks import check_choice, check_ints, check_number, nonnegative_int, positive_float, positive_int
from mpokit.methods.finetune import FinetuneConfig, Prepared, TrainContext, TrainOutcome
from mpokit.ops.stable_rank import relative_change, stable_rank
from mpokit.surgery.targets import weight_matrix

__all__ = ["SELECTIONS", "ORDERS", "STARTS", "SelectiveFinetuneConfig", "select_count", "select_top",
           "stable_rank_scores", "fisher_scores", "calibration_batches", "effective_weight", "StartGate",
           "stable_rank_start_callback", "open_fraction"]

SELECTIONS = ("all", "stable-rank", "random", "fisher")
ORDERS = ("low", "high")
STARTS = ("off", "stable-rank")
# The stable-rank end adapted by default, picked on SST-2 dev (docs/benchmarks/peft-selection.md): with
# LoRA on MiniLM's attention matrices the highest stable ranks (values, outputs) scored 0.764 dev, the
# lowest (keys) 0.509, i.e. the majority class.
DEFAULT_ORDER = "high"
DEFAULT_FRACTION = 0.25
DEFAULT_START = {"start_threshold": 0.01, "start_window": 5, "start_lr_scale": 0.1}
CALIBRATION_BATCHES = 4


def open_fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def select_count(fraction: float, n: int) -> int:
    """How many of n candidates a fraction selects: round(fraction * n), at least 1."""
    check_number("select_fraction", fraction, 0, 1, low_open=True)
    return min(n, max(1, int(fraction * n + 0.5)))


def select_top(scores: dict[str, float], count: int, largest: bool = True) -> list[str]:
    """The `count` names with the largest (or smallest) scores, in model order (ties: model order).
    Shared with OPF's choice of weights to expand."""
    if count < 1:
        raise ValueError(f"expected count >= 1, got {count}")
    ranked = set(sorted(scores, key=scores.get, reverse=largest)[:count])
    return [n for n in scores if n in ranked]


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The matrix a module applies: W + scaling * B A of a PEFT LoRA layer, an MPO layer's core product, W."""
    if hasattr(module, "get_delta_weight") and hasattr(module, "lora_A"):
        w = module.get_base_layer().weight.detach()  # stored layout ((in, out) for Conv1D): srank is transpose-free
        for name in module.active_adapters:
            if name in module.lora_A:
                w = w + module.get_delta_weight(name).detach()  # PEFT returns it in the base weight's layout
        return w
    return weight_matrix(module).detach()


def stable_rank_scores(model: nn.Module, names: list[str]) -> dict[str, float]:
    """||W||_F^2 / ||W||_2^2 (ops.stable_rank) of the matrix each named module applies (1 <= srank <= rank)."""
    return {n: stable_rank(effective_weight(model.get_submodule(n))) for n in names}


def calibration_batches(ctx: TrainContext, count: int = CALIBRATION_BATCHES) -> list[dict]:
    """The first `count` batches of training rows (collated as the Trainer would)."""
    from transformers import default_data_collator

    collate = ctx.collator or default_data_collator
    rows = [ctx.train[k] for k in range(min(len(ctx.train), count * ctx.batch_size))]
    return [collate(rows[k:k + ctx.batch_size]) for k in range(0, len(rows), ctx.batch_size)]


def fisher_scores(model: nn.Module, names: list[str], batches: Iterable[dict]) -> dict[str, float]:
    """Summed squared gradient of the task loss over each named module's weights (not biases) and the batches."""
    params = {n: [p for k, p in model.get_submodule(n).named_parameters() if not k.endswith("bias")] for n in names}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for ps in params.values():
        for p in ps:
            p.requires_grad_(True)
    sums, count, was_training = dict.fromkeys(names, 0.0), 0, model.training
    model.eval()  # no dropout noise in the importance estimate
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            for n, ps in params.items():
                sums[n] += sum(float(p.grad.pow(2).sum()) for p in ps if p.grad is not None)
            count += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
    if count == 0:
        raise ValueError("expected at least one calibration batch for Fisher selection, got none")
    return sums


class StartGate:
    """Holds training back (LR times lr_scale) until a trajectory settles; pure bookkeeping, no torch."""

    def __init__(self, threshold: float, window: int, lr_scale: float):
        check_number("start_threshold", threshold, 0, low_open=True)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"expected start_window >= 1, got {window!r}")
        check_number("start_lr_scale", lr_scale, 0, 1, low_open=True)
        self.threshold, self.window, self.lr_scale = threshold, window, lr_scale
        self.trajectory: list[float] = []
        self.start_step: int | None = None  # the first step trained at the full LR

    @property
    def started(self) -> bool:
        return self.start_step is not None

    def observe(self, value: float, step: int) -> bool:
        """Record the value after optimizer step `step`; returns whether training has started."""
        if not self.started:
            self.trajectory.append(float(value))
            if relative_change(self.trajectory, self.window) < self.threshold:
                self.start_step = step + 1
        return self.started

    def info(self) -> dict[str, Any]:
        return {"rule": "stable-rank", "threshold": self.threshold, "window": self.window, "lr_scale": self.lr_scale,
                "start_step": self.start_step, "trajectory": self.trajectory}


def stable_rank_start_callback(gate: StartGate, modules: list[nn.Module]):
    """A TrainerCallback: scale the LR by gate.lr_scale for each optimizer step until the gate opens; after
    each step, feed the gate the mean stable rank of `modules`' effective weights."""
    from transformers import TrainerCallback

    if not modules:
        raise ValueError("expected at least one adapted module to track for --start stable-rank, got none")

    class StableRankStart(TrainerCallback):
        def __init__(self):
            self.gate, self._saved = gate, None

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
            if not self.gate.started and optimizer is not None:
                self._saved = [g["lr"] for g in optimizer.param_groups]
                for g in optimizer.param_groups:
                    g["lr"] = g["lr"] * self.gate.lr_scale

        def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
            if self._saved is not None:  # the scheduler owns the LR; give it back unscaled
                for g, lr in zip(optimizer.param_groups, self._saved):
                    g["lr"] = lr
                self._saved = None

        def on_step_end(self, args, state, control, **kw):
            if not self.gate.started:
                value = sum(stable_rank(effective_weight(m)) for m in modules) / len(modules)
                self.gate.observe(value, state.global_step)

    return StableRankStart()


@dataclass
class SelectiveFinetuneConfig(FinetuneConfig):
    """Base of fine-tuning methods that adapt chosen weight matrices (LoRA, MPOP): where (select) and when
    (start) lightweight fine-tuning applies. Subclasses call `choose` in prepare and put the chosen names
    in Prepared.info["selected"]; `train` tracks those for the time-aware start."""

    select: str = option("all", "which weight matrices to adapt: all candidates, or --select-fraction of them by "
                         "stable rank (--select-order), a seeded random draw, or Fisher importance (opf: which "
                         "weights to expand, fisher or stable-rank)", choices=SELECTIONS)
    select_fraction: float | None = option(None, f"fraction of candidate matrices selected (default "
                                           f"{DEFAULT_FRACTION})", type=open_fraction)
    select_order: str | None = option(None, f"--select stable-rank: adapt the lowest or highest stable ranks "
                                      f"(default {DEFAULT_ORDER})", choices=ORDERS)
    select_seed: int | None = option(None, "--select random: seed of the draw (default 0)", type=nonnegative_int)
    start: str = option("off", "stable-rank: LR times --start-lr-scale until the adapted weights' stable rank "
                        "settles (relative change < --start-threshold over --start-window steps)", choices=STARTS)
    start_threshold: float | None = option(None, f"--start stable-rank: relative change (default "
                                           f"{DEFAULT_START['start_threshold']})", type=positive_float)
    start_window: int | None = option(None, f"--start stable-rank: steps (default {DEFAULT_START['start_window']})",
                                      type=positive_int)
    start_lr_scale: float | None = option(None, f"--start stable-rank: LR factor before the start (default "
                                          f"{DEFAULT_START['start_lr_scale']})", type=open_fraction)

    def __post_init__(self) -> None:
        check_choice("select", self.select, SELECTIONS)
        check_choice("start", self.start, STARTS)
        if self.select_order is not None:
            check_choice("select_order", self.select_order, ORDERS)
        if self.select_fraction is not None:
            check_number("select_fraction", self.select_fraction, 0, 1, low_open=True)
        check_ints(self, 0, ["select_seed"], optional=True)
        misplaced = [flag for flag, given, ok in (
            ("--select-fraction", self.select_fraction is not None, self.select != "all"),
            ("--select-order", self.select_order is not None, self.select == "stable-rank"),
            ("--select-seed", self.select_seed is not None, self.select == "random")) if given and not ok]
        if misplaced:
            raise ValueError(f"expected {', '.join(misplaced)} with a --select that uses it, "
                             f"got --select {self.select}")
        for name in DEFAULT_START:
            if getattr(self, name) is not None and self.start == "off":
                raise ValueError(f"expected --{name.replace('_', '-')} only with --start stable-rank, got --start off")
        check_number("start_threshold", self._start_setting("start_threshold"), 0, low_open=True)
        check_ints(self, 1, ["start_window"], optional=True)
        check_number("start_lr_scale", self._start_setting("start_lr_scale"), 0, 1, low_open=True)

    def _start_setting(self, name: str):
        value = getattr(self, name)
        return DEFAULT_START[name] if value is None else value

    def choose(self, model: nn.Module, names: list[str], ctx: TrainContext | None) -> tuple[list[str], dict]:
        """(chosen names in model order, a record of how) among candidate module `names`."""
        if not names:
            raise ValueError("expected at least one candidate weight matrix to select from, got none")
        if self.select == "all":
            return list(names), {"select": "all", "candidates": len(names)}
        count = select_count(self.select_fraction or DEFAULT_FRACTION, len(names))
        record: dict[str, Any] = {"select": self.select, "fraction": self.select_fraction or DEFAULT_FRACTION,
                                  "candidates": len(names), "count": count}
        if self.select == "random":
            seed = self.select_seed or 0
            drawn = set(random.Random(seed).sample(list(names), count))
            return [n for n in names if n in drawn], {**record, "seed": seed}
        if self.select == "stable-rank":
            order = self.select_order or DEFAULT_ORDER
            scores = stable_rank_scores(model, names)
            return select_top(scores, count, largest=order == "high"), {**record, "order": order,
                                                                            "scores": scores}
        if ctx is None:
            raise ValueError("expected training data for --select fisher (calibration batches), got none")
        scores = fisher_scores(model, names, calibration_batches(ctx))
        return select_top(scores, count, largest=True), {**record, "scores": scores}

    def train(self, prepared: Prepared, ctx: TrainContext) -> TrainOutcome:
        if self.start == "off":
            return super().train(prepared, ctx)
        selected = prepared.info.get("selected") or []
        modules = [m for n, m in prepared.model.named_modules()
                   if any(n == s or n.endswith("." + s) for s in selected)]
        gate = StartGate(*(self._start_setting(k) for k in ("start_threshold", "start_window", "start_lr_scale")))
        result = ctx.fit(prepared.model, max_steps=ctx.max_steps, loss_fn=prepared.loss_fn,
                         callbacks=[stable_rank_start_callback(gate, modules)])
        return TrainOutcome(result, {"start": gate.info()})
