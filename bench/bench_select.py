"""Where to adapt: all matrices vs stable-rank vs random vs Fisher selection (LoRA, MPOP) on SST-2, MiniLM.

Candidates: the 24 attention matrices of all-MiniLM-L6-v2 (query, key, value, attention output; all
384 x 384, so a selection's LoRA parameter count depends only on how many it picks). Selections adapt
--fraction of them; LoRA "all" gets rank * count / 24 so every LoRA row trains the same number of
adapter parameters. With --methods mpop, MPOP trains the auxiliary cores of the selected matrices (same F,
counts reported; "all" trains more). Both stable-rank ends run: SST-2 dev picks the direction, test is the report.
Each run: 1 epoch over the first --train-limit rows of train.tsv, linear schedule, 10% warmup.
Results: results/bench_select.json (or --out), written after every run.
Usage (the runs in docs/benchmarks/peft-selection.md; 1 thread: 2 thrashed on a shared 2-core machine):
  python bench/bench_select.py --threads 1
  python bench/bench_select.py --threads 1 --variants "stable-rank high + start" --append
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"]
VARIANTS = {  # row name -> selection fields
    "all": {},
    "stable-rank low": {"select": "stable-rank", "select_order": "low"},
    "stable-rank high": {"select": "stable-rank", "select_order": "high"},
    "random": {"select": "random"},
    "fisher": {"select": "fisher"},
    "stable-rank high + start": {"select": "stable-rank", "select_order": "high", "start": "stable-rank"},
}


def _config(method: str, variant: str, seed: int, args, n_candidates: int):
    from mpokit.methods.presets import build_config
    from mpokit.methods.selection import select_count

    fields = dict(VARIANTS[variant])
    if fields:
        fields["select_fraction"] = args.fraction
    if fields.get("select") == "random":
        fields["select_seed"] = seed  # a different draw per seed
    if method == "lora":
        count = select_count(args.fraction, n_candidates)
        rank = args.rank if fields else max(1, round(args.rank * count / n_candidates))  # equal adapter params
        return build_config("lora", "finetune", targets=CANDIDATES, rank=rank, **fields)
    return build_config("mpop", "finetune", target_modules=CANDIDATES, **fields)


def _test_accuracy(saved: str, seq_len: int) -> float:
    from transformers import DataCollatorWithPadding

    from mpokit.io.models import load_model
    from mpokit.train.data import SST2, shared_data_dir
    from mpokit.train.evaluate import accuracy

    loaded = load_model(saved, task="sequence-classification")
    test = SST2(loaded.tokenizer, shared_data_dir() / "sst2" / "test.tsv", seq_len)
    return accuracy(loaded.model, test, DataCollatorWithPadding(loaded.tokenizer))


def _summary(rows: list[dict], method: str, variant: str) -> dict:
    runs = [r for r in rows if r["method"] == method and r["variant"] == variant]
    dev, test = [r["dev_accuracy"] for r in runs], [r["test_accuracy"] for r in runs]
    sd = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0)
    return {"method": method, "variant": variant, "seeds": len(runs),
            "trainable_params": sorted({r["trainable_params"] for r in runs}),
            "rank": runs[0].get("rank"), "dev_mean": statistics.mean(dev), "dev_sd": sd(dev),
            "test_mean": statistics.mean(test), "test_sd": sd(test),
            "start_steps": [r["start_step"] for r in runs] if runs[0].get("start_step", -1) != -1 else None,
            "train_seconds": statistics.mean(r["train_seconds"] for r in runs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="lora", help="lora and/or mpop")
    p.add_argument("--variants", default="all,stable-rank low,stable-rank high,random,fisher",
                   help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--fraction", type=float, default=0.25)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the selections ('all': scaled down)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--train-limit", type=int, default=1000)
    p.add_argument("--lr", type=float, default=2e-3, help="every row (not tuned)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "results" / "bench_select.json"))
    p.add_argument("--append", action="store_true", help="add these rows to the runs already in --out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from mpokit.eval.table import print_table
    from mpokit.io.atomic import write_json
    from mpokit.train.data import shared_data_dir
    from mpokit.train.recipes import FinetuneOptions, finetune

    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"expected variants from {list(VARIANTS)}, got {unknown}")
    steps = max(1, args.train_limit // args.batch_size)  # one epoch
    settings = {k: getattr(args, k) for k in ("fraction", "rank", "batch_size", "seq_len", "train_limit", "lr",
                                              "threads")}
    settings.update(steps=steps, warmup_steps=max(1, steps // 10), candidates=CANDIDATES, model="all-MiniLM-L6-v2",
                    dev="SST-2 dev.tsv (872 rows, choosing)", test="SST-2 test.tsv (1821 rows, report)")
    rows, summary, t0 = [], [], time.time()
    if args.append and Path(args.out).exists():
        import json

        old = json.loads(Path(args.out).read_text())
        rows, summary, t0 = old["runs"], old["summary"], t0 - old["seconds"]
    for method in args.methods.split(","):
        for variant in variants:
            for seed in [int(s) for s in args.seeds.split(",")]:
                config = _config(method, variant, seed, args, n_candidates=24)
                with tempfile.TemporaryDirectory() as tmp:
                    r = finetune(FinetuneOptions(
                        model="minilm", method=config, task="sst2", data=str(shared_data_dir() / "sst2"), out=tmp,
                        max_steps=steps, batch_size=args.batch_size, seq_len=args.seq_len,
                        train_limit=args.train_limit, lr=args.lr, seed=seed, warmup_steps=max(1, steps // 10)))
                    test = _test_accuracy(r["saved"], args.seq_len)
                start = r.get("start") or {}
                rows.append({"method": method, "variant": variant, "seed": seed, "rank": getattr(config, "rank", None),
                             "trainable_params": r["trainable_params"], "dev_accuracy": r["accuracy"],
                             "test_accuracy": test, "train_loss": r["train_loss"], "train_seconds": r["train_seconds"],
                             "selected": r["selected"], "start_step": start.get("start_step", -1),
                             "start_trajectory": start.get("trajectory")})
                print(f"{method} {variant!r} seed {seed}: dev {r['accuracy']:.4f} test {test:.4f} "
                      f"({r['trainable_params']} trainable, {time.time() - t0:.0f}s)", flush=True)
            summary.append(_summary(rows, method, variant))
            write_json(args.out, {"settings": settings, "summary": summary, "runs": rows,
                                  "seconds": time.time() - t0})  # partial runs survive
    picks = {}
    for method in args.methods.split(","):
        ends = {s["variant"]: s["dev_mean"] for s in summary if s["method"] == method and
                s["variant"] in ("stable-rank low", "stable-rank high")}
        if len(ends) == 2:
            picks[method] = "low" if ends["stable-rank low"] >= ends["stable-rank high"] else "high"
    print_table(summary, ["method", "variant", "seeds", "rank", "trainable_params", "dev_mean", "dev_sd", "test_mean",
                          "test_sd", "train_seconds"],
                title=f"SST-2, MiniLM, {args.train_limit} train rows, 1 epoch ({steps} steps x {args.batch_size}), "
                      f"max {args.seq_len} tokens, F={args.fraction}")
    print(f"stable-rank direction picked on dev: {picks}; total {time.time() - t0:.0f}s")
    write_json(args.out, {"settings": settings, "summary": summary, "dev_picks_order": picks, "runs": rows,
                          "seconds": time.time() - t0})
    return 0


if __name__ == "__main__":
    sys.exit(main())
