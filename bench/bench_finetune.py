"""SST-2 fine-tuning on all-MiniLM-L6-v2: full vs MPOP (aux cores) vs LoRA (PEFT) vs OPF, same steps.

Every method runs in this one process with the same data order, steps, batch size, sequence length,
linear schedule and 10% warmup; accuracy is on the first --eval-limit rows of SST-2 dev (872 = all).
Learning rates: full and OPF use --lr (a usual BERT fine-tuning rate); the parameter-efficient
methods (MPOP aux cores, LoRA) use the higher --lr-pe, as LoRA setups usually do (few parameters,
zero-initialized adapter). Not tuned per method here.
Results: results/bench_finetune.json (or --out).
Usage (the run in docs/benchmarks/finetune.md): python bench/bench_finetune.py --max-steps 400 --batch-size 16 --seq-len 64 --train-limit 20000
  --eval-limit 872 --threads 1 --out results/bench_finetune_long.json
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="full,mpop,lora,opf")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--train-limit", type=int, default=4000)
    p.add_argument("--eval-limit", type=int, default=200)
    p.add_argument("--lr", type=float, default=5e-5, help="full, OPF")
    p.add_argument("--lr-pe", type=float, default=1e-3, help="MPOP, LoRA")
    p.add_argument("--opf-count", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "results" / "bench_finetune.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from mpokit.eval.table import print_table
    from mpokit.io.atomic import write_json
    from mpokit.train.data import shared_data_dir
    from mpokit.methods.presets import build_config
    from mpokit.train.recipes import FinetuneOptions, finetune

    data = shared_data_dir() / "sst2"
    rows = []
    settings = {k: getattr(args, k) for k in ("max_steps", "batch_size", "seq_len", "train_limit", "eval_limit",
                                              "lr", "lr_pe", "opf_count")}
    for method in args.methods.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            config = build_config(method, "finetune", **({"count": args.opf_count} if method in ("opf", "opdf") else {}))
            r = finetune(FinetuneOptions(model="minilm", method=config, task="sst2", data=str(data), out=tmp,
                                         max_steps=args.max_steps, batch_size=args.batch_size, seq_len=args.seq_len,
                                         train_limit=args.train_limit, eval_limit=args.eval_limit,
                                         lr=args.lr_pe if method in ("mpop", "lora") else args.lr,
                                         warmup_steps=max(1, args.max_steps // 10)))
        r.pop("saved", None)
        r["trainable_frac"] = r["trainable_params"] / r["params"]
        rows.append(r)
        print_table(rows, ["method", "lr", "trainable_params", "trainable_frac", "train_loss", "accuracy",
                           "train_seconds"],
                    title=f"SST-2 dev (first {args.eval_limit} rows), MiniLM, {args.max_steps} steps x {args.batch_size}")
        write_json(args.out, {"settings": settings, "eval": f"SST-2 dev, first {args.eval_limit} rows",
                              "threads": args.threads, "rows": rows})  # after each method: partial runs survive
    return 0


if __name__ == "__main__":
    sys.exit(main())
