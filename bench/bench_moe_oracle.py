"""Why MoEfication loses quality on SwiGLU: oracle masks of the FFN activations, no router.

For every FFN of the default model, the intermediate activation h = act(gate x) * up x is
masked per token before the down projection, keeping either the top fraction of single
neurons by |h| or the top fraction of experts by their summed |h| (experts = balanced
k-means groups over calibration activations, as `--method moefication` builds them, or
random groups as a control). An oracle knows h, so these are upper bounds for any router.

    python bench/bench_moe_oracle.py                       # 2048 test tokens, context 512
    python bench/bench_moe_oracle.py --experts 32 128 --fractions 0.25

Writes results/bench_moe_oracle.json and prints a table.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"


def ffn_inputs(model, batches) -> list[torch.Tensor]:
    """Per layer, the down projection's inputs over the calibration batches: (tokens, intermediate)."""
    seen: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(
        lambda m, args, i=i: seen[i].append(args[0].reshape(-1, args[0].shape[-1]).detach()))
        for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(s) for s in seen]


class OracleMask:
    """Forward pre-hooks on every down projection keeping, per token, the top units of h."""

    def __init__(self, model):
        self.labels: list[torch.Tensor] | None = None  # per layer: neuron -> expert (None = single neurons)
        self.fraction: float | None = None  # None = no masking
        self.handles = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: self.mask(i, a[0]))
                        for i, layer in enumerate(model.model.layers)]

    def mask(self, layer: int, h: torch.Tensor):
        if self.fraction is None:
            return None
        if self.labels is None:  # single neurons
            keep = h.abs().topk(int(self.fraction * h.shape[-1]), dim=-1).indices
            return (h * torch.zeros_like(h).scatter_(-1, keep, 1.0),)
        labels = self.labels[layer]
        experts = int(labels.max()) + 1
        mass = torch.zeros(*h.shape[:-1], experts, dtype=h.dtype).index_add_(-1, labels, h.abs())  # (..., E)
        keep = mass.topk(max(1, round(self.fraction * experts)), dim=-1).indices
        chosen = torch.zeros_like(mass).scatter_(-1, keep, 1.0)
        return (h * chosen[..., labels],)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--calibration-tokens", type=int, default=2048)
    p.add_argument("--fractions", nargs="+", type=float, default=[0.5, 0.25, 0.1])
    p.add_argument("--experts", nargs="+", type=int, default=[32])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "results" / "bench_moe_oracle.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from mpokit.calibration import calibration_batches
    from mpokit.cli.common import print_table
    from mpokit.eval import perplexity
    from mpokit.io.atomic import write_json
    from mpokit.io.models import load_model
    from mpokit.methods.moefication.clustering import balanced_kmeans, neuron_features

    lm = load_model()
    model, tok = lm.model, lm.tokenizer
    test = (DATA / "test.txt").read_text()
    hidden = ffn_inputs(model, calibration_batches(tok, (DATA / "valid.txt").read_text(),
                                                   args.calibration_tokens, 512))
    oracle = OracleMask(model)

    def ppl() -> float:
        with torch.no_grad():
            return perplexity(model, tok, test, tokens=args.tokens, context=512, progress=False).perplexity

    rows = [{"unit": "none (dense)", "kept": 1.0, "perplexity": ppl()}]
    for f in args.fractions:
        oracle.fraction = f
        rows.append({"unit": "neuron", "kept": f, "perplexity": ppl()})
        print(rows[-1], flush=True)
    gen = torch.Generator().manual_seed(0)
    for experts in args.experts:
        for grouping in ("kmeans", "random"):
            start = time.perf_counter()
            if grouping == "kmeans":
                oracle.labels = [balanced_kmeans(neuron_features(None, None, h, "activations"), experts)
                                 for h in hidden]
            else:
                oracle.labels = [torch.randperm(h.shape[1], generator=gen) % experts for h in hidden]
            cluster_s = time.perf_counter() - start
            for f in args.fractions:
                oracle.fraction = f
                rows.append({"unit": f"expert of {hidden[0].shape[1] // experts} ({grouping}, E={experts})",
                             "kept": f, "perplexity": ppl(), "cluster_s": cluster_s})
                print(rows[-1], flush=True)
    print_table(rows, ["unit", "kept", "perplexity"],
                title=f"Oracle FFN masks, WikiText-2 test first {args.tokens} tokens, context 512")
    write_json(Path(args.out), {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32)", "tokens": args.tokens,
                                "context": 512, "calibration_tokens": args.calibration_tokens, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
