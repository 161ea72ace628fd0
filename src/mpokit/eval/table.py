"""Tables for people: one rich table per call, shared by the CLI and the bench scripts."""
from __future__ import annotations

from typing import Any, Iterable

__all__ = ["fmt", "print_table"]

_LEFT = ("name", "model", "method", "corpus", "layer", "type")


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    if isinstance(v, (list, tuple)):
        return "x".join(str(x) for x in v)
    return "" if v is None else str(v)


def print_table(rows: Iterable[dict[str, Any]], columns: list[str], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c in _LEFT else "right")
    for r in rows:
        table.add_row(*(fmt(r.get(c)) for c in columns))
    console = Console()
    if not console.is_terminal:  # pipes and logs: do not squeeze columns into 80 chars
        console = Console(width=200)
    console.print(table)
