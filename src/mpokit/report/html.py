"""The report page: one HTML file, figures inline, every text escaped, nothing fetched.

Number cells carry the exact input value in data-value (what a test or a script reads) and
show it rounded as the terminal tables do (eval.table.fmt).
"""
from __future__ import annotations

import datetime
import html
import json
from typing import Any

from mpokit.eval.table import fmt
from mpokit.report import figures
from mpokit.report.collect import CheckpointRecord, TableRecord, as_number
from mpokit.report.points import Point, fields_of, points, row_labels
from mpokit.version import __version__

__all__ = ["build_page"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1250px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; margin-top: 2em; }
h3 { font-size: 1.05em; }
table { border-collapse: collapse; font-size: 0.8em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; position: sticky; top: 0; }
.scroll { overflow: auto; max-height: 36em; }
figure { margin: 1em 0; } img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption, .note { font-size: 0.85em; color: #555; }
ul.notes li { font-size: 0.85em; color: #7a4b00; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _cell(v: Any) -> str:
    n = as_number(v)
    if n is not None:
        return f'<td class="num" data-value="{_e(repr(v))}">{_e(fmt(v))}</td>'
    if isinstance(v, (dict, list)):
        text = json.dumps(v, default=str)
        return f"<td>{_e(text if len(text) <= 160 else text[:157] + '...')}</td>"
    return f"<td>{_e('' if v is None else v)}</td>"


def table(rows: list[dict[str, Any]], columns: list[str] | None = None, name: str = "") -> str:
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c)) for c in columns) + "</tr>" for r in rows)
    return (f'<div class="scroll"><table class="data" data-table="{_e(name)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


class Page:
    """Collects sections and figures; `figures` counts the images so callers can check them."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.figures: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def figure(self, fig, name: str, caption: str) -> None:
        if fig is None:
            return
        uri = figures.to_data_uri(fig)
        self.figures.append(name)
        self.add(f'<figure><img src="{uri}" alt="{_e(caption)}" data-figure="{_e(name)}">'
                 f"<figcaption>{_e(caption)}</figcaption></figure>")

    def notes(self, notes: list[str], title: str = "Not plotted") -> None:
        if notes:
            self.add(f"<h3>{_e(title)}</h3><ul class=\"notes\">" + "".join(f"<li>{_e(n)}</li>" for n in notes)
                     + "</ul>")


def build_page(records: list[CheckpointRecord | TableRecord], title: str = "mpokit report") -> tuple[str, list[str]]:
    """The page's HTML (ASCII: other characters as entities) and the names of its figures, in order."""
    page = Page()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    page.add(f"<h1>{_e(title)}</h1><p class=\"note\">mpokit {_e(__version__)}, {_e(stamp)}; inputs:</p><ul>"
             + "".join(f"<li>{_e(r.path)}</li>" for r in records) + "</ul>")
    _comparison(page, records)
    for k, rec in enumerate(records):
        if isinstance(rec, CheckpointRecord):
            _checkpoint(page, rec, k)
        else:
            _table_section(page, rec, k)
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n" + "\n".join(page.parts)
           + "\n</body></html>\n")
    return doc.encode("ascii", "xmlcharrefreplace").decode("ascii"), page.figures


def _comparison(page: Page, records) -> None:
    pts, notes = points(records)
    page.add("<h2>Comparison</h2>")
    colors = {s: i for i, s in enumerate(dict.fromkeys(p.series for p in pts))}
    quality = [p for p in pts if p.quality is not None]
    groups = list(dict.fromkeys((p.unit, p.quality_kind) for p in quality))
    for unit, kind in groups:
        group = [p for p in quality if (p.unit, p.quality_kind) == (unit, kind)]
        page.figure(figures.quality_figure(group, unit, kind, colors), f"quality-{kind}-{unit}",
                    f"{kind} vs size in {unit}: {len(group)} points; dashed: each series' Pareto front")
    if not groups:
        notes.append("no quality vs size plot: no input has both a size and a quality (perplexity or accuracy)")
    decode = [p for p in pts if p.decode is not None]
    for unit in dict.fromkeys(p.unit for p in decode):
        group = [p for p in decode if p.unit == unit]
        page.figure(figures.decode_figure(group, unit, colors), f"decode-{unit}",
                    f"decode speed vs size in {unit}: {len(group)} points; dashed: each series' Pareto front")
    if not decode:
        notes.append("no decode speed vs size plot: no input has a decode speed "
                     "(decode_tok_s, as bench/bench_deploy.py writes) beside a size")
    if pts:
        page.add(table([_comparison_row(p) for p in pts], ["series", "row", "size", "unit", "size_field",
                                                              "quality", "quality_field", "decode_tok_s"],
                       name="comparison"))
    page.notes(notes)


