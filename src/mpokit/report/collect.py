"""Read report inputs into plain records: checkpoint folders (no weights loaded) and result JSONs.

A checkpoint's per-layer view joins three sources: the layer specs in mpokit.json (layout,
bonds, bits), the compression report stored beside them (kind, error, the layers left dense),
and the safetensors header of the weights file (exact stored bytes per tensor; only the header
is read). A JSON is a bench result when it holds a list of row objects under "rows" (or
"runs"); any other JSON object is one row (e.g. `mpokit eval --json` output).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpokit.io.aligned_read import read_header
from mpokit.io.checkpoint import read_meta, weight_files
from mpokit.ops.tt import count_params

__all__ = ["LayerInfo", "CheckpointRecord", "TableRecord", "read_inputs", "read_input", "as_number"]

_BLOCK = re.compile(r"\.(\d+)\.")  # the first ".<index>." of a module name is its block (depth)
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass
class LayerInfo:
    name: str
    type: str  # class stored in the checkpoint (MPOLinear, QuantLinear, ...); "Linear" when left dense
    layout: str  # what the method chose: lowrank, mpo, dense, int4, ...
    block: int | None  # depth index, None for modules outside the repeated blocks
    kind: str  # the module within its block ("self_attn.q_proj")
    rank: int | None = None  # largest bond
    bits: int | None = None
    params: int | None = None
    dense_params: int | None = None
    bytes: int | None = None
    dense_bytes: int | None = None  # the dense matrices at the checkpoint's dtype
    rel_error: float | None = None

    @property
    def kept_params(self) -> float | None:
        return self.params / self.dense_params if self.params is not None and self.dense_params else None

    @property
    def kept_bytes(self) -> float | None:
        """Stored over dense bytes: what a low rank and fewer bits save together."""
        return self.bytes / self.dense_bytes if self.bytes is not None and self.dense_bytes else None


@dataclass
class CheckpointRecord:
    path: Path
    meta: dict[str, Any]
    layers: list[LayerInfo]
    bytes_by_type: dict[str, int]  # stored bytes per layer type, the whole weights file
    bytes_by_module: dict[str, int]  # stored bytes per module kind
    total_bytes: int | None
    dense_bytes: int | None = None
    perplexity: float | None = None
    dense_perplexity: float | None = None
    perplexity_from: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.path.name or str(self.path)


@dataclass
class TableRecord:
    path: Path
    settings: dict[str, Any]  # top-level fields of the file other than lists
    rows: list[dict[str, Any]]
    is_eval: bool = False  # one `mpokit eval --json` result (a dict with "perplexity" and "model")
    used_by: str | None = None  # the checkpoint this eval result was matched to

    @property
    def label(self) -> str:
        return self.path.name


def read_inputs(paths: list[str | Path]) -> list[CheckpointRecord | TableRecord]:
    """Every input in order; eval JSONs of a given checkpoint (or of its source model) are attached to it."""
    if not paths:
        raise ValueError("expected at least one checkpoint folder or result JSON, got none")
    records = [read_input(p) for p in paths]
    evals = [r for r in records if isinstance(r, TableRecord) and r.is_eval]
    for ck in (r for r in records if isinstance(r, CheckpointRecord)):
        _attach_evals(ck, evals)
    return records


def read_input(path: str | Path) -> CheckpointRecord | TableRecord:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        return read_checkpoint(path)  # read_meta raises CheckpointError (a ValueError) for other folders
    return read_table(path)


def read_table(path: Path) -> TableRecord:
    what = "a result JSON (bench results/*.json or `mpokit eval --json` output) or an mpokit checkpoint folder"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"expected {what}, got {path}: not JSON ({e})") from None
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        return TableRecord(path, {}, data)
    if not isinstance(data, dict):
        raise ValueError(f"expected {what}, got {path}: a JSON {type(data).__name__}, not an object")
    rows = next((data[k] for k in ("rows", "runs") if _is_rows(data.get(k))), None)
    settings = {k: v for k, v in data.items() if _is_scalar(v) or isinstance(v, dict)}
    if rows is not None:
        return TableRecord(path, settings, rows)
    is_eval = as_number(data.get("perplexity")) is not None and isinstance(data.get("model"), str)
    return TableRecord(path, {}, [settings], is_eval=is_eval)


def _is_rows(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(r, dict) for r in v)


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def as_number(v: Any) -> float | None:
    """v as a finite float, None for anything else (booleans, strings, NaN)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


