"""MPS data-set compression on scikit-learn's digits: train the small CNN on a compressed training set.

The training split of digits_splits (1,077 8x8 images, pixels 0..16 scaled to [0, 1]) is stored
in 4x, 10x and 30x fewer bytes than its float32 originals (256 bytes per image) by
- MPS: one matrix product state per image (mpokit.data.mps, six sites of dimension 2, row and
  column digits interleaved, float16 cores, bytes spread over images by the budget planner);
  where every image at bond 1 (29 bytes) does not fit, MPS + subset: a random subset of images
  as MPSs, its size picked on val accuracy among 29, 45 and 64 bytes per kept image;
  "MPS raster": the same with pixels read row by row instead of interleaved;
- MPS + KD: the same data, trained with a distillation term against a teacher CNN trained on the
  original split (teacher logits on the compressed inputs; the teacher is not counted in the bytes);
- PCA: truncated SVD of the flattened set (float16 mean, basis and coefficients, all counted),
  with and without the same KD term;
- JPEG (Pillow): full JPEG files (headers and tables in every file) and abbreviated JPEG (tables
  stored once, counted once), at the highest quality that fits;
- random subset: the fraction of images that fits, stored as uint8 pixels (lossless for 0..16)
  or as float32.
Every run trains DigitsCNN with Adam for the same number of optimizer steps (30 epochs of the
full split), 3 seeds; accuracy is on the original test split, val accuracy on the original val
split (used only to pick the MPS + subset size).

    python bench/bench_mps_data.py [--threads 1] [--seeds 0 1 2] [--ratios 4 10 30]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: busy-waiting threads slow a shared CPU

import argparse  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from vision_nets import DigitsCNN, Split, accuracy, digits_splits, train_classifier, train_distilled  # noqa: E402

from mpokit.data.mps import compress_dataset  # noqa: E402
from mpokit.ops.mps import LAYOUTS  # noqa: E402
from mpokit.eval.table import print_table  # noqa: E402
from mpokit.io import write_json  # noqa: E402

PIXELS = 64
F32_BYTES, U8_BYTES = 4 * PIXELS, PIXELS  # per image
JPEG_QUALITIES = (1, 2, 3, 5, 8, 10, 15, 20, 25, 30, 40, 50, 60, 70, 80, 90, 95)
HYBRID_BYTES = (29, 45, 64)  # MPS + subset: average bytes per kept image (29 = every bond 1)


def rel_error(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over images of ||x - y|| / ||x||."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    return (torch.linalg.vector_norm(x - y, dim=1) / torch.linalg.vector_norm(x, dim=1)).mean().item()


# ---- compressed sets: (images, labels, bytes, note, kept indices or None) -----------------------------------
def mps_set(train: Split, budget: float, per_image: float, seed: int, layout: str):
    n = len(train.y)
    keep = n if per_image * n <= budget else int(budget // per_image)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:keep].sort().values
    c = compress_dataset(train.x[idx], total_bytes=budget, layout=layout)
    return c.decompress_batch(), train.y[idx], c.nbytes, f"{keep} img, bond {c.bonds.double().mean():.2f}", idx


def pca_set(train: Split, budget: float):
    x = train.x.flatten(1).double()  # (N, 64)
    n = x.shape[0]
    k = int((budget / 2 - PIXELS) // (PIXELS + n))  # float16 mean (64) + basis (k, 64) + coefficients (N, k)
    mean = x.mean(0)
    u, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    basis, coef, mean = vh[:k].half(), (u[:, :k] * s[:k]).half(), mean.half()
    y = (coef.double() @ basis.double() + mean.double()).float().reshape(train.x.shape)
    return y, train.y, 2 * (PIXELS + k * PIXELS + n * k), f"{k} components", None


def _jpeg(img: np.ndarray, quality: int, **kw) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(img, "L").save(b, "JPEG", quality=quality, **kw)
    return b.getvalue()


def jpeg_set(train: Split, budget: float, abbreviated: bool):
    """Highest quality whose real bytes fit: full files (optimize=True: smallest Huffman tables) or
    abbreviated streams (streamtype=2) plus one tables-only stream (streamtype=1)."""
    from PIL import Image

    imgs = (train.x[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()  # (N, 8, 8)
    best = None
    for q in JPEG_QUALITIES:
        if abbreviated:
            size = len(_jpeg(imgs[0], q, streamtype=1)) + sum(len(_jpeg(im, q, streamtype=2)) for im in imgs)
        else:
            size = sum(len(_jpeg(im, q, optimize=True)) for im in imgs)
        if size <= budget or best is None and q == JPEG_QUALITIES[0]:
            best = (q, size)
        if size > budget:
            break
    q, size = best
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(_jpeg(im, q)))) for im in imgs])  # same pixels as above
    y = torch.tensor(decoded, dtype=torch.float32)[:, None] / 255
    return y, train.y, size, f"quality {q}" + ("" if size <= budget else " (lowest; does not fit)"), None


def subset_set(train: Split, budget: float, per_image: int, seed: int):
    n = len(train.y)
    keep = min(n, int(budget // per_image))
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:keep].sort().values
    x = train.x[idx]
    if per_image == U8_BYTES:  # uint8 pixels: the digits' 0..16 values survive the round trip exactly
        x = (x * 16).round().to(torch.uint8).float() / 16
    return x, train.y[idx], keep * per_image, f"{keep} images", idx


# ---- training ------------------------------------------------------------------------------------
def fit(x, y, data, seed: int, steps_epochs: int, teacher=None) -> tuple[float, float]:
    """(test acc, val acc) of a DigitsCNN trained on (x, y) for the optimizer steps of steps_epochs full epochs."""
    n_full = len(data["train"].y)
    epochs = max(1, round(steps_epochs * math.ceil(n_full / 64) / math.ceil(len(y) / 64)))
    torch.manual_seed(seed)
    model = DigitsCNN()
    if teacher is None:
        train_classifier(model, Split(x, y), epochs, seed=seed)
    else:
        train_distilled(model, Split(x, y), teacher, epochs, seed=seed)
    return accuracy(model, data["test"]), accuracy(model, data["val"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ratios", type=float, nargs="+", default=[4, 10, 30])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--out", default=str(ROOT / "results" / "bench_mps_data.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    data = digits_splits(0)
    train = data["train"]
    n = len(train.y)
    runs: dict[tuple, dict] = {}

    def record(method, ratio, seed, made, acc):
        """One seed's run; kept per seed, since the subsets (and the MPS + subset size) depend on the seed."""
        x, y, nbytes, note, idx = made
        r = runs.setdefault((method, ratio), {"method": method, "ratio": ratio, "per seed": [], "test": [], "val": []})
        original = train.x if idx is None else train.x[idx]
        r["per seed"].append({"seed": seed, "bytes": nbytes, "images": len(y), "note": note,
                              "rel err": rel_error(original, x)})  # over the images kept
        r["test"].append(acc[0])
        r["val"].append(acc[1])

    for seed in args.seeds:
        torch.manual_seed(seed)
        teacher = DigitsCNN()
        train_classifier(teacher, train, args.epochs, seed=seed)
        record("original (float32)", 1.0, seed, (train.x, train.y, n * F32_BYTES, "", None),
               (accuracy(teacher, data["test"]), accuracy(teacher, data["val"])))
        for ratio in args.ratios:
            budget = n * F32_BYTES / ratio
            # MPS: every image when each can have bond 1, else the subset size with the best val accuracy
            options = [budget / n] if budget / n >= HYBRID_BYTES[0] else list(HYBRID_BYTES)
            for layout in LAYOUTS:
                tried = []
                for b in options:
                    made = mps_set(train, budget, b, seed, layout)
                    tried.append((fit(*made[:2], data, seed, args.epochs), made))
                acc, made = max(tried, key=lambda t: t[0][1])  # the best val accuracy
                name = ("MPS" if len(made[1]) == n else "MPS + subset") + ("" if layout == "interleaved" else " raster")
                record(name, ratio, seed, made, acc)
                record(name + " + KD", ratio, seed, made, fit(*made[:2], data, seed, args.epochs, teacher))
            made = pca_set(train, budget)
            record("PCA", ratio, seed, made, fit(*made[:2], data, seed, args.epochs))
            record("PCA + KD", ratio, seed, made, fit(*made[:2], data, seed, args.epochs, teacher))
            for abbreviated in (False, True):
                made = jpeg_set(train, budget, abbreviated)
                acc = fit(*made[:2], data, seed, args.epochs) if made[2] <= budget else (None, None)
                record("JPEG abbreviated" if abbreviated else "JPEG files", ratio, seed, made, acc)
            for per, name in ((U8_BYTES, "subset (uint8)"), (F32_BYTES, "subset (float32)")):
                made = subset_set(train, budget, per, seed)
                record(name, ratio, seed, made, fit(*made[:2], data, seed, args.epochs))
        print(f"seed {seed} done at {time.time() - start:.0f} s", file=sys.stderr)

    # Layout check (no training): reconstruction error of interleaved vs raster site order at equal bytes.
    layouts = {}
    for per_image in (29, 45, 64, 100, 128):
        layouts[f"{per_image} B/image"] = {lay: rel_error(train.x, compress_dataset(
            train.x, total_bytes=per_image * n, layout=lay).decompress_batch()) for lay in ("interleaved", "raster")}
    print(f"MPS layouts, mean rel. error at equal bytes: {layouts}", file=sys.stderr)

    rows = []
    for r in runs.values():
        test = [a for a in r["test"] if a is not None]
        seeds = r["per seed"]
        nbytes = max(s["bytes"] for s in seeds)  # a subset's bytes can differ by seed (MPS + subset size)
        images = sorted({s["images"] for s in seeds})
        budget = n * F32_BYTES / r["ratio"]
        rows.append({**r, "budget": "1x" if r["ratio"] == 1 else f"{r['ratio']:g}x", "budget bytes": round(budget),
                     "bytes": nbytes, "bytes/image": nbytes / n, "ratio f32": n * F32_BYTES / nbytes,
                     "ratio u8": n * U8_BYTES / nbytes, "fits": nbytes <= budget + 1e-9,
                     "images": "/".join(str(s["images"]) for s in seeds) if len(images) > 1 else images[0],
                     "rel err": statistics.mean(s["rel err"] for s in seeds),
                     "note": "; ".join(sorted({s["note"] for s in seeds})),
                     "test acc": statistics.mean(test) if test else None,
                     "test std": statistics.stdev(test) if len(test) > 1 else None,
                     "val acc": statistics.mean([a for a in r["val"] if a is not None]) if test else None})
    print_table(rows, ["method", "budget", "bytes", "bytes/image", "ratio f32", "ratio u8", "images", "rel err",
                       "test acc", "test std", "val acc", "note"],
                title=f"DigitsCNN trained on compressed digits ({n} training images), seeds {args.seeds}")
    result = {"bench": "mps_data", "seeds": args.seeds, "epochs": args.epochs, "train_images": n,
              "float32_bytes": n * F32_BYTES, "uint8_bytes": n * U8_BYTES, "rows": rows,
              "mps_layout_rel_error": layouts, "seconds": round(time.time() - start, 1), "threads": args.threads,
              "torch": torch.__version__, "python": platform.python_version(),
              "command": "python bench/bench_mps_data.py " + " ".join(sys.argv[1:])}
    write_json(args.out, result)
    print(f"wrote {args.out} ({time.time() - start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
