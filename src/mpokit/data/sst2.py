"""SST-2 sentences: the one reader behind fine-tuning data and the in-context-learning probe."""
from __future__ import annotations

import csv
from pathlib import Path

__all__ = ["read_sst2"]


def read_sst2(path: str | Path, limit: int | None = None) -> list[tuple[int, str]]:
    """Rows (label, sentence) of a GLUE-style `label<TAB>text` file with a header line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing SST-2 file: {path} (set MPOKIT_DATA to the data folder)")
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader, None)  # header
        for rec in reader:
            if len(rec) >= 2 and rec[0] in ("0", "1"):
                rows.append((int(rec[0]), rec[1]))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"expected `label<TAB>sentence` rows in {path}, got none")
    return rows
