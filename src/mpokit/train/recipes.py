"""`mpokit finetune`: load -> method.prepare -> fit -> method.finish -> evaluate -> save.

What trains and how (MPOP, recovery, OPF, OPDF, KD, LoRA, full) is the method's config
(mpokit.methods, kind "finetune"); this module owns only the run: data, Trainer options,
evaluation and the saved model.

No figure is measured on training text: without --eval-data the tail of --data is held out
(training never reads it), and for --task lm a second, out-of-domain text is always scored too.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mpokit.data import shared_data_dir
from mpokit.data.corpus import MIX
from mpokit.methods.checks import check_choice, check_ints, check_number
from mpokit.methods.finetune import FinetuneConfig, TrainContext

__all__ = ["FinetuneOptions", "finetune", "TASKS"]

TASKS = ("lm", "sst2")
CLOCK_ONLY_STEPS = 10**6  # max_steps None with max_minutes: the clock alone ends training (and the schedule)


@dataclass
class FinetuneOptions:
    model: str | None
    method: FinetuneConfig | str  # a name: that method with its defaults
    task: str
    data: str | None  # None: lm the built-in mix ("mix"), sst2 the shared data folder's sst2/
    max_steps: int | None  # None: CLOCK_ONLY_STEPS, with max_minutes
    out: str
    batch_size: int = 8
    lr: float | None = None  # None: per-method default
    seq_len: int = 128  # lm window / sst2 max tokens
    train_limit: int | None = None  # sst2 rows / lm windows used for training
    # lm: text for perplexity (default: the held-out tail of data); sst2: tsv (default: dev.tsv next to data)
    eval_data: str | None = None
    held_out: float = 0.1  # lm without eval_data: fraction of data's characters held out for evaluation
    # lm: out-of-domain texts also scored, files or corpus names (None: data.corpus.default_ood_corpora, the pydoc
    # corpus's first half and the licence texts where the machine has them)
    ood_data: str | list[str] | None = None
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
    max_minutes: float | None = None  # wall-clock budget: training and the LR schedule end there (or at max_steps)
    use_cpu: bool | None = None  # Trainer's use_cpu; None: the CPU only when CUDA is not available

    def __post_init__(self) -> None:
        if isinstance(self.method, str):
            from mpokit.methods.base import get_method

            self.method = get_method(self.method, "finetune")()
        if not isinstance(self.method, FinetuneConfig):
            raise ValueError(f"expected a fine-tuning method config, got {type(self.method).__name__}")
        if self.max_steps is None:
            if self.max_minutes is None:
                raise ValueError("expected --max-steps or --max-minutes (or both), got neither")
            if self.method.trains_in_phases:
                raise ValueError(f"expected --max-steps for --method {self.method.method} with these options (it "
                                 "splits its steps over several runs), got only --max-minutes")
            self.max_steps = CLOCK_ONLY_STEPS
        check_ints(self, 1, ["max_steps", "batch_size", "grad_accum"])
        check_ints(self, 2, ["seq_len", "eval_tokens", "context"])
        check_ints(self, 0, ["warmup_steps", "seed"])
        check_ints(self, 1, ["train_limit", "eval_limit", "save_steps", "save_total_limit"], optional=True)
        if self.lr is not None:
            check_number("lr", self.lr, 0, low_open=True)
        check_number("weight_decay", self.weight_decay, 0)
        check_choice("task", self.task, TASKS)
        if self.data is None:
            self.data = MIX if self.task == "lm" else str(shared_data_dir() / "sst2")
        check_number("held_out", self.held_out, 0, 0.5, low_open=True)
        if self.max_minutes is not None:
            check_number("max_minutes", self.max_minutes, 0, low_open=True)
        if isinstance(self.ood_data, str):
            self.ood_data = [self.ood_data]
        if self.ood_data is not None and not self.ood_data:
            raise ValueError("expected at least one out-of-domain text, got an empty list (leave it out for the "
                             "defaults)")


def _datasets(o: FinetuneOptions, tok, data: tuple[str, str] | None):
    """(train dataset, evaluation text or dataset, collator, evaluation label); never evaluation on training text.
    data: lm, the (text, name) of --data (read once by the caller)."""
    from transformers import DataCollatorWithPadding

    from mpokit.train.data import SST2, TextWindows, hold_out_tail, read_text, same_text

    if o.task == "sst2":
        data = Path(o.data)
        train_file = data / "train.tsv" if data.is_dir() else data
        eval_file = Path(o.eval_data) if o.eval_data else train_file.parent / "dev.tsv"
        if same_text(str(train_file), str(eval_file)):
            raise ValueError(f"expected an evaluation split other than the training file {train_file}, got the same "
                             "file (accuracy on training rows)")
        label = {"text": str(eval_file), "held_out": False,
                 "note": f"evaluated on {eval_file} ({'--eval-data' if o.eval_data else 'the dev split'}), not trained on"}
        return (SST2(tok, train_file, o.seq_len, o.train_limit), SST2(tok, eval_file, o.seq_len, o.eval_limit),
                DataCollatorWithPadding(tok), label)
    text, name = data
    if o.eval_data:
        if same_text(o.data, o.eval_data):
            raise ValueError(f"expected --eval-data other than --data, got {o.eval_data} for both (perplexity on "
                             "training text); leave --eval-data out to hold out the tail of --data")
        evaluation, eval_name = read_text(o.eval_data)
        label = {"text": eval_name, "held_out": False, "note": f"evaluated on {eval_name} (--eval-data), not trained on"}
    else:
        split = hold_out_tail(tok, text, o.held_out, min_tokens=min(o.eval_tokens, 2 * o.context))
        text, evaluation = split.train_text, split.eval_text
        label = {"text": f"{name} (held-out tail)", "held_out": True, "fraction": split.fraction,
                 "from_char": split.cut, "note": split.note()}
    return TextWindows(tok, text, o.seq_len, o.train_limit), evaluation, None, label


def _ood_texts(o: FinetuneOptions, train_text: str | None) -> list[tuple[str, str]]:
    """lm: (text, name) of each out-of-domain text: --ood-data, else those of data.corpus.default_ood_corpora
    that `train_text` (all of --data) does not hold (training on `--data pydoc` or `licenses` drops that text
    from the defaults)."""
    from mpokit.data.corpus import default_ood_corpora
    from mpokit.train.data import read_text, same_text

    if o.task != "lm":
        return []
    if o.ood_data is None:
        kept = [(c.text, c.name) for c in default_ood_corpora() if c.text[:2000] not in train_text]
        if not kept:
            raise ValueError(f"expected --ood-data: --data {o.data} holds every default out-of-domain text")
        return kept
    for spec in o.ood_data:
        if same_text(spec, o.data) or same_text(spec, o.eval_data):
            raise ValueError(f"expected --ood-data other than --data and --eval-data, got {spec}")
    return [read_text(spec) for spec in o.ood_data]


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


def _recorded_source(loaded) -> str | None:
    """The model an mpokit checkpoint was made from: its mpokit.json "source" (else the report's "model")."""
    from mpokit.io.checkpoint import is_checkpoint, read_meta

    if loaded.path is None or not is_checkpoint(loaded.path):
        return None
    meta = read_meta(loaded.path)
    source = meta.get("source") or (meta.get("report") or {}).get("model")
    return source if isinstance(source, str) and source else None


def _source_loader(o: FinetuneOptions, loaded):
    """() -> (model, label) of the recorded source model, for TrainContext.load_source."""
    from mpokit.io.models import embedded_alias, load_model

    source = _recorded_source(loaded)

    def load():
        if source is None:
            raise ValueError(f"expected a checkpoint that records its source model (mpokit compress does), got none "
                             f"in {o.model}; pass --teacher MODEL, or --recover-loss lm")
        spec = embedded_alias(source) or source
        try:
            return load_model(spec, task=_task(o)).model, source
        except FileNotFoundError as e:
            raise FileNotFoundError(f"cannot load the source model recorded in {o.model} ({e}); pass --teacher MODEL"
                                    ) from e

    return load


def _context(o: FinetuneOptions, loaded, train, collator, lr: float) -> TrainContext:
    from mpokit.io.models import load_model
    from mpokit.train.params import head_parameters
    from mpokit.train.trainer import fit

    common = dict(batch_size=o.batch_size, lr=lr, seed=o.seed, collator=collator, lr_scheduler=o.scheduler,
                  warmup_steps=o.warmup_steps, weight_decay=o.weight_decay, grad_accum=o.grad_accum,
                  max_minutes=o.max_minutes, use_cpu=o.use_cpu)

    def run(model, max_steps: int, loss_fn=None, subdir: str | None = None, callbacks: list | None = None):
        """One Trainer run; the main one (no subdir) keeps checkpoints under out/trainer and resumes."""
        if subdir is not None:
            return fit(model, train, str(Path(o.out) / subdir), max_steps=max_steps, loss_fn=loss_fn,
                       callbacks=callbacks, **common)
        return fit(model, train, str(Path(o.out) / "trainer"), max_steps=max_steps, loss_fn=loss_fn,
                   callbacks=callbacks, save_steps=o.save_steps, save_total_limit=o.save_total_limit,
                   resume=o.resume or None, **common)

    return TrainContext(task=o.task, train=train, collator=collator, batch_size=o.batch_size, max_steps=o.max_steps,
                        head=head_parameters(loaded.model) if o.task == "sst2" else [],
                        load_teacher=lambda path: load_model(path, task=_task(o)).model, fit=run,
                        load_source=_source_loader(o, loaded))


def _evaluate(o: FinetuneOptions, model, tok, evaluation, collator, label: dict, ood: list[tuple[str, str]]) -> dict:
    """The run's figures, each labelled with its text: "eval" (held out or --eval-data), and for lm "ood", one
    entry per out-of-domain text (`ood`: the (text, name) pairs of _ood_texts)."""
    from mpokit.train.evaluate import accuracy, perplexity_entry

    if o.task == "sst2":
        acc = accuracy(model, evaluation, collator)
        return {"accuracy": acc, "eval_rows": len(evaluation), "eval": {**label, "accuracy": acc,
                                                                        "rows": len(evaluation)}}
    name, extra = label["text"], {k: v for k, v in label.items() if k != "text"}
    ev = perplexity_entry(model, tok, evaluation, name, o.eval_tokens, o.context, **extra)
    ood_entries = [perplexity_entry(model, tok, text, text_name, o.eval_tokens, o.context,
                                    note="out-of-domain text, not trained on") for text, text_name in ood]
    return {"perplexity": ev["perplexity"], "eval_tokens": ev["tokens"], "context": o.context, "eval": ev,
            "ood": ood_entries}


def finetune(o: FinetuneOptions) -> dict:
    """Load, prepare (the method), fit, finish (the method), evaluate, save; returns the run's figures."""
    from mpokit.eval.size import count_params
    from mpokit.io.checkpoint import save_compressed
    from mpokit.train.data import read_text
    from mpokit.train.gather import gather_sharded_, is_main_process
    from mpokit.train.params import count_trainable

    t0 = time.time()
    method = o.method
    loaded = _load(o)
    model, tok = loaded.model, loaded.tokenizer
    data = read_text(o.data) if o.task == "lm" else None  # (text, name): read once for training and the OOD check
    train, evaluation, collator, label = _datasets(o, tok, data)
    ood = _ood_texts(o, data[0] if data else None)  # read before training: a bad --ood-data fails now, not after
    lr = o.lr if o.lr is not None else method.default_lr
    ctx = _context(o, loaded, train, collator, lr)
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
    out.update(_evaluate(o, model, tok, evaluation, collator, label, ood))
    # the run owns out/model; the source it records is the teacher of a later `recover`
    source = _recorded_source(loaded) or loaded.source
    out["gathered_from_shards"] = gather_sharded_(model)  # FSDP2: whole tensors before the save
    if is_main_process():
        out["saved"] = str(save_compressed(model, Path(o.out) / "model", tokenizer=tok, extra={"source": source},
                                           overwrite=True))
    out["seconds"] = time.time() - t0
    return out
