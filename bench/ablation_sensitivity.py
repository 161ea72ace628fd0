"""Ablation behind AwareConfig's defaults: which layer weighting makes global allocation work.

Open loop (all statistics from the original model, every layer truncated at once, no
sequential pass), so many variants fit in one process; budget 0.8 of the decoder linears.
Per layer, the weighted matrix R W S is truncated (S S^T = X^T X from calibration inputs;
R from the output-gradient second moments G of the LM loss):
  whiten     R = I                          (SVD-LLM)
  scalar     R = sqrt(mean diag G) I        (one loss scale per layer)
  diag       R = sqrt(diag G + d mean)      (the default, fisher_full_max=0)
  kfac       R^T R = G + d mean I           (full K-FAC factor)
Ranks are either uniform (every layer keeps the budget) or global (greedy over all layers'
weighted spectra, i.e. in estimated loss units when R is used).

    python bench/ablation_sensitivity.py                  # 2048 calibration / 2048 test tokens
Writes results/ablation_sensitivity.json and prints a table.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
VARIANTS = ["whiten/uniform", "whiten/global", "scalar/global", "diag:0.03/uniform", "diag:0.03/global",
            "diag:0/global", "diag:1/global", "kfac:0.01/uniform", "kfac:0.01/global", "kfac:0.3/global"]


def collect(model, names, batches):
    """Input Grams C and output-gradient Grams G (full matrices) of every named layer."""
    from mpokit.calibration.fisher import collect_output_fisher
    from mpokit.calibration.stats import collect_input_stats

    stats = collect_input_stats(model, names, batches, progress=False)
    grads = collect_output_fisher(model, names, batches, full_max=1 << 30, progress=False)
    return {n: stats.gram(n) for n in names}, grads


def weighted_factors(w, c, g, kind: str, damp: float):
    from mpokit.ops.whiten import output_factor, whitened_svd, whitening_factor

    s = whitening_factor(c, 1e-4)
    if kind == "whiten":
        left = None
    elif kind == "scalar":
        left = torch.diagonal(g).double().mean().sqrt().expand(w.shape[0]).clone()
    elif kind == "diag":
        left = output_factor(torch.diagonal(g), damp)
    else:
        left = output_factor(g, damp)
    return whitened_svd(w, s, left)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=0.8)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--calibration-tokens", type=int, default=2048)
    p.add_argument("--variants", nargs="+", default=VARIANTS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "results" / "ablation_sensitivity.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from mpokit.calibration import calibration_batches
    from mpokit.eval.table import print_table
    from mpokit.eval import perplexity
    from mpokit.io.atomic import write_json
    from mpokit.io.models import load_model
    from mpokit.methods.aware.allocate import LayerSpectrum, allocate_global, allocate_uniform
    from mpokit.surgery import find_targets, get_module

    lm = load_model()
    model, tok = lm.model, lm.tokenizer
    names = find_targets(model)
    batches = calibration_batches(tok, (DATA / "valid.txt").read_text(), args.calibration_tokens, 512)
    start = time.perf_counter()
    grams, grads = collect(model, names, batches)
    stats_s = time.perf_counter() - start
    original = {n: get_module(model, n).weight.detach().clone() for n in names}
    test = (DATA / "test.txt").read_text()

    def ppl() -> float:
        with torch.no_grad():
            return perplexity(model, tok, test, tokens=args.tokens, context=512, progress=False).perplexity

    rows = [{"variant": "dense", "perplexity": ppl()}]
    for variant in args.variants:
        weighting, allocation = variant.split("/")
        kind, _, damp = weighting.partition(":")
        factors = {n: weighted_factors(original[n].double(), grams[n], grads[n], kind, float(damp or 0))
                   for n in names}
        spectra = {n: LayerSpectrum(*original[n].shape, factors[n][1]) for n in names}
        ranks = (allocate_global(spectra, args.budget) if allocation == "global"
                 else allocate_uniform(spectra, args.budget))
        for n in names:
            u, s, vt = factors[n]
            r = ranks[n]
            w = original[n] if r is None else ((u[:, :r] * s[:r]) @ vt[:r]).float()
            get_module(model, n).weight.data.copy_(w)
        rows.append({"variant": variant, "perplexity": ppl(), "dense_layers": sum(r is None for r in ranks.values())})
        print(rows[-1], flush=True)
    for n in names:
        get_module(model, n).weight.data.copy_(original[n])
    print_table(rows, ["variant", "perplexity", "dense_layers"],
                title=f"Open-loop ablation at budget {args.budget}: WikiText-2 test first {args.tokens} tokens, "
                      f"context 512; calibration {args.calibration_tokens} tokens of WikiText-2 valid")
    write_json(Path(args.out), {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32)", "budget": args.budget,
                                "tokens": args.tokens, "calibration_tokens": args.calibration_tokens,
                                "statistics_s": stats_s, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
