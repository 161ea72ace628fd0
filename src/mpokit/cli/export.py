"""mpokit export: write a checkpoint in another runtime's format (GGUF: llama.cpp, transformers gguf_file=;
compressed-tensors: a Hugging Face folder plain transformers loads with the compressed-tensors package;
hf: a self-contained transformers folder, mpokit's layers in its modeling file, trust_remote_code=True)."""
from __future__ import annotations

from mpokit.cli.common import DTYPES, UserError, add_device_flag, emit_json, print_table, resolve_device
from mpokit.export import FORMATS
from mpokit.export.compressed_tensors import UNSUPPORTED
from mpokit.export.gguf import CONVERT, DENSE, INT4_ZERO_POINT

HELP = ("export a checkpoint to another format (gguf: for llama.cpp and transformers' gguf_file= loader; "
        "compressed-tensors: a Hugging Face folder for plain transformers; hf: a transformers folder that "
        "loads without mpokit, trust_remote_code=True)")
# The options each format takes; one given for another format is a usage error.
OWN = {"gguf": ("metadata_from", "int4_zero_point", "convert", "dense"), "compressed-tensors": ("unsupported", "dense"),
       "hf": ("max_shard_size", "dtype")}
# Why --dtype does not apply to a format: its tensor types are fixed by codes and its own flags.
NO_DTYPE = {"gguf": "each GGUF tensor's type is its layer's codes (Q4_0, Q8_0, ...) or what --dense and --convert "
                    "choose (F32, F16, Q8_0)",
            "compressed-tensors": "quantized layers keep their codes and scales, other tensors take --dense (f16, f32)"}
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
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="hf: compute dtype of the exported model: its float tensors (MPO cores, dense weights, "
                        "norms) are cast to it; quantized layers keep their codes and float16 scales and dequantize "
                        "into it (default: the checkpoint's dtype); gguf and compressed-tensors refuse it (their "
                        "--dense chooses float tensor types)")
    add_device_flag(p, "where the checkpoint is loaded and cast for --dtype; encoding runs on the CPU and the files "
                       "always hold CPU tensors")
    p.add_argument("--tensors", action="store_true", help="print one row per tensor")
    p.add_argument("--json", default=None, help="write the export report as JSON here")


def _options(args):
    """(options, keywords) of the chosen format; a flag of another format is a usage error."""
    if args.dtype is not None and args.format in NO_DTYPE:
        raise UserError(f"expected --dtype only with --format hf, got it with --format {args.format}: "
                        f"{NO_DTYPE[args.format]}")
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


def _cast_checkpoint(args, device, kw: dict):
    """(model, keywords, mpokit.json) for --dtype: the checkpoint loaded on `device`, cast, back on the CPU.

    The exporter is then handed a model in memory, so the checks it makes against the input folder
    (output not inside it, never over it) and the tokenizer it would read from it are done here.
    """
    from pathlib import Path

    import torch

    from mpokit.export.hf import _WHAT, MODELING_FILE
    from mpokit.export.tensors import check_folder_out, saved_tokenizer, source_meta
    from mpokit.io.checkpoint import load_compressed

    ckpt, meta = source_meta(args.path)
    check_folder_out(Path(args.out), args.overwrite, ckpt, MODELING_FILE, _WHAT)
    model = load_compressed(ckpt, device=device)
    model.to(getattr(torch, args.dtype))  # a layer whose tensors overflow float16 refuses (CastOverflowError)
    return model.to("cpu"), {**kw, "tokenizer": saved_tokenizer(ckpt)}, meta


def run(args) -> int:
    options, kw = _options(args)
    device = resolve_device(args.device)
    source, meta = args.path, None
    if args.dtype is not None:
        source, kw, meta = _cast_checkpoint(args, device, kw)
    report = FORMATS[args.format](source, args.out, options, overwrite=args.overwrite, **kw)
    report["device"] = str(device) if args.dtype is not None else "cpu"
    if meta is not None:
        report["source"], report["dtype"] = meta.get("source"), args.dtype
        report["notes"].append(f"float tensors cast to {args.dtype} (from the checkpoint's {meta.get('dtype')}) on "
                               f"{device}; quantized layers keep their codes and scales, dequantized into {args.dtype}")
    elif args.device != "auto" and device.type != "cpu":  # asked for, but there is no work for it
        report["notes"].append(f"--device {args.device}: nothing to compute there without --dtype; the checkpoint "
                               "was read, encoded and written on the CPU")
    per_tensor, summary = _COLUMNS[args.format]
    if args.tensors:
        print_table(report["tensors"], per_tensor)
    source = f", metadata from {report['metadata_from']}" if report.get("metadata_from") else ""
    print_table(report["summary"], summary, title=f"wrote {args.out}: {report['bytes'] / 2**20:.1f} MiB{source}")
    for note in report["notes"]:
        print(f"note: {note}")
    emit_json(args.json, report)
    return 0
