"""Recovery after compression: default model compressed to a budget, short CPU tuning, perplexity before/after.

One process measures, on WikiText-2 test (first --tokens tokens, windows of --context): the dense model,
the compressed checkpoint before tuning, and each tuning recipe after tuning on WikiText-2 *valid*
(train and test never overlap). Ratios are against the dense perplexity of the same run.
The compressed checkpoint is made once (`mpokit compress --method whitened-svd ...`) and reused.
Recipes (--recipes, comma list): recover = every MPO core trains; mpop = auxiliary cores only;
lora = PEFT LoRA on the frozen MPO layers. Each stops at --minutes of wall clock (hard limit) and its
cosine schedule spans --max-steps (pick max_steps so the schedule ends within the minutes).
Results: results/bench_recovery.json. Usage (the run in docs/benchmarks/finetune.md):
  python bench/bench_recovery.py --compressed /tmp/rec/wsvd-0.8 --recipes recover --max-steps 48 --minutes 15
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LR = {"recover": 1e-4, "mpop": 3e-4, "lora": 1e-3}  # recover: 1e-4 beat 3e-4 in a 12-step probe


def _perplexity(spec, text: str, tokens: int, context: int) -> float:
    from mpokit.eval.perplexity import perplexity
    from mpokit.io.models import load_model

    loaded = load_model(spec)
    return perplexity(loaded.model, loaded.tokenizer, text, tokens=tokens, context=context, progress=False).perplexity


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compressed", default="/tmp/rec/wsvd-0.8", help="compressed checkpoint (made if missing)")
    p.add_argument("--method", default="whitened-svd", help="compression preset when the checkpoint is missing")
    p.add_argument("--budget", type=float, default=0.8)
    p.add_argument("--recipes", default="recover")
    p.add_argument("--max-steps", type=int, default=48)
    p.add_argument("--minutes", type=float, default=15.0, help="wall-clock training limit per recipe")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--warmup-steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="override the per-recipe learning rate")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--dense-ppl", type=float, default=None, help="skip measuring dense (reuse a value)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "results" / "bench_recovery.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from mpokit.eval.table import print_table
    from mpokit.io.atomic import write_json
    from mpokit.train.data import shared_data_dir
    from mpokit.methods.presets import build_config
    from mpokit.train.recipes import FinetuneOptions, finetune

    wt = shared_data_dir() / "wikitext-2"
    test = (wt / "test.txt").read_text(encoding="utf-8")
    ckpt = Path(args.compressed)
    if not ckpt.exists():
        import subprocess  # the CLI as a tool, not imported

        subprocess.run([sys.executable, "-m", "mpokit", "compress", "--method", args.method, "--budget",
                        str(args.budget), "--calibration", str(wt / "valid.txt"), "--calibration-tokens", "4096",
                        "--out", str(ckpt)], check=True)
    dense = args.dense_ppl if args.dense_ppl else _perplexity(None, test, args.tokens, args.context)
    before = _perplexity(str(ckpt), test, args.tokens, args.context)
    settings = {k: getattr(args, k) for k in ("budget", "method", "max_steps", "minutes", "batch_size", "grad_accum",
                                              "seq_len", "warmup_steps", "tokens", "context", "threads")}
    base = {"recipe": "none (compressed)", "perplexity": before, "ratio_to_dense": before / dense}
    rows = [{"recipe": "dense", "perplexity": dense, "ratio_to_dense": 1.0}, base]
    for recipe in args.recipes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            method = build_config(recipe, "finetune", **({"rank": 16} if recipe == "lora" else {}))
            r = finetune(FinetuneOptions(
                model=str(ckpt), method=method, task="lm", data=str(wt / "valid.txt"), eval_data=str(wt / "test.txt"),
                out=tmp, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                seq_len=args.seq_len, lr=args.lr or LR[recipe], scheduler="cosine", warmup_steps=args.warmup_steps,
                eval_tokens=args.tokens, context=args.context, max_minutes=args.minutes))
            r["wall_seconds"] = time.perf_counter() - t0
        r.pop("saved", None)
        r.update(recipe=recipe, ratio_to_dense=r["perplexity"] / dense, train_minutes=r["train_seconds"] / 60,
                 target_met=r["perplexity"] <= 1.25 * dense)
        rows.append(r)
        print_table(rows, ["recipe", "perplexity", "ratio_to_dense", "global_step", "tokens_seen", "train_minutes",
                           "trainable_params", "lr"],
                    title=f"WikiText-2 test ({args.tokens} tokens, ctx {args.context}); budget {args.budget}; "
                          f"tuned on WikiText-2 valid; target <= 1.25x dense")
        write_json(args.out, {"settings": settings, "compressed": str(ckpt), "dense_perplexity": dense,
                              "target": "<= 1.25x dense", "rows": rows})  # after each recipe: partial runs survive
    return 0


if __name__ == "__main__":
    sys.exit(main())
