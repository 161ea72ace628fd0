"""MPOE vs a plain upcycled MoE (same experts, same short training) on the default model.

    python bench/bench_mpoe.py                       # last 2 FFNs -> 8 experts, top-2, 40 steps
    python bench/bench_mpoe.py --layers 26,27,28,29 --steps 100

The chosen FFNs of SmolLM2 are upcycled (every expert starts as the dense FFN), then only
those layers' FFN parameters are trained (plain Adam, causal-LM loss + balance_coef x the
load-balancing loss) on WikiText-2 valid windows; everything else is frozen. Arms, all from
the same pretrained start, same data order and steps:
  dense    the dense FFNs themselves fine-tuned (control: what training alone gives)
  upcycled E dense copies per FFN (Switch-style sparse upcycling)
  mpoe     E MPO experts sharing each matrix's central core, gradient mask on it
  mpoe-nomask  the same without the gradient mask
Reported: total and FFN parameters, WikiText-2 test perplexity before and after training.
Writes results/bench_mpoe.json.
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


def train(model, params, ids: torch.Tensor, steps: int, lr: float, context: int, coef: float) -> list[float]:
    from mpokit.methods.mpoe import moe_aux_loss

    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        window = ids[(step * context) % (ids.numel() - context):][:context].unsqueeze(0)  # (1, L)
        lm_loss = model(input_ids=window, labels=window).loss
        loss = lm_loss + coef * moe_aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(lm_loss.detach()))
    model.eval()
    return losses


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="28,29", help="decoder layers whose FFN is upcycled")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--context", type=int, default=256, help="training window")
    p.add_argument("--tokens", type=int, default=2048, help="test tokens for perplexity (context 512)")
    p.add_argument("--noise", type=float, default=0.01, help="relative init noise on each expert (breaks symmetry)")
    p.add_argument("--arms", default="dense,upcycled,mpoe,mpoe-nomask")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "results" / "bench_mpoe.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from mpokit import compress_
    from mpokit.eval.table import print_table
    from mpokit.eval import count_params, perplexity
    from mpokit.data.corpus import tokenize_prefix
    from mpokit.io.models import load_model
    from mpokit.methods.mpoe import MPOEConfig

    layers = [int(i) for i in args.layers.split(",")]
    targets = [f"model.layers.{i}.mlp" for i in layers]
    test = (DATA / "test.txt").read_text()
    lm = load_model(None)
    train_ids = tokenize_prefix(lm.tokenizer, (DATA / "valid.txt").read_text(), args.steps * args.context + 1)
    ppl_kw = dict(tokens=args.tokens, context=512, progress=False, corpus_name="wikitext-2 test")
    base_ppl = perplexity(lm.model, lm.tokenizer, test, **ppl_kw).perplexity
    rows = []
    for arm in args.arms.split(","):
        torch.manual_seed(0)
        model = load_model(None).model
        for prm in model.parameters():
            prm.requires_grad_(False)
        report = None
        if arm != "dense":
            config = MPOEConfig(num_experts=args.experts, top_k=args.top_k, target_modules=targets,
                                expert_type="dense" if arm == "upcycled" else "mpo", noise=args.noise,
                                grad_mask=0.0 if arm in ("mpoe-nomask", "upcycled") else 0.5)
            report = compress_(model, config, progress=False)
        ffns = [model.get_submodule(t) for t in targets]
        params = [prm for f in ffns for prm in f.parameters()]
        for prm in params:
            prm.requires_grad_(True)
        start_ppl = perplexity(model, lm.tokenizer, test, **ppl_kw).perplexity
        start = time.perf_counter()
        losses = train(model, params, train_ids, args.steps, args.lr, args.context,
                       config.balance_coef if report else 0.0)
        seconds = time.perf_counter() - start
        ppl = perplexity(model, lm.tokenizer, test, **ppl_kw).perplexity
        loads = [f.last_load.tolist() for f in ffns if getattr(f, "last_load", None) is not None]
        row = {"arm": arm, "experts": 1 if arm == "dense" else args.experts, "top_k": 1 if arm == "dense" else args.top_k,
               "ffn_params": sum(prm.numel() for prm in params), "model_params": count_params(model),
               "ppl_start": start_ppl, "ppl": ppl, "ppl_ratio_vs_pretrained": ppl / base_ppl,
               "train_loss_first5": sum(losses[:5]) / len(losses[:5]), "train_loss_last5": sum(losses[-5:]) / len(losses[-5:]),
               "train_seconds": seconds, "expert_load_last_batch": loads}
        rows.append(row)
        print(row, flush=True)
        del model
    dense_experts = next((r["ffn_params"] for r in rows if r["arm"] == "upcycled"), None)
    for r in rows:
        r["ffn_params_vs_upcycled"] = r["ffn_params"] / dense_experts if dense_experts else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bench": "mpoe", "model": lm.source, "pretrained_ppl": base_ppl, "layers": layers,
                               "eval": {"corpus": "wikitext-2 test", "tokens": args.tokens, "context": 512},
                               "train": {"data": "wikitext-2 valid", "steps": args.steps, "lr": args.lr,
                                         "context": args.context, "optimizer": "Adam"},
                               "threads": args.threads, "torch": torch.__version__, "rows": rows,
                               "argv": sys.argv[1:]}, indent=2) + "\n")
    print_table(rows, ["arm", "experts", "top_k", "ffn_params", "ffn_params_vs_upcycled", "model_params", "ppl_start",
                       "ppl", "train_loss_first5", "train_loss_last5"],
                title=f"MPOE vs upcycled MoE, FFNs of layers {layers}, {args.steps} steps; pretrained ppl "
                      f"{base_ppl:.3f} (WikiText-2 test {args.tokens} tokens, context 512)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