# ---- checkpoints ------------------------------------------------------------------
def read_checkpoint(path: Path) -> CheckpointRecord:
    meta = read_meta(path)
    report = meta.get("report") if isinstance(meta.get("report"), dict) else {}
    notes: list[str] = []
    tensors, matrices = _tensor_bytes(path, notes)
    layers = _layers(meta, report, tensors, notes)
    by_type, by_module = _breakdown(layers, tensors, matrices)
    total = sum(tensors.values()) if tensors else None
    dense = None
    before, after = as_number(report.get("bytes_before")), as_number(report.get("bytes_after"))
    if total is not None and before is not None and after is not None:
        dense = int(total - after + before)  # the untargeted tensors are stored unchanged
    ck = CheckpointRecord(path, meta, layers, by_type, by_module, total, dense, notes=notes)
    ck.perplexity, ck.dense_perplexity = as_number(report.get("perplexity")), as_number(report.get("dense_perplexity"))
    if ck.perplexity is not None:
        ck.perplexity_from = "the checkpoint's recorded report"
    return ck


def _tensor_bytes(path: Path, notes: list[str]) -> tuple[dict[str, int], set[str]]:
    """Stored bytes of every tensor and the names of the 2-D ones, from the safetensors headers (every shard)."""
    sizes, matrices = {}, set()
    try:
        for weights in weight_files(path):
            header = read_header(weights)
            sizes.update({k: int(v["data_offsets"][1]) - int(v["data_offsets"][0]) for k, v in header.items()})
            matrices.update(k for k, v in header.items() if len(v["shape"]) == 2)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        notes.append(f"stored sizes not shown: cannot read the weights' headers in {path} ({e})")
        return {}, set()
    return sizes, matrices


def _layers(meta: dict, report: dict, tensors: dict[str, int], notes: list[str]) -> list[LayerInfo]:
    specs = meta.get("layers") if isinstance(meta.get("layers"), dict) else {}
    records = {r["name"]: r for r in report.get("layers", []) if isinstance(r, dict) and "name" in r}
    if not records:
        notes.append("no compression report in mpokit.json: layers left dense and errors are not known")
    itemsize = _DTYPE_BYTES.get(str(meta.get("dtype")), 4)
    out = []
    for name in list(records) + [n for n in specs if n not in records]:  # the report keeps model order
        spec, rec = specs.get(name, {}), records.get(name, {})
        info = _layer(name, spec, rec)
        owned = [b for t, b in tensors.items() if t.startswith(name + ".")]
        info.bytes = sum(owned) if owned else (info.params * itemsize if info.params and not tensors else None)
        info.dense_bytes = info.dense_params * itemsize if info.dense_params else None
        out.append(info)
    return out


def _layer(name: str, spec: dict, rec: dict) -> LayerInfo:
    m = _BLOCK.search(name)
    block, kind = (int(m.group(1)), name[m.end():]) if m else (None, name.rsplit(".", 1)[-1])
    bonds = spec.get("bonds") or (rec.get("detail") or {}).get("bonds")
    typ = spec.get("type", "Linear")
    info = LayerInfo(name, typ, _layout(spec, rec), block, kind, rank=max(bonds) if bonds else None,
                     bits=spec.get("bits"), rel_error=as_number(rec.get("rel_error")))
    if "out_dims" in spec and bonds:
        info.params = count_params(spec["out_dims"], spec["in_dims"], bonds)
    elif as_number(rec.get("params_after")) is not None:
        info.params = int(rec["params_after"])
    rows = spec.get("out_features", spec.get("num_embeddings"))
    cols = spec.get("in_features", spec.get("embedding_dim"))
    shape = rec.get("shape")
    if rows and cols:
        info.dense_params = int(rows) * int(cols)
    elif as_number(rec.get("params_before")) is not None:  # all matrices a layer replaced (a whole FFN)
        info.dense_params = int(rec["params_before"])
    elif isinstance(shape, list) and len(shape) == 2:
        info.dense_params = int(shape[0]) * int(shape[1])
    return info


