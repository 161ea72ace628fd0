"""mpokit finetune: adapt a model (MPOP, recovery, OPF, OPDF, LoRA, full) with Hugging Face Trainer."""
from __future__ import annotations

from mpokit.cli.common import (UserError, add_device_flag, add_method_flags, emit_json, int_at_least,
                               method_flag_values, nonnegative_float, nonnegative_int, positive_float, positive_int,
                               print_table, resolve_device)

HELP = "fine-tune a model or compressed checkpoint (causal LM on a text file, or SST-2) and report the metric"


def add_arguments(p) -> None:
    from mpokit.methods.base import method_names
    from mpokit.train.recipes import TASKS

    p.add_argument("model", nargs="?", default=None, help="checkpoint folder, alias (smollm2, minilm) or hub id")
    p.add_argument("--method", required=True, choices=method_names("finetune"),
                   help="mpop: auxiliary cores only; recover: a compressed model learns back from the uncompressed "
                        "one (distillation; --recover-loss lm: plain LM loss on --data); opf: expand "
                        "selected weights to long MPOs, train, contract back; opdf: opf + distillation from "
                        "--teacher; lora: PEFT LoRA (on the MPO layers of a compressed model); full: every "
                        "parameter; kd: every parameter, loss mixes labels and --teacher logits")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", default=None,
                   help="lm: training text file, or 'mix' (the default: WikiText-2 valid, Python docs and SST-2 "
                        "sentences, interleaved); sst2: folder with train.tsv/dev.tsv (default: the shared data "
                        "folder's sst2/)")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="optimizer steps (may be left out with --max-minutes: the clock alone ends training and "
                        "the schedule)")
    p.add_argument("--out", required=True, help="output folder (Trainer checkpoints + model/)")
    p.add_argument("--json", default=None, help="write results as JSON here")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--lr", type=positive_float, default=None, help="learning rate (default depends on --method)")
    p.add_argument("--seq-len", type=int_at_least(2), default=128, help="lm window / sst2 max tokens (default 128)")
    p.add_argument("--train-limit", type=positive_int, default=None,
                   help="use only the first N rows/windows for training")
    p.add_argument("--eval-data", default=None,
                   help="lm: text for perplexity (default: the held-out tail of --data, never trained on); sst2: tsv "
                        "(default: dev.tsv beside train.tsv)")
    p.add_argument("--held-out", type=positive_float, default=0.1,
                   help="lm without --eval-data: fraction of --data (its tail) held out for evaluation (default 0.1)")
    p.add_argument("--ood-data", action="append", default=None, metavar="TEXT",
                   help="lm: an out-of-domain text also scored, a file, 'licenses' or 'vim-manual'; repeat for "
                        "more (default: the offline pydoc corpus's first half, and the licence texts in "
                        "/usr/share/common-licenses where the machine has them)")
    p.add_argument("--eval-limit", type=positive_int, default=None, help="sst2: first N evaluation rows")
    p.add_argument("--tokens", type=int_at_least(2), default=8192, help="lm: perplexity tokens (default 8192)")
    p.add_argument("--context", type=int_at_least(2), default=512, help="lm: perplexity window (default 512)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--save-steps", type=positive_int, default=None, help="Trainer checkpoint every N steps")
    p.add_argument("--save-total-limit", type=positive_int, default=3,
                   help="Trainer checkpoints kept in --out (oldest deleted first; default 3)")
    p.add_argument("--resume", action="store_true",
                   help="resume from the newest valid Trainer checkpoint in --out (each is verified first; a corrupt "
                        "or half-written one is moved aside and the one before it used; none valid: start afresh)")
    p.add_argument("--resume-from", default=None, metavar="CHECKPOINT",
                   help="resume from this Trainer checkpoint folder (refused if it does not verify)")
    add_method_flags(p, "finetune")  # each method's own options, declared on its config
    p.add_argument("--scheduler", default="linear", help="LR schedule (transformers name: linear, cosine, ...)")
    p.add_argument("--warmup-steps", type=nonnegative_int, default=0)
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.0)
    p.add_argument("--grad-accum", type=positive_int, default=1, help="gradient accumulation steps per optimizer step")
    p.add_argument("--max-minutes", type=positive_float, default=None,
                   help="stop training after this many wall-clock minutes; the LR schedule ends there too when "
                        "the clock comes before --max-steps")
    add_device_flag(p, "where Hugging Face Trainer trains: cpu (its use_cpu), cuda (every visible GPU, as Trainer "
                       "does; pick one with CUDA_VISIBLE_DEVICES) or mps")


def trainer_use_cpu(name: str) -> bool | None:
    """Trainer's use_cpu for --device (None: Trainer's own choice); the device must be available."""
    device = resolve_device(name)
    if device.index is not None:
        raise UserError(f"expected --device auto, cpu, cuda or mps for finetune, got {name}: Hugging Face Trainer "
                        f"uses every visible GPU; choose one with CUDA_VISIBLE_DEVICES={device.index}")
    return None if name == "auto" else device.type == "cpu"


def run(args) -> int:
    from mpokit.eval.size import peak_device_mb
    from mpokit.methods.presets import build_config
    from mpokit.train.gather import is_main_process
    from mpokit.train.recipes import FinetuneOptions, finetune

    use_cpu = trainer_use_cpu(args.device)
    method = build_config(args.method, kind="finetune", **method_flag_values(args, "finetune"))
    opts = FinetuneOptions(
        model=args.model, method=method, task=args.task, data=args.data, max_steps=args.max_steps, out=args.out,
        batch_size=args.batch_size, lr=args.lr, seq_len=args.seq_len, train_limit=args.train_limit,
        eval_data=args.eval_data, held_out=args.held_out, ood_data=args.ood_data, eval_tokens=args.tokens,
        context=args.context, eval_limit=args.eval_limit,
        seed=args.seed, save_steps=args.save_steps, save_total_limit=args.save_total_limit,
        resume=args.resume_from or args.resume, scheduler=args.scheduler, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, grad_accum=args.grad_accum, max_minutes=args.max_minutes, use_cpu=use_cpu)
    out = finetune(opts)
    if not is_main_process():  # under accelerate launch, rank 0 alone reports (and saved)
        return 0
    out["device"] = str(resolve_device(args.device))  # auto: what Trainer picks too (use_cpu without CUDA)
    out["peak_device_mb"] = peak_device_mb()
    ood = {f"ood_perplexity_{k + 1}": e for k, e in enumerate(out.get("ood") or [])}  # column -> entry
    row = {**out, **{column: e["perplexity"] for column, e in ood.items()}}
    metrics = ["accuracy"] if args.task == "sst2" else ["perplexity", *ood]
    print_table([row], ["model", "method", "task", "global_step", "trainable_params", "params", "train_loss", *metrics,
                        "train_seconds", "seconds"])
    print(out["eval"]["note"])
    for column, e in ood.items():
        print(f"{column}: on {e['text']}, {e['note']}")
    emit_json(args.json, out)
    return 0
