"""MoEfication of the default model (SmolLM2-135M, SwiGLU): perplexity and FFN time vs dense, same run.

    python bench/bench_moe.py                         # E=32, k=3/8/16, 8192 test tokens, context 512
    python bench/bench_moe.py --tokens 2048 --ks 8    # quick look
    python bench/bench_moe.py --kernels               # only time the expert kernels (loop/gather/dense)
    python bench/bench_moe.py --shared-experts 4 --ks 4 --refit   # 4 shared + 4 routed of 32 = 25%

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
    from mpokit.data.corpus import tokenize_prefix

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

    refit = [r for r in rows if r["routing"] == "router" and r["kernel"] == "loop" and r.get("refit")]
    rows = [r for r in rows if r["routing"] == "router" and r["kernel"] == "loop" and not r.get("refit")]
    frac = [r["active_fraction"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(frac, [r["ppl_ratio"] for r in rows], "o-", label="perplexity / dense")
    ax.plot(frac, [r["ffn_time_ratio"] for r in rows], "s-", label="FFN time / dense")
    if refit:
        ax.plot([r["active_fraction"] for r in refit], [r["ppl_ratio"] for r in refit], "*", ms=10,
                label="perplexity / dense, refit")
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.axhline(1.3, color="C0", lw=0.5, ls="--", label="target perplexity ratio 1.3")
    ax.axhline(0.5, color="C1", lw=0.5, ls="--", label="target FFN time ratio 0.5")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of experts computed ((shared + k) / E)")
    shared = rows[0]["shared_experts"] if rows else 0
    ax.set_title(f"MoEfication of SmolLM2-135M, E={rows[0]['experts'] if rows else '?'}, {shared} shared "
                 "(same-run ratios)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--ks", default="3,8,16", help="comma-separated top-k values (routed experts)")
    p.add_argument("--shared-experts", type=int, default=0, help="always-computed experts (counted in the "
                   "active fraction)")
    p.add_argument("--refit", action="store_true", help="after the plain rows, refit the output projections to the "
                   "routing at max(ks) (as MoEficationConfig(refit=True) does) and evaluate again")
    p.add_argument("--features", default="activations", choices=["weights", "activations"])
    p.add_argument("--router-hidden", type=int, default=64)
    p.add_argument("--calibration-tokens", type=int, default=8192)
    p.add_argument("--oracle-ks", default="8", help="top-k values also evaluated with oracle routing (true expert "
                   "output norms; costs a full FFN per layer), comma-separated, '' for none")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)")
    p.add_argument("--kernels", action="store_true", help="only time the expert kernels")
    p.add_argument("--save", default=None, help="also save the MoE model (top_k = max of --ks) to this folder")
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

    from mpokit import Calibration, compress_
    from mpokit.eval.table import print_table
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
                               shared_experts=args.shared_experts,
                               router_hidden=args.router_hidden, calibration_tokens=args.calibration_tokens,
                               calibration_context=args.context)
    calibration_text = (DATA / "valid.txt").read_text()
    calib_inputs = None
    if args.refit:  # the dense FFN inputs compress_ fits on, kept to refit after the plain rows (same run)
        from mpokit.calibration.stats import resolve_calibration
        from mpokit.methods.moefication.router import collect_ffn_inputs
        from mpokit.surgery.ffn import find_ffns

        batches = resolve_calibration(Calibration(text=calibration_text), tok, config.calibration_tokens,
                                      config.calibration_context, "moefication")
        calib_inputs = list(collect_ffn_inputs(model, find_ffns(model), batches, progress=False).values())
    start = time.perf_counter()
    report = compress_(model, config, tokenizer=tok, calibration=Calibration(text=calibration_text))
    compress_s = time.perf_counter() - start
    moes = moe_layers(model)
    print(f"moefication: {compress_s:.0f} s, mean router recall@{max(ks)} {report.extra['mean_router_recall']:.3f}",
          flush=True)

    rows = []
    variants = [(k, "router", "loop") for k in ks] + [(ks[len(ks) // 2], "router", "dense")]
    variants += [(int(k), "oracle", "loop") for k in args.oracle_ks.split(",") if k]
    refit_stats = None
    for refit in (False, True) if args.refit else (False,):
        if refit:  # least-squares refit of every output projection to the router's selection at max(ks)
            from mpokit.methods.moefication.refit import refit_output_

            set_top_k_(model, max(ks))
            for m in moes:
                m.oracle_routing, m.forward_mode = False, "auto"
            start = time.perf_counter()
            refit_stats = [refit_output_(m, x, config.refit_ridge) for m, x in zip(moes, calib_inputs)]
            print(f"refit: {time.perf_counter() - start:.0f} s", flush=True)
            variants = [(max(ks), "router", "loop")] + [v for v in variants if v[1] == "oracle"]
        for k, routing, kernel in variants:
            set_top_k_(model, k)
            for m in moes:
                m.oracle_routing, m.forward_mode = routing == "oracle", kernel
            res = perplexity(model, tok, test, **ppl_kw) if kernel == "loop" else None
            t_dense, t_moe = time_pair(dense_mlps, moes, inputs, args.repeats) if routing == "router" else (None, None)
            t1_dense, t1_moe = (time_pair(dense_mlps, moes, [x[:1] for x in inputs], args.repeats * 4)
                                if routing == "router" else (None, None))
            row = {"experts": args.experts, "shared_experts": args.shared_experts, "refit": refit,
                   "top_k": k, "active_fraction": (args.shared_experts + k) / args.experts, "routing": routing,
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
    if args.save:
        from mpokit.io import save_compressed

        save_compressed(model, args.save, tok, extra={"source": lm.source, "report": report.to_dict()})

    result = {
        "bench": "moefication", "model": lm.source, "env": env, "eval": dense_ppl.to_dict() | {"perplexity": None},
        "dense_ppl": dense_ppl.perplexity, "params_dense": params_dense, "params_moe": count_params(model),
        "compress_seconds": compress_s, "config": config.to_dict(), "timing_tokens": int(inputs[0].shape[0]),
        "router_recall_at_max_k": report.extra["mean_router_recall"],
        "per_layer_router_recall": [r.detail["router_recall"] for r in report.layers], "rows": rows,
        "refit_rel_errors": refit_stats,
        "argv": sys.argv[1:],
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
    print_table(rows, ["shared_experts", "refit", "top_k", "active_fraction", "routing", "kernel", "ppl", "ppl_ratio",
                       "ffn_ms_dense", "ffn_ms_moe", "ffn_time_ratio", "decode_ffn_time_ratio"],
                title=f"MoEfication E={args.experts} (shared {args.shared_experts}, refit {args.refit}), "
                      f"WikiText-2 test {dense_ppl.tokens} tokens, context "
                      f"{args.context}; dense ppl {dense_ppl.perplexity:.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
