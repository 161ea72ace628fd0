"""mpokit report: one self-contained HTML page from checkpoints and result JSONs."""
from __future__ import annotations

import sys

HELP = "write one self-contained HTML page (figures inline, opens offline) from checkpoints and result JSONs"


def add_arguments(p) -> None:
    p.add_argument("inputs", nargs="+", metavar="RESULT_OR_DIR",
                   help="mpokit checkpoint folders, bench JSONs (results/*.json) or `mpokit eval --json` outputs; "
                        "an eval JSON of a given checkpoint (or of its source model) gives its (dense) perplexity")
    p.add_argument("--out", required=True, help="the HTML file to write (atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--title", default="mpokit report", help="the page's title")


def run(args) -> int:
    from mpokit.report import write_report

    names = write_report(args.inputs, args.out, overwrite=args.overwrite, title=args.title)
    print(f"wrote {args.out} ({len(names)} figures, {len(args.inputs)} inputs)", file=sys.stderr)
    return 0
