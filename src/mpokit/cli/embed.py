"""mpokit embed: build a sentence-embedding index from a text file, search it, describe it.

    mpokit embed index docs.txt --out docs.idx --storage binary --rescore int8
    mpokit embed search docs.idx "how do tides work" -k 5
    mpokit embed info docs.idx
"""
from __future__ import annotations

import json
from pathlib import Path

from mpokit.cli.common import UserError, emit_json, positive_int, print_table

HELP = "sentence embeddings: index a text file (float32, int8 or binary vectors) and search it"
_SHOWN_CHARS = 100  # text shown per result row


def add_arguments(p) -> None:
    from mpokit.embed import INT8_MODES, RESCORES, STORAGES

    sub = p.add_subparsers(dest="embed_command", required=True, metavar="{index,search,info}")
    ix = sub.add_parser("index", help="embed every line of a text file and save the index",
                        description="Embed every non-blank line of TEXTFILE (one document per line) and save the "
                                    "vectors with their texts as an index folder.")
    ix.add_argument("textfile", help="UTF-8 text, one document per line (blank lines are skipped)")
    ix.add_argument("--out", required=True, help="index folder to write (an existing one only with --overwrite)")
    ix.add_argument("--storage", default="float32", choices=STORAGES,
                    help="how vectors are stored: float32 (4 bytes/dim), int8 (1 byte/dim, per-dimension ranges), "
                         "binary (1 bit/dim, Hamming search); default float32")
    ix.add_argument("--rescore", default="none", choices=RESCORES,
                    help="binary only: also keep int8 or float32 vectors and rescore the Hamming candidates with "
                         "the float query (default none)")
    ix.add_argument("--rescore-multiplier", type=positive_int, default=4,
                    help="binary + rescore: candidates per result (default 4: 40 candidates for -k 10)")
    ix.add_argument("--int8-mode", default="symmetric", choices=INT8_MODES,
                    help="int8 ranges per dimension: symmetric [-max|x|, max|x|] (default: less clipping, higher "
                         "SQNR on held-out MiniLM vectors) or asymmetric [min, max]")
    ix.add_argument("--calibration", default=None, metavar="TEXTFILE",
                    help="calibrate the int8 ranges on the embeddings of these lines (default: the indexed lines)")
    _encoder_flags(ix)
    ix.add_argument("--overwrite", action="store_true", help="replace an existing index folder at --out")
    ix.add_argument("--json", default=None, help="write a summary of the index as JSON here ('-': stdout)")
    ix.set_defaults(embed_run=run_index)

    se = sub.add_parser("search", help="the k documents of an index nearest to each query",
                        description="Encode each QUERY with the index's encoder and print its k best documents.")
    se.add_argument("index", help="index folder written by `mpokit embed index`")
    se.add_argument("queries", nargs="+", metavar="QUERY", help="query text (several: one table each)")
    se.add_argument("-k", type=positive_int, default=10, help="results per query (default 10)")
    se.add_argument("--rescore-multiplier", type=positive_int, default=None,
                    help="binary + rescore: candidates per result (default: the one saved in the index)")
    se.add_argument("--model", default=None,
                    help="encode queries with this encoder instead of the one the index records (same dimension)")
    se.add_argument("--json", default=None, help="write the results as JSON here ('-': stdout, no tables)")
    se.set_defaults(embed_run=run_search)

    info = sub.add_parser("info", help="what an index holds: count, storage, bytes per vector, encoder")
    info.add_argument("index", help="index folder written by `mpokit embed index`")
    info.add_argument("--json", default=None, help="write the description as JSON here ('-': stdout)")
    info.set_defaults(embed_run=run_info)


def _encoder_flags(p) -> None:
    p.add_argument("--model", default=None,
                   help="encoder: alias minilm (the embedded all-MiniLM-L6-v2, default), HF folder, mpokit "
                        "checkpoint or hub id")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="tokens per text (default: the encoder's, 256 for MiniLM); longer texts are truncated")
    p.add_argument("--batch-size", type=positive_int, default=32, help="texts per encoder batch (default 32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while encoding")


def run(args) -> int:
    return args.embed_run(args)


