"""mpokit data: store a data set as one matrix product state per sample, and get it back.

    mpokit data compress digits --out digits.mps.safetensors --bytes-per-sample 64
    mpokit data compress images.npz --out images.mps.safetensors --max-error 0.05 --dtype float32
    mpokit data decompress digits.mps.safetensors --out digits.npz
"""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path

from mpokit.cli.common import UserError, emit_json, positive_float, print_table

HELP = "data sets as matrix product states: compress an array file (or sklearn digits) to a byte budget or error"
_PROGRESS_FROM = 2000  # samples: smaller sets finish before a bar is worth drawing
_OUT_SUFFIXES = (".npy", ".npz", ".safetensors")


def add_arguments(p) -> None:
    from mpokit.data.mps import STORAGE_DTYPES
    from mpokit.ops.mps import LAYOUTS

    sub = p.add_subparsers(dest="data_command", required=True, metavar="{compress,decompress}")
    c = sub.add_parser("compress", help="compress an (N, ...) array to one MPS per sample",
                       description="Compress every sample of INPUT to a matrix product state (TT-SVD over a grid of "
                                   "small dims, image rows and columns interleaved) and save the cores.")
    c.add_argument("input", help="a .npy/.npz/.safetensors array file of shape (N, ...) (npz/safetensors: the array "
                                 "x/images/data, labels y/labels/target), or 'digits' (scikit-learn's 8x8 digits)")
    c.add_argument("--out", required=True,
                   help="the .safetensors file to write (an existing one only with --overwrite)")
    target = c.add_mutually_exclusive_group(required=True)
    target.add_argument("--bytes-per-sample", type=positive_float, default=None,
                        help="at most this many bytes per sample (core values + bond table)")
    target.add_argument("--total-bytes", type=positive_float, default=None,
                        help="at most this many bytes for the whole set, spent where they remove the most error")
    target.add_argument("--max-error", type=positive_float, default=None,
                        help="relative Frobenius error per sample, measured after the cast to --dtype")
    c.add_argument("--dtype", default="float16", choices=tuple(STORAGE_DTYPES),
                   help="how core values are stored (default float16: 2 bytes each)")
    c.add_argument("--layout", default="interleaved", choices=LAYOUTS,
                   help="site order: interleaved row/column digits (default) or raster (row by row)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("--json", default=None, help="write the summary as JSON here")
    c.set_defaults(data_run=run_compress)

    d = sub.add_parser("decompress", help="write the samples of an MPS data set back as an array file",
                       description="Contract every sample of FILE and write them as .npy (samples only), .npz or "
                                   ".safetensors (x, and y when the set has labels).")
    d.add_argument("file", help="a file written by `mpokit data compress`")
    d.add_argument("--out", required=True, help=f"array file to write ({', '.join(_OUT_SUFFIXES)})")
    d.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    d.set_defaults(data_run=run_decompress)


def run(args) -> int:
    return args.data_run(args)


def _refuse_existing(path: str, overwrite: bool) -> None:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"expected a file path for --out, got the folder {path}")
    if os.path.lexists(p) and not overwrite:
        raise UserError(f"{path} exists; pass --overwrite to replace it")


def _summary_rows(s: dict, file_bytes: int | None) -> list[dict]:
    rows = [("samples", s["samples"]), ("sample shape", s["sample_shape"]), ("sites", s["sites"]),
            ("core dtype", s["dtype"]), ("bytes before (float32)", s["bytes_float32"]),
            ("bytes after (cores + bonds)", s["bytes"]), ("bytes per sample", round(s["bytes_per_sample"], 2)),
            ("ratio vs float32", round(s["ratio_vs_float32"], 3)), ("mean bond", round(s["mean_bond"], 3)),
            ("mean rel. error", s["mean_rel_error"]), ("max rel. error", s["max_rel_error"]),
            ("label bytes (not counted)", s["label_bytes"]), ("file bytes (with header)", file_bytes)]
    return [{"name": k, "value": v} for k, v in rows]


def run_compress(args) -> int:
    from mpokit.data.mps import compress_dataset, read_array

    _refuse_existing(args.out, args.overwrite)  # before the work, not after it
    if args.input != "digits" and Path(args.input).resolve() == Path(args.out).resolve():
        raise UserError(f"expected --out to differ from INPUT, got {args.out} for both")
    x, labels = read_array(args.input)
    compressed = compress_dataset(x, bytes_per_sample=args.bytes_per_sample, total_bytes=args.total_bytes,
                                  max_error=args.max_error, dtype=args.dtype, layout=args.layout, labels=labels,
                                  progress=not args.no_progress and len(x) >= _PROGRESS_FROM, source=args.input)
    compressed.save(args.out, overwrite=args.overwrite)
    summary = {"input": args.input, "out": args.out, **compressed.summary(),
               "file_bytes": Path(args.out).stat().st_size}
    print_table(_summary_rows(summary, summary["file_bytes"]), ["name", "value"], title=f"wrote {args.out}")
    emit_json(args.json, summary)
    return 0


def run_decompress(args) -> int:
    import numpy as np

    from mpokit.data.mps import CompressedSet, write_bytes_atomic

    suffix = Path(args.out).suffix.lower()
    if suffix not in _OUT_SUFFIXES:
        raise UserError(f"expected --out ending in {', '.join(_OUT_SUFFIXES)}, got {args.out}")
    _refuse_existing(args.out, args.overwrite)
    compressed = CompressedSet.load(args.file)
    x = compressed.decompress_batch().numpy()
    arrays = {"x": x} if compressed.labels is None else {"x": x, "y": compressed.labels.numpy()}
    if suffix == ".npy":
        buf = io.BytesIO()
        np.save(buf, x)
        data = buf.getvalue()
    elif suffix == ".npz":
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        data = buf.getvalue()
    else:
        from safetensors.numpy import save

        data = save(arrays)
    write_bytes_atomic(args.out, data, overwrite=args.overwrite)
    print(f"wrote {args.out}: {len(x)} samples of shape {list(x.shape[1:])} ({x.dtype})"
          f"{' with labels' if compressed.labels is not None else ''}", file=sys.stderr)
    return 0
