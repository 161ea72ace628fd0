"""GGUF export benchmark: mpokit's in-memory quantized model vs the GGUF file it exports, loaded by transformers.

For each variant the default SmolLM2-135M-Instruct is quantized (what `mpokit compress --method quant
--bits B --group-size G` does), saved as an mpokit checkpoint, loaded back (the model the export
reads), and exported with `export_gguf` (what `mpokit export CKPT --format gguf --out F.gguf` does).
Perplexity on the first --tokens tokens of WikiText-2 test in windows of --context, computed with the
checkpoint's tokenizer for both models so both see the same token ids. Also: file sizes, export time,
transformers' load time of the GGUF (`from_pretrained(folder, gguf_file=name)`, which dequantizes it).

The default model's weights come from a Q4_1 GGUF (groups of 32, float offsets): re-quantizing
on that grid would be lossless and prove nothing. mpokit's RTN uses integer zero points, so even
group 32 lands on another grid (its perplexity rises); groups 64 and 128 are the real tests.

    python bench/bench_export.py --threads 2            # every variant, ~15 min on a loaded 2-core CPU
    python bench/bench_export.py --variants int4-g128 --tokens 512
Writes results/bench_export.json.

--format compressed-tensors exports each variant once with `export_compressed_tensors` (what
`mpokit export CKPT --format compressed-tensors --out DIR` does) and loads the folder with plain
`AutoModelForCausalLM.from_pretrained(DIR)`; load_s includes the first one-token forward, which is
where transformers decompresses models it loaded compressed. mpokit's perplexity is measured on its
reference path (float32 dequantize + F.linear), the values the folder is checked against.

    python bench/bench_export.py --format compressed-tensors --variants int4-g64 int4-g128 int8-g128 \
        int8-g128-sym gptq-int4-g128 --threads 1       # ~10 min; writes results/bench_export_ct.json
"""
from __future__ import annotations

import argparse
import copy
import gc
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "results"

# name -> (QuantConfig keywords, GGUFOptions of each export, note)
Q5 = {"int4_zero_point": "q5_0"}
VARIANTS = {
    "int4-g32": ({"bits": 4, "group_size": 32}, [{}],
                 ("groups of 32 like the source Q4_1 file, but integer zero points: not the source grid "
                  "(that needs float offsets), so not lossless")),
    "int4-g64": ({"bits": 4, "group_size": 64}, [{}, Q5], ""),
    "int4-g128": ({"bits": 4, "group_size": 128}, [{}, Q5], "576-column layers use group 96 (fit_groups)"),
    "int4-g128-float": ({"bits": 4, "group_size": 128, "zero_point": False}, [{}],
                        "float16 offsets (zero_point=False): exact Q4_1"),
    "int8-g128": ({"bits": 8, "group_size": 128}, [{}, {"convert": "q8_0"}],
                  "8-bit zero points: no exact GGUF type"),
    "int8-g128-sym": ({"bits": 8, "group_size": 128, "symmetric": True}, [{}], "symmetric: exact Q8_0"),
    "gptq-int4-g128": ({"bits": 4, "group_size": 128, "algorithm": "gptq", "calibration_tokens": 2048}, [{}, Q5],
                       "GPTQ, calibrated on the first 2048 tokens of WikiText-2 valid"),
}
COLUMNS = ["variant", "export", "types", "exact", "ppl_mpokit", "ppl_gguf", "ppl_diff_pct", "max_abs_diff",
           "ckpt_mb", "gguf_mb", "export_s", "load_s", "note"]
CT_COLUMNS = ["variant", "groups", "exact", "ppl_mpokit", "ppl_ct", "ppl_diff_pct", "max_abs_diff", "ckpt_mb",
              "ct_mb", "export_s", "load_s"]


def _ppl(model, tok, text: str, args) -> float:
    from mpokit.eval.perplexity import perplexity

    return perplexity(model, tok, text, tokens=args.tokens, context=args.context, progress=False).perplexity


