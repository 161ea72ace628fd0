"""Quality per byte of the decoder linear layers: the mixed byte budget against GPTQ alone, low rank
alone, low rank + int4 factors, and optimum-quanto / torchao, in one run.

Every variant quantizes or factorizes the same layers (q, k, v, o, gate, up, down of every block;
embeddings and lm_head stay float32 so the byte axis is those layers alone), calibrated on WikiText-2
valid (--calib-tokens tokens); perplexity on the first --tokens tokens of WikiText-2 test (windows of
--context) and on the first --ood-tokens tokens of the Python docs corpus (pydoc_data, ships with
CPython; nobody tuned anything on it). Bytes are the stored bytes of those layers (codes, 16-bit
scales, zero points; float32 for float factors). Groups of --group columns (fitted to 96 on SmolLM2's
576-wide inputs; NOT 32: the model comes from a Q4_1 GGUF with groups of 32, where 4-bit
re-quantization is lossless by construction). The mixed method measures its candidates once and
plans every budget from them (report.extra["candidates"]).

    .venv/bin/python bench/bench_mixed.py                      # ~40 min on 2 idle cores
    .venv/bin/python bench/bench_mixed.py --bpw 3.0 --gptq-bits 3 --no-lowrank --no-peers
    .venv/bin/python bench/bench_mixed.py --bpw 4.0 3.0 --factor-bits --gptq-bits --no-lowrank --no-peers \
        --out results/bench_mixed_no_lowrank.json --plot /tmp/no-lowrank.png   # ablation: no low-rank candidates
torchao: install it to a side folder and pass --peer-path (see bench/bench_quant.py).
Writes results/bench_mixed.json and the plot docs/benchmarks/mixed-pareto.png.
"""
from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))
COLUMNS = ["variant", "family", "bits_per_weight", "weight_mb", "ppl_wiki", "wiki_x", "ppl_ood", "ood_x", "seconds"]


def linear_bytes(model, names) -> int:
    """Stored bytes of the named layers: mpokit layers as they store themselves, others their weight tensor
    (quanto's packed tensors included, see bench_quant)."""
    from bench_quant import _tensor_bytes
    from mpokit.layers.base import MpokitLayer
    from mpokit.surgery import get_module

    total = 0
    for n in names:
        m = get_module(model, n)
        total += m.storage_bytes() if isinstance(m, MpokitLayer) else _tensor_bytes(m.weight)
    return total


class Run:
    """The dense model, the texts and the rows of one benchmark run."""

    def __init__(self, args):
        from mpokit import Calibration, load_model
        from mpokit.data import load_corpus
        from mpokit.surgery import find_targets

        self.args = args
        loaded = load_model(None)
        self.source, self.dense, self.tok = loaded.source, loaded.model, loaded.tokenizer
        self.names = find_targets(self.dense)
        self.weights = sum(self.dense.get_submodule(n).weight.numel() for n in self.names)
        self.calibration = Calibration.from_file(DATA / "wikitext-2" / "valid.txt")
        self.wiki = (DATA / "wikitext-2" / "test.txt").read_text(encoding="utf-8")
        self.ood = load_corpus().text
        self.rows: list[dict] = []

    def ppl(self, model, text: str, tokens: int) -> float:
        from mpokit.eval.perplexity import perplexity

        return perplexity(model, self.tok, text, tokens=tokens, context=self.args.context, progress=False).perplexity

    def add(self, variant: str, family: str, model, seconds: float, **extra) -> dict:
        nbytes = linear_bytes(model, self.names)
        row = {"variant": variant, "family": family, "bits_per_weight": 8 * nbytes / self.weights,
               "weight_mb": nbytes / 2**20, "ppl_wiki": self.ppl(model, self.wiki, self.args.tokens),
               "ppl_ood": self.ppl(model, self.ood, self.args.ood_tokens), "seconds": seconds, **extra}
        if self.rows:
            row["wiki_x"] = row["ppl_wiki"] / self.rows[0]["ppl_wiki"]
            row["ood_x"] = row["ppl_ood"] / self.rows[0]["ppl_ood"]
        self.rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "choices"}, flush=True)
        return row

    def compressed(self, configs, **calibrated) -> tuple:
        """A copy of the dense model with each config applied in turn; (model, last report, seconds)."""
        from mpokit import compress_

        model, t = copy.deepcopy(self.dense), time.perf_counter()
        report = None
        for config in configs:
            kw = {"tokenizer": self.tok, "calibration": self.calibration} if getattr(config, "needs_calibration",
                                                                                     False) else {}
            report = compress_(model, config, **kw, **calibrated)
        return model, report, time.perf_counter() - t


def run_mixed(run: Run) -> None:
    from mpokit.methods import MixedConfig

    candidates = None
    for bpw in run.args.bpw:
        config = MixedConfig(bits_per_weight=bpw, group_size=run.args.group, embeddings=None,
                             calibration_tokens=run.args.calib_tokens, factor_bits=tuple(run.args.factor_bits))
        model, rep, sec = run.compressed([config], **({"candidates": candidates} if candidates else {}))
        if candidates is None:
            candidates = rep.extra["candidates"]
        family = "mixed" if run.args.factor_bits else "mixed, no low rank"
        run.add(f"{family} {bpw}", family, model, sec, choices=rep.extra["choices"])
        del model
        gc.collect()


