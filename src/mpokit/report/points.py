"""Which fields of a result are size, quality and decode speed, and the points they give.

Bench JSONs name the same quantity differently (perplexity, ppl, ppl_mpokit; disk_mb,
ckpt_mb, weight_bytes). A field is used when at least half of a file's rows hold it as a
number; the first such candidate wins. Sizes are shown in MiB when the field is a byte count,
else in parameters: the two never share an axis.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mpokit.eval.table import fmt
from mpokit.report.collect import CheckpointRecord, TableRecord, as_number

__all__ = ["Point", "Fields", "fields_of", "points", "pareto_front", "SIZE_FIELDS", "QUALITY_FIELDS",
           "DECODE_FIELDS"]

MIB = 2 ** 20
# field -> (unit, factor to that unit)
SIZE_FIELDS = {"bytes": ("MiB", 1 / MIB), "bytes_after": ("MiB", 1 / MIB), "weight_bytes": ("MiB", 1 / MIB),
               "model_bytes": ("MiB", 1 / MIB), "disk_mb": ("MiB", 1.0), "ckpt_mb": ("MiB", 1.0),
               "size_mb": ("MiB", 1.0), "gguf_mb": ("MiB", 1.0), "ct_mb": ("MiB", 1.0), "weight_mb": ("MiB", 1.0),
               "params_after": ("M params", 1e-6), "params_model": ("M params", 1e-6),
               "model_params": ("M params", 1e-6), "params": ("M params", 1e-6)}
# field -> (quality kind, higher is better)
QUALITY_FIELDS = {"perplexity": ("perplexity", False), "ppl": ("perplexity", False),
                  "ppl_mpokit": ("perplexity", False), "ppl_gguf": ("perplexity", False),
                  "ppl_wiki": ("perplexity", False),
                  "accuracy": ("accuracy", True)}
DECODE_FIELDS = ("decode_tok_s", "decode_tokens_per_s", "decode_tps")
_SERIES = ("method", "peer", "recipe", "arm", "family")  # a column that groups rows into lines, when it repeats
_LABEL = ("variant", "method", "peer", "recipe", "arm", "model", "name", "unit")
# settings that tell apart rows of the same name
_SETTINGS = ("budget", "bits", "group", "group_size", "export", "experts", "top_k", "shared_experts", "refit",
             "max_bond", "threads", "tokens")


@dataclass
class Point:
    series: str
    label: str
    size: float  # in `unit`
    unit: str
    quality: float | None = None
    quality_kind: str | None = None
    quality_field: str | None = None
    higher_better: bool = False
    decode: float | None = None
    size_field: str = ""


@dataclass
class Fields:
    size: str | None
    quality: str | None
    decode: str | None


def _pick(rows: list[dict[str, Any]], candidates) -> str | None:
    for name in candidates:
        if 2 * sum(as_number(r.get(name)) is not None for r in rows) >= len(rows):
            return name
    return None


def fields_of(table: TableRecord) -> Fields:
    return Fields(_pick(table.rows, SIZE_FIELDS), _pick(table.rows, QUALITY_FIELDS), _pick(table.rows, DECODE_FIELDS))


def row_labels(rows: list[dict[str, Any]], skip: str | None = None) -> list[str]:
    """A readable name per row: its first naming column (not `skip`, else `skip` itself); where names
    repeat, the settings that tell those rows apart (budget=0.8), and a number where even those agree."""
    key = next((k for k in _LABEL if k != skip and any(isinstance(r.get(k), str) for r in rows)), skip)
    names = [str(r[key]) if key and r.get(key) is not None else "" for r in rows]
    for name in {n for n in names if names.count(n) > 1}:
        same = [i for i, n in enumerate(names) if n == name]
        differ = [c for c in _SETTINGS if len({repr(rows[i].get(c)) for i in same}) > 1]
        for i in same:
            names[i] = " ".join([name] * bool(name) + [f"{c}={fmt(rows[i].get(c))}" for c in differ])
    seen: dict[str, int] = {}
    out = []
    for k, n in enumerate(names):
        seen[n] = seen.get(n, 0) + 1
        out.append((n or f"row {k + 1}") if names.count(n) == 1 else f"{n or 'row'} #{seen[n]}")
    return out


def series_key(table: TableRecord) -> str | None:
    """A column that groups rows into lines: present in every row, with repeating values."""
    return next((k for k in _SERIES if all(k in r for r in table.rows)
                 and len({str(r[k]) for r in table.rows}) < len(table.rows)), None)


def points(records: list[CheckpointRecord | TableRecord]) -> tuple[list[Point], list[str]]:
    """Every plottable point, and one note per input (or row set) that gives none, saying why."""
    pts: list[Point] = []
    notes: list[str] = []
    for rec in records:
        if isinstance(rec, CheckpointRecord):
            pts += _checkpoint_points(rec, notes)
        elif rec.used_by is None:
            pts += _table_points(rec, notes)
    return pts, notes


def _checkpoint_points(ck: CheckpointRecord, notes: list[str]) -> list[Point]:
    if ck.total_bytes is None:
        notes.append(f"{ck.label}: not plotted: its stored size is unknown")
        return []
    if ck.perplexity is None:
        notes.append(f"{ck.label}: only in the size comparison, not in the quality plot: no perplexity "
                     "(its report records none and no `mpokit eval --json` result of it was given)")
    out = [Point("checkpoints", ck.label, ck.total_bytes / MIB, "MiB", ck.perplexity, "perplexity",
                 "perplexity", size_field="stored bytes")]
    if ck.dense_perplexity is not None and ck.dense_bytes is not None:
        out.append(Point("checkpoints", f"{ck.label}: dense", ck.dense_bytes / MIB, "MiB", ck.dense_perplexity,
                         "perplexity", "perplexity", size_field="stored bytes"))
    return out


def _table_points(table: TableRecord, notes: list[str]) -> list[Point]:
    f = fields_of(table)
    if f.size is None:
        notes.append(f"{table.label}: table only: no size field in at least half its rows "
                     f"(looked for {', '.join(SIZE_FIELDS)})")
        return []
    if f.quality is None and f.decode is None:
        notes.append(f"{table.label}: table only: a size ({f.size}) but no quality or decode-speed field "
                     f"(looked for {', '.join(QUALITY_FIELDS)}; {', '.join(DECODE_FIELDS)})")
        return []
    unit, factor = SIZE_FIELDS[f.size]
    kind, higher = QUALITY_FIELDS[f.quality] if f.quality else (None, False)
    out, skipped = [], 0
    key = series_key(table)
    series = [f"{table.label}: {r[key]}" if key else table.label for r in table.rows]
    labels = [""] * len(table.rows)
    for s in dict.fromkeys(series):  # names within a series: what tells its points apart
        at = [i for i, x in enumerate(series) if x == s]
        for i, label in zip(at, row_labels([table.rows[i] for i in at], skip=key)):
            labels[i] = label
    for row, label, name in zip(table.rows, labels, series):
        size = as_number(row.get(f.size))
        quality = as_number(row.get(f.quality)) if f.quality else None
        decode = as_number(row.get(f.decode)) if f.decode else None
        if size is None or (quality is None and decode is None):
            skipped += 1
            continue
        out.append(Point(name, label, size * factor, unit, quality, kind, f.quality, higher, decode, f.size))
    if skipped:
        notes.append(f"{table.label}: {skipped} of {len(table.rows)} rows not plotted: they lack a number in "
                     f"{f.size}" + (f" or {f.quality}" if f.quality else "") + (f"/{f.decode}" if f.decode else ""))
    return out


def pareto_front(pts: list[Point], value: str, higher_better: bool) -> list[Point]:
    """The points no other point beats on both size (smaller) and `value`, by increasing size."""
    front, best = [], None
    for p in sorted(pts, key=lambda p: (p.size, -getattr(p, value) if higher_better else getattr(p, value))):
        v = getattr(p, value)
        if best is None or (v > best if higher_better else v < best):
            front.append(p)
            best = v
    return front