def _load_gguf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, time.perf_counter() - start


def _types(report: dict) -> str:
    counts: dict[str, int] = {}
    for t in report["tensors"]:
        counts[t["type"]] = counts.get(t["type"], 0) + 1
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def baseline_row(loaded, text: str, args) -> dict:
    """The dense model and the GGUF file it was loaded from: the same weights on both sides."""
    from mpokit.io.models import default_gguf_path

    ppl = _ppl(loaded.model, loaded.tokenizer, text, args)
    src = default_gguf_path()
    model, load_s = _load_gguf(src)
    ppl_gguf = _ppl(model, loaded.tokenizer, text, args)
    return {"variant": "dense", "export": "(source file)", "types": "Q4_1:210 F32:61 Q8_0:1", "ppl_mpokit": ppl,
            "ppl_gguf": ppl_gguf, "ppl_diff_pct": 100 * (ppl_gguf / ppl - 1), "gguf_mb": src.stat().st_size / 2**20,
            "load_s": load_s, "note": "float32 model dequantized from the shipped Q4_1 file, and that file"}


def _checkpoint(name: str, loaded, work: Path):
    """Quantize a copy of the default model as `name` says, save it, load it back: (ckpt, model)."""
    from mpokit import QuantConfig, compress_, load_compressed, save_compressed

    model = copy.deepcopy(loaded.model)
    config = QuantConfig(**VARIANTS[name][0])
    calibration = {}
    if config.algorithm == "gptq":  # same layer type as RTN; calibrated on valid, evaluated on test
        calibration = {"tokenizer": loaded.tokenizer,
                       "calibration_text": (DATA / "wikitext-2" / "valid.txt").read_text()}
    compress_(model, config, **calibration)
    ckpt = work / name
    save_compressed(model, ckpt, loaded.tokenizer, extra={"source": loaded.source})  # as `mpokit compress` records it
    del model
    return ckpt, load_compressed(ckpt)


def variant_rows(name: str, loaded, text: str, work: Path, args) -> list[dict]:
    from mpokit.export import GGUFOptions, export_gguf

    kwargs, exports, note = VARIANTS[name]
    ckpt, mem = _checkpoint(name, loaded, work)
    ppl_mem = _ppl(mem, loaded.tokenizer, text, args)
    rows = []
    for i, options in enumerate(exports):
        out = work / f"{name}-{i}.gguf"
        start = time.perf_counter()
        report = export_gguf(ckpt, out, GGUFOptions(**options))
        export_s = time.perf_counter() - start
        gguf_model, load_s = _load_gguf(out)
        ppl_gguf = _ppl(gguf_model, loaded.tokenizer, text, args)
        del gguf_model
        gc.collect()
        quant = [t for t in report["tensors"] if t["name"].startswith("blk.") and len(t["shape"]) == 2]
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in options.items())
        rows.append({"variant": name, "export": flags or "default",
                     "types": _types(report), "exact": f"{sum(t['exact'] for t in report['tensors'])}/"
                     f"{len(report['tensors'])}", "ppl_mpokit": ppl_mem, "ppl_gguf": ppl_gguf,
                     "ppl_diff_pct": 100 * (ppl_gguf / ppl_mem - 1),
                     "max_abs_diff": max(t["max_abs_diff"] for t in quant),
                     "inexact_blocks": sum(t["inexact_blocks"] or 0 for t in quant),
                     "blocks": sum(t["blocks"] or 0 for t in quant),
                     "ckpt_mb": (ckpt / "model.safetensors").stat().st_size / 2**20,
                     "gguf_mb": out.stat().st_size / 2**20, "export_s": export_s, "load_s": load_s,
                     "metadata_from": report["metadata_from"], "note": note, "config": kwargs})
        out.unlink()
        print(f"{name} {flags or 'default'}: mpokit {ppl_mem:.4f}, gguf {ppl_gguf:.4f}", flush=True)
    del mem
    gc.collect()
    return rows


