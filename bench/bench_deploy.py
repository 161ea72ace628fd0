"""Run-time cost of compressed models: disk, peak memory, load time, prefill and decode speed, perplexity.

Each (model, threads) pair is measured in its own process so peak RSS and load time are its own:
load (`load_model` for the dense model, `load_compressed` for checkpoints), a prompt of --prompt
tokens of WikiText-2 test, then --new greedy tokens (`model.generate`, no early stop); best of
--repeats runs of each; then perplexity on the first --ppl-tokens tokens of WikiText-2 test (windows
of 512; nobody tuned on it). Ratios are to the dense float32 model at the same thread count.

    .venv/bin/python bench/bench_deploy.py                                  # the default variants
    .venv/bin/python bench/bench_deploy.py --checkpoint lowrank-0.8=out/smollm2-0.8 --threads 1 2

Variants: dense fp32 and bf16; RTN int4 g64 on the exact reference path (dequantize on every call),
with `kernel="fast"` (packed int4 kernel while decoding, reference path for the prefill), as a
bfloat16 model (kernel for every input), and with its tied embedding/lm_head at 8 bits; RTN int8
with one group per row (int8 kernel); `--gptq` adds GPTQ int4 g128 + 8-bit embeddings (calibrated
on WikiText-2 valid); `--mixed` adds the mixed byte budget (`--method mixed`) at 4.0 / 3.0 / 2.5 bits
per weight with 8-bit embeddings (same calibration).
Writes results/bench_deploy.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "results"

# name -> (QuantConfig keywords or None for the dense model, dtype, kernel)
INT4 = {"bits": 4, "group_size": 64}
INT8 = {"bits": 8, "group_size": 4096}  # group >= in_features: one group per row, the int8 kernel's grid
VARIANTS = {
    "dense-fp32": (None, "float32", "auto"),
    "dense-bf16": (None, "bfloat16", "auto"),
    "int4-g64-reference": (INT4, "float32", "reference"),  # exact float32: dequantize on every call
    "int4-g64-fast": (INT4, "float32", "fast"),  # packed int4 kernel while decoding, exact path for prefill
    "int4-g64-bf16": (INT4, "bfloat16", "auto"),  # a bfloat16 model: the kernel for every input
    "int4-g64-emb8-fast": ({**INT4, "embeddings": 8}, "float32", "fast"),  # + 8-bit tied embedding/lm_head
    "int8-row-fast": (INT8, "float32", "fast"),
}
GPTQ = {"gptq-int4-g128-emb8-fast": ({"bits": 4, "group_size": 128, "algorithm": "gptq", "calibration_tokens": 2048,
                                      "embeddings": 8}, "float32", "fast")}
# --mixed: the byte-budget method at 4.0 / 3.0 / 2.5 bits per weight of the decoder linears, 8-bit embeddings
MIXED = {f"mixed-{b}-emb8-fast": ({"method": "mixed", "bits_per_weight": b, "calibration_tokens": 2048}, "float32",
                                  "fast") for b in (4.0, 3.0, 2.5)}
COLUMNS = ["model", "threads", "paths", "disk_mb", "peak_rss_mb", "rss_x", "load_s", "prefill_tok_s", "prefill_x",
           "decode_tok_s", "decode_x", "ppl", "ppl_x"]


def measure(args) -> dict:
    """One model in this process (the child side)."""
    import torch

    torch.set_num_threads(args.threads[0])
    from mpokit import load_model
    from mpokit.eval.perplexity import perplexity
    from mpokit.layers.quant import set_kernel_

    start = time.perf_counter()
    loaded = load_model(args.checkpoint_dir)  # None: the dense default; a folder: load_compressed + its tokenizer
    model, tok = loaded.model.to(getattr(torch, args.dtype)).eval(), loaded.tokenizer
    paths = set_kernel_(model, args.kernel)
    load_s = time.perf_counter() - start
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())}
    text = (DATA / "wikitext-2" / "test.txt").read_text(encoding="utf-8")
    ids = tok(text[:20000], return_tensors="pt").input_ids[:, : args.prompt]
    prefill, decode = [], []
    greedy = {"do_sample": False, "pad_token_id": tok.eos_token_id}
    with torch.inference_mode():
        model.generate(ids[:, :8], max_new_tokens=2, **greedy)  # warm-up: kernels pack their weights once
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, **greedy)  # prefill (+ one token)
            t1 = time.perf_counter()
            model.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, **greedy)
            t2 = time.perf_counter()
            prefill.append(args.prompt / (t1 - t0))
            decode.append((args.new - 1) / ((t2 - t1) - (t1 - t0)))  # the same prefill, then new - 1 steps
    from mpokit.eval.size import peak_rss_mb

    peak = peak_rss_mb()
    ppl = perplexity(model, tok, text, tokens=args.ppl_tokens, context=512, progress=False).perplexity
    return {"load_s": load_s, "peak_rss_mb": peak, "tensor_mb": sum(tensors.values()) / 2**20, "prefill_tok_s": max(prefill), "decode_tok_s": max(decode),
            "ppl": ppl, "paths": " ".join(f"{k}:{v}" for k, v in sorted(paths.items())) or "dense"}


def build_checkpoints(names: list[str], variants: dict, work: Path) -> dict[str, Path | None]:
    import copy

    from mpokit import Calibration, compress_, get_method, load_model, save_compressed

    loaded, out = None, {}
    for name in names:
        kwargs = variants[name][0]
        if kwargs is None:
            out[name] = None
            continue
        key = json.dumps(kwargs, sort_keys=True)  # variants differing only in dtype/kernel share a checkpoint
        path = work / str(abs(hash(key)))
        if not path.exists():
            loaded = loaded or load_model(None)
            model = copy.deepcopy(loaded.model)
            kwargs = dict(kwargs)
            config = get_method(kwargs.pop("method", "quant"))(**kwargs)  # QuantConfig unless named
            calibration = {}
            if getattr(config, "needs_calibration", False):
                calibration = {"tokenizer": loaded.tokenizer,
                               "calibration": Calibration.from_file(DATA / "wikitext-2" / "valid.txt")}
            compress_(model, config, **calibration)
            save_compressed(model, path, loaded.tokenizer, extra={"source": loaded.source})
            del model
        out[name] = path
    return out


def _disk_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20


def run_child(name: str, ckpt: Path | None, dtype: str, kernel: str, threads: int, args) -> dict:
    cmd = [sys.executable, __file__, "--measure", "--dtype", dtype, "--kernel", kernel, "--threads", str(threads),
           "--prompt", str(args.prompt), "--new", str(args.new), "--repeats", str(args.repeats),
           "--ppl-tokens", str(args.ppl_tokens)] + (["--checkpoint-dir", str(ckpt)] if ckpt else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"{name}: measuring failed:\n{done.stderr[-3000:]}")
    row = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    # the dense model's disk size: its tensors as a safetensors file would hold them
    return {"model": name, "threads": threads, "disk_mb": _disk_mb(ckpt) if ckpt else row["tensor_mb"], **row}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=None)
    p.add_argument("--gptq", action="store_true", help="add GPTQ int4 g128 (a few minutes to compress)")
    p.add_argument("--mixed", action="store_true", help="add the mixed byte budget at 4.0/3.0/2.5 bits per weight")
    p.add_argument("--checkpoint", action="append", default=[], help="NAME=DIR: also measure this checkpoint")
    p.add_argument("--checkpoint-kernel", default="auto", choices=["auto", "fast", "always", "reference"],
                   help="quantized layers' kernel choice for the --checkpoint models (default auto)")
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ppl-tokens", type=int, default=2048)
    p.add_argument("--out", default=str(RESULTS / "bench_deploy.json"))
    # child side
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--kernel", default="auto", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print("RESULT " + json.dumps(measure(args)))
        return 0

    from mpokit.eval.table import print_table
    from mpokit.io.atomic import write_json

    variants = {**VARIANTS, **(GPTQ if args.gptq else {}), **(MIXED if args.mixed else {})}
    names = args.variants or list(variants)
    unknown = [n for n in names if n not in variants]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(variants)}")
    with tempfile.TemporaryDirectory(prefix="mpokit-bench-deploy-") as tmp:
        ckpts = build_checkpoints(names, variants, Path(tmp))
        extra = dict(c.split("=", 1) for c in args.checkpoint)
        rows = []
        for threads in args.threads:
            for name in names:
                rows.append(run_child(name, ckpts[name], variants[name][1], variants[name][2], threads, args))
                print(json.dumps(rows[-1]), flush=True)
            for name, path in extra.items():
                rows.append(run_child(name, Path(path), "float32", args.checkpoint_kernel, threads, args))
                print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        base = next((b for b in rows if b["model"] == "dense-fp32" and b["threads"] == r["threads"]), None)
        if base:
            r["rss_x"] = r["peak_rss_mb"] / base["peak_rss_mb"]
            r["prefill_x"] = r["prefill_tok_s"] / base["prefill_tok_s"]
            r["decode_x"] = r["decode_tok_s"] / base["decode_tok_s"]
            r["ppl_x"] = r["ppl"] / base["ppl"]
    print_table(rows, COLUMNS, title=f"prompt {args.prompt} tokens, {args.new} new tokens, best of {args.repeats}")
    write_json(args.out, {"prompt": args.prompt, "new": args.new, "repeats": args.repeats,
                          "ppl_tokens": args.ppl_tokens, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
