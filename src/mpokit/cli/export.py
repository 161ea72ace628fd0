"""mpokit export: write a checkpoint in another runtime's format (GGUF: llama.cpp, transformers gguf_file=)."""
from __future__ import annotations

from mpokit.cli.common import emit_json, print_table
from mpokit.export import FORMATS
from mpokit.export.gguf import CONVERT, DENSE, INT4_ZERO_POINT

HELP = "export a checkpoint to another format (gguf: for llama.cpp and transformers' gguf_file= loader)"


def add_arguments(p) -> None:
    p.add_argument("path", help="checkpoint folder written by mpokit compress")
    p.add_argument("--format", default="gguf", choices=sorted(FORMATS), help="output format (default: gguf)")
    p.add_argument("--out", required=True, help="output file (.gguf; written atomically, never over the input)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--metadata-from", default=None,
                   help="GGUF file of the same model to copy tokenizer/general metadata from (default: the file "
                        "the checkpoint's model was loaded from, when known; else its Hugging Face tokenizer)")
    p.add_argument("--int4-zero-point", default="q4_1", choices=INT4_ZERO_POINT,
                   help="4-bit integer-zero-point weights: q4_1 (5.0 bits/weight, offsets rounded to float16) or "
                        "q5_0 (5.5 bits/weight, exact) (default: q4_1)")
    p.add_argument("--convert", default="f16", choices=CONVERT,
                   help="weights no GGUF type holds exactly (groups not a multiple of 32, 8-bit asymmetric): "
                        "write them dequantized as f16 or f32, or re-quantize them to Q8_0 with gguf's quantizer "
                        "(smaller, rounds a second time) (default: f16)")
    p.add_argument("--dense", default="auto", choices=DENSE,
                   help="unquantized tensors: auto = smallest exact form (Q8_0 grid, F16, F32), or f32/f16")
    p.add_argument("--tensors", action="store_true", help="print one row per tensor")
    p.add_argument("--json", default=None, help="write the export report as JSON here")


def run(args) -> int:
    from mpokit.export.gguf import GGUFOptions

    options = GGUFOptions(int4_zero_point=args.int4_zero_point, convert=args.convert, dense=args.dense)
    report = FORMATS[args.format](args.path, args.out, options, metadata_from=args.metadata_from,
                                  overwrite=args.overwrite)
    if args.tensors:
        print_table(report["tensors"], ["name", "shape", "type", "exact", "bytes", "max_abs_diff", "inexact_blocks"])
    print_table(report["summary"], ["type", "how", "tensors", "exact", "bytes", "max_abs_diff", "inexact_blocks"],
                title=f"wrote {args.out}: {report['bytes'] / 2**20:.1f} MiB, metadata from {report['metadata_from']}")
    for note in report["notes"]:
        print(f"note: {note}")
    emit_json(args.json, report)
    return 0
