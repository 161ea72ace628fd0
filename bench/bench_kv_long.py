"""Quantized KV caches at long context: perplexity at 1024/2048 tokens and decode speed at 2048.

Perplexity: each `--contexts` window of WikiText-2 (`--split`, test by default) is fed in chunks of
`--chunk` tokens through one cache, so later chunks attend to the quantized states of earlier
ones; the baseline is the same chunked evaluation with transformers' DynamicCache, in the same
run. Bytes: the cache contents at window end (codes, scales, zero points, small cores, 16-bit
window, sinks, outlier channels) vs a 16-bit cache of the same tokens. mpokit caches run with
their float history on (bit-identical states to the compact path, tested; only faster).

Decode (`--decode`): a 2048-token context is prefilled once (DynamicCache) and its states are written
into each cache in 256-token pieces (quantized as a chunked prefill would), then `--steps` single
tokens are decoded, interleaved in `--rounds` with the same steps on a copy of the DynamicCache;
speed vs DynamicCache, and the memory each cache holds at the end (packed storage + float
history, vs DynamicCache's tensors in the model's dtype).

A run names caches as KIND[:field=value,...], e.g. `decoquant-kcr:residual_length=64,key_outliers=4`
(the fields of the kind's config in mpokit.methods.kv_cache).

    python bench/bench_kv_long.py --threads 2                        # presets, contexts 1024 2048
    python bench/bench_kv_long.py --decode --threads 2               # decode speed at 2048
    python bench/bench_kv_long.py --split valid --tokens 2048 --contexts 1024 --out results/x.json \
        --caches decoquant-kcr decoquant-kcr:residual_length=64     # ablations, tuned on valid
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHES = ["decoquant-kcr", "rtn-kcr", "decoquant-long", "rtn-long", "quanto"]


def parse_cache(spec: str, bits: int):
    """'kind:field=value,...' -> the kind's config at `bits` (values: int, true/false, none, or text)."""
    from mpokit.methods.kv_cache import kv_cache_config

    kind, _, rest = spec.partition(":")
    kw = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        low = value.lower()
        kw[key] = None if low == "none" else True if low == "true" else False if low == "false" else \
            int(value) if value.lstrip("-").isdigit() else value
    cfg = kv_cache_config(kind, bits, **kw)
    if hasattr(cfg, "float_history") and "float_history" not in kw:
        cfg.float_history = "model"  # same states as the compact path, dequantized once per token
    return cfg


def perplexity_part(args, model, tok, text: str) -> dict:
    from mpokit.eval.perplexity import perplexity
    from mpokit.methods.kv_cache import KVCacheFactory

    out = {}
    for context in args.contexts:
        t = time.perf_counter()
        base = perplexity(model, tok, text, tokens=args.tokens, context=context, chunk=args.chunk, progress=False)
        rows = {"baseline": base.perplexity, "baseline_seconds": time.perf_counter() - t, "runs": []}
        print(f"context {context}: baseline (DynamicCache, chunked) perplexity {base.perplexity:.3f}", flush=True)
        for bits in args.bits:
            for spec in args.caches:
                if spec.startswith("quanto") and bits not in (2, 4):
                    continue
                cfg = parse_cache(spec, bits)
                factory = KVCacheFactory(cfg, model.config)
                t = time.perf_counter()
                res = perplexity(model, tok, text, tokens=args.tokens, context=context, chunk=args.chunk,
                                 cache_factory=factory, progress=False)
                row = {"cache": spec, "bits": bits, "perplexity": res.perplexity,
                       "ppl_delta_pct": 100 * (res.perplexity / base.perplexity - 1),
                       "kv_bytes_ratio": factory.bytes_ratio(), "seconds": time.perf_counter() - t}
                rows["runs"].append(row)
                print(json.dumps(row), flush=True)
        out[str(context)] = rows
    return out


def _held_bytes(cache) -> int:
    from mpokit.layers.kv_cache import kv_cache_bytes

    held, _ = kv_cache_bytes(cache)
    return held + (cache.working_bytes() if hasattr(cache, "working_bytes") else 0)


