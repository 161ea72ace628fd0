"""mpokit inspect: per-layer layout, bonds, parameters and truncation error of a checkpoint."""
from __future__ import annotations

import math
from pathlib import Path

from mpokit.cli.common import emit_json, print_table

HELP = "show the per-layer layout of a compressed checkpoint (no weights loaded)"


def layer_rows(meta: dict) -> list[dict]:
    from mpokit.ops.tt import core_shapes

    records = {r["name"]: r for r in meta.get("report", {}).get("layers", [])}
    rows = []
    for name, spec in meta["layers"].items():
        row = {"layer": name, "type": spec["type"], "tied_to": spec.get("tied_to")}
        record = records.get(name, {})
        if "bonds" in spec:
            shapes = core_shapes(spec["out_dims"], spec["in_dims"], spec["bonds"])
            sizes = [math.prod(s) for s in shapes]
            rows_, cols = (spec.get("out_features", spec.get("num_embeddings")),
                           spec.get("in_features", spec.get("embedding_dim")))
            row.update(shape=[rows_, cols], out_dims=spec["out_dims"], in_dims=spec["in_dims"], bonds=spec["bonds"],
                       params=sum(sizes), dense_params=rows_ * cols, kept=sum(sizes) / (rows_ * cols),
                       central_share=max(sizes) / sum(sizes), rel_error=record.get("rel_error"))
        elif record:  # other layouts: what the compression report says of the layer
            before, after = record.get("params_before"), record.get("params_after")
            error = record.get("rel_error")
            row.update(shape=record.get("shape"), params=after, dense_params=before,
                       kept=after / before if before and after is not None else None,
                       rel_error=(record.get("detail") or {}).get("rel_error_after") if error is None else error)
        rows.append(row)
    return rows


def add_arguments(p) -> None:
    p.add_argument("path", help="checkpoint folder written by mpokit compress")
    p.add_argument("--json", default=None, help="write one entry per compressed layer as JSON here")


def run(args) -> int:
    from mpokit.io.checkpoint import read_meta

    meta = read_meta(Path(args.path))
    rows = layer_rows(meta)
    print_table(rows, ["layer", "type", "shape", "out_dims", "in_dims", "bonds", "params", "kept", "central_share",
                       "rel_error"], title=f"{args.path}: {len(rows)} compressed layers")
    emit_json(args.json, {"path": str(args.path), "mpokit_version": meta.get("mpokit_version"),
                          "methods": meta.get("methods"), "layers": rows})
    return 0
