"""export_gguf: write an mpokit model (weight-quantized or not) as a GGUF file for llama.cpp and transformers.

Quantized layers are written from their codes (encode.py says which GGUF type each grid maps onto
and when that is exact); the report lists, per tensor, its type, whether the file holds exactly
the values mpokit computes with (measured by decoding the written blocks with gguf's reference
dequantizer) and, when not, what was converted and how far it moved.

The file is written beside its target under a temporary name and renamed into place: a failed
export leaves nothing behind, and an existing file is replaced only with overwrite=True.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mpokit.export.metadata import (check_architecture, check_source, general_kv, llama_kv, provenance_kv,
                                    read_source_kv, tokenizer_kv, write_kv)
from mpokit.export.tensors import GGUF_CODES, collect_tensors, densified_copy, source_meta, source_model
from mpokit.io.atomic import OutputPathError, recover

__all__ = ["GGUFOptions", "export_gguf", "INT4_ZERO_POINT", "CONVERT", "DENSE"]

INT4_ZERO_POINT = ("q4_1", "q5_0")  # 4-bit zero-point grids: Q4_1 (offset rounded to fp16) or Q5_0 (exact, +10%)
CONVERT = ("f16", "q8_0", "f32")  # grids no GGUF type holds: dequantized floats, or gguf's Q8_0 quantizer
DENSE = ("auto", "f32", "f16")  # unquantized tensors: the smallest exact form, or a fixed float type
_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1",
               "Q5_0": "MOSTLY_Q5_0", "Q8_0": "MOSTLY_Q8_0"}


@dataclass
class GGUFOptions:
    """How tensors without an exact-and-smallest GGUF type are written.

      int4_zero_point: 4-bit codes with integer zero points, w = (q - z) * s. "q4_1" (default, 5.0
        bits/weight): Q4_1 with m = -z*s rounded to float16, off by at most half a float16 ulp of
        z*s in blocks where z*s is not a float16; "q5_0" (5.5 bits/weight): exact.
      convert: grids with no GGUF type (groups not a multiple of 32; 8-bit asymmetric). "f16"
        (default) writes the dequantized weight in float16 (off by at most half a float16 ulp);
        "f32" exactly, at 32 bits/weight; "q8_0" keeps 8.5 bits/weight: Q8_0 with d = s and q - z
        in the blocks where q - z fits int8, gguf's Q8_0 quantizer on the dequantized weight
        elsewhere, which rounds a second time (measured on SmolLM2 int8: see
        docs/benchmarks/export.md).
      dense: unquantized tensors. "auto" picks the smallest exact form (Q8_0 when the values lie on
        a Q8_0 grid, else F16 when every value is a float16, else F32); "f32" or "f16" fix the type
        (1-D tensors are always F32).
    """

    int4_zero_point: str = "q4_1"
    convert: str = "f16"
    dense: str = "auto"

    def __post_init__(self) -> None:
        for name, choices in (("int4_zero_point", INT4_ZERO_POINT), ("convert", CONVERT), ("dense", DENSE)):
            if getattr(self, name) not in choices:
                raise ValueError(f"expected {name} in {choices}, got {getattr(self, name)!r}")


def _check_out(out: Path, overwrite: bool, protect: list[Path]) -> None:
    if out.suffix.lower() != ".gguf":
        raise ValueError(f"expected an output file name ending in .gguf, got {out}")
    target = out.expanduser().resolve()
    for p in protect:
        source = p.expanduser().resolve()
        if target == source or source in target.parents:
            raise OutputPathError(f"refusing to write to {out}: it would replace or sit inside the input {p}; "
                                  "choose another output file")
    if out.is_symlink():
        raise OutputPathError(f"refusing to replace {out}: it is a symbolic link; pass the file it points to")
    if out.is_dir():
        raise OutputPathError(f"expected an output file for the GGUF export, got the folder {out}")
    if out.exists() and not overwrite:
        raise _exists_error(out)


def _exists_error(out: Path) -> OutputPathError:
    return OutputPathError(f"{out} exists; pass --overwrite to replace it (overwrite=True in Python)")


def _place_new(tmp: Path, out: Path) -> None:
    """Move `tmp` to `out` only if `out` does not exist, even if it appeared during the export."""
    try:
        os.link(tmp, out)  # atomic create-if-absent
    except FileExistsError:
        raise _exists_error(out) from None
    except OSError:  # a filesystem without hard links: check, then rename
        if os.path.lexists(out):
            raise _exists_error(out) from None
        os.replace(tmp, out)


def _write_atomic(out: Path, write, overwrite: bool) -> None:
    """write(tmp) a temporary file beside `out`, fsync it, then move it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)  # removes temporary files that killed exports of `out` left (named as atomic.py names them)
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes owner-only files; give the usual mode
        if overwrite:
            os.replace(tmp, out)
        else:
            _place_new(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    with contextlib.suppress(OSError):  # the rename is durable once the folder is synced
        dfd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def source_gguf(meta: dict) -> Path | None:
    """The GGUF file a checkpoint's model was loaded from, when mpokit.json tells."""
    source = meta.get("source")
    if not isinstance(source, str):
        return None
    if source.lower().endswith(".gguf") and Path(source).expanduser().is_file():
        return Path(source).expanduser()
    from mpokit.io.models import DEFAULT_MODEL, default_gguf_path, embedded_alias

    if embedded_alias(source) == DEFAULT_MODEL:
        with contextlib.suppress(FileNotFoundError):
            return default_gguf_path()
    return None


def _metadata(model: nn.Module, tokenizer, meta: dict, ckpt: Path | None, source: Path | None, explicit: bool):
    """(key-values, where the tokenizer came from, notes)."""
    built = llama_kv(model.config)
    methods = meta.get("methods", getattr(model, "_mpokit_methods", []))
    notes = []
    if source is not None:
        kv = read_source_kv(source)
        try:
            check_source(kv, built, source)
        except ValueError as e:
            if explicit:
                raise
            notes.append(f"metadata not copied from {source}: {e}")
        else:
            return {**kv, **{k: v for k, v in built.items() if k not in kv}, **provenance_kv(methods)}, \
                str(source), notes
    if tokenizer is None and ckpt is not None:
        from mpokit.io.models import checkpoint_tokenizer

        tokenizer = checkpoint_tokenizer(ckpt)
    if tokenizer is None:
        raise ValueError("expected a tokenizer (tokenizer=) or a GGUF file to copy one from (metadata_from=) for "
                         "GGUF metadata, got neither")
    name = meta.get("source") or getattr(model.config, "_name_or_path", "") or type(model).__name__
    kv = {**general_kv(f"{name} (mpokit)"), **provenance_kv(methods), **built,
          **tokenizer_kv(tokenizer, model.config.vocab_size)}
    return kv, "Hugging Face tokenizer", notes


def _file_type(tensors) -> int:
    from gguf import LlamaFileType

    weights = Counter()
    for t in tensors:  # llama.cpp names a file by the type most of its layer weights have
        if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2:
            weights[t.encoded.kind] += t.shape[0] * t.shape[1]
    kind = weights.most_common(1)[0][0] if weights else "F32"
    return int(LlamaFileType[_FILE_TYPES[kind]])


def _row(t) -> dict[str, Any]:
    e = t.encoded
    return {"name": t.name, "hf_name": t.hf_name, "shape": list(t.shape), "type": e.kind, "exact": e.exact,
            "how": e.how, "bytes": e.nbytes, "max_abs_diff": e.max_abs_diff, "inexact_values": e.inexact_values,
            "blocks": e.blocks, "inexact_blocks": e.inexact_blocks}


def export_gguf(model_or_dir, out_path, options: GGUFOptions | None = None, *, tokenizer=None,
                metadata_from=None, overwrite: bool = False) -> dict[str, Any]:
    """Write `model_or_dir` (an mpokit checkpoint folder, or a model in memory) as the GGUF file `out_path`.

    tokenizer: for metadata when no source GGUF is known (a checkpoint folder's own is used otherwise).
    metadata_from: a GGUF file of the same model to copy general/tokenizer metadata from (found on
      its own for checkpoints of a model loaded from a GGUF file, such as the default SmolLM2).
    Returns the report: per tensor its GGUF type, bytes, whether it is exact and, if not, how it was
    converted and the largest change of any weight; and a summary by type.
    """
    options = options or GGUFOptions()
    out = Path(out_path)
    explicit = metadata_from is not None
    if explicit and not Path(metadata_from).is_file():
        raise FileNotFoundError(f"expected a GGUF file to copy metadata from, got a missing path: {metadata_from}")
    ckpt, meta = source_meta(model_or_dir)
    source = Path(metadata_from) if explicit else source_gguf(meta)
    _check_out(out, overwrite, [p for p in (ckpt, source) if p is not None])  # before any slow work
    model = source_model(model_or_dir, ckpt)
    check_architecture(model.config)
    kv, tokenizer_source, notes = _metadata(model, tokenizer, meta, ckpt, source, explicit)
    dense_model, dense_notes = densified_copy(model, keep=GGUF_CODES)
    tensors = collect_tensors(dense_model, options.int4_zero_point, options.convert, options.dense)
    _write_atomic(out, lambda tmp: _write(tmp, kv, tensors), overwrite)
    rows = [_row(t) for t in tensors]
    return {"format": "gguf", "path": str(out), "bytes": out.stat().st_size, "source": meta.get("source"),
            "metadata_from": tokenizer_source, "options": asdict(options), "notes": notes + dense_notes,
            "tensors": rows, "summary": summarize(rows)}


def _write(path: Path, kv, tensors) -> None:
    from gguf import GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(path, "llama")
    write_kv(writer, kv)
    writer.add_file_type(_file_type(tensors))
    writer.add_quantization_version(2)  # GGML_QNT_VERSION: the block layouts written here
    for t in tensors:
        raw = None if t.encoded.kind in ("F32", "F16") else GGMLQuantizationType[t.encoded.kind]
        writer.add_tensor(t.name, t.encoded.data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (GGUF type, how): tensor count, exact count, bytes, largest weight change."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        g = groups.setdefault((r["type"], r["how"]), {"type": r["type"], "how": r["how"], "tensors": 0, "exact": 0,
                                                 "bytes": 0, "max_abs_diff": 0.0, "inexact_blocks": 0})
        g["tensors"] += 1
        g["exact"] += int(r["exact"])
        g["bytes"] += r["bytes"]
        g["max_abs_diff"] = max(g["max_abs_diff"], r["max_abs_diff"])
        g["inexact_blocks"] += r["inexact_blocks"] or 0
    return sorted(groups.values(), key=lambda g: -g["bytes"])
