"""Benchmark the MPO core on the default model (SmolLM2-135M-Instruct), CPU, float32 weights.

(a) Decomposition time of all decoder Linear weights (30 layers x 7 = 210 matrices), 3 cores,
    mpokit `tt_svd` vs tensorly `tensor_train_matrix` on the same matrices, same layout, same
    bonds, timed pair by pair (alternating), float64 compute for both:
      - lossless: full bonds for both;
      - budget 0.5: each matrix truncated to the bonds mpokit's budget search gives for 50% of
        its parameters (the same bond list is passed to both libraries as max ranks).
(b) MPOLinear forward time vs nn.Linear on 512 tokens for the FFN (1536x576, 576x1536) and
    attention (576x576) weights of layer 0 at budgets 0.8/0.5/0.3, 3-core and low-rank layouts:
    inference (no_grad, forward_mode="auto": cached weight or contraction, as the FLOP estimate
    picks), inference with forced "contract", and training forward+backward ("auto").
    Each MPO timing is paired with a dense timing taken right before it (median of the runs),
    so the ratio is robust to load drift on a shared machine.

    python bench/bench_mpo_core.py [--threads 2] [--matrices 210] [--out results/bench_mpo_core.json]
"""
from __future__ import annotations

import os

# Must precede the torch import: on a shared, busy CPU, spinning OpenMP workers make LAPACK
# calls (SVD) 5-20x slower. Passive waiting costs nothing measurable when the cores are free.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from mpokit.eval.table import print_table  # noqa: E402
from mpokit.io import write_json  # noqa: E402
from mpokit.io.models import load_model  # noqa: E402
from mpokit.layers.mpo import MPOLinear, make_layout  # noqa: E402
from mpokit.ops.tt import bonds_for_budget, full_bonds, pad_matrix, tt_svd, tt_to_matrix  # noqa: E402
from mpokit.surgery import find_targets, get_module  # noqa: E402
from mpokit.version import __version__  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = (0.8, 0.5, 0.3)
FORWARD_SHAPES = {"ffn_up 1536x576": "model.layers.0.mlp.up_proj",
                  "ffn_down 576x1536": "model.layers.0.mlp.down_proj",
                  "attn_q 576x576": "model.layers.0.self_attn.q_proj"}


# ---- (a) decomposition ------------------------------------------------------------
def tensorly_ttm(w: torch.Tensor, out_dims: list[int], in_dims: list[int], bonds: list[int]):
    import tensorly as tl
    from tensorly.decomposition import tensor_train_matrix

    t = tl.tensor(w.to(torch.float64).reshape(*out_dims, *in_dims))  # (o1..on, i1..in)
    return tensor_train_matrix(t, rank=[1, *bonds, 1])


def tensorly_to_matrix(ttm, rows: int, cols: int) -> torch.Tensor:
    import tensorly as tl

    return torch.as_tensor(tl.to_numpy(ttm.to_tensor()) if tl.get_backend() == "numpy" else ttm.to_tensor()
                           ).reshape(rows, cols)


def rel_error(a: torch.Tensor, w: torch.Tensor) -> float:
    w = w.to(torch.float64)
    return (torch.linalg.matrix_norm(a.to(torch.float64) - w) / torch.linalg.matrix_norm(w)).item()


def bench_decomposition(weights: dict[str, torch.Tensor], budget: float = 0.5) -> dict:
    """Pairwise timing of mpokit vs tensorly, lossless and at a matched truncation."""
    settings = {"lossless": {}, f"budget {budget}": {}}
    for key in settings:
        settings[key] = {"mpokit_s": 0.0, "tensorly_s": 0.0, "params": 0, "dense_params": 0,
                         "max_rel_err_mpokit": 0.0, "max_rel_err_tensorly": 0.0, "max_rel_err_diff": 0.0}
    start = time.perf_counter()
    for k, (name, w) in enumerate(weights.items()):
        od, idd = make_layout(*w.shape, num_cores=3)
        w = pad_matrix(w, math.prod(od), math.prod(idd))  # no-op for these shapes (they factor exactly)
        full = full_bonds(od, idd)
        t0 = time.perf_counter()
        cores, info = tt_svd(w, od, idd, max_bond=full)
        t1 = time.perf_counter()
        ttm = tensorly_ttm(w, od, idd, full)
        t2 = time.perf_counter()
        truncated = bonds_for_budget(info.spectra, od, idd, int(budget * w.numel()))  # not timed
        t3 = time.perf_counter()
        cores_t, _ = tt_svd(w, od, idd, max_bond=truncated)
        t4 = time.perf_counter()
        ttm_t = tensorly_ttm(w, od, idd, truncated)
        t5 = time.perf_counter()
        for key, (c, tt, bonds, tm, tt_s) in {"lossless": (cores, ttm, full, t1 - t0, t2 - t1),
                                              f"budget {budget}": (cores_t, ttm_t, truncated, t4 - t3,
                                                                   t5 - t4)}.items():
            s = settings[key]
            e_m, e_t = rel_error(tt_to_matrix(c), w), rel_error(tensorly_to_matrix(tt, *w.shape), w)
            s["mpokit_s"] += tm
            s["tensorly_s"] += tt_s
            s["params"] += sum(x.numel() for x in c)
            s["dense_params"] += w.numel()
            s["max_rel_err_mpokit"] = max(s["max_rel_err_mpokit"], e_m)
            s["max_rel_err_tensorly"] = max(s["max_rel_err_tensorly"], e_t)
            s["max_rel_err_diff"] = max(s["max_rel_err_diff"], abs(e_m - e_t))
        if (k + 1) % 30 == 0:
            print(f"  decomposed {k + 1}/{len(weights)} matrices ({time.perf_counter() - start:.0f}s)", flush=True)
    for s in settings.values():
        s["ratio_tensorly_over_mpokit"] = s["tensorly_s"] / s["mpokit_s"]
        s["kept_fraction"] = s["params"] / s["dense_params"]
        s["matrices"] = len(weights)
    return settings


