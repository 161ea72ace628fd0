"""One self-contained HTML page from checkpoints and result JSONs (`mpokit report`).

collect reads the inputs into plain records (no weights loaded), points finds their size,
quality and speed fields, figures draws them with matplotlib, html lays out the page.
"""
from __future__ import annotations

from pathlib import Path

from mpokit.io.atomic import OutputPathError, write_text

__all__ = ["build_report", "write_report"]


def build_report(inputs: list[str | Path], title: str = "mpokit report") -> tuple[str, list[str]]:
    """The page's HTML and the names of its figures."""
    from mpokit.report.collect import read_inputs
    from mpokit.report.html import build_page

    return build_page(read_inputs(inputs), title)


def check_output(out: str | Path, overwrite: bool = False) -> None:
    """Refuse an output that exists (unless overwrite) or is not a plain file, before any work."""
    out = Path(out)
    if out.is_dir():
        raise OutputPathError(f"refusing to write {out}: it is a folder; name a file such as report.html")
    if out.exists() and not overwrite:
        raise OutputPathError(f"{out} exists; pass --overwrite to replace it")
    if out.is_symlink():
        raise OutputPathError(f"refusing to replace {out}: it is a symbolic link")


def write_report(inputs: list[str | Path], out: str | Path, *, overwrite: bool = False,
                 title: str = "mpokit report") -> list[str]:
    """Write the page to `out` atomically (a temporary file renamed into place); returns its figure names."""
    check_output(out, overwrite)
    text, names = build_report(inputs, title)
    write_text(out, text)
    return names