def run_gptq(run: Run) -> None:
    from mpokit.methods import GPTQConfig

    for bits in run.args.gptq_bits:
        model, _, sec = run.compressed([GPTQConfig(bits=bits, group_size=run.args.group,
                                                   calibration_tokens=run.args.calib_tokens)])
        run.add(f"gptq int{bits}", "gptq", model, sec)
        del model
        gc.collect()


def run_lowrank(run: Run) -> None:
    from mpokit.methods import AwareConfig, QuantConfig

    for budget in run.args.lowrank:
        model, _, sec = run.compressed([AwareConfig(budget=budget)])
        run.add(f"lowrank {budget}", "lowrank", model, sec)
        t = time.perf_counter()
        from mpokit import compress_

        compress_(model, QuantConfig(bits=4, group_size=run.args.group))  # RTN on both factors (MPO cores)
        run.add(f"lowrank {budget} + int4 factors", "lowrank+int4", model, sec + time.perf_counter() - t)
        del model
        gc.collect()


def run_peers(run: Run) -> None:
    from bench_quant import _has, quantize_quanto, quantize_torchao

    peers = [("quanto", quantize_quanto, (2, 4, 8))]
    if _has("torchao"):
        peers.append(("torchao", quantize_torchao, (2, 3, 4, 8)))
    for family, quantize, bits_list in peers:
        for bits in bits_list:
            model, t = copy.deepcopy(run.dense), time.perf_counter()
            note = quantize(model, run.names, bits, run.args.group)
            run.add(f"{family} int{bits}", family, model, time.perf_counter() - t, note=note)
            del model
            gc.collect()


def plot(rows: list[dict], path: Path, top: float = 8.0) -> None:
    """Perplexity ratio vs bits per weight per family; points above `top` are drawn on the top edge and named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "wiki_x", "WikiText-2 test"), (axes[1], "ood_x", "Python docs (untuned)")):
        off = []
        for family in dict.fromkeys(r["family"] for r in rows[1:]):
            pts = sorted((r["bits_per_weight"], r[key], r["variant"]) for r in rows[1:] if r["family"] == family)
            ax.plot([p[0] for p in pts], [min(p[1], top) for p in pts], marker="o", label=family)
            off += [f"{v} ({y:.3g}x)" for _, y, v in pts if y > top]
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_ylim(0.95, top * 1.05)
        ax.set_xlabel("bits per weight of the decoder linear layers (stored, log scale)")
        ax.set_ylabel("perplexity / dense (log scale)")
        ax.set_title(label + (f"\noff scale, drawn at {top:g}x: " + ", ".join(off) if off else ""), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bpw", type=float, nargs="+", default=[4.0, 3.5, 3.0, 2.5])
    p.add_argument("--factor-bits", type=int, nargs="*", default=[4, 8],
                   help="bits of the low-rank candidates' factors (none: GPTQ bit widths only, an ablation)")
    p.add_argument("--gptq-bits", type=int, nargs="*", default=[2, 3, 4, 8])
    p.add_argument("--lowrank", type=float, nargs="+", default=[0.8, 0.6])
    p.add_argument("--no-lowrank", action="store_true")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--ood-tokens", type=int, default=4096)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peer-path", default=None, help="extra folder on sys.path (a side install of torchao)")
    p.add_argument("--out", default=str(ROOT / "results" / "bench_mixed.json"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "benchmarks" / "mixed-pareto.png"))
    p.add_argument("--report", default=None, metavar="HTML", help="also write the results as an mpokit report page")
    args = p.parse_args(argv)
    if args.peer_path:
        sys.path.insert(0, args.peer_path)
    import torch

    torch.set_num_threads(args.threads)
    from mpokit.eval.table import print_table
    from mpokit.io.atomic import write_json

    run = Run(args)
    t = time.perf_counter()
    run.add("dense fp32", "dense", run.dense, 0.0)
    for part, skip in ((run_mixed, False), (run_gptq, False), (run_lowrank, args.no_lowrank),
                       (run_peers, args.no_peers)):
        if not skip:
            part(run)
    meta = {"model": run.source, "targets": "decoder linear layers (q,k,v,o,gate,up,down)", "weights": run.weights,
            "calibration": f"WikiText-2 valid, {args.calib_tokens} tokens", "wiki_tokens": args.tokens,
            "ood": f"pydoc_data topics, first {args.ood_tokens} tokens", "context": args.context,
            "group": args.group, "seconds": time.perf_counter() - t}
    write_json(args.out, {**meta, "rows": run.rows})
    plot(run.rows, Path(args.plot))
    print_table(run.rows, COLUMNS, title=f"{run.source}: decoder linear layers, {args.tokens} WikiText-2 test "
                                         f"tokens, {args.ood_tokens} pydoc tokens, context {args.context}")
    print(f"wrote {args.out} and {args.plot}")
    if args.report:
        from mpokit.report import write_report

        write_report([args.out], args.report)
        print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