def _load_ct(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long))  # decompresses a model loaded compressed
    return model, time.perf_counter() - start


def ct_variant_rows(name: str, loaded, text: str, work: Path, args) -> list[dict]:
    from mpokit.export import export_compressed_tensors
    from mpokit.layers.quant import set_kernel_

    kwargs = VARIANTS[name][0]  # (its note is about GGUF)
    ckpt, mem = _checkpoint(name, loaded, work)
    set_kernel_(mem, "reference")  # the values the folder holds, not the packed kernels' bfloat16 products
    ppl_mem = _ppl(mem, loaded.tokenizer, text, args)
    del mem
    out = work / f"{name}-ct"
    start = time.perf_counter()
    report = export_compressed_tensors(ckpt, out)
    export_s = time.perf_counter() - start
    model, load_s = _load_ct(out)
    ppl_ct = _ppl(model, loaded.tokenizer, text, args)
    del model
    gc.collect()
    quant_rows = [t for t in report["tensors"] if t["type"].startswith("int")]
    groups = "; ".join(f"int{g['bits']} g{g['group_size']} {'sym' if g['symmetric'] else 'asym'} x{g['layers']}"
                       for g in report["config_groups"].values())
    print(f"{name} compressed-tensors: mpokit {ppl_mem:.4f}, exported {ppl_ct:.4f}", flush=True)
    shutil.rmtree(out)
    return [{"variant": name, "types": _types(report), "groups": groups,
             "exact": f"{sum(t['exact'] for t in report['tensors'])}/{len(report['tensors'])}",
             "ppl_mpokit": ppl_mem, "ppl_ct": ppl_ct, "ppl_diff_pct": 100 * (ppl_ct / ppl_mem - 1),
             "max_abs_diff": max(t["max_abs_diff"] for t in report["tensors"]),
             "quant_layers": len(quant_rows), "ckpt_mb": (ckpt / "model.safetensors").stat().st_size / 2**20,
             "ct_mb": report["bytes"] / 2**20, "export_s": export_s, "load_s": load_s, "notes": report["notes"],
             "config": kwargs}]


def markdown(rows: list[dict], columns: list[str] = COLUMNS) -> str:
    from mpokit.eval.table import fmt

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    from mpokit import load_model
    from mpokit.eval.table import print_table
    from mpokit.io.atomic import write_json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-baseline", action="store_true", help="skip the dense model / source file row (gguf)")
    p.add_argument("--format", default="gguf", choices=["gguf", "compressed-tensors"])
    p.add_argument("--out", default=None,
                   help="default: results/bench_export.json (gguf), results/bench_export_ct.json (compressed-tensors)")
    args = p.parse_args(argv)
    ct = args.format == "compressed-tensors"
    args.out = args.out or str(RESULTS / ("bench_export_ct.json" if ct else "bench_export.json"))
    torch.set_num_threads(args.threads)
    text = (DATA / "wikitext-2" / "test.txt").read_text()
    loaded = load_model(None)
    rows = [] if args.no_baseline or ct else [baseline_row(loaded, text, args)]
    work = Path(tempfile.mkdtemp(prefix="mpokit-bench-export-"))
    try:
        for name in args.variants:
            rows += (ct_variant_rows if ct else variant_rows)(name, loaded, text, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    title = f"{loaded.source}: WikiText-2 test, first {args.tokens} tokens, windows of {args.context}"
    columns = CT_COLUMNS if ct else COLUMNS
    print_table(rows, columns, title=title)
    print(markdown(rows, columns))
    extra = {}
    if ct:
        import compressed_tensors
        import transformers

        extra = {"format": args.format, "compressed_tensors": compressed_tensors.__version__,
                 "transformers": transformers.__version__, "ppl_mpokit_path": "reference (float32 dequantize)"}
    write_json(args.out, {"model": loaded.source, "corpus": "WikiText-2 test", "tokens": args.tokens,
                          "context": args.context, "threads": args.threads, **extra, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
