"""MPO compression of a CNN and an LSTM language model (the original MPO papers' networks), CPU.

(a) DigitsCNN (bench/vision_nets.py: conv 1->32, conv 32->64, fc 256->256->128->10) trained on
    scikit-learn's digits (seeded stratified 60/20/20 split). conv2, fc1 and fc2 (98% of the
    weights; the 1-channel conv1 and the 10-way classifier cannot go 10x under SVD and stay
    dense) are compressed to 10x and 50x fewer parameters with the data-free MPO method
    (3 and 2 cores) and with truncated SVD of the same reshaped matrices (MPOConfig lowrank=True)
    under the same global budget; test accuracy right after compression and after a short
    recovery (Adam, a few epochs). Validation accuracy is printed too; nothing is tuned on test.
(b) LSTMLM (embedding 128, 2-layer LSTM 256, vocabulary of the 5,000 most frequent words of
    WikiText-2 valid) trained for a fixed time on valid.txt, its LSTM compressed to 10x fewer
    weight parameters (MPO vs SVD), perplexity on the first --test-tokens words of test.txt
    before and after the same recovery time. Baselines: the dense model trained on for the recovery
    time too, and a dense 2-layer LSTM with the same number of LSTM weights trained from scratch for
    the dense model's training time plus the recovery time.

    python bench/bench_mpo_nets.py [--threads 1] [--lm-train-s 120] [--lm-recover-s 60] [--skip-lm]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: busy-waiting threads slow a shared CPU

import argparse  # noqa: E402
import copy  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from vision_nets import (LSTMLM, DigitsCNN, Vocab, accuracy, batchify, count_params, digits_splits,  # noqa: E402
                         perplexity, train_classifier, train_lm, wikitext_tokens)

from mpokit import MPOConfig, compress_  # noqa: E402
from mpokit.eval.table import print_table  # noqa: E402
from mpokit.io import write_json  # noqa: E402

CNN_TARGETS = ["conv2", "fc1", "fc2"]
METHODS = {"MPO 3 cores": {"num_cores": 3}, "MPO 2 cores": {"num_cores": 2}, "SVD": {"lowrank": True}}


def targeted_weights(model, names) -> int:
    return sum(getattr(model, n).weight.numel() for n in names)


def rel_error(report) -> float:
    """The largest relative Frobenius error of a compressed matrix (||W - W'|| / ||W||, from TT-SVD)."""
    return max(r.rel_error or 0.0 for r in report.layers)


def bench_cnn(args) -> list[dict]:
    torch.manual_seed(args.seed)
    data = digits_splits(args.seed)
    dense = DigitsCNN()
    train_s = train_classifier(dense, data["train"], args.cnn_epochs, seed=args.seed)
    weights = targeted_weights(dense, CNN_TARGETS)
    rows = [{"net": "cnn", "method": "dense", "ratio": "1x", "target params": weights, "kept": 1.0,
             "test acc": accuracy(dense, data["test"]), "val acc": accuracy(dense, data["val"]),
             "train s": round(train_s, 1), "total params": count_params(dense)}]
    for ratio in args.cnn_ratios:
        for method, kw in METHODS.items():
            model = copy.deepcopy(dense)
            report = compress_(model, MPOConfig(budget=1 / ratio, target_modules=CNN_TARGETS, **kw), progress=False)
            compressed = accuracy(model, data["test"])
            rec_s = train_classifier(model, data["train"], args.recover_epochs, seed=args.seed)
            rows.append({"net": "cnn", "method": method, "ratio": f"{ratio:g}x", "target params": report.params_after,
                         "kept": report.kept_fraction, "rel err": rel_error(report), "compressed acc": compressed,
                         "test acc": accuracy(model, data["test"]), "val acc": accuracy(model, data["val"]),
                         "train s": round(rec_s, 1), "total params": count_params(model),
                         "bonds": {r.name: r.detail["bonds"] for r in report.layers}})
    return rows


def lstm_weights(lm: LSTMLM) -> int:
    return sum(w.numel() for n, w in lm.lstm.named_parameters() if n.startswith("weight"))


def small_hidden(params: int, emb: int, layers: int) -> int:
    """Largest hidden size whose LSTM weights (4h(emb+h) + (layers-1) 4h(2h)) fit in `params`."""
    h = 1
    while 4 * (h + 1) * (emb + h + 1) + (layers - 1) * 8 * (h + 1) ** 2 <= params:
        h += 1
    return h


def bench_lm(args) -> tuple[list[dict], dict]:
    torch.manual_seed(args.seed)
    train_words, test_words = wikitext_tokens("valid"), wikitext_tokens("test")[: args.test_tokens]
    vocab = Vocab(train_words, args.vocab)
    train = batchify(vocab.encode(train_words), args.batch)
    test_ids = vocab.encode(test_words)
    test = batchify(test_ids, 16)
    setup = {"train_tokens": len(train_words), "test_tokens": test.numel(),
             "test_unk_rate": (test_ids == 0).float().mean().item(),
             "vocab": len(vocab), "batch": args.batch, "bptt": 35, "eval": "16 streams, windows of 70, state carried"}
    dense = LSTMLM(len(vocab), args.emb, args.hidden, args.layers)
    run = train_lm(dense, train, args.lm_train_s)
    weights = lstm_weights(dense)
    rows = [{"net": "lstm", "method": "dense", "ratio": "1x", "target params": weights, "kept": 1.0,
             "test ppl": perplexity(dense, test), "steps": run["steps"], "train s": round(run["seconds"], 1),
             "total params": count_params(dense)}]
    more = copy.deepcopy(dense)  # control: the dense model given the recovery time too
    run = train_lm(more, train, args.lm_recover_s)
    rows.append({"net": "lstm", "method": "dense, + recovery time", "ratio": "1x", "target params": weights,
                 "kept": 1.0, "test ppl": perplexity(more, test), "steps": run["steps"],
                 "train s": round(run["seconds"], 1), "total params": count_params(more)})
    for method, kw in (("MPO 3 cores", {"num_cores": 3}), ("SVD", {"lowrank": True})):
        model = copy.deepcopy(dense)
        report = compress_(model, MPOConfig(budget=1 / args.lm_ratio, target_modules=["lstm"], **kw), progress=False)
        before = perplexity(model, test)
        rec = train_lm(model, train, args.lm_recover_s)
        rows.append({"net": "lstm", "method": method, "ratio": f"{args.lm_ratio:g}x",
                     "target params": report.params_after,
                     "kept": report.kept_fraction, "rel err": rel_error(report), "compressed ppl": before,
                     "test ppl": perplexity(model, test), "steps": rec["steps"], "train s": round(rec["seconds"], 1),
                     "total params": count_params(model)})
    h = small_hidden(weights // args.lm_ratio, args.emb, args.layers)
    torch.manual_seed(args.seed)
    small = LSTMLM(len(vocab), args.emb, h, args.layers)
    run = train_lm(small, train, args.lm_train_s + args.lm_recover_s)
    rows.append({"net": "lstm", "method": f"dense, hidden {h}", "ratio": f"{weights / lstm_weights(small):.3g}x",
                 "target params": lstm_weights(small), "kept": lstm_weights(small) / weights,
                 "test ppl": perplexity(small, test), "steps": run["steps"], "train s": round(run["seconds"], 1),
                 "total params": count_params(small)})
    return rows, setup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cnn-epochs", type=int, default=30)
    p.add_argument("--recover-epochs", type=int, default=5)
    p.add_argument("--cnn-ratios", type=float, nargs="+", default=[10, 50])
    p.add_argument("--skip-lm", action="store_true")
    p.add_argument("--lm-train-s", type=float, default=120.0, help="dense LM training time (seconds)")
    p.add_argument("--lm-recover-s", type=float, default=60.0, help="recovery time after compression (seconds)")
    p.add_argument("--lm-ratio", type=int, default=10)
    p.add_argument("--vocab", type=int, default=5000)
    p.add_argument("--emb", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--test-tokens", type=int, default=40_000)
    p.add_argument("--out", default=str(ROOT / "results" / "bench_mpo_nets.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = {"args": vars(args), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              "load_avg_start": os.getloadavg()}
    cnn = bench_cnn(args)
    print_table(cnn, ["method", "ratio", "target params", "kept", "rel err", "compressed acc", "test acc", "val acc",
                      "train s", "total params"], title="DigitsCNN on sklearn digits (360 test images)")
    result["cnn"] = cnn
    if not args.skip_lm:
        lm, setup = bench_lm(args)
        print_table(lm, ["method", "ratio", "target params", "kept", "rel err", "compressed ppl", "test ppl", "steps",
                         "train s", "total params"],
                    title=f"LSTM LM, WikiText-2 (trained on valid, ppl on the first "
                          f"{setup['test_tokens']:,} test tokens)")
        result["lm"], result["lm_setup"] = lm, setup
    result["seconds"], result["load_avg_end"] = time.perf_counter() - start, os.getloadavg()
    write_json(args.out, result)
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
