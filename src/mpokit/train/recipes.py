"""`mpokit finetune` recipes: pick what trains (full, MPOP, recovery, OPF, OPDF, LoRA), fit, evaluate, save."""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["FinetuneOptions", "finetune", "METHODS", "TASKS"]

METHODS = ("mpop", "recover", "opf", "opdf", "lora", "full", "kd")
TASKS = ("lm", "sst2")
LORA_TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


@dataclass
class FinetuneOptions:
    model: str | None
    method: str
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
    num_cores: int = 3  # MPOP decomposition of a dense model
    squeeze_bond: int | None = None  # MPOP dimension squeezing target
    squeeze_steps: int = 2
    select: str = "fisher"  # OPF/OPDF layer selection: fisher | stable-rank
    opf_count: int = 4
    opf_extra: int = 2
    teacher: str | None = None
    alpha: float = 0.5  # OPDF: KD weight
    beta: float = 1.0  # OPDF: tensor constraint weight
    lora_rank: int = 8
    lora_targets: list[str] | None = None  # None: per-model defaults (all MPO layers on a compressed model)
    scheduler: str = "linear"  # transformers lr_scheduler_type: linear | cosine | constant_with_warmup ...
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_accum: int = 1
    max_minutes: float | None = None  # stop training at this wall-clock budget (the schedule keeps max_steps)

    def __post_init__(self) -> None:
        for name, low in (("max_steps", 1), ("batch_size", 1), ("seq_len", 2), ("eval_tokens", 2), ("context", 2),
                          ("num_cores", 2), ("squeeze_steps", 1), ("opf_count", 1), ("opf_extra", 1),
                          ("lora_rank", 1), ("warmup_steps", 0), ("grad_accum", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"expected {name} >= {low} (an integer), got {value!r}")
        for name in ("train_limit", "eval_limit", "save_steps", "save_total_limit", "squeeze_bond"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"expected {name} >= 1 (an integer) or None, got {value!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"expected lr > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"expected weight_decay >= 0, got {self.weight_decay}")
        if self.method not in METHODS:
            raise ValueError(f"expected method in {METHODS}, got {self.method!r}")
        if self.task not in TASKS:
            raise ValueError(f"expected task in {TASKS}, got {self.task!r}")
        if self.select not in ("fisher", "stable-rank"):
            raise ValueError(f"expected select in ('fisher', 'stable-rank'), got {self.select!r}")
        if self.warmup_steps < 0 or self.grad_accum < 1:
            raise ValueError(f"expected warmup_steps >= 0 and grad_accum >= 1, got {self.warmup_steps} and "
                             f"{self.grad_accum}")
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes) and self.max_minutes > 0):
            raise ValueError(f"expected max_minutes > 0, got {self.max_minutes}")
        if self.method in ("opdf", "kd") and not self.teacher:
            raise ValueError(f"expected --teacher for --method {self.method}, got none")


DEFAULT_LR = {"full": 5e-5, "kd": 5e-5, "opf": 5e-5, "opdf": 5e-5, "mpop": 1e-3, "recover": 1e-4, "lora": 1e-3}


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


def _candidates(model: nn.Module) -> list[str]:
    from mpokit.surgery import find_targets

    return [n for n in find_targets(model) if type(model.get_submodule(n)) is nn.Linear]


def _opf_expand(o: FinetuneOptions, model, train, collator) -> list[str]:
    from mpokit.methods.opf import expand_, fisher_scores, select_top, stable_rank_scores

    names = _candidates(model)
    if o.select == "fisher":
        rows = [train[k] for k in range(min(len(train), 2 * o.batch_size))]
        batches = [(collator or _stack)(rows[k:k + o.batch_size]) for k in range(0, len(rows), o.batch_size)]
        scores = fisher_scores(model, names, batches)
    else:
        scores = stable_rank_scores(model, names)
    return expand_(model, select_top(scores, min(o.opf_count, len(names))), extra=o.opf_extra)


def _stack(rows):
    from transformers import default_data_collator

    return default_data_collator(rows)


