"""Scale ladder: seconds and peak memory of `mpokit compress` as models grow (issue 14).

Quality is meaningless on random weights; time and memory are not. For each SmolLM2 shape (135M,
360M, 1.7B) a Llama model with random weights is written as sharded safetensors (one decoder block
at a time, so writing it never holds the model), with the embedded model's tokenizer. Each method
then compresses it through the CLI in its own process, with a fixed number of calibration tokens;
the process's peak RSS (VmHWM, before and after saving) and wall time are recorded. The real
default model runs too, streamed and whole (--no-stream), for the before/after of block streaming.
A log-log least-squares fit over the synthetic ladder gives the exponent of cost in parameters.

  .venv/bin/python bench/bench_scale.py --tokens 512          # the full ladder (~1 h on 2 cores)
  .venv/bin/python bench/bench_scale.py --sizes 135M --methods gptq   # a quick look
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

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
# SmolLM2 shapes (hidden, intermediate, layers, heads, kv heads); vocabulary 49152, tied embeddings
SHAPES = {"135M": (576, 1536, 30, 9, 3), "360M": (960, 2560, 32, 15, 5), "1.7B": (2048, 8192, 24, 32, 32)}
METHODS = {"gptq": ["--method", "gptq"], "mpo": ["--method", "mpo", "--budget", "0.8"]}
SHARD_BYTES = 1 << 30


def synthetic_config(size: str):
    from transformers import LlamaConfig

    hidden, inter, layers, heads, kv = SHAPES[size]
    return LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True,
                       max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0)


def write_synthetic(size: str, folder: Path, tokenizer_from: Path) -> int:
    """Random-weight Llama of `size` as shards of about SHARD_BYTES plus an index; returns its parameter count."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    config = synthetic_config(size)
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    skeleton.tie_weights()  # lm_head is the embedding: written once, as transformers writes tied weights
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    files: list[list[str]] = []  # tensor names of each written shard
    total = 0
    for name, p in skeleton.named_parameters():  # a tied lm_head is listed once, as the embedding
        shards[-1][name] = torch.ones(p.shape) if name.endswith("norm.weight") else torch.randn(p.shape, generator=gen) * 0.02
        total += p.numel()
        if sum(t.numel() * 4 for t in shards[-1].values()) >= SHARD_BYTES:
            save_file(shards[-1], folder / f"part-{len(files)}.safetensors", metadata={"format": "pt"})
            files.append(list(shards[-1]))
            shards[-1] = {}
    if shards[-1]:
        save_file(shards[-1], folder / f"part-{len(files)}.safetensors", metadata={"format": "pt"})
        files.append(list(shards[-1]))
    weight_map = {}
    for i, names in enumerate(files):  # transformers' shard names and index
        name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        (folder / f"part-{i}.safetensors").rename(folder / name)
        weight_map.update(dict.fromkeys(names, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total


def run_compress(model: str, method: str, out: Path, tokens: int, stream: bool) -> dict:
    report = out.with_suffix(".json")
    cmd = [str(ROOT / ".venv" / "bin" / "mpokit"), "compress", "--model", model, *METHODS[method],
           "--calibration", str(DATA), "--calibration-tokens", str(tokens), "--out", str(out), "--json", str(report)]
    if not stream:
        cmd.append("--no-stream")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    r = json.loads(report.read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": r["seconds"], "wall_seconds": wall, "peak_rss_mb": r["peak_rss_mb"],
            "peak_rss_with_save_mb": r.get("peak_rss_with_save_mb"), "model_mb": r["model_mb"],
            "bytes_after": r.get("bytes_after"), "streamed": r.get("streamed")}


def fit_exponent(points: list[tuple[float, float]]) -> float | None:
    """Slope of log(y) against log(x) (least squares): y ~ x^slope."""
    if len(points) < 2:
        return None
    xs, ys = zip(*points)
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--tokens", type=int, default=1024, help="calibration tokens, the same for every size")
    ap.add_argument("--no-real", action="store_true", help="skip the real default model (streamed and whole)")
    ap.add_argument("--whole", nargs="*", default=[], choices=list(SHAPES),
                    help="synthetic sizes also run whole (--no-stream); the real model always runs both ways")
    ap.add_argument("--json", default=str(ROOT / "results" / "bench_scale.json"))
    ap.add_argument("--work", default=None, help="folder for the synthetic models (default: a temporary one)")
    args = ap.parse_args()
    from mpokit.eval.table import print_table
    from mpokit.io.models import _gguf_cached, default_gguf_path

    default_folder = _gguf_cached(default_gguf_path())
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mpokit-scale-"))
    rows = []
    cases = [] if args.no_real else [("SmolLM2-135M (real)", "smollm2", None, s) for s in (True, False)]
    for size in args.sizes:
        folder = work / size
        if not (folder / "config.json").is_file():
            print(f"writing the synthetic {size} model to {folder}", flush=True)
            write_synthetic(size, folder, default_folder)
        cases += [(f"synthetic {size}", str(folder), size, s) for s in (True, False) if s or size in args.whole]
    for label, model, size, stream in cases:
        for method in args.methods:
            print(f"{label} {method} {'streamed' if stream else 'whole'} ...", flush=True)
            r = run_compress(model, method, work / f"out-{method}", args.tokens, stream)
            params = r.get("model_mb", 0) * 2**20 / 4
            row = {"model": label, "method": method, "mode": "streamed" if stream else "whole",
                   "params_m": params / 1e6 if params else None, **r}
            if "error" not in r:
                row.update(peak_x_model=r["peak_rss_mb"] / r["model_mb"], s_per_mparam=r["seconds"] / (params / 1e6))
            rows.append(row)
            print_table([row], [c for c in ("model", "method", "mode", "params_m", "seconds", "peak_rss_mb",
                                             "peak_x_model", "s_per_mparam", "error") if c in row])
    fits = {}
    for method in args.methods:
        pts = [(r["params_m"], r) for r in rows if r["method"] == method and r["mode"] == "streamed"
               and r["model"].startswith("synthetic") and "error" not in r]
        fits[method] = {"seconds_exponent": fit_exponent([(p, r["seconds"]) for p, r in pts]),
                        "peak_rss_exponent": fit_exponent([(p, r["peak_rss_mb"]) for p, r in pts]),
                        "sizes": [r["model"] for _, r in pts]}
    columns = ["model", "method", "mode", "params_m", "seconds", "s_per_mparam", "peak_rss_mb", "peak_x_model",
               "peak_rss_with_save_mb", "error"]
    print_table(rows, [c for c in columns if any(c in r for r in rows)], title="compress cost by model size")
    print_table([{"method": m, **f} for m, f in fits.items()], ["method", "seconds_exponent", "peak_rss_exponent"],
                title="fitted exponent in parameters (streamed, synthetic ladder)")
    out = {"tokens": args.tokens, "rows": rows, "fits": fits, "command": " ".join(sys.argv)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
