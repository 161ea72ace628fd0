"""mpokit export: write a checkpoint in another runtime's format (GGUF: llama.cpp, transformers gguf_file=;
compressed-tensors: a Hugging Face folder plain transformers loads with the compressed-tensors package;
hf: a self-contained transformers folder, mpokit's layers in its modeling file, trust_remote_code=True)."""
from __future__ import annotations

from mpokit.cli.common import emit_json, print_table
from mpokit.export import FORMATS
from mpokit.export.compressed_tensors import UNSUPPORTED
from mpokit.export.gguf import CONVERT, DENSE, INT4_ZERO_POINT

HELP = ("export a checkpoint to another format (gguf: for llama.cpp and transformers' gguf_file= loader; "
        "compressed-tensors: a Hugging Face folder for plain transformers; hf: a transformers folder that "
        "loads without mpokit, trust_remote_code=True)")
# The options each format takes; one given for another format is a usage error.
OWN = {"gguf": ("metadata_from", "int4_zero_point", "convert", "dense"), "compressed-tensors": ("unsupported", "dense"),
       "hf": ("max_shard_size",)}
# (per-tensor columns, summary columns) of the printed tables
_COLUMNS = {"gguf": (["name", "shape", "type", "exact", "bytes", "max_abs_diff", "inexact_blocks"],
                     ["type", "how", "tensors", "exact", "bytes", "max_abs_diff", "inexact_blocks"]),
            "compressed-tensors": (["name", "shape", "type", "exact", "bytes", "max_abs_diff", "inexact_values"],
                                   ["type", "how", "tensors", "exact", "bytes", "max_abs_diff"]),
            "hf": (["name", "shape", "type", "layer", "bytes"], ["layer", "modules", "tensors", "bytes", "how"])}


def add_arguments(p) -> None:
    p.add_argument("path", help="checkpoint folder written by mpokit compress")
    p.add_argument("--format", default="gguf", choices=sorted(FORMATS), help="output format (default: gguf)")
    p.add_argument("--out", required=True, help="output: a .gguf file (gguf) or a folder (compressed-tensors, hf); "
                                                "written atomically, never over the input")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--metadata-from", default=None,
                   help="gguf: GGUF file of the same model to copy tokenizer/general metadata from (default: the "
                        "file the checkpoint's model was loaded from, when known; else its Hugging Face tokenizer)")
    p.add_argument("--int4-zero-point", default=None, choices=INT4_ZERO_POINT,
                   help="gguf: 4-bit integer-zero-point weights: q4_1 (5.0 bits/weight, offsets rounded to float16) "
                        "or q5_0 (5.5 bits/weight, exact) (default: q4_1)")
    p.add_argument("--convert", default=None, choices=CONVERT,
                   help="gguf: weights no GGUF type holds exactly (groups not a multiple of 32, 8-bit asymmetric): "
                        "write them dequantized as f16 or f32, or re-quantize them to Q8_0 with gguf's quantizer "
                        "(smaller, rounds a second time) (default: f16)")
    p.add_argument("--dense", default=None, choices=DENSE,
                   help="gguf, compressed-tensors: unquantized tensors: auto = smallest exact form (gguf: Q8_0 grid, "
                        "F16, F32; compressed-tensors: F16, else as stored), or f32/f16 (default: auto)")
    p.add_argument("--unsupported", default=None, choices=UNSUPPORTED,
                   help="compressed-tensors: layers the format cannot hold (float offsets, Conv1D): write them as "
                        "dense float weights, or refuse (default: dense)")
    p.add_argument("--max-shard-size", default=None,
                   help="hf: largest safetensors file before the weights are split into shards with an index, "
                        "e.g. 2GB or 500MB (default: 2GB)")
    p.add_argument("--tensors", action="store_true", help="print one row per tensor")
    p.add_argument("--json", default=None, help="write the export report as JSON here")


def _options(args):
    """(options, keywords) of the chosen format; a flag of another format is a usage error."""
    others = {k for fmt, keys in OWN.items() if fmt != args.format for k in keys} - set(OWN[args.format])
    given = [f"--{k.replace('_', '-')}" for k in sorted(others) if getattr(args, k) is not None]
    if given:
        raise ValueError(f"expected options of --format {args.format}, got {', '.join(given)}, which "
                         f"{'does' if len(given) == 1 else 'do'} not apply to it")
    if args.format == "gguf":
        from mpokit.export.gguf import GGUFOptions

        return GGUFOptions(int4_zero_point=args.int4_zero_point or "q4_1", convert=args.convert or "f16",
                           dense=args.dense or "auto"), {"metadata_from": args.metadata_from}
    if args.format == "hf":
        from mpokit.export.hf import HFOptions

        return HFOptions(max_shard_size=args.max_shard_size or "2GB"), {}
    from mpokit.export.compressed_tensors import CTOptions

    return CTOptions(dense=args.dense or "auto", unsupported=args.unsupported or "dense"), {}


def run(args) -> int:
    options, kw = _options(args)
    report = FORMATS[args.format](args.path, args.out, options, overwrite=args.overwrite, **kw)
    per_tensor, summary = _COLUMNS[args.format]
    if args.tensors:
        print_table(report["tensors"], per_tensor)
    source = f", metadata from {report['metadata_from']}" if report.get("metadata_from") else ""
    print_table(report["summary"], summary, title=f"wrote {args.out}: {report['bytes'] / 2**20:.1f} MiB{source}")
    for note in report["notes"]:
        print(f"note: {note}")
    emit_json(args.json, report)
    return 0
