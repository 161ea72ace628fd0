"""Thin wrapper over Hugging Face `Trainer`: CPU/GPU/multi-process, checkpoints and resume all come from it.

The optimizer is built inside `Trainer.train()`, i.e. after any layer swap done before calling
`fit` (the OPF research code built it before swapping, so the new tensors never trained).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["FitResult", "fit", "LossTrainer"]


@dataclass
class FitResult:
    global_step: int
    train_loss: float
    losses: list[float]  # logged per-step training losses
    trainable_params: int
    seconds: float = 0.0  # wall clock of trainer.train()
    stopped_by_time: bool = False
    resumed_from: str | None = None  # the verified checkpoint training continued from


def _trainer_cls():
    from transformers import Trainer

    class LossTrainer(Trainer):
        """Trainer whose loss may be replaced by `loss_fn(model, inputs) -> scalar` (distillation)."""

        def __init__(self, *a, loss_fn: Callable | None = None, time_budget_s: float | None = None, **kw):
            super().__init__(*a, **kw)
            self.loss_fn = loss_fn
            self.time_budget_s = time_budget_s

        def create_scheduler(self, num_training_steps, optimizer=None):
            fresh = self.lr_scheduler is None
            scheduler = super().create_scheduler(num_training_steps, optimizer)
            if fresh and self.time_budget_s and hasattr(scheduler, "lr_lambdas"):
                _fit_schedule_to_time(scheduler, num_training_steps, self.args.get_warmup_steps(num_training_steps),
                                      self.time_budget_s)
            return scheduler

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.loss_fn is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, outputs = self.loss_fn(model, inputs)
            return (loss, outputs) if return_outputs else loss

    return LossTrainer


def _fit_schedule_to_time(scheduler, num_steps: int, warmup_steps: int, budget_s: float) -> None:
    """Make a LambdaLR end with the time budget when that comes before num_steps: after warmup, each lambda
    sees max(step, elapsed / budget * num_steps), so a run the clock will stop still anneals (cosine and
    linear reach 0 at the limit), and a run that finishes its steps in time follows its steps unchanged."""
    start = time.perf_counter()
    lambdas = list(scheduler.lr_lambdas)

    def timed(f):
        def lr_lambda(step):
            if step < warmup_steps:
                return f(step)
            return f(max(step, min(1.0, (time.perf_counter() - start) / budget_s) * num_steps))
        return lr_lambda

    scheduler.lr_lambdas = [timed(f) for f in lambdas]


def __getattr__(name):  # lazy: importing transformers' Trainer costs seconds
    if name == "LossTrainer":
        return _trainer_cls()
    raise AttributeError(name)


def fit(model: nn.Module, dataset, out_dir: str, *, max_steps: int, batch_size: int = 8, lr: float = 5e-5,
        weight_decay: float = 0.0, warmup_steps: int = 0, save_steps: int | None = None,
        save_total_limit: int | None = 3, seed: int = 0,
        resume: bool | str | None = None, collator=None, loss_fn: Callable | None = None,
        logging_steps: int = 1, progress: bool = False, callbacks: list | None = None,
        lr_scheduler: str = "linear", grad_accum: int = 1, max_minutes: float | None = None,
        use_cpu: bool | None = None) -> FitResult:
    """Train `model` (its requires_grad flags decide what trains) for max_steps optimizer steps.

    save_steps: write a Trainer checkpoint every N steps to out_dir/checkpoint-N, each followed by
        a hash manifest (train.checkpoints); save_total_limit: checkpoints kept (None: all).
    resume: True (the newest checkpoint in out_dir that verifies; invalid newer ones are moved aside
        and, with none valid, training starts afresh, each said on stderr) or a checkpoint path (it
        must verify): Trainer restores weights, optimizer, scheduler, RNG states and the data position.
    callbacks: transformers TrainerCallbacks (e.g. one that stops early, to simulate an interruption).
    use_cpu: train on the CPU even where CUDA is available (None: the CPU only when it is not).
    max_minutes: wall-clock training budget; training stops at the first step past it, and the LR schedule
        ends there too when the clock comes before max_steps (so max_steps may be an upper bound).
    """
    from transformers import TrainingArguments

    from mpokit.train.checkpoints import _global_step, manifest_callback, pick_resume
    from mpokit.train.params import count_trainable

    if max_steps < 1:
        raise ValueError(f"expected max_steps >= 1, got {max_steps}")
    if grad_accum < 1:
        raise ValueError(f"expected grad_accum >= 1, got {grad_accum}")
    if batch_size < 1:
        raise ValueError(f"expected batch_size >= 1, got {batch_size}")
    if save_steps is not None and save_steps < 1:
        raise ValueError(f"expected save_steps >= 1, got {save_steps}")
    if save_total_limit is not None and save_total_limit < 1:
        raise ValueError(f"expected save_total_limit >= 1 (or None: keep all), got {save_total_limit}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"expected a learning rate > 0, got {lr}")
    resume = pick_resume(out_dir, resume)  # verified before anything trains (raises for a bad explicit path)
    callbacks = list(callbacks or [])
    if save_steps:
        callbacks.append(manifest_callback())
    timer = _time_limit_callback(max_minutes) if max_minutes else None
    if timer is not None:
        callbacks.append(timer)
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, lr_scheduler_type=lr_scheduler,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, save_total_limit=save_total_limit,
        seed=seed, data_seed=seed,
        logging_steps=logging_steps, report_to=[], disable_tqdm=not progress,
        use_cpu=not torch.cuda.is_available() if use_cpu is None else use_cpu,
        remove_unused_columns=False, dataloader_num_workers=0,
    )
    trainer = _trainer_cls()(model=model, args=args, train_dataset=dataset, data_collator=collator, loss_fn=loss_fn,
                             callbacks=callbacks, time_budget_s=60 * max_minutes if max_minutes else None)
    if resume and _global_step(Path(resume)) >= max_steps:
        # A finished run: Trainer would take one step past max_steps; load its weights instead.
        from transformers.trainer_callback import TrainerState

        trainer._load_from_checkpoint(str(resume))
        state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        return FitResult(state.global_step, losses[-1] if losses else float("nan"), losses, count_trainable(model),
                         0.0, False, resume)
    t0 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return FitResult(trainer.state.global_step, float(out.training_loss), losses, count_trainable(model), seconds,
                     bool(timer is not None and timer.fired), resume)


def _time_limit_callback(max_minutes: float):
    from transformers import TrainerCallback

    class TimeLimit(TrainerCallback):
        def __init__(self):
            self.start, self.fired = None, False

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if time.perf_counter() - self.start > 60 * max_minutes:
                self.fired = control.should_training_stop = True

    return TimeLimit()