def read_lines(path: str, flag: str = "TEXTFILE") -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped; an error when there are none."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"expected a text file for {flag}, got the folder {path}")
    if not p.is_file():
        raise FileNotFoundError(f"missing text file: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"expected UTF-8 text in {path}, got undecodable bytes at offset {e.start}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserError(f"expected at least one non-blank line in {path}, got none")
    return lines


def _emit(path: str | None, obj) -> None:
    if path == "-":
        print(json.dumps(obj, indent=2, default=str))
    else:
        emit_json(path, obj)


def run_index(args) -> int:
    from mpokit.embed import EmbeddingIndex, INDEX_MARKER, load_encoder
    from mpokit.io.atomic import check_target

    if args.rescore != "none" and args.storage != "binary":
        raise UserError(f"expected --rescore only with --storage binary, got --storage {args.storage}")
    if args.calibration and "int8" not in (args.storage, args.rescore):
        raise UserError("expected --calibration only with int8 vectors (--storage int8 or --rescore int8), got "
                        f"--storage {args.storage} --rescore {args.rescore}")
    # Inputs and the output first: minutes of encoding must not end in a refusal.
    check_target(args.out, overwrite=args.overwrite, marker=INDEX_MARKER, protect=[args.model, args.textfile],
                 what="an mpokit embedding index")
    texts = read_lines(args.textfile)
    calibration = read_lines(args.calibration, "--calibration") if args.calibration else None
    encoder = load_encoder(args.model, args.max_length)
    index = EmbeddingIndex(dim=encoder.dim, storage=args.storage, rescore=args.rescore, int8_mode=args.int8_mode,
                           rescore_multiplier=args.rescore_multiplier)
    progress = not args.no_progress
    if calibration is not None:
        vectors = encoder.encode(calibration, batch_size=args.batch_size, progress=progress)
        index.calibrate(vectors, f"lines of {args.calibration}")
    index.encode(encoder, texts, batch_size=args.batch_size, progress=progress)
    index.save(args.out, overwrite=args.overwrite)
    summary = {"out": str(args.out), "textfile": str(args.textfile), **index.meta()}
    if args.json != "-":
        _print_info(summary, f"wrote {args.out}")
    _emit(args.json, summary)
    return 0


def _print_info(meta: dict, title: str) -> None:
    rows = [{"name": "vectors", "value": meta["count"]}, {"name": "dimension", "value": meta["dim"]},
            {"name": "storage", "value": meta["storage"] + ("" if meta["rescore"] == "none" else
                                                           f" + {meta['rescore']} rescoring")},
            {"name": "bytes per vector", "value": meta["bytes_per_vector"]},
            {"name": "bytes scanned per vector", "value": meta["search_bytes_per_vector"]},
            {"name": "encoder", "value": (meta.get("encoder") or {}).get("source")}]
    if meta.get("int8_mode"):
        rows.append({"name": "int8 ranges", "value": f"{meta['int8_mode']}, calibrated on {meta['calibration']}"})
    print_table(rows, ["name", "value"], title=title)


def run_search(args) -> int:
    from mpokit.embed import EmbeddingIndex, load_encoder

    index = EmbeddingIndex.load(args.index)
    queries = [q.strip() for q in args.queries]
    if not all(queries):
        raise UserError("expected non-empty query texts, got an empty one")
    source = args.model or index.encoder.get("source")
    if not source:
        raise UserError(f"the index {args.index} records no encoder; name one with --model")
    encoder = load_encoder(source, index.encoder.get("max_length") if not args.model else None)
    if encoder.dim != index.dim:
        raise UserError(f"expected an encoder of dimension {index.dim} (the index's), got {encoder.dim} from {source}")
    ids, scores = index.search(encoder.encode(queries), args.k, rescore_multiplier=args.rescore_multiplier)
    results = []
    for q, row_ids, row_scores in zip(queries, ids.tolist(), scores.tolist()):
        hits = [{"rank": r + 1, "id": i, "score": s, "text": index.texts[i] if index.texts else None}
                for r, (i, s) in enumerate(zip(row_ids, row_scores))]
        results.append({"query": q, "results": hits})
        if args.json != "-":
            rows = [{**h, "text": _short(h["text"])} for h in hits]
            print_table(rows, ["rank", "id", "score", "text"], title=f"{q!r}: top {len(hits)} of {len(index)}")
    out = {"index": str(args.index), "k": args.k, "storage": index.storage, "rescore": index.rescore,
           "encoder": source, "queries": results}
    _emit(args.json, out)
    return 0


def _short(text: str | None) -> str | None:
    if text is None or len(text) <= _SHOWN_CHARS:
        return text
    return text[:_SHOWN_CHARS - 3] + "..."


def run_info(args) -> int:
    from mpokit.embed import EmbeddingIndex

    meta = EmbeddingIndex.load(args.index).meta()
    if args.json != "-":
        _print_info(meta, str(args.index))
    _emit(args.json, {"index": str(args.index), **meta})
    return 0
