"""Distillation on SST-2: OPDF student vs plain-KD student vs no-KD student, same steps, same start.

Teacher: all-MiniLM-L6-v2 (6 layers) fine-tuned on SST-2 with every parameter for --teacher-steps.
Student start (shared by all three students, saved once so the classifier head is identical):
the first --student-layers transformer layers of the *pretrained* all-MiniLM-L6-v2 (not fine-tuned).
Students, each for --steps steps with the same data order, batch and learning rate:
  no-KD  every parameter, label loss only                         (mpokit finetune --method full)
  KD     every parameter, (1-a) label loss + a Hinton KD (T=2)     (--method kd --teacher T)
  OPDF   --opf-count Fisher-selected weights OPF-expanded, KD as above + beta * tensor constraint
         (MSE of student vs teacher auxiliary cores), contracted back after training (--method opdf)
Accuracy: SST-2 dev, first --eval-limit rows, all in this one process. Results: results/bench_distill.json.
Usage (the run in docs/benchmarks/finetune.md): python bench/bench_distill.py --teacher-steps 200 --steps 200 --eval-limit 872 --threads 1
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def make_student(path: Path, layers: int, seed: int = 0) -> int:
    """Save the truncated pretrained MiniLM (sequence classifier, fresh head) to `path`; returns its params."""
    from mpokit.io.models import load_model

    torch.manual_seed(seed)
    loaded = load_model("minilm", task="sequence-classification")
    model = loaded.model
    model.bert.encoder.layer = model.bert.encoder.layer[:layers]
    model.config.num_hidden_layers = layers
    model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--opf-count", type=int, default=6)
    p.add_argument("--train-limit", type=int, default=20000)
    p.add_argument("--eval-limit", type=int, default=872)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "results" / "bench_distill.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from mpokit.eval.table import print_table
    from mpokit.io.atomic import write_json
    from mpokit.train.data import shared_data_dir
    from mpokit import FullConfig, KDConfig, OPDFConfig
    from mpokit.train.recipes import FinetuneOptions, finetune

    data = str(shared_data_dir() / "sst2")
    common = dict(task="sst2", data=data, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                  train_limit=args.train_limit, eval_limit=args.eval_limit, scheduler="linear",
                  warmup_steps=max(1, args.steps // 10))
    settings = {k: getattr(args, k) for k in ("teacher_steps", "steps", "student_layers", "batch_size", "seq_len",
                                              "lr", "alpha", "beta", "opf_count", "train_limit", "eval_limit")}
    rows = []
    cols = ["role", "method", "layers", "global_step", "trainable_params", "params", "train_loss", "accuracy", "seconds"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = finetune(FinetuneOptions(model="minilm", method="full", max_steps=args.teacher_steps,
                                           out=str(tmp / "teacher"), **common))
        rows.append({**teacher, "role": "teacher", "layers": 6})
        student_dir = tmp / "student"
        make_student(student_dir, args.student_layers)
        for role, method in (("student no-KD", "full"), ("student KD", "kd"), ("student OPDF", "opdf")):
            config = {"full": FullConfig(), "kd": KDConfig(teacher=teacher["saved"], alpha=args.alpha),
                      "opdf": OPDFConfig(teacher=teacher["saved"], alpha=args.alpha, beta=args.beta,
                                         count=args.opf_count)}[method]
            r = finetune(FinetuneOptions(model=str(student_dir), method=config, max_steps=args.steps,
                                         out=str(tmp / method), **common))
            rows.append({**r, "role": role, "layers": args.student_layers})
            print_table(rows, cols, title=f"SST-2 dev (first {args.eval_limit} rows): distillation, "
                                          f"{args.steps} student steps x {args.batch_size}")
            write_json(args.out, {"settings": settings, "eval": f"SST-2 dev, first {args.eval_limit} rows",
                                  "student": f"first {args.student_layers} layers of pretrained all-MiniLM-L6-v2",
                                  "threads": args.threads,
                                  "rows": [{k: v for k, v in x.items() if k != "saved"} for x in rows]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
