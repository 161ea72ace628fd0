"""GPU runs of the command line (issue 14): compress, eval and finetune with --device cuda against --device cpu,
on one machine, in separate processes, on a random-weight Llama at a SmolLM2 shape (bench_scale's models).

Quality means nothing on random weights; what this checks is that each command runs on the accelerator, how
long it takes, how much host (peak RSS) and device memory (torch's peak allocation) it holds, and whether the
two devices agree (each device's checkpoint evaluated on that device). Each step has its own time limit, so
one that hangs or fails is a row with its error, not a lost run. Meant for a machine with a GPU
(scripts/gpu-check.sh runs it there).

  python bench/bench_gpu.py --size 360M --tokenizer DIR --calibration valid.txt --json results/bench_gpu.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_scale import SHAPES, write_synthetic

ROOT = Path(__file__).resolve().parent.parent
COMPRESS = {"gptq": ["--method", "gptq"], "mpo": ["--method", "mpo", "--budget", "0.8"]}


def mpokit(argv: list[str], limit: int, json_path: Path) -> dict:
    """One `python -m mpokit` run in its own process; its JSON report, or the last line of its error."""
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "mpokit", *argv, "--json", str(json_path)], capture_output=True,
                              text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"error": f"over its {limit} s limit"}
    wall = time.perf_counter() - start
    if proc.returncode:
        lines = proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"]
        return {"error": lines[-1][:300], "wall_seconds": wall}
    return {**json.loads(json_path.read_text()), "wall_seconds": wall}


def pick(r: dict, *keys: str) -> dict:
    return {k: r[k] for k in ("error", "wall_seconds", *keys) if k in r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="360M", choices=list(SHAPES))
    ap.add_argument("--tokenizer", required=True, help="folder with the SmolLM2 tokenizer files")
    ap.add_argument("--calibration", required=True, help="calibration text (WikiText-2 valid)")
    ap.add_argument("--tokens", type=int, default=1024, help="calibration tokens")
    ap.add_argument("--methods", nargs="+", default=list(COMPRESS), choices=list(COMPRESS))
    ap.add_argument("--devices", nargs="+", default=["cuda", "cpu"])
    ap.add_argument("--limit", type=int, default=240, help="seconds allowed to each step")
    ap.add_argument("--finetune-steps", type=int, default=20)
    ap.add_argument("--json", default=str(ROOT / "results" / "bench_gpu.json"))
    args = ap.parse_args()
    import torch

    from mpokit.eval.table import print_table

    work = Path(tempfile.mkdtemp(prefix="mpokit-gpu-"))
    model = work / args.size
    params = write_synthetic(args.size, model, Path(args.tokenizer))
    rows = []
    for device in args.devices:  # the accelerator first: a step past the run's end loses a CPU row, not a GPU one
        for method in args.methods:
            out = work / f"{method}-{device}"
            r = mpokit(["compress", "--model", str(model), *COMPRESS[method], "--calibration", args.calibration,
                        "--calibration-tokens", str(args.tokens), "--device", device, "--out", str(out)],
                       args.limit, work / f"{out.name}.json")
            rows.append({"step": f"compress {method}", "device": device,
                         **pick(r, "seconds", "peak_rss_mb", "peak_device_mb", "bytes_after")})
            if "error" in r:
                continue  # nothing to evaluate
            e = mpokit(["eval", str(out), "--text", args.calibration, "--tokens", "2048", "--context", "512",
                        "--device", device], args.limit, work / f"{out.name}-eval.json")
            rows.append({"step": f"eval {method} checkpoint", "device": device,
                         **pick(e, "perplexity", "seconds", "peak_rss_mb", "peak_device_mb")})
        if device != args.devices[0] or not (work / f"{args.methods[0]}-{device}").is_dir():
            continue  # fine-tuning on the CPU would only measure the CPU
        r = mpokit(["finetune", str(work / f"{args.methods[0]}-{device}"), "--method", "full", "--task", "lm",
                    "--data", args.calibration, "--max-steps", str(args.finetune_steps), "--batch-size", "4",
                    "--seq-len", "256", "--tokens", "2048", "--context", "512", "--device", device,
                    "--out", str(work / f"ft-{device}")], args.limit, work / f"ft-{device}.json")
        rows.append({"step": f"finetune full, {args.finetune_steps} steps", "device": device,
                     **pick(r, "perplexity", "train_seconds", "global_step", "peak_device_mb")})
        print_table(rows, ["step", "device", "seconds", "train_seconds", "peak_device_mb", "error"])
    columns = ["step", "device", "seconds", "train_seconds", "wall_seconds", "peak_rss_mb", "peak_device_mb",
               "perplexity", "error"]
    print_table(rows, [c for c in columns if any(c in r for r in rows)], title=f"synthetic {args.size} on the GPU")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    out = {"size": args.size, "params": params, "tokens": args.tokens, "gpu": gpu, "torch": torch.__version__,
           "rows": rows, "command": " ".join(sys.argv)}
    shutil.rmtree(work, ignore_errors=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
