"""`mpokit finetune`: load -> method.prepare -> fit -> method.finish -> evaluate -> save.

What trains and how (MPOP, recovery, OPF, OPDF, KD, LoRA, full) is the method's config
(mpokit.methods, kind "finetune"); this module owns only the run: data, Trainer options,
evaluation and the saved model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mpokit.methods.checks import check_choice, check_ints, check_number
from mpokit.methods.finetune import FinetuneConfig, TrainContext

__all__ = ["FinetuneOptions", "finetune", "TASKS"]

TASKS = ("lm", "sst2")


@dataclass
class FinetuneOptions:
    model: str | None
    method: FinetuneConfig | str  # a name: that method with its defaults
    task: str
    data: str
    max_steps: int
    out: str
    batch_size: int = 8
    lr: float | None = None  # None: per-method default
    seq_len: int = 128  # lm window / sst2 max tokens
    train_limit: int | None = None  # sst2 rows / lm windows used for training
    eval_data: str | None = None  # lm: text for perplexity (default: data); sst2: tsv (default: dev.tsv next to data)
    eval_tokens: int = 8192
    context: int = 512
    eval_limit: int | None = None
    seed: int = 0
    save_steps: int | None = None
    save_total_limit: int | None = 3  # Trainer checkpoints kept (None: all)
    resume: bool | str = False  # True: newest valid checkpoint under out/trainer; a path: that checkpoint
    scheduler: str = "linear"  # transformers lr_scheduler_type: linear | cosine | constant_with_warmup ...
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_accum: int = 1
    max_minutes: float | None = None  # stop training at this wall-clock budget (the schedule keeps max_steps)

    def __post_init__(self) -> None:
        if isinstance(self.method, str):
            from mpokit.methods.base import get_method

            self.method = get_method(self.method, "finetune")()
        if not isinstance(self.method, FinetuneConfig):
            raise ValueError(f"expected a fine-tuning method config, got {type(self.method).__name__}")
        check_ints(self, 1, ["max_steps", "batch_size", "grad_accum"])
        check_ints(self, 2, ["seq_len", "eval_tokens", "context"])
        check_ints(self, 0, ["warmup_steps", "seed"])
        check_ints(self, 1, ["train_limit", "eval_limit", "save_steps", "save_total_limit"], optional=True)
        if self.lr is not None:
            check_number("lr", self.lr, 0, low_open=True)
        check_number("weight_decay", self.weight_decay, 0)
        check_choice("task", self.task, TASKS)
        if self.max_minutes is not None:
            check_number("max_minutes", self.max_minutes, 0, low_open=True)


def _datasets(o: FinetuneOptions, tok):
    from transformers import DataCollatorWithPadding

    from mpokit.train.data import SST2, TextWindows

    data = Path(o.data)
    if o.task == "sst2":
        train_file = data / "train.tsv" if data.is_dir() else data
        eval_file = Path(o.eval_data) if o.eval_data else train_file.parent / "dev.tsv"
        return (SST2(tok, train_file, o.seq_len, o.train_limit), SST2(tok, eval_file, o.seq_len, o.eval_limit),
                DataCollatorWithPadding(tok))
    if not data.is_file():
        raise FileNotFoundError(f"missing training text: {data}")
    train = TextWindows(tok, data.read_text(encoding="utf-8"), o.seq_len, o.train_limit)
    eval_text = Path(o.eval_data or data).read_text(encoding="utf-8")
    return train, eval_text, None


def _load(o: FinetuneOptions):
    from mpokit.eval.perplexity import check_positions
    from mpokit.io.models import load_model

    if not isinstance(o.resume, bool) and not Path(o.resume).exists():  # before minutes of loading
        raise FileNotFoundError(f"missing checkpoint to resume from: {o.resume}")
    torch.manual_seed(o.seed)  # a freshly added classifier head starts the same for every method
    loaded = load_model(o.model, task=_task(o))
    check_positions(loaded.model, o.seq_len, "--seq-len")
    if o.task == "lm":
        check_positions(loaded.model, min(o.context, o.eval_tokens), "--context")
    if loaded.tokenizer.pad_token is None:
        loaded.tokenizer.pad_token = loaded.tokenizer.eos_token
    return loaded


def _task(o: FinetuneOptions) -> str:
    return "causal-lm" if o.task == "lm" else "sequence-classification"


def _context(o: FinetuneOptions, model, train, collator, lr: float) -> TrainContext:
    from mpokit.io.models import load_model
    from mpokit.train.params import head_parameters
    from mpokit.train.trainer import fit

    common = dict(batch_size=o.batch_size, lr=lr, seed=o.seed, collator=collator, lr_scheduler=o.scheduler,
                  warmup_steps=o.warmup_steps, weight_decay=o.weight_decay, grad_accum=o.grad_accum,
                  max_minutes=o.max_minutes)

    def run(model, max_steps: int, loss_fn=None, subdir: str | None = None):
        """One Trainer run; the main one (no subdir) keeps checkpoints under out/trainer and resumes."""
        if subdir is not None:
            return fit(model, train, str(Path(o.out) / subdir), max_steps=max_steps, loss_fn=loss_fn, **common)
        return fit(model, train, str(Path(o.out) / "trainer"), max_steps=max_steps, loss_fn=loss_fn,
                   save_steps=o.save_steps, save_total_limit=o.save_total_limit, resume=o.resume or None, **common)

    return TrainContext(task=o.task, train=train, collator=collator, batch_size=o.batch_size, max_steps=o.max_steps,
                        head=head_parameters(model) if o.task == "sst2" else [],
                        load_teacher=lambda path: load_model(path, task=_task(o)).model, fit=run)


def _evaluate(o: FinetuneOptions, model, tok, evaluation, collator) -> dict:
    if o.task == "sst2":
        from mpokit.train.evaluate import accuracy

        return {"accuracy": accuracy(model, evaluation, collator), "eval_rows": len(evaluation)}
    from mpokit.eval.perplexity import perplexity

    res = perplexity(model, tok, evaluation, tokens=o.eval_tokens, context=o.context, progress=False)
    return {"perplexity": res.perplexity, "eval_tokens": res.tokens, "context": o.context}


def finetune(o: FinetuneOptions) -> dict:
    """Load, prepare (the method), fit, finish (the method), evaluate, save; returns the run's figures."""
    from mpokit.eval.size import count_params
    from mpokit.io.checkpoint import save_compressed
    from mpokit.train.params import count_trainable

    t0 = time.time()
    method = o.method
    loaded = _load(o)
    model, tok = loaded.model, loaded.tokenizer
    train, evaluation, collator = _datasets(o, tok)
    lr = o.lr if o.lr is not None else method.default_lr
    ctx = _context(o, model, train, collator, lr)
    prepared = method.prepare(model, ctx)
    trainable = count_trainable(prepared.model)
    prepared.model.train()
    outcome = method.train(prepared, ctx)
    result = outcome.result
    model = prepared.model.eval()
    model = method.finish(model)
    out = {"model": loaded.source, "method": method.method, "task": o.task, "max_steps": o.max_steps,
           "global_step": result.global_step, "batch_size": o.batch_size, "grad_accum": o.grad_accum, "lr": lr,
           "scheduler": o.scheduler, "warmup_steps": o.warmup_steps, "seq_len": o.seq_len,
           "train_seconds": result.seconds, "stopped_by_time": result.stopped_by_time,
           "tokens_seen": result.global_step * o.batch_size * o.grad_accum * o.seq_len if o.task == "lm" else None,
           "trainable_params": trainable, "params": count_params(model), "train_loss": result.train_loss,
           "selected": [], "squeeze": None, **prepared.info, **outcome.info, "resumed_from": result.resumed_from,
           "config": method.to_dict()}
    out.update(_evaluate(o, model, tok, evaluation, collator))
    out["saved"] = str(save_compressed(model, Path(o.out) / "model", tokenizer=tok, overwrite=True))  # the run owns it
    out["seconds"] = time.time() - t0
    return out