def decode_part(args, model) -> dict:
    """Decode speed vs DynamicCache, interleaved: rounds of a few steps on a copy of the float cache, then
    the same steps on the cache under test, so that the shared machine's load changes hit both alike."""
    import copy

    import torch
    from transformers import DynamicCache

    n_ctx = args.decode_context
    ids = torch.randint(100, model.config.vocab_size - 100, (1, n_ctx + args.steps + 1),
                        generator=torch.Generator().manual_seed(0))
    prefill = DynamicCache()
    with torch.no_grad():  # the context's states, computed once and written into each cache
        for s in range(0, n_ctx, 256):
            model(input_ids=ids[:, s:s + 256], past_key_values=prefill, use_cache=True)

    def filled(make):
        cache = make()
        for s in range(0, n_ctx, 256):  # as a chunked prefill would write them (quantizing as it goes)
            for i, layer in enumerate(prefill.layers):
                cache.update(layer.keys[:, :, s:s + 256], layer.values[:, :, s:s + 256], i)
        return cache

    def steps(cache, first: int, count: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for j in range(n_ctx + first, n_ctx + first + count):
                model(input_ids=ids[:, j:j + 1], past_key_values=cache, use_cache=True)
        return time.perf_counter() - t

    out = {"context": n_ctx, "steps": args.steps, "rounds": args.rounds, "runs": [],
           "how": f"{args.rounds} rounds of {args.steps // args.rounds} decode steps on a DynamicCache copy then on "
                  f"the cache under test (after one untimed step each); speed = summed times; held bytes at the end"}
    for bits in args.bits:
        for spec in args.caches:
            if spec.startswith("quanto") and bits not in (2, 4):
                continue
            modes = args.histories if hasattr(parse_cache(spec, bits), "float_history") else ["-"]
            for mode in modes:
                cfg = parse_cache(spec, bits)
                if mode != "-":
                    cfg.float_history = None if mode == "off" else mode
                base, cache = copy.deepcopy(prefill), filled(lambda: cfg.make_cache(model.config))
                steps(base, 0, 1), steps(cache, 0, 1)  # warm up
                per = args.steps // args.rounds
                t_base = t_cache = 0.0
                for r in range(args.rounds):
                    t_base += steps(base, 1 + r * per, per)
                    t_cache += steps(cache, 1 + r * per, per)
                n = per * args.rounds
                row = {"cache": spec, "bits": bits, "float_history": None if mode == "-" else mode,
                       "tokens_per_s": n / t_cache, "float_tokens_per_s": n / t_base, "speed_vs_float": t_base / t_cache,
                       "held_bytes": _held_bytes(cache), "float_held_bytes": _held_bytes(base)}
                row["held_vs_float"] = row["held_bytes"] / row["float_held_bytes"]
                out["runs"].append(row)
                print(json.dumps(row), flush=True)
                del base, cache
    return out


def print_tables(path: Path) -> None:
    """Markdown tables of a results file (perplexity parts and decode)."""
    res = json.loads(path.read_text())
    for part in ("perplexity", "ablation"):
        for context, rows in res.get(part, {}).items():
            print(f"\n{part}, context {context} ({res.get(part + '_corpus', res.get('corpus'))}), baseline "
                  f"{rows['baseline']:.3f}\n\n| cache | bits | perplexity | delta % | KV bytes vs 16-bit |\n|---|---|---|---|---|")
            for r in rows["runs"]:
                print(f"| {r['cache']} | {r['bits']} | {r['perplexity']:.3f} | {r['ppl_delta_pct']:+.2f} | "
                      f"{r['kv_bytes_ratio']:.3f} |")
    dec = res.get("decode")
    if dec:
        print(f"\ndecode at {dec['context']} tokens ({dec['how']})\n\n| cache | bits | float history | tokens/s | "
              f"DynamicCache tokens/s | speed vs float | memory held (MiB) | vs DynamicCache |\n|---|---|---|---|---|---|---|---|")
        for r in dec["runs"]:
            print(f"| {r['cache']} | {r['bits']} | {r['float_history'] or '-'} | {r['tokens_per_s']:.2f} | "
                  f"{r['float_tokens_per_s']:.2f} | {r['speed_vs_float']:.2f} | {r['held_bytes'] / 2**20:.1f} | "
                  f"{r['held_vs_float']:.2f} |")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    p.add_argument("--caches", nargs="+", default=DEFAULT_CACHES)
    p.add_argument("--split", choices=["test", "valid"], default="test")
    p.add_argument("--decode", action="store_true", help="measure decode speed instead of perplexity")
    p.add_argument("--decode-context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per cache (split into --rounds)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--histories", nargs="+", default=["off", "float16", "model"],
                   help="float history modes to time for mpokit caches (off: dequantize the whole history each step)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/bench_kv_long.json; the "
                   "perplexity and decode parts are merged into it)")
    p.add_argument("--table", type=Path, default=None, help="print the markdown tables of a results file and exit")
    args = p.parse_args(argv)
    if args.table:
        print_tables(args.table)
        return {}

    import torch

    from mpokit import load_model
    from mpokit.data.paths import shared_data_dir
    from mpokit.io.atomic import write_json
    from mpokit.methods.kv_cache import KV_PRESETS

    torch.set_num_threads(args.threads)
    loaded = load_model(None)
    model, tok = loaded.model, loaded.tokenizer
    out = {"model": loaded.source, "threads": args.threads, "command": "python bench/bench_kv_long.py " +
           " ".join(argv if argv is not None else __import__("sys").argv[1:]),
           "presets": {k: v for k, v in KV_PRESETS.items() if any(c.partition(":")[0] == k for c in args.caches)}}
    if args.decode:
        out["decode"] = decode_part(args, model)
    else:
        text = (shared_data_dir() / "wikitext-2" / f"{args.split}.txt").read_text()
        out.update(corpus=f"WikiText-2 {args.split}", tokens=args.tokens, chunk=args.chunk,
                   perplexity=perplexity_part(args, model, tok, text))
    path = args.out or ROOT / "results" / "bench_kv_long.json"
    if path.exists():  # the perplexity and decode parts share one file: keep the other part's results
        old = json.loads(path.read_text())
        keep = ["decode", "decode_command"] if not args.decode else [k for k in old if k not in ("decode", "decode_command")]
        out = {**{k: old[k] for k in keep if k in old}, **out}
    if args.decode:
        out["decode_command"], out["decode_threads"] = out.pop("command"), out.pop("threads")
    write_json(path, out)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