def _layout(spec: dict, rec: dict) -> str:
    """The method's chosen layout: the report's kind, else one read off the spec."""
    if isinstance(rec.get("kind"), str):
        return rec["kind"]
    if spec.get("bits") and "bonds" in spec:
        return f"mpo-int{spec['bits']}"
    if spec.get("bits"):
        return f"int{spec['bits']}"
    if "bonds" in spec:
        return "lowrank" if len(spec["bonds"]) == 1 else "mpo"
    return "dense" if not spec else spec.get("type", "?")


def _breakdown(layers: list[LayerInfo], tensors: dict[str, int],
               matrices: set[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Stored bytes by layer type and by module kind; tensors outside the listed layers by name."""
    by_type: dict[str, int] = {}
    by_module: dict[str, int] = {}
    owner = {li.name: li for li in layers}
    if not tensors:  # no header: what the layer specs give
        for li in layers:
            if li.bytes:
                by_type[_type_label(li)] = by_type.get(_type_label(li), 0) + li.bytes
                by_module[li.kind] = by_module.get(li.kind, 0) + li.bytes
        return by_type, by_module
    for t, b in tensors.items():
        module = t.rsplit(".", 1)[0]
        li = owner.get(module) or next((owner[p] for p in _prefixes(module) if p in owner), None)
        typ, kind = (_type_label(li), li.kind) if li else _untargeted(t, matrices)
        by_type[typ] = by_type.get(typ, 0) + b
        by_module[kind] = by_module.get(kind, 0) + b
    return by_type, by_module


def _prefixes(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1)]


def _type_label(li: LayerInfo) -> str:
    return li.type if li.layout in (li.type, "dense") and li.type != "Linear" else f"{li.type} ({li.layout})"


def _untargeted(tensor: str, matrices: set[str]) -> tuple[str, str]:
    """(layer type, module kind) of a tensor no method touched, read off its name and shape."""
    name = tensor.lower()
    if "embed" in name or name.split(".")[-2:-1] in (["wte"], ["wpe"]):
        return "embedding", "embedding"
    if "norm" in name or re.search(r"(^|\.)ln_?\w*\.", name):
        return "norm", "norm"
    if "lm_head" in name:
        return "lm_head", "lm_head"
    module = tensor.rsplit(".", 1)[0]
    if f"{module}.weight" in matrices:  # a weight matrix (and its bias) left as it was
        m = _BLOCK.search(module)
        return "Linear (not targeted)", module[m.end():] if m else module.rsplit(".", 1)[-1]
    return "other", "other"


def _attach_evals(ck: CheckpointRecord, evals: list[TableRecord]) -> None:
    """An eval JSON of this checkpoint gives its perplexity; one of its source model, the dense one."""
    here = ck.path.resolve()
    source = ck.meta.get("source")
    for ev in evals:
        row = ev.rows[0]
        model = row["model"]
        if _same_path(model, here):
            ck.perplexity, ck.perplexity_from = float(row["perplexity"]), ev.label
            ev.used_by = ck.label
        elif source and model == source:
            ck.dense_perplexity = float(row["perplexity"])
            if ck.dense_bytes is None and as_number(row.get("bytes")) is not None:
                ck.dense_bytes = int(row["bytes"])
            ev.used_by = f"{ck.label} (dense model)"


def _same_path(text: str, path: Path) -> bool:
    try:
        return Path(text).expanduser().resolve() == path
    except (OSError, RuntimeError, ValueError):
        return False