def _lora(o: FinetuneOptions, model):
    """PEFT LoRA; on a compressed model the adapters sit on the (frozen) MPO layers via a custom module."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("--method lora needs PEFT: pip install peft") from None
    from mpokit.methods.mpop import mpo_linears
    from mpokit.train.lora_mpo import lora_config_for_mpo, mpo_lora_targets

    on_mpo = bool(mpo_linears(model))
    targets = o.lora_targets or (mpo_lora_targets(model) if on_mpo else LORA_TARGETS.get(model.config.model_type))
    if targets is None:
        raise ValueError(f"expected a model type with LoRA defaults {sorted(LORA_TARGETS)} or --lora-targets, "
                         f"got {model.config.model_type!r}")
    cfg = LoraConfig(r=o.lora_rank, lora_alpha=2 * o.lora_rank, target_modules=list(targets), lora_dropout=0.0,
                     task_type="SEQ_CLS" if o.task == "sst2" else "CAUSAL_LM")
    if on_mpo:
        lora_config_for_mpo(cfg)
    with warnings.catch_warnings():  # PEFT warns on any custom layer type; ours is registered on purpose
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        return get_peft_model(model, cfg)


def finetune(o: FinetuneOptions) -> dict:
    from mpokit.eval.size import count_params
    from mpokit.io.models import load_model
    from mpokit.methods import mpop as mp
    from mpokit.methods.opf import contract_
    from mpokit.train.params import count_trainable, head_parameters
    from mpokit.train.trainer import fit

    t0 = time.time()
    if not isinstance(o.resume, bool) and not Path(o.resume).exists():  # before minutes of loading
        raise FileNotFoundError(f"missing checkpoint to resume from: {o.resume}")
    torch.manual_seed(o.seed)  # a freshly added classifier head starts the same for every method
    task = "causal-lm" if o.task == "lm" else "sequence-classification"
    loaded = load_model(o.model, task=task)
    model, tok = loaded.model, loaded.tokenizer
    from mpokit.eval.perplexity import check_positions

    check_positions(model, o.seq_len, "--seq-len")
    if o.task == "lm":
        check_positions(model, min(o.context, o.eval_tokens), "--context")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    train, evaluation, collator = _datasets(o, tok)
    head = head_parameters(model) if o.task == "sst2" else []
    loss_fn, selected, squeeze_log = None, [], None
    if o.method in ("mpop", "recover"):
        if o.method == "recover" and not mp.mpo_linears(model):
            raise ValueError("expected a compressed model (MPO layers) for --method recover; compress it first")
        mp.decompose_(model, num_cores=o.num_cores)
        mp.mpop_(model, extra=head, all_cores=o.method == "recover")
    elif o.method in ("opf", "opdf"):
        selected = _opf_expand(o, model, train, collator)
        model.requires_grad_(True)
        if o.method == "opdf":
            from mpokit.methods.opdf import expand_teacher_like_, make_distill_loss

            teacher = load_model(o.teacher, task=task).model
            expand_teacher_like_(teacher, model)
            loss_fn = make_distill_loss(teacher, o.alpha, o.beta)
    elif o.method == "lora":
        model = _lora(o, model)
    else:  # full, kd
        model.requires_grad_(True)
        if o.method == "kd":  # plain KD: every parameter, no tensor constraint
            from mpokit.methods.opdf import make_distill_loss

            loss_fn = make_distill_loss(load_model(o.teacher, task=task).model, o.alpha, beta=0.0)
    trainable = count_trainable(model)
    lr = o.lr if o.lr is not None else DEFAULT_LR[o.method]
    kw = dict(batch_size=o.batch_size, lr=lr, seed=o.seed, collator=collator, loss_fn=loss_fn,
              lr_scheduler=o.scheduler, warmup_steps=o.warmup_steps, weight_decay=o.weight_decay,
              grad_accum=o.grad_accum, max_minutes=o.max_minutes)
    model.train()
    if o.method == "mpop" and o.squeeze_bond:
        per_cut = max(1, o.max_steps // o.squeeze_steps)
        runs = []
        squeeze_log = mp.dimension_squeeze_(model, o.squeeze_bond, o.squeeze_steps, lambda: runs.append(
            fit(model, train, str(Path(o.out) / f"squeeze{len(runs)}"), max_steps=per_cut, **kw)), extra=head)
        result = runs[-1]
        trainable = squeeze_log[-1]["trainable_params"]
    else:
        result = fit(model, train, str(Path(o.out) / "trainer"), max_steps=o.max_steps, save_steps=o.save_steps,
                     save_total_limit=o.save_total_limit, resume=o.resume or None, **kw)
    model.eval()
    if o.method == "lora":
        model = model.merge_and_unload()
    contract_(model)  # OPF/OPDF: back to the original architecture (no-op otherwise)
    out = {"model": loaded.source, "method": o.method, "task": o.task, "max_steps": o.max_steps,
           "global_step": result.global_step, "batch_size": o.batch_size, "grad_accum": o.grad_accum, "lr": lr,
           "scheduler": o.scheduler, "warmup_steps": o.warmup_steps, "seq_len": o.seq_len,
           "train_seconds": result.seconds, "stopped_by_time": result.stopped_by_time,
           "tokens_seen": result.global_step * o.batch_size * o.grad_accum * o.seq_len if o.task == "lm" else None,
           "trainable_params": trainable, "params": count_params(model), "train_loss": result.train_loss,
           "selected": selected, "squeeze": squeeze_log, "resumed_from": result.resumed_from}
    if o.task == "sst2":
        from mpokit.train.evaluate import accuracy

        out["accuracy"] = accuracy(model, evaluation, collator)
        out["eval_rows"] = len(evaluation)
    else:
        from mpokit.eval.perplexity import perplexity

        res = perplexity(model, tok, evaluation, tokens=o.eval_tokens, context=o.context, progress=False)
        out.update(perplexity=res.perplexity, eval_tokens=res.tokens, context=o.context)
    from mpokit.io.checkpoint import save_compressed

    out["saved"] = str(save_compressed(model, Path(o.out) / "model", tokenizer=tok, overwrite=True))  # the run owns it
    out["seconds"] = time.time() - t0
    return out
