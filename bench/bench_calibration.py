"""Calibration text against quality in and out of domain (issue 18, item 3).

The same compression (mpokit compress's default method at --budget) calibrated on each source in turn:
WikiText-2 valid, the built-in mix (WikiText-2 valid + the second half of the pydoc corpus + SST-2 train
sentences, interleaved) and the offline pydoc corpus alone. Every checkpoint and the dense model are scored
on three texts nobody calibrated on: WikiText-2 *test*, the pydoc corpus's first half (near the mix's docs,
never in it) and the licence texts (legal English; no calibration source is near it). First --tokens tokens
of each, windows of --context; ratios against dense, same run.

Each compression runs through the CLI in its own process and is reused when its folder exists:
  .venv/bin/python bench/bench_calibration.py --out-dir out/calibration
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_recovery import score  # noqa: E402  (the same untuned scoring on several texts)

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {  # name -> --calibration value
    "wikitext-valid": str(ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"),
    "mix": "mix",
    "pydoc": "pydoc",
}


def _texts() -> dict[str, tuple[str, str]]:
    from mpokit.data.corpus import licenses_corpus, pydoc_first_half

    test = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"
    docs, legal = pydoc_first_half(), licenses_corpus()
    return {"wikitext": (test.read_text(encoding="utf-8"), f"WikiText-2 test ({test})"),
            "pydoc": (docs.text, docs.name), "licenses": (legal.text, legal.name)}


def _compress(source: str, folder: Path, args) -> float | None:
    """Seconds of `mpokit compress` (None: the folder existed and is reused)."""
    if folder.exists():
        return None
    cmd = [sys.executable, "-m", "mpokit", "compress", "--budget", str(args.budget), "--out", str(folder),
           "--calibration", SOURCES[source]]
    if args.calibration_tokens:
        cmd += ["--calibration-tokens", str(args.calibration_tokens)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)  # the CLI as a tool, not imported
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", default=",".join(SOURCES), help=f"comma list of {list(SOURCES)}")
    p.add_argument("--budget", type=float, default=0.8)
    p.add_argument("--calibration-tokens", type=int, default=None, help="default: compress's")
    p.add_argument("--out-dir", default=str(ROOT / "out" / "calibration"), help="checkpoints, reused if present")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="torch threads for scoring (default: torch's)")
    p.add_argument("--out", default=str(ROOT / "results" / "bench_calibration.json"))
    args = p.parse_args(argv)
    sources = [s for s in args.sources.split(",") if s]
    if unknown := sorted(set(sources) - set(SOURCES)):
        raise SystemExit(f"unknown sources {unknown}; expected some of {list(SOURCES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from mpokit.eval.table import print_table
    from mpokit.io.atomic import write_json

    texts = _texts()
    dense = {"calibration": "dense (none)", **score(None, texts, args)}
    rows = [dense]
    for source in sources:
        folder = Path(args.out_dir) / f"{source}-{args.budget}"
        seconds = _compress(source, folder, args)
        rows.append({"calibration": source, "checkpoint": str(folder), "compress_seconds": seconds,
                     **score(str(folder), texts, args)})
        for row in rows:
            row.update({f"{k}_x_dense": row[k] / dense[k] for k in texts})
        columns = ["calibration"] + [c for k in texts for c in (k, f"{k}_x_dense")]
        print_table(rows, columns, title=f"perplexity by calibration text, budget {args.budget} ({args.tokens} "
                                         f"tokens, ctx {args.context})")
        write_json(args.out, {"settings": vars(args), "texts": {k: v[1] for k, v in texts.items()},
                              "sources": {s: SOURCES[s] for s in sources}, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
