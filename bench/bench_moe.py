"""MoEfication of the default model (SmolLM2-135M, SwiGLU): perplexity and FFN time vs dense, same run.

    python bench/bench_moe.py                         # E=32, k=3/8/16, 8192 test tokens, context 512
    python bench/bench_moe.py --tokens 2048 --ks 8    # quick look
    python bench/bench_moe.py --kernels               # only time the expert kernels (loop/gather/dense)

Every ratio compares against the dense model measured in the same process. FFN time is
the sum over all FFNs of the minimum over --repeats runs on the same captured inputs
(the FFN inputs of the first perplexity batch, 4 x 512 tokens), dense and MoE interleaved
layer by layer so machine load hits both alike; the MoE time includes its router. The
"dense-kernel" row runs the MoE with every expert computed and masked (what the research
code did). Calibration: WikiText-2 valid; evaluation: WikiText-2 test.
Writes results/bench_moe.json (+ results/bench_moe.png).
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

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"


def ffn_inputs(model, tokenizer, text: str, tokens: int, context: int) -> list[torch.Tensor]:
    """Each FFN's input (T, d) for the first perplexity batch (4 windows)."""
    from mpokit.eval.perplexity import tokenize_prefix

    ids = tokenize_prefix(tokenizer, text, min(tokens, 4 * context))
    windows = torch.stack([ids[i:i + context] for i in range(0, ids.numel() - context + 1, context)])  # (B, L)
    store, hooks = [], []
    for layer in model.model.layers:
        hooks.append(layer.mlp.register_forward_pre_hook(lambda m, a: store.append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        model(input_ids=windows)
    for h in hooks:
        h.remove()
    return store


def time_pair(dense_mlps, moe_mlps, inputs, repeats: int) -> tuple[float, float]:
    """Summed over layers: min seconds of dense(x) and moe(x), interleaved."""
    total_d = total_m = 0.0
    with torch.no_grad():
        for dense, moe, x in zip(dense_mlps, moe_mlps, inputs):
            td, tm = [], []
            for _ in range(repeats):
                for fn, acc in ((dense, td), (moe, tm)):
                    t = time.perf_counter()
                    fn(x)
                    acc.append(time.perf_counter() - t)
            total_d, total_m = total_d + min(td), total_m + min(tm)
    return total_d, total_m


def bench_kernels(repeats: int) -> list[dict]:
    """Expert kernels on SmolLM2 FFN shapes (d=576, 32 experts of 48 neurons, gated) vs a dense FFN."""
    import torch.nn.functional as F

    from mpokit.ops.experts import KERNELS

    d, E, m = 576, 32, 48
    w_in, w_out = torch.randn(E, 2 * m, d) / 24, torch.randn(E, m, d) / 40
    dense_w = (w_in[:, :m].reshape(-1, d), w_in[:, m:].reshape(-1, d), w_out.reshape(-1, d).t().contiguous())

    def dense(x):
        return F.linear(F.silu(F.linear(x, dense_w[0])) * F.linear(x, dense_w[1]), dense_w[2])

    rows = []
    with torch.no_grad():
        for T in (1, 4, 16, 128, 2048):
            x = torch.randn(T, d)
            for k in (3, 8, 16):
                sel = torch.randn(T, E).topk(k, 1).indices
                fns = {"dense_ffn": lambda: dense(x)}
                for name, kern in KERNELS.items():
                    if not (name == "gather" and T * k > 4096):  # gathers copy T*k expert matrices
                        fns[name] = lambda kern=kern: kern(x, sel, w_in, None, w_out, F.silu, True)
                times = {n: [] for n in fns}
                for _ in range(repeats):
                    for n, fn in fns.items():
                        t = time.perf_counter()
                        fn()
                        times[n].append(time.perf_counter() - t)
                row = {"tokens": T, "top_k": k, **{f"{n}_ms": 1e3 * min(v) for n, v in times.items()}}
                rows.append(row)
                print(row, flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["routing"] == "router" and r["kernel"] == "loop"]
    frac = [r["active_fraction"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(frac, [r["ppl_ratio"] for r in rows], "o-", label="perplexity / dense")
    ax.plot(frac, [r["ffn_time_ratio"] for r in rows], "s-", label="FFN time / dense")
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.axhline(1.3, color="C0", lw=0.5, ls="--", label="target perplexity ratio 1.3")
    ax.axhline(0.5, color="C1", lw=0.5, ls="--", label="target FFN time ratio 0.5")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of experts computed (k / E)")
    ax.set_title("MoEfication of SmolLM2-135M (same-run ratios)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--ks", default="3,8,16", help="comma-separated top-k values")
    p.add_argument("--features", default="activations", choices=["weights", "activations"])
    p.add_argument("--router-hidden", type=int, default=64)
    p.add_argument("--calibration-tokens", type=int, default=8192)
    p.add_argument("--oracle-ks", default="8", help="top-k values also evaluated with oracle routing (true expert "
                   "output norms; costs a full FFN per layer), comma-separated, '' for none")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)")
    p.add_argument("--kernels", action="store_true", help="only time the expert kernels")
    p.add_argument("--out", default=str(ROOT / "results" / "bench_moe.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine()}
    if args.kernels:
        rows = bench_kernels(args.repeats * 4)
        out.with_name("bench_moe_kernels.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
        return 0

    from mpokit import compress_
    from mpokit.cli.common import print_table
    from mpokit.eval import count_params, perplexity
    from mpokit.io.models import load_model
    from mpokit.methods.moefication import MoEficationConfig, moe_layers, set_top_k_

    ks = [int(k) for k in args.ks.split(",")]
    lm = load_model(None)
    model, tok = lm.model, lm.tokenizer
    test = (DATA / "test.txt").read_text()
    ppl_kw = dict(tokens=args.tokens, context=args.context, progress=False, corpus_name="wikitext-2 test")
    dense_ppl = perplexity(model, tok, test, **ppl_kw)
    print(f"dense: ppl {dense_ppl.perplexity:.3f} ({dense_ppl.seconds:.1f} s)", flush=True)
    inputs = ffn_inputs(model, tok, test, args.tokens, args.context)
    dense_mlps = [copy.deepcopy(layer.mlp) for layer in model.model.layers]
    params_dense = count_params(model)

    config = MoEficationConfig(num_experts=args.experts, top_k=max(ks), cluster_features=args.features,
                               router_hidden=args.router_hidden, calibration_tokens=args.calibration_tokens,
                               calibration_context=args.context)
    start = time.perf_counter()
    report = compress_(model, config, tokenizer=tok, calibration_text=(DATA / "valid.txt").read_text())
    compress_s = time.perf_counter() - start
    moes = moe_layers(model)
    print(f"moefication: {compress_s:.0f} s, mean router recall@{max(ks)} {report.extra['mean_router_recall']:.3f}",
          flush=True)

    rows = []
    variants = [(k, "router", "loop") for k in ks] + [(ks[len(ks) // 2], "router", "dense")]
    variants += [(int(k), "oracle", "loop") for k in args.oracle_ks.split(",") if k]
    for k, routing, kernel in variants:
        set_top_k_(model, k)
        for m in moes:
            m.oracle_routing, m.forward_mode = routing == "oracle", kernel
        res = perplexity(model, tok, test, **ppl_kw) if kernel == "loop" else None
        t_dense, t_moe = time_pair(dense_mlps, moes, inputs, args.repeats) if routing == "router" else (None, None)
        t1_dense, t1_moe = (time_pair(dense_mlps, moes, [x[:1] for x in inputs], args.repeats * 4)
                            if routing == "router" else (None, None))
        row = {"experts": args.experts, "top_k": k, "active_fraction": k / args.experts, "routing": routing,
               "kernel": kernel, "ppl": res.perplexity if res else None,
               "ppl_ratio": res.perplexity / dense_ppl.perplexity if res else None,
               "ffn_ms_dense": 1e3 * t_dense if t_dense else None, "ffn_ms_moe": 1e3 * t_moe if t_moe else None,
               "ffn_time_ratio": t_moe / t_dense if t_dense else None,
               "decode_ffn_time_ratio": t1_moe / t1_dense if t1_dense else None,
               "eval_seconds": res.seconds if res else None}
        rows.append(row)
        print(row, flush=True)
    for m in moes:
        m.oracle_routing, m.forward_mode = False, "auto"
    set_top_k_(model, max(ks))

    result = {
        "bench": "moefication", "model": lm.source, "env": env, "eval": dense_ppl.to_dict() | {"perplexity": None},
        "dense_ppl": dense_ppl.perplexity, "params_dense": params_dense, "params_moe": count_params(model),
        "compress_seconds": compress_s, "config": config.to_dict(), "timing_tokens": int(inputs[0].shape[0]),
        "router_recall_at_max_k": report.extra["mean_router_recall"],
        "per_layer_router_recall": [r.detail["router_recall"] for r in report.layers], "rows": rows,
        "argv": sys.argv[1:],
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
    print_table(rows, ["top_k", "active_fraction", "routing", "kernel", "ppl", "ppl_ratio", "ffn_ms_dense",
                       "ffn_ms_moe", "ffn_time_ratio", "decode_ffn_time_ratio"],
                title=f"MoEfication E={args.experts}, WikiText-2 test {dense_ppl.tokens} tokens, context "
                      f"{args.context}; dense ppl {dense_ppl.perplexity:.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
