"""Why MoEfication loses quality on SwiGLU: oracle masks of the FFN activations, no router.

For every FFN of the default model, the intermediate activation h = act(gate x) * up x is
masked per token before the down projection, keeping either the top fraction of single
neurons by |h| or the top fraction of experts by their summed |h| (experts = balanced
k-means groups over calibration activations, as `--method moefication` builds them, or
random groups as a control). An oracle knows h, so these are upper bounds for any router.

Levers: --shared S keeps S experts' worth of neurons with the highest mean |h| on calibration
always on (counted in the kept fraction: k routed experts = round(fraction * E) - S, the rest
clustered into E - S experts). --compensate mean replaces every dropped neuron's h by its
calibration mean (= adding, per dropped expert, its mean output down(h_e) as a bias, since
down is linear); --compensate conditional by its mean over the calibration tokens where it is
dropped. --refit RIDGE refits every down projection by least squares to the masked
activations (plus one bias, or a per-expert table added when that expert is skipped).

    python bench/bench_moe_oracle.py                       # 2048 test tokens, context 512
    python bench/bench_moe_oracle.py --experts 32 128 --fractions 0.25
    python bench/bench_moe_oracle.py --fractions 0.25 --shared 0 2 4 --compensate mean --no-neurons --no-random
    python bench/bench_moe_oracle.py --calibration-tokens 8192 --fractions 0.25 --shared 4 --refit 0.01 \
        --no-neurons --no-random --out results/x.json

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
        self.shared_experts = 0  # always-kept experts' worth of neurons (label = routed_experts)
        self.routed_experts = 0
        self.means: list[torch.Tensor] | None = None  # per layer: (N,) calibration mean of h (compensation)
        self.handles = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: self.mask(i, a[0]))
                        for i, layer in enumerate(model.model.layers)]

    def keep(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """(..., N) 0/1 mask of the neurons kept for each token (experts mode)."""
        labels = self.labels[layer]  # routed neurons -> [0, E_routed); shared neurons -> E_routed (always kept)
        routed = self.routed_experts
        total = routed + self.shared_experts
        k = round(self.fraction * total) - self.shared_experts
        mass = torch.zeros(*h.shape[:-1], routed + 1, dtype=h.dtype).index_add_(-1, labels, h.abs())  # (..., E+1)
        chosen = torch.zeros_like(mass)
        if k > 0:
            chosen.scatter_(-1, mass[..., :routed].topk(k, dim=-1).indices, 1.0)
        chosen[..., routed] = 1.0  # the shared group (empty when there is none)
        return chosen[..., labels]

    def mask(self, layer: int, h: torch.Tensor):
        if self.fraction is None:
            return None
        if self.labels is None:  # single neurons
            keep = h.abs().topk(int(self.fraction * h.shape[-1]), dim=-1).indices
            return (h * torch.zeros_like(h).scatter_(-1, keep, 1.0),)
        keep = self.keep(layer, h)
        if self.means is None:
            return (h * keep,)
        return (h * keep + self.means[layer] * (1 - keep),)


def dropped_mean(h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(N,) mean of each neuron's h over the tokens where it is dropped (h, keep: (T, N))."""
    drop = 1 - keep
    return (h * drop).sum(0) / drop.sum(0).clamp_min(1)