# ---- (b) forward ------------------------------------------------------------------
def paired_times(dense_fn, mpo_fn, min_reps: int = 5, max_reps: int = 30, budget_s: float = 3.0):
    """Median seconds of dense_fn and mpo_fn, each mpo run right after a dense run."""
    first = time.perf_counter()
    mpo_fn()  # warm-up (fills the weight cache in auto inference mode)
    first = time.perf_counter() - first
    dense_fn()
    dense, mpo, start = [], [], time.perf_counter()
    while len(mpo) < max_reps and (len(mpo) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        dense_fn()
        t1 = time.perf_counter()
        mpo_fn()
        t2 = time.perf_counter()
        dense.append(t1 - t0)
        mpo.append(t2 - t1)
    return statistics.median(dense), statistics.median(mpo), len(mpo), first


def _train_step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    def step():
        for p in layer.parameters():
            p.grad = None
        (layer(x) * g).sum().backward()
    return step


def _infer(layer: nn.Module, x: torch.Tensor):
    def run():
        with torch.no_grad():
            layer(x)
    return run


def bench_forward(model: nn.Module, tokens: int = 512) -> list[dict]:
    rows = []
    for label, name in FORWARD_SHAPES.items():
        w = get_module(model, name).weight.detach().float()
        dense = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            dense.weight.copy_(w)
        x = torch.randn(tokens, w.shape[1])
        g = torch.randn(tokens, w.shape[0])
        for layout, kw in (("3-core", {"num_cores": 3}), ("lowrank", {"lowrank": True})):
            for budget in BUDGETS:
                mpo = MPOLinear.from_weight(w, max_params=int(budget * w.numel()), **kw)
                base = {"shape": label, "layout": layout, "budget": budget, "bonds": mpo.bonds,
                        "kept": mpo.core_params() / w.numel(), "rel_error": mpo.info.relative_error}
                for mode in ("infer auto", "infer contract", "train auto"):
                    mpo.forward_mode = "contract" if mode == "infer contract" else "auto"
                    if mode.startswith("train"):
                        mpo.train()
                        dense.train()
                        with torch.enable_grad():
                            path = mpo.choose_path(tokens)
                        d, m, reps, first = paired_times(_train_step(dense, x, g), _train_step(mpo, x, g),
                                                         budget_s=2.0)
                    else:
                        mpo.eval()
                        dense.eval()
                        with torch.no_grad():
                            path = mpo.choose_path(tokens)
                        d, m, reps, first = paired_times(_infer(dense, x), _infer(mpo, x),
                                                         min_reps=3 if path == "contract" else 5)
                    rows.append({**base, "mode": mode, "path": path, "dense_ms": d * 1e3, "mpo_ms": m * 1e3,
                                 "ratio": m / d, "first_call_ms": first * 1e3, "reps": reps})
                    r = rows[-1]
                    print(f"  {label:18s} {layout:8s} {budget:.1f} {mode:15s} path={path:8s} "
                          f"dense={r['dense_ms']:.2f}ms mpo={r['mpo_ms']:.2f}ms ratio={r['ratio']:.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--matrices", type=int, default=None, help="decompose only the first N (default all 210)")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--skip-decomposition", action="store_true")
    p.add_argument("--skip-forward", action="store_true")
    p.add_argument("--out", default=str(ROOT / "results" / "bench_mpo_core.json"))
    args = p.parse_args(argv)

    import tensorly as tl

    torch.set_num_threads(args.threads)
    tl.set_backend("pytorch")
    torch.manual_seed(0)
    loaded = load_model(None)
    model = loaded.model
    names = find_targets(model)[: args.matrices]
    weights = {n: get_module(model, n).weight.detach() for n in names}
    result = {
        "model": loaded.source, "mpokit": __version__, "torch": torch.__version__, "tensorly": tl.__version__,
        "tensorly_backend": tl.get_backend(), "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg(), "tokens": args.tokens,
        "note": "ratios compare runs taken in the same process, pair by pair",
    }
    if not args.skip_decomposition:
        print(f"(a) decomposing {len(weights)} matrices (mpokit tt_svd vs tensorly tensor_train_matrix)", flush=True)
        dec = bench_decomposition(weights)
        result["decomposition"] = dec
        print_table([{"setting": k, **v} for k, v in dec.items()],
                    ["setting", "matrices", "kept_fraction", "mpokit_s", "tensorly_s", "ratio_tensorly_over_mpokit",
                     "max_rel_err_mpokit", "max_rel_err_tensorly", "max_rel_err_diff"],
                    title=f"(a) decomposition, 3 cores, float64 compute, {args.threads} threads")
    if not args.skip_forward:
        print(f"(b) forward on {args.tokens} tokens", flush=True)
        rows = bench_forward(model, args.tokens)
        result["forward"] = rows
        print_table(rows, ["shape", "layout", "budget", "bonds", "mode", "path", "dense_ms", "mpo_ms", "ratio"],
                    title=f"(b) MPOLinear vs nn.Linear, {args.tokens} tokens, float32, {args.threads} threads "
                          "(median, paired runs)")
    result["load_avg_end"] = os.getloadavg()
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
