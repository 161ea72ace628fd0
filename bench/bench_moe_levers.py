"""Neuron-level sparsity on the default model's SwiGLU FFNs: each lever's effect, same run (issue 17).

At `--keep` of each FFN's neurons per token, for each selector (static hot neurons, the exact gate as in
CATS, a trained low-rank predictor as in Deja Vu, the training-free rank-r estimate of every neuron from the
inputs' principal directions, the exact gate times that estimate of up, and the oracle bound), without and
with the least-squares refit of the down projections to the selection (a closed-form distillation against the
dense FFN outputs):
  - perplexity on WikiText-2 test and on the licence texts (neither tuned on; calibration is WikiText-2 valid),
  - the time of the 30 FFNs on the same captured inputs, dense and sparse interleaved: one token (decode,
    gathered rows) and 2048 tokens (prefill, dense with the dropped neurons zeroed),
  - the whole model's prefill (one 512-token forward) and decode speed (64 greedy tokens after a 128-token
    prompt, with the KV cache), dense and sparse alternated, best of --repeats.
The oracle computes every neuron to choose, so it gets no time columns. 1 thread by default.

  python bench/bench_moe_levers.py                                   # results/bench_moe_levers.json (~1 h)
  python bench/bench_moe_levers.py --selectors predictor --tokens 2048   # quick look
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

from bench_moe import ffn_inputs, time_pair

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"


def decode_speed(model, prompt: torch.Tensor, new: int) -> tuple[float, float]:
    """(prefill seconds of one forward over `prompt`, decode tokens/s of `new` greedy tokens with the cache)."""
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        t = time.perf_counter()
        model(input_ids=prompt[:, :512])
        prefill = time.perf_counter() - t
        short = prompt[:, :128]
        t = time.perf_counter()
        model.generate(short, max_new_tokens=1, min_new_tokens=1, **kw)
        first = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(short, max_new_tokens=new + 1, min_new_tokens=new + 1, **kw)
        total = time.perf_counter() - t
    return prefill, new / max(total - first, 1e-9)


def best_speeds(dense, sparse, prompt, new: int, repeats: int) -> dict[str, float]:
    """Alternated runs, best of each: prefill time ratio and decode tokens/s ratio, sparse over dense."""
    runs = {"dense": [], "sparse": []}
    for _ in range(repeats):
        for name, model in (("dense", dense), ("sparse", sparse)):
            runs[name].append(decode_speed(model, prompt, new))
    pd, dd = min(r[0] for r in runs["dense"]), max(r[1] for r in runs["dense"])
    ps, ds = min(r[0] for r in runs["sparse"]), max(r[1] for r in runs["sparse"])
    return {"prefill_s_dense": pd, "prefill_s": ps, "prefill_time_ratio": ps / pd,
            "decode_tok_s_dense": dd, "decode_tok_s": ds, "decode_speed_ratio": ds / dd}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", type=float, default=0.25, help="share of each FFN's neurons computed per token")
    p.add_argument("--selectors", default="static,gate,predictor,lowrank,gate-lowrank,oracle")
    p.add_argument("--rank", type=int, default=128, help="rank of the predictor and of the low-rank estimates")
    p.add_argument("--steps", type=int, default=600, help="predictor training steps")
    p.add_argument("--tokens", type=int, default=8192, help="WikiText-2 test tokens")
    p.add_argument("--ood-tokens", type=int, default=4096, help="licence-text tokens")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--calibration-tokens", type=int, default=8192)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "results" / "bench_moe_levers.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from mpokit import Calibration
    from mpokit.calibration.stats import resolve_calibration
    from mpokit.data.corpus import licenses_corpus, tokenize_prefix
    from mpokit.eval import perplexity
    from mpokit.eval.table import print_table
    from mpokit.io.models import load_model
    from mpokit.layers.sparse_ffn import NeuronSparseFFN
    from mpokit.methods.dejavu import DejaVuConfig, refit_down_, sparsify_site
    from mpokit.methods.moefication.router import collect_ffn_inputs
    from mpokit.surgery.ffn import find_ffns

    lm = load_model(None)
    dense, tok = lm.model.eval(), lm.tokenizer
    test = (DATA / "test.txt").read_text()
    licences = licenses_corpus()
    texts = {"wikitext2_test": (test, args.tokens), "licences": (licences.text, args.ood_tokens)}

    def quality(model) -> dict[str, float]:
        return {name: perplexity(model, tok, text, tokens=n, context=args.context, progress=False,
                                 corpus_name=name).perplexity for name, (text, n) in texts.items()}

    base = quality(dense)
    print(f"dense: {base}", flush=True)
    timing_inputs = ffn_inputs(dense, tok, test, args.tokens, args.context)  # 4 x 512 test tokens per FFN
    dense_mlps = [layer.mlp for layer in dense.model.layers]
    prompt = tokenize_prefix(tok, test, 512)[None]
    sites = find_ffns(dense)
    batches = resolve_calibration(Calibration(text=(DATA / "valid.txt").read_text()), tok, args.calibration_tokens,
                                  args.context, "dejavu")
    calib = collect_ffn_inputs(dense, sites, batches, progress=False)
    rows = []
    for selector in args.selectors.split(","):
        config = DejaVuConfig(keep_fraction=args.keep, selector=selector, predictor_rank=args.rank,
                              predictor_steps=args.steps, calibration_tokens=args.calibration_tokens)
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        records = [sparsify_site(model, site, calib[site.module_name], config, i) for i, site in enumerate(sites)]
        fit_s = time.perf_counter() - start
        layers = [m for m in model.modules() if isinstance(m, NeuronSparseFFN)]
        speed = {}
        if selector != "oracle":
            t1_d, t1_s = time_pair(dense_mlps, layers, [x[:1] for x in timing_inputs], 20)
            tp_d, tp_s = time_pair(dense_mlps, layers, timing_inputs, args.repeats)
            speed = {"decode_ffn_time_ratio": t1_s / t1_d, "prefill_ffn_time_ratio": tp_s / tp_d,
                     **best_speeds(dense, model, prompt, args.new_tokens, args.repeats)}
        active = sum(r.detail["active_params"] for r in records) / sum(r.params_before for r in records)
        for refit in (False, True):
            refit_s = 0.0
            if refit:
                start = time.perf_counter()
                errors = [refit_down_(m, calib[s.module_name], config.refit_ridge) for m, s in zip(layers, sites)]
                refit_s = time.perf_counter() - start
            ppl = quality(model)
            row = {"selector": selector, "refit": refit, "keep": args.keep, "ffn_weights_read": active,
                   "recall": sum(r.detail["recall"] for r in records) / len(records),
                   **{f"ppl_{k}": v for k, v in ppl.items()}, **{f"x_dense_{k}": v / base[k] for k, v in ppl.items()},
                   "fit_seconds": fit_s + refit_s, **speed}
            if refit:
                row["refit_rel_error"] = sum(e["rel_error_after"] for e in errors) / len(errors)
                row["rel_error_before_refit"] = sum(e["rel_error_before"] for e in errors) / len(errors)
            rows.append(row)
            print(json.dumps(row), flush=True)
    columns = ["selector", "refit", "recall", "ffn_weights_read", "ppl_wikitext2_test", "x_dense_wikitext2_test",
               "x_dense_licences", "decode_ffn_time_ratio", "prefill_ffn_time_ratio", "decode_speed_ratio",
               "prefill_time_ratio", "fit_seconds"]
    print_table(rows, columns, title=f"neuron sparsity at {args.keep:.0%} of the FFN, dense {base} "
                                     f"(WikiText-2 test {args.tokens} tokens, licences {args.ood_tokens})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine()}
    out.write_text(json.dumps({"bench": "moe_levers", "model": lm.source, "env": env, "dense": base,
                               "calibration": "wikitext-2 valid", "rows": rows,
                               "command": "python bench/bench_moe_levers.py " + " ".join(sys.argv[1:])},
                              indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