@torch.no_grad()
def refit_down(model, hidden, oracle, ridge: float, table: bool) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Least-squares refit of every down projection to the masked h, plus either one bias or (table)
    one output vector per routed expert added when that expert is skipped (a compensation table):
    min sum_t ||h_t W0^T - (keep_t * h_t) W^T - c_t||^2 + ridge * mean(diag) * ||W||^2 on calibration.
    Installs the fit as forward hooks on the down projections; returns the hook handles."""
    handles = []
    for i, (layer, h) in enumerate(zip(model.model.layers, hidden)):
        down = layer.mlp.down_proj
        keep = oracle.keep(i, h)  # (T, N)
        labels = oracle.labels[i]
        routed = oracle.routed_experts
        if table:  # skip indicators (T, E_r); their sum is constant, so they also span a bias
            extra = 1 - torch.zeros(h.shape[0], routed + 1).index_add_(1, labels, keep)[:, :routed].clamp_max(1)
        else:
            extra = torch.ones(h.shape[0], 1)
        hm = torch.cat([h * keep, extra], 1).double()  # (T, N + c)
        a = hm.t() @ hm
        n = h.shape[1]
        a.diagonal()[:n] += ridge * a.diagonal()[:n].mean()
        a.diagonal()[n:] += 1e-6 * a.diagonal()[n:].mean()
        target = h.double() @ down.weight.double().t()  # (T, d) the dense FFN output
        sol = torch.linalg.solve(a, hm.t() @ target).float()  # (N + c, d)
        w, c = sol[:n].t().contiguous(), sol[n:]  # (d, N), (c, d)

        def hook(mod, args, out, i=i, w=w, c=c, labels=labels, routed=routed):
            hh = args[0]  # already masked by the pre-hook; its kept experts are the same
            if table:
                skipped = 1 - torch.zeros(*hh.shape[:-1], routed + 1).index_add_(-1, labels, oracle.keep(i, hh))[
                    ..., :routed].clamp_max(1)
                return torch.nn.functional.linear(hh, w) + skipped @ c
            return torch.nn.functional.linear(hh, w) + c[0]
        handles.append(down.register_forward_hook(hook))
    return handles


def group(hidden, experts: int, shared: int, grouping: str, gen):
    """Per layer labels (N,): routed experts 0..E-shared-1; the shared neurons (highest mean |h|) get E - shared."""
    from mpokit.methods.moefication.clustering import balanced_kmeans, neuron_features

    labels = []
    for h in hidden:
        n = h.shape[1]
        size = n // experts
        mask = torch.zeros(n, dtype=torch.bool)
        mask[h[:2048].abs().mean(0).topk(shared * size).indices] = True
        rest = (~mask).nonzero().squeeze(1)
        routed = experts - shared
        if grouping == "kmeans":
            sub = balanced_kmeans(neuron_features(None, None, h[:2048, rest], "activations"), routed)
        else:
            sub = torch.randperm(rest.numel(), generator=gen) % routed
        lab = torch.full((n,), routed, dtype=torch.long)
        lab[rest] = sub
        labels.append(lab)
    return labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--calibration-tokens", type=int, default=2048)
    p.add_argument("--fractions", nargs="+", type=float, default=[0.5, 0.25, 0.1])
    p.add_argument("--experts", nargs="+", type=int, default=[32])
    p.add_argument("--shared", nargs="+", type=int, default=[0], help="always-kept experts' worth of neurons")
    p.add_argument("--compensate", nargs="*", default=[], choices=["mean", "conditional"],
                   help="also rows with compensation of dropped neurons by their calibration mean ('mean') or "
                        "their mean over the calibration tokens where the oracle drops them ('conditional')")
    p.add_argument("--refit", nargs="*", type=float, default=[], help="also rows with the down projections "
                   "refit by least squares to the masked activations, one per ridge value")
    p.add_argument("--no-neurons", action="store_true", help="skip the single-neuron rows")
    p.add_argument("--no-random", action="store_true", help="skip the random-group control rows")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "results" / "bench_moe_oracle.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from mpokit.calibration import calibration_batches
    from mpokit.eval.table import print_table
    from mpokit.eval import perplexity
    from mpokit.io.atomic import write_json
    from mpokit.io.models import load_model

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
    for f in [] if args.no_neurons else args.fractions:
        oracle.fraction = f
        rows.append({"unit": "neuron", "kept": f, "perplexity": ppl()})
        print(rows[-1], flush=True)
    means = [h.mean(0) for h in hidden]  # (N,) per layer
    gen = torch.Generator().manual_seed(0)
    for experts in args.experts:
        for shared in args.shared:
            for grouping in ("kmeans",) if args.no_random else ("kmeans", "random"):
                start = time.perf_counter()
                oracle.labels = group(hidden, experts, shared, grouping, gen)
                oracle.shared_experts, oracle.routed_experts = shared, experts - shared
                cluster_s = time.perf_counter() - start
                for compensate in ["none", *args.compensate]:
                    for f in args.fractions:
                        oracle.fraction = f
                        oracle.means = None if compensate == "none" else means if compensate == "mean" else [
                            dropped_mean(h, oracle.keep(i, h)) for i, h in enumerate(hidden)]
                        rows.append({"unit": f"expert of {hidden[0].shape[1] // experts} ({grouping}, E={experts})",
                                     "shared": shared, "compensate": compensate, "kept": f, "perplexity": ppl(),
                                     "cluster_s": cluster_s})
                        print(rows[-1], flush=True)
                for ridge in args.refit:
                    oracle.means = None
                    for f in args.fractions:
                        oracle.fraction = f
                        for table in (False, True):
                            handles = refit_down(model, hidden, oracle, ridge, table)
                            rows.append({"unit": f"expert of {hidden[0].shape[1] // experts} ({grouping}, "
                                                 f"E={experts})", "shared": shared,
                                         "compensate": f"refit ridge {ridge}" + (" + table" if table else " + bias"),
                                         "kept": f, "perplexity": ppl(), "cluster_s": cluster_s})
                            for handle in handles:
                                handle.remove()
                            print(rows[-1], flush=True)
    print_table(rows, ["unit", "shared", "compensate", "kept", "perplexity"],
                title=f"Oracle FFN masks, WikiText-2 test first {args.tokens} tokens, context 512")
    write_json(Path(args.out), {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32)", "tokens": args.tokens,
                                "context": 512, "calibration_tokens": args.calibration_tokens, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
