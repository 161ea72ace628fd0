"""Low-bit sentence embeddings: WikiText-2 retrieval and zero-shot SST-2 per storage type.

Encoder: the embedded all-MiniLM-L6-v2 (mean pooling + L2 norm, 384 dimensions, 256 tokens).
Retrieval: the first --pairs WikiText-2 test paragraphs (lines of the file) with >= 3 sentences (1502
in all; 1000 by default, to keep the run near 10 minutes at 2 threads); a paragraph's first
sentence is the query, the other sentences its document, and all documents form the index (each
query's document must be found among all of them). Zero-shot SST-2: sentences are indexed, the
two label descriptions are the queries, a sentence takes the label whose description scores
higher; the wording is chosen on dev with float32 vectors, then reported on test.
int8 ranges are calibrated on WikiText-2 *valid* embeddings (queries and documents of its first
--calibration-pairs pairs), for retrieval and SST-2 alike; never on test.

Rows: float32, int8 (symmetric, the default), int8 asymmetric (ablation), binary (Hamming),
binary + int8 rescoring and binary + float32 rescoring (top k*m Hamming candidates rescored with
the float query, m = --rescore-multiplier). Search time: ms per query of the exact scan at
--search-threads threads (default 1; queries already encoded, k = 10), on the real index and on the index tiled
to --scale-to vectors (its codes repeated: the cost of a larger collection).

    python bench/bench_embed.py            # 606 s on the shared 2-core machine (load average ~9), 95% encoding
    python bench/bench_embed.py --pairs 0  # all 1502 test pairs (~13 min there)
Writes results/bench_embed.json and prints a table.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
SETUPS = [("float32", "float32", "none", "symmetric"), ("int8", "int8", "none", "symmetric"),
          ("int8 asymmetric", "int8", "none", "asymmetric"), ("binary", "binary", "none", "symmetric"),
          ("binary + int8 rescore", "binary", "int8", "symmetric"),
          ("binary + float32 rescore", "binary", "float32", "symmetric")]
WORDINGS = [("a negative review", "a positive review"), ("a negative movie review", "a positive movie review"),
            ("this movie is bad", "this movie is good"), ("terrible", "great"),
            ("I hated this film.", "I loved this film."),
            ("a boring, disappointing film", "a wonderful, enjoyable film")]


def build(vectors, storage, rescore, mode, calibration, m):
    from mpokit.embed import EmbeddingIndex

    ix = EmbeddingIndex(vectors.shape[1], storage, rescore=rescore, int8_mode=mode, rescore_multiplier=m)
    if ix.uses_int8:
        ix.calibrate(calibration, "WikiText-2 valid queries and documents")
    ix.add(vectors)
    return ix


def ms_per_query(ix, queries, k, repeats=3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        ix.search(queries, k)
        best = min(best, time.perf_counter() - t0)
    return 1000 * best / queries.shape[0]


def tiled(ix, n):
    """The same index with its codes repeated to n vectors: search cost at a realistic size."""
    from dataclasses import replace

    reps = -(-n // len(ix))
    rep = lambda t: None if t is None else t.repeat(reps, 1)[:n]  # noqa: E731
    return replace(ix, codes=rep(ix.codes), rescore_codes=rep(ix.rescore_codes), texts=None)


def zero_shot(enc, ix_for, sentences_vec, labels, wording, k_all):
    """Accuracy of label = argmax over the two descriptions' scores against each indexed sentence."""
    ix = ix_for(sentences_vec)
    q = enc.encode(list(wording))  # (2, D): negative, positive
    ids, scores = ix.search(q, k=k_all)
    full = torch.empty(2, len(ix)).scatter_(1, ids, scores)  # (2, N) back in sentence order
    pred = (full[1] > full[0]).long()
    return (pred == labels).float().mean().item(), (full[1] == full[0]).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=1000,
                   help="the first N WikiText-2 test pairs (default 1000 of 1502, to stay near 10 min at 2 threads; "
                        "0: all)")
    p.add_argument("--calibration-pairs", type=int, default=300)
    p.add_argument("--sst2-limit", type=int, default=None, help="cap SST-2 dev/test sentences (default: all)")
    p.add_argument("--rescore-multiplier", type=int, default=4)
    p.add_argument("--scale-to", type=int, default=100_000)
    p.add_argument("--timing-queries", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch threads for encoding (default 2)")
    p.add_argument("--search-threads", type=int, default=1,
                   help="torch threads while timing searches (default 1: numpy's popcount uses one, and on a shared "
                        "machine 2 threads time OpenMP waits on small matmuls, not the scan)")
    p.add_argument("--out", default=str(RESULTS / "bench_embed.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from mpokit.data import read_sst2, shared_data_dir
    from mpokit.embed import Int8Ranges, load_encoder, recall_at_k, retrieval_pairs, wikitext_path
    from mpokit.eval.table import print_table
    from mpokit.io.atomic import write_json
    from mpokit.ops.quant import sqnr_db

    start = time.time()
    enc = load_encoder()
    pairs = retrieval_pairs(wikitext_path("test").read_text(), limit=args.pairs or None)
    calib_pairs = retrieval_pairs(wikitext_path("valid").read_text(), limit=args.calibration_pairs)
    t0 = time.time()
    docs = enc.encode([x.document for x in pairs], args.batch_size, progress=True)  # (N, D)
    encode_docs_s = time.time() - t0
    queries = enc.encode([x.query for x in pairs], args.batch_size, progress=True)  # (N, D)
    calibration = enc.encode([x.query for x in calib_pairs] + [x.document for x in calib_pairs], args.batch_size,
                             progress=True)
    sst = {split: read_sst2(shared_data_dir() / "sst2" / f"{split}.tsv", args.sst2_limit) for split in ("dev", "test")}
    sst_vec = {s: enc.encode([t for _, t in rows], args.batch_size, progress=True) for s, rows in sst.items()}
    sst_labels = {s: torch.tensor([lab for lab, _ in rows]) for s, rows in sst.items()}
    encode_s = time.time() - start

    # int8 modes on valid alone (ranges from one half, SQNR on the other), then on the test documents
    calib_stats = {"mean_abs_offset_over_std": (calibration.mean(0).abs() / calibration.std(0)).mean().item()}
    half = calibration[torch.randperm(calibration.shape[0], generator=torch.Generator().manual_seed(0))]
    fit, held = half[: half.shape[0] // 2], half[half.shape[0] // 2:]
    for mode in ("asymmetric", "symmetric"):
        r = Int8Ranges.calibrate(fit, mode)
        calib_stats[f"valid_heldout_sqnr_db_{mode}"] = sqnr_db(held, r.dequantize(r.quantize(held)))
        r = Int8Ranges.calibrate(calibration, mode)
        calib_stats[f"test_docs_sqnr_db_{mode}"] = sqnr_db(docs, r.dequantize(r.quantize(docs)))
        lo, hi = r.dequantize(torch.tensor([[r.code_range[0]], [r.code_range[1]]], dtype=torch.int8).expand(2, r.dim))
        calib_stats[f"test_docs_clipped_fraction_{mode}"] = ((docs < lo) | (docs > hi)).float().mean().item()

    # wording: chosen on dev, float32
    float_ix = lambda v: build(v, "float32", "none", "symmetric", calibration, args.rescore_multiplier)  # noqa: E731
    dev_acc = {" / ".join(w): zero_shot(enc, float_ix, sst_vec["dev"], sst_labels["dev"], w, len(sst["dev"]))[0]
               for w in WORDINGS}
    wording = max(WORDINGS, key=lambda w: dev_acc[" / ".join(w)])

    torch.set_num_threads(args.search_threads)
    truth = torch.arange(len(pairs))
    timing_q = queries[:args.timing_queries]
    rows = []
    for name, storage, rescore, mode in SETUPS:
        ix = build(docs, storage, rescore, mode, calibration, args.rescore_multiplier)
        ids, _ = ix.search(queries, k=10)
        big = tiled(ix, args.scale_to)
        ix_for = lambda v, s=storage, r=rescore, md=mode: build(v, s, r, md, calibration,  # noqa: E731
                                                                args.rescore_multiplier)
        test_acc, ties = zero_shot(enc, ix_for, sst_vec["test"], sst_labels["test"], wording, len(sst["test"]))
        dev, _ = zero_shot(enc, ix_for, sst_vec["dev"], sst_labels["dev"], wording, len(sst["dev"]))
        rows.append({"name": name, "storage": storage, "rescore": rescore, "int8_mode": mode if ix.uses_int8 else None,
                     "recall@1": recall_at_k(ids, truth, 1), "recall@10": recall_at_k(ids, truth, 10),
                     "bytes/vector": ix.bytes_per_vector, "scanned bytes/vector": ix.search_bytes_per_vector,
                     f"ms/query N={len(ix)}": ms_per_query(ix, timing_q, 10),
                     f"ms/query N={args.scale_to}": ms_per_query(big, timing_q[:64], 10, repeats=2),
                     "sst2 dev acc": dev, "sst2 test acc": test_acc, "sst2 test ties": ties})
        print(f"{name}: recall@1 {rows[-1]['recall@1']:.4f}", flush=True)

    columns = ["name", "recall@1", "recall@10", "bytes/vector", "scanned bytes/vector", f"ms/query N={len(pairs)}",
               f"ms/query N={args.scale_to}", "sst2 dev acc", "sst2 test acc"]
    print_table(rows, columns, title=f"WikiText-2 test retrieval ({len(pairs)} queries / documents), zero-shot "
                                     f"SST-2 ({len(sst['test'])} test sentences), MiniLM-L6; encoding "
                                     f"{args.threads} threads, search {args.search_threads}")
    print(f"SST-2 wording (chosen on dev, float32): {wording}; int8 calibration: {calib_stats}")
    write_json(args.out, {
        "encoder": enc.source, "max_length": enc.max_length, "dim": enc.dim, "threads": args.threads,
        "search_threads": args.search_threads, "load_average": os.getloadavg(),
        "pairs": len(pairs), "calibration_pairs": len(calib_pairs), "calibration_vectors": calibration.shape[0],
        "sst2": {s: len(r) for s, r in sst.items()}, "rescore_multiplier": args.rescore_multiplier,
        "scale_to": args.scale_to, "timing_queries": timing_q.shape[0], "wording": list(wording),
        "wording_dev_acc_float32": dev_acc, "int8_calibration": calib_stats, "rows": rows,
        "encode_docs_per_s": len(pairs) / encode_docs_s, "encode_s": encode_s, "elapsed_s": time.time() - start,
        "command": "python bench/bench_embed.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                             for k, v in vars(args).items()
                                                             if v is not None and k != "out")})
    print(f"wrote {args.out} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