def _comparison_row(p: Point) -> dict[str, Any]:
    return {"series": p.series, "row": p.label, "size": p.size, "unit": p.unit, "size_field": p.size_field,
            "quality": p.quality, "quality_field": p.quality_field, "decode_tok_s": p.decode}


def _checkpoint(page: Page, ck: CheckpointRecord, k: int) -> None:
    meta, report = ck.meta, ck.meta.get("report") if isinstance(ck.meta.get("report"), dict) else {}
    page.add(f"<h2>Checkpoint {_e(ck.path)}</h2>")
    methods = ", ".join(str(m.get("method")) for m in meta.get("methods", []) if isinstance(m, dict))
    ratio = (ck.perplexity / ck.dense_perplexity if ck.perplexity is not None and ck.dense_perplexity else None)
    summary = {"source": meta.get("source"), "architecture": meta.get("architecture"), "dtype": meta.get("dtype"),
               "methods": methods, "compressed layers": sum(li.type != "Linear" for li in ck.layers),
               "targeted params before": report.get("params_before"),
               "targeted params after": report.get("params_after"),
               "stored bytes": ck.total_bytes, "dense stored bytes": ck.dense_bytes, "perplexity": ck.perplexity,
               "dense perplexity": ck.dense_perplexity, "perplexity / dense": ratio,
               "perplexity from": ck.perplexity_from}
    page.add(table([{"field": key, "value": v} for key, v in summary.items() if v is not None],
                   ["field", "value"], name=f"checkpoint-{k}-summary"))
    notes = list(ck.notes)
    if ck.perplexity is None:
        notes.append("no perplexity: the checkpoint's report records none; pass `mpokit eval CKPT --json F` "
                     "output (and one of its source model for the dense figure) as inputs")
    elif ck.dense_perplexity is None:
        notes.append("no dense perplexity: pass `mpokit eval` output of the source model "
                     f"({meta.get('source')}) as an input")
    page.figure(figures.breakdown_figure(ck), f"checkpoint-{k}-breakdown",
                f"{ck.label}: where the stored bytes go (safetensors header; no weights loaded)")
    if not figures.heatmap_panels(ck):
        notes.append("no per-layer heatmap: no layer sits in a numbered block")
    page.figure(figures.heatmap_figure(ck), f"checkpoint-{k}-heatmap",
                f"{ck.label}: chosen layout, rank, bits, stored bytes against dense and estimated error per layer "
                f"({', '.join(figures.heatmap_panels(ck))})")
    rows = [{"layer": li.name, "type": li.type, "layout": li.layout, "rank": li.rank, "bits": li.bits,
             "params": li.params, "dense_params": li.dense_params, "kept_params": li.kept_params, "bytes": li.bytes,
             "kept_bytes": li.kept_bytes,
             "rel_error": li.rel_error} for li in ck.layers]
    page.add(f"<h3>Layers ({len(rows)})</h3>")
    page.add(table(rows, name=f"checkpoint-{k}-layers") if rows else "<p class=\"note\">no layer specs</p>")
    page.notes(notes, "Notes")


def _table_section(page: Page, rec: TableRecord, k: int) -> None:
    page.add(f"<h2>Results {_e(rec.path)}</h2>")
    if rec.used_by:
        page.add(f"<p class=\"note\">used as the perplexity of {_e(rec.used_by)}</p>")
    if rec.settings:
        page.add(table([{"field": key, "value": v} for key, v in rec.settings.items()], ["field", "value"],
                       name=f"table-{k}-settings"))
    f = fields_of(rec)
    used = [f"{what}: {name}" for what, name in (("size", f.size), ("quality", f.quality), ("decode", f.decode))
            if name]
    page.add(f"<p class=\"note\">{len(rec.rows)} rows; plotted fields: {_e('; '.join(used) or 'none')}</p>")
    labelled = [{"row": label, **r} for label, r in zip(row_labels(rec.rows), rec.rows)]
    page.add(table(labelled, name=f"table-{k}-rows"))
