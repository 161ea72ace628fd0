"""Cross-layer sharing of MPO central cores on the default model: parameters vs perplexity, groups 1/2/all.

    python bench/bench_share.py                          # groups 2,0 at full bonds + groups 1 at the same
                                                         # parameter counts, 8192 test tokens
    python bench/bench_share.py --max-bond 48 --tokens 2048
    python bench/bench_share.py --recover-steps 50       # + a short recovery fine-tune per setting

All seven linear weight types of every layer become 3-core MPOs; weights of one type in a
group of consecutive layers share the central core (groups 0 = all 30 layers). The dense
model is measured in the same run. The optional recovery trains every parameter of the
compressed model (shared central cores, auxiliary cores, the rest) with Adam on WikiText-2
valid windows; evaluation is on WikiText-2 test. Writes results/bench_share.json (+ .png).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"


def recover(model, tokenizer, text: str, steps: int, lr: float, context: int) -> list[float]:
    """A few plain Adam steps of causal-LM loss on consecutive windows of text; returns the losses."""
    from mpokit.data.corpus import tokenize_prefix

    ids = tokenize_prefix(tokenizer, text, steps * context + 1)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        window = ids[(step * context) % (ids.numel() - context):][:context].unsqueeze(0)  # (1, L)
        loss = model(input_ids=window, labels=window).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def plot(rows: list[dict], dense_ppl: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, marker, label in (("ppl", "o", "no recovery"), ("ppl_recovered", "s", "after recovery")):
        pts = [(r["kept_fraction"], r[key]) for r in rows if r.get(key)]
        if pts:
            ax.plot(*zip(*pts), marker, label=label)
            for (x, y), r in zip(pts, [r for r in rows if r.get(key)]):
                ax.annotate(f"G={r['groups'] or 'all'}" + (" (matched)" if r["budget"] else ""), (x, y), fontsize=8)
    ax.axhline(dense_ppl, color="gray", lw=0.5, label="dense")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters kept (targeted linear layers)")
    ax.set_ylabel("WikiText-2 test perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", default="2,0", help="comma-separated group sizes (0 = all layers)")
    p.add_argument("--max-bond", type=int, default=None, help="bond cap (default: full bonds)")
    p.add_argument("--budget", type=float, default=None, help="fraction of targeted parameters (instead of a bond)")
    p.add_argument("--sweeps", type=int, default=4)
    p.add_argument("--matched", action=argparse.BooleanOptionalAction, default=True,
                   help="also run groups=1 (no sharing) at each shared setting's parameter count")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--recover-steps", type=int, default=0)
    p.add_argument("--recover-lr", type=float, default=1e-4)
    p.add_argument("--recover-context", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "results" / "bench_share.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from mpokit import compress_
    from mpokit.eval.table import print_table
    from mpokit.eval import count_params, perplexity
    from mpokit.io.models import load_model
    from mpokit.methods.share import ShareConfig

    test = (DATA / "test.txt").read_text()
    valid = (DATA / "valid.txt").read_text()
    ppl_kw = dict(tokens=args.tokens, context=args.context, progress=False, corpus_name="wikitext-2 test")
    lm = load_model(None)
    dense = perplexity(lm.model, lm.tokenizer, test, **ppl_kw)
    params_dense = count_params(lm.model)
    print(f"dense: ppl {dense.perplexity:.3f}, {params_dense:,} parameters", flush=True)
    rows = []
    settings = [(int(g), args.max_bond, args.budget) for g in args.groups.split(",")]
    while settings:
        groups, max_bond, budget = settings.pop(0)
        model = load_model(None).model if rows else lm.model
        config = ShareConfig(groups=groups, max_bond=max_bond, budget=budget, sweeps=args.sweeps)
        start = time.perf_counter()
        report = compress_(model, config, progress=False)
        fit_s = time.perf_counter() - start
        res = perplexity(model, lm.tokenizer, test, **ppl_kw)
        errors = [r.rel_error for r in report.layers]
        if args.matched and groups != 1 and budget is None:  # plain per-layer MPO at the same parameter count
            settings.append((1, None, report.kept_fraction))
        row = {"groups": groups, "budget": budget, "bonds": report.layers[0].detail["bonds"],
               "params_targeted_before": report.params_before, "params_targeted_after":
               report.params_after, "kept_fraction": report.kept_fraction, "params_model": count_params(model),
               "params_saved_by_sharing": report.extra["params_saved_by_sharing"],
               "mean_rel_error": sum(errors) / len(errors), "ppl": res.perplexity,
               "ppl_ratio": res.perplexity / dense.perplexity, "fit_seconds": fit_s}
        if args.recover_steps:
            losses = recover(model, lm.tokenizer, valid, args.recover_steps, args.recover_lr, args.recover_context)
            rec = perplexity(model, lm.tokenizer, test, **ppl_kw)
            row.update({"ppl_recovered": rec.perplexity, "ppl_recovered_ratio": rec.perplexity / dense.perplexity,
                        "recover_loss_first_last": [losses[0], losses[-1]]})
        rows.append(row)
        print(row, flush=True)
        del model
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"bench": "share", "model": lm.source, "eval": {**dense.to_dict(), "perplexity": None},
              "dense_ppl": dense.perplexity, "params_dense": params_dense, "threads": args.threads,
              "torch": torch.__version__, "max_bond": args.max_bond, "budget": args.budget, "sweeps": args.sweeps,
              "recover": {"steps": args.recover_steps, "lr": args.recover_lr, "context": args.recover_context,
                          "data": "wikitext-2 valid"}, "rows": rows, "argv": sys.argv[1:]}
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, dense.perplexity, out.with_suffix(".png"))
    cols = ["groups", "budget", "bonds", "params_targeted_after", "kept_fraction", "params_model", "mean_rel_error", "ppl", "ppl_ratio"]
    cols += ["ppl_recovered", "ppl_recovered_ratio"] if args.recover_steps else []
    print_table(rows, cols, title=f"share: WikiText-2 test {dense.tokens} tokens, context {args.context}; dense ppl "
                                  f"{dense.perplexity:.3f}, {params_dense:,} params")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
