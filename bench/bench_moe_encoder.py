"""MoEfication of an encoder classifier (all-MiniLM-L6-v2 fine-tuned on SST-2): dev accuracy and FFN time.

The decoder benchmark (bench_moe.py) shows SwiGLU FFNs do not split well into experts; this one
checks the encoder case the MoEfication paper targets. MiniLM's FFNs are GELU, 1536 neurons.

    mpokit finetune minilm --method full --task sst2 --data ../shared/data/sst2 --max-steps 400 \
        --batch-size 16 --seq-len 64 --train-limit 20000 --eval-limit 872 --out /tmp/minilm-sst2
    python bench/bench_moe_encoder.py --model /tmp/minilm-sst2/model

For each setting the same fine-tuned model is converted (calibration: SST-2 *train* sentences,
one per batch, as the model sees them) and scored on all 872 dev sentences; FFN time sums
dense vs MoE over the 6 FFNs on the same captured dev inputs, interleaved, in this process.
Writes results/bench_moe_encoder.json and prints a table.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import time_pair  # noqa: E402  (the same interleaved dense/MoE FFN timing)

ROOT = Path(__file__).resolve().parents[1]
SST2_DIR = ROOT.parent / "shared" / "data" / "sst2"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="fine-tuned SST-2 classifier folder (mpokit finetune ... --out DIR: DIR/model)")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--settings", default="0:8,0:16,0:3,6:2",
                   help="comma-separated shared:top_k pairs (active fraction = (shared + top_k) / experts)")
    p.add_argument("--refit", action="store_true", help="also each setting with the least-squares refit")
    p.add_argument("--calibration-sentences", type=int, default=2000)
    p.add_argument("--eval-limit", type=int, default=872)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "results" / "bench_moe_encoder.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from mpokit import compress_
    from mpokit.eval.table import print_table
    from mpokit.io.atomic import write_json
    from mpokit.methods.moefication import MoEficationConfig, moe_layers
    from mpokit.methods.moefication.router import collect_ffn_inputs
    from mpokit.surgery.ffn import find_ffns, read_ffn
    from mpokit.train.data import SST2, read_sst2
    from mpokit.train.evaluate import accuracy

    tok = AutoTokenizer.from_pretrained(args.model)
    dense = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
    dev = SST2(tok, SST2_DIR / "dev.tsv", max_len=64, limit=args.eval_limit)
    collator = DataCollatorWithPadding(tok)
    base_acc = accuracy(dense, dev, collator)
    print(f"dense dev accuracy {base_acc:.4f}", flush=True)
    train = read_sst2(SST2_DIR / "train.tsv", limit=args.calibration_sentences)
    batches = [tok(text, return_tensors="pt", truncation=True, max_length=64)["input_ids"] for _, text in train]
    dev_ids = collator([dev[i] for i in range(64)])["input_ids"]  # timing inputs: 64 padded dev sentences
    sites = find_ffns(dense)
    timing_inputs = list(collect_ffn_inputs(dense, sites, [dev_ids], progress=False).values())
    dense_ffns = [read_ffn(dense, s) for s in sites]

    rows = []
    for pair in args.settings.split(","):
        shared, top_k = (int(v) for v in pair.split(":"))
        for refit in (False, True) if args.refit else (False,):
            model = copy.deepcopy(dense)
            config = MoEficationConfig(num_experts=args.experts, top_k=top_k, shared_experts=shared, refit=refit)
            start = time.perf_counter()
            report = compress_(model, config, batches=batches, progress=False)
            convert_s = time.perf_counter() - start
            acc = accuracy(model, dev, collator)
            t_dense, t_moe = time_pair(dense_ffns, moe_layers(model), timing_inputs, args.repeats)
            rows.append({"experts": args.experts, "shared": shared, "top_k": top_k, "refit": refit,
                         "active_fraction": (shared + top_k) / args.experts, "accuracy": acc,
                         "accuracy_drop": base_acc - acc, "router_recall": report.extra["mean_router_recall"],
                         "ffn_ms_dense": 1e3 * t_dense, "ffn_ms_moe": 1e3 * t_moe, "ffn_time_ratio": t_moe / t_dense,
                         "convert_seconds": convert_s})
            print(json.dumps(rows[-1]), flush=True)
    write_json(Path(args.out), {"bench": "moefication-encoder", "model": args.model,
                                "dense_accuracy": base_acc, "eval": f"first {len(dev)} SST-2 dev sentences",
                                "calibration": f"first {len(batches)} SST-2 train sentences, one per batch",
                                "timing": "FFN forward on 64 padded dev sentences, min of repeats, dense/MoE "
                                          "interleaved", "threads": args.threads, "rows": rows})
    print_table(rows, ["shared", "top_k", "refit", "active_fraction", "accuracy", "accuracy_drop", "router_recall",
                       "ffn_time_ratio"],
                title=f"MoEfication of an SST-2 MiniLM classifier (dense dev accuracy {base_acc:.4f})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
