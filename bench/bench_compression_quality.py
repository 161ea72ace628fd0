"""Compression quality at equal parameter budget: mpokit vs SVD baselines and tensorly-torch.

Every (method, budget) runs in its own subprocess, so peak memory (max RSS) and time are
per run. All runs share the same calibration text (WikiText-2 valid) and test text
(WikiText-2 test); the dense model is evaluated in the same invocation.

    python bench/bench_compression_quality.py                       # full table (long)
    python bench/bench_compression_quality.py --budgets 0.8 --methods mpo whitened-svd
    python bench/bench_compression_quality.py --jobs 2 --threads 1  # two rows at a time

Writes results/compression_quality.json and results/compression_quality.png.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
from concurrent.futures import ThreadPoolExecutor
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
METHODS = ["svd", "asvd", "whitened-svd", "mpo-datafree", "tltorch-blocktt", "mpo"]


def tltorch_compress(model, budget: float) -> dict:
    """tensorly-torch BlockTT (3 cores) on every decoder linear layer, ranks matched to the budget."""
    import tltorch
    from tltorch.utils import get_tensorized_shape

    from mpokit.surgery import find_targets, get_module, set_module

    before = after = 0
    for name in find_targets(model):
        lin = get_module(model, name)
        o, i = lin.weight.shape
        idd, od = get_tensorized_shape(i, o, order=3, verbose=False)  # same split from_linear makes
        full = [min(od[0] * idd[0], od[1] * idd[1] * od[2] * idd[2]), min(od[0] * idd[0] * od[1] * idd[1], od[2] * idd[2])]

        def params(s):
            r1, r2 = max(1, int(full[0] * s)), max(1, int(full[1] * s))
            return od[0] * idd[0] * r1 + r1 * od[1] * idd[1] * r2 + r2 * od[2] * idd[2], (1, r1, r2, 1)

        lo, hi = 0.0, 1.0
        for _ in range(30):  # largest uniform bond fraction within this layer's share of the budget
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if params(mid)[0] <= budget * o * i else (lo, mid)
        rank = params(lo)[1]
        new = tltorch.FactorizedLinear.from_linear(lin, rank=rank, factorization="blocktt", n_tensorized_modes=3,
                                                   bias=lin.bias is not None)
        set_module(model, name, new)
        before += o * i
        after += sum(p.numel() for p in new.weight.parameters())
    return {"params_before": before, "params_after": after, "kept_fraction": after / before}


def run_one(method: str, budget: float, args) -> dict:
    """Inside a subprocess: load, compress, evaluate; returns one result row."""
    import torch

    from mpokit.calibration import calibration_batches
    from mpokit.eval import perplexity
    from mpokit.io.models import load_model
    from mpokit.methods import compress_
    from mpokit.methods.presets import build_config, needs_calibration

    torch.set_num_threads(args.threads)
    lm = load_model()
    model_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    test = (DATA / "test.txt").read_text()
    start = time.perf_counter()
    if method == "dense":
        rep = {"kept_fraction": 1.0}
    elif method == "tltorch-blocktt":
        rep = tltorch_compress(lm.model, budget)
    else:
        config = build_config(method, budget=budget)
        kwargs = {}
        if needs_calibration(config):
            kwargs["batches"] = calibration_batches(lm.tokenizer, (DATA / "valid.txt").read_text(),
                                                    args.calibration_tokens, 512)
        rep = compress_(lm.model, config, progress=False, **kwargs).to_dict()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ppl = perplexity(lm.model, lm.tokenizer, test, tokens=args.tokens, context=512, progress=False)
    kinds: dict[str, int] = {}
    for layer in rep.get("layers", []):
        kinds[layer["kind"]] = kinds.get(layer["kind"], 0) + 1
    return {"method": method, "budget": budget, "perplexity": ppl.perplexity, "kept": rep["kept_fraction"],
            "params_after": rep.get("params_after"), "compress_s": seconds, "peak_rss_gb": peak / 2**30,
            "peak_over_model": (peak - rss_loaded + model_bytes) / model_bytes, "layouts": kinds,
            "tokens": ppl.tokens, "context": 512, "calibration_tokens": args.calibration_tokens}


def plot(rows: list[dict], dense: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        pts = sorted((r["budget"], r["perplexity"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.axhline(dense, color="k", ls="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("kept fraction of decoder linear parameters")
    ax.set_ylabel("WikiText-2 test perplexity (log)")
    ax.set_title("SmolLM2-135M: perplexity vs parameter budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--budgets", nargs="+", type=float, default=[0.9, 0.8, 0.6])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--calibration-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--jobs", type=int, default=1, help="rows run in parallel processes")
    p.add_argument("--out", default=str(ROOT / "results" / "compression_quality.json"))
    p.add_argument("--one", nargs=2, metavar=("METHOD", "BUDGET"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one[0], float(args.one[1]), args)), flush=True)
        return
    from mpokit.eval.table import print_table

    jobs = [("dense", 1.0)] + [(m, b) for b in args.budgets for m in args.methods]

    def run(job):
        method, budget = job
        cmd = [sys.executable, __file__, "--one", method, str(budget), "--tokens", str(args.tokens),
               "--calibration-tokens", str(args.calibration_tokens), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(f"{method} @ {budget} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return None
        row = json.loads(line[0][7:])
        row["parallel_jobs"] = args.jobs
        print(f"{method:>16} @ {budget}: ppl {row['perplexity']:.4g}  ({row['compress_s']:.0f} s)", flush=True)
        return row

    # --jobs > 1 runs rows side by side (each process keeps --threads threads): faster overall,
    # but each row's compress time and memory bandwidth then share the machine.
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = [r for r in pool.map(run, jobs) if r is not None]
    dense = next((r["perplexity"] for r in rows if r["method"] == "dense"), math.nan)
    for r in rows:
        r["ppl_over_dense"] = r["perplexity"] / dense
    print_table(rows, ["method", "budget", "kept", "perplexity", "ppl_over_dense", "compress_s", "peak_rss_gb",
                       "peak_over_model"],
                title=f"WikiText-2 test, first {args.tokens} tokens, context 512; calibration "
                      f"{args.calibration_tokens} tokens of WikiText-2 valid")
    out = Path(args.out)
    from mpokit.io.atomic import write_json

    write_json(out, {"model": "SmolLM2-135M-Instruct", "dense_perplexity": dense, "rows": rows})
    plot(rows, dense, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
