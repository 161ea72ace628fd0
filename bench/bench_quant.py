"""Quantization benchmarks: low-bit weights vs peers, DecoQuant KV cache, abilities, MiniLM.

Parts (each writes results/bench_quant_<part>.json and prints a table; baselines run in the
same invocation, so every ratio compares numbers measured side by side):
  weights    SmolLM2 decoder linears at 8/4/3/2 bits, group 128 and 64 (NOT 32: the model comes
             from a Q4_1 GGUF, groups of 32, where 4-bit re-quantization is lossless by
             construction); mpokit (RTN, integer zero points), its ablations mpokit-float (16-bit
             float offset = group minimum, as quanto stores) and mpokit-clip (MSE clip search),
             optimum-quanto, torchao (when importable), gptq (mpokit's GPTQ with the input-energy
             weighted range search, `--method gptq`, calibrated on the first --calib-tokens tokens of
             WikiText-2 valid; not run at 8 bits) and its ablation gptq-minmax (plain min/max group
             ranges); WikiText-2 test perplexity, weight bytes.
  kv         KV cache at 8/4/2 bits: DecoQuant (per-token, as published), RTN (ablation), the
             -kc variants (keys per channel in 64-token blocks + 4 sink tokens), the -kcr variants
             (-kc + Hadamard-rotated values / value large cores), transformers
             QuantizedCache (quanto backend); each 512-token window is fed in chunks of 64 tokens
             through one cache, so chunks 2..8 attend to the quantized states of the earlier ones.
  abilities  ICL (k-shot SST-2), CoT arithmetic, instruction following at dense/8/4/3/2-bit RTN
             weights and --ability-gptq-bits GPTQ weights.
  minilm     float32 all-MiniLM-L6-v2 encoder: weight SQNR and sentence-embedding cosine vs the
             float model on SST-2 dev sentences (GPTQ calibrated on SST-2 train sentences).

    python bench/bench_quant.py --parts weights kv abilities minilm
    python bench/bench_quant.py --parts weights --tokens 2048 --bits 4 --groups 128
torchao changes what `import transformers` does once installed (it imports torchao eagerly),
so it is not a project dependency: install it to a side folder and pass --peer-path:
    pip install --no-deps --target /tmp/mpokit-peers torchao==0.18.0
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "results"


SUFFIX = [""]  # --suffix: results/bench_quant_<part><suffix>.json


def _save(part: str, payload: dict) -> None:
    from mpokit.io.atomic import write_json

    write_json(RESULTS / f"bench_quant_{part}{SUFFIX[0]}.json", payload)


def _ppl(model, tok, args, **kw) -> float:
    from mpokit.eval.perplexity import perplexity

    text = (DATA / "wikitext-2" / "test.txt").read_text()
    return perplexity(model, tok, text, tokens=args.tokens, context=args.context, progress=False, **kw).perplexity


def _tensor_bytes(t) -> int:
    from mpokit.layers.kv_cache import _tensor_bytes as tb

    return tb(t)


def _module_weight_bytes(model, names) -> int:
    """Bytes of the stored weights (codes + scales + zero points) of the named layers, as they sit in memory."""
    from mpokit.layers.quant import QuantLinear
    from mpokit.surgery import get_module

    total = 0
    for n in names:
        m = get_module(model, n)
        if isinstance(m, QuantLinear):
            total += m.qweight.storage_bytes()
        else:
            total += _tensor_bytes(m.weight)
    return total


def peer_group(in_features: int, group: int) -> int:
    """The group a divisor-only peer can use: `group`, else the largest multiple of 32 below it that
    divides in_features (quanto's own rule; e.g. 96 for SmolLM2's 576 columns at group 128)."""
    g = group
    while in_features % g and g > 32:
        g -= 32
    return g if in_features % g == 0 else in_features


def quantize_quanto(model, names, bits: int, group: int) -> str:
    from optimum.quanto import freeze, qint2, qint4, qint8, quantize

    qtype = {8: qint8, 4: qint4, 2: qint2}.get(bits)
    if qtype is None:
        raise ValueError(f"optimum-quanto has no {bits}-bit weights")
    quantize(model, weights=qtype, include=list(names))
    from mpokit.surgery import get_module

    used = set()
    for n in names:
        m = get_module(model, n)
        if bits != 8:
            m.weight_group_size = peer_group(m.in_features, group)
            used.add(m.weight_group_size)
    freeze(model)
    return "per-channel (quanto 8-bit has no groups)" if bits == 8 else f"groups {sorted(used)}"


def quantize_torchao(model, names, bits: int, group: int) -> str:
    import torch
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, quantize_
    from torchao.quantization.granularity import PerGroup

    used = set()
    name_set = set(names)
    by_group: dict[int, set] = {}
    for n, m in model.named_modules():
        if n in name_set:
            by_group.setdefault(peer_group(m.in_features, group), set()).add(n)
    for g, members in by_group.items():
        cfg = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(g),
                                   mapping_type=MappingType.ASYMMETRIC)
        quantize_(model, cfg, filter_fn=lambda mod, fqn, members=members: fqn in members)
        used.add(g)
    return f"asymmetric, groups {sorted(used)}"


def mpokit_config(peer: str, bits: int, group: int, **kw):
    """mpokit: RTN with integer zero points; gptq: the same grid, GPTQ on calibration text; the
    ablations swap in a float offset (the group minimum, as quanto stores) or the MSE clip search."""
    from mpokit.methods import GPTQConfig, QuantConfig

    if peer in ("gptq", "gptq-minmax"):  # what `mpokit compress --method gptq` runs (minmax: no range search)
        return GPTQConfig(bits=bits, group_size=group, **({"clip_search": False} if peer == "gptq-minmax" else {}), **kw)
    extra = {"mpokit-float": {"zero_point": False}, "mpokit-clip": {"clip_search": True}}.get(peer, {})
    return QuantConfig(bits=bits, group_size=group, **extra, **kw)


def part_weights(args) -> dict:
    from mpokit import compress_, load_model
    from mpokit.eval.size import param_bytes
    from mpokit.methods import QuantConfig
    from mpokit.surgery import find_targets

    loaded = load_model(None)
    dense, tok = loaded.model, loaded.tokenizer
    names = find_targets(dense)
    t = time.perf_counter()
    base = _ppl(dense, tok, args)
    out = {"model": loaded.source, "corpus": "WikiText-2 test", "tokens": args.tokens, "context": args.context,
           "targets": "decoder linear layers (q,k,v,o,gate,up,down); embeddings/lm_head stay float32",
           "dense": {"perplexity": base, "weight_bytes": _module_weight_bytes(dense, names),
                     "model_bytes": param_bytes(dense), "seconds": time.perf_counter() - t},
           "runs": []}
    print(f"dense perplexity {base:.3f}", flush=True)
    args.calib_context = args.calib_context or QuantConfig().calibration_context
    calib = {"tokenizer": tok, "calibration_text": (DATA / "wikitext-2" / "valid.txt").read_text()}
    out["gptq_calibration"] = f"WikiText-2 valid, first {args.calib_tokens} tokens, windows of {args.calib_context}"
    peers = ["mpokit", "gptq", "gptq-minmax", "mpokit-float", "mpokit-clip", "quanto"] + \
        (["torchao"] if _has("torchao") else [])
    peers = [p for p in peers if p in args.peers]
    for group in args.groups:
        for bits in args.bits:
            for peer in peers:
                if (peer == "quanto" and bits == 3) or (peer.startswith("gptq") and bits == 8):
                    continue
                model = copy.deepcopy(dense)
                t = time.perf_counter()
                note = ""
                is_gptq = peer.startswith("gptq")
                if peer.startswith("mpokit") or is_gptq:
                    calib_size = {"calibration_tokens": args.calib_tokens, "calibration_context": args.calib_context}
                    cfg = mpokit_config(peer, bits, group, **(calib_size if is_gptq else {}))
                    rep = compress_(model, cfg, progress=False, **(calib if is_gptq else {}))
                    sqnr = sum(r.detail["sqnr_db"] for r in rep.layers) / len(rep.layers)
                    groups = sorted({r.detail["group_size"] for r in rep.layers})
                    note = f"groups {groups}, mean layer SQNR {sqnr:.2f} dB"
                    if is_gptq:
                        out_err = [r.detail["output_rel_error"] / r.detail["rtn_output_rel_error"] for r in rep.layers]
                        note += (f", {rep.extra['calibration_tokens']} calibration tokens, layer output error "
                                 f"{sum(out_err) / len(out_err):.2f}x RTN's (mean)")
                elif peer == "quanto":
                    note = quantize_quanto(model, names, bits, group)
                else:
                    note = quantize_torchao(model, names, bits, group)
                qsec = time.perf_counter() - t
                ppl = _ppl(model, tok, args)
                row = {"peer": peer, "bits": bits, "group": group, "perplexity": ppl, "ppl_ratio": ppl / base,
                       "weight_bytes": _module_weight_bytes(model, names), "note": note,
                       "quantize_seconds": qsec, "seconds": time.perf_counter() - t}
                row["weight_bytes_ratio"] = row["weight_bytes"] / out["dense"]["weight_bytes"]
                out["runs"].append(row)
                print(json.dumps(row), flush=True)
                _save("weights", out)
                del model
                gc.collect()
    return out


def part_kv(args) -> dict:
    from mpokit import load_model
    from mpokit.methods.kv_cache import KV_PRESETS, KVCacheFactory

    loaded = load_model(None)
    model, tok = loaded.model, loaded.tokenizer
    t = time.perf_counter()
    base = _ppl(model, tok, args, chunk=args.chunk)
    out = {"model": loaded.source, "corpus": "WikiText-2 test", "tokens": args.tokens, "context": args.context,
           "chunk": args.chunk,
           "how": f"each {args.context}-token window fed in chunks of {args.chunk} tokens through one cache (chunks "
                  f"2.. attend to the quantized states of earlier ones); bytes = cache contents at window end "
                  f"(codes, scales, zero points/offsets, small cores, 16-bit window and sinks) vs a 16-bit cache of "
                  f"the same tokens; baseline = the same chunked evaluation with transformers' DynamicCache",
           "presets": {k: v for k, v in KV_PRESETS.items() if k in args.kv_kinds},
           "baseline": {"perplexity": base, "seconds": time.perf_counter() - t}, "runs": []}
    print(f"baseline (chunked, DynamicCache) perplexity {base:.3f}", flush=True)
    for bits in args.kv_bits:
        for kind in args.kv_kinds:
            if kind == "quanto" and bits not in (2, 4):
                continue
            factory = KVCacheFactory(kind, model.config, bits=bits, residual_length=args.residual)
            t = time.perf_counter()
            ppl = _ppl(model, tok, args, chunk=args.chunk, cache_factory=factory)
            row = {"kind": kind, "bits": bits, "residual": factory.method.residual_length, "perplexity": ppl, "ppl_ratio": ppl / base,
                   "kv_bytes_ratio": factory.bytes_ratio(), "seconds": time.perf_counter() - t}
            out["runs"].append(row)
            print(json.dumps(row), flush=True)
            _save("kv", out)
    return out


def part_abilities(args) -> dict:
    from mpokit import compress_, load_model
    from mpokit.eval.abilities import evaluate_abilities
    from mpokit.methods import QuantConfig

    loaded = load_model(None)
    dense, tok = loaded.model, loaded.tokenizer
    sizes = {"icl_n": args.icl_n, "icl_k": 4, "cot_n": args.cot_n, "if_n": args.if_n}
    out = {"model": loaded.source, "group": args.ability_group, "sizes": sizes, "seed": 0, "runs": []}
    calib = {"tokenizer": tok, "calibration_text": (DATA / "wikitext-2" / "valid.txt").read_text()}
    settings = [(None, "rtn")] + [(b, "rtn") for b in args.bits] + [(b, "gptq") for b in args.ability_gptq_bits]
    for bits, algo in settings:
        model = dense if bits is None else copy.deepcopy(dense)
        if bits is not None:
            cfg = mpokit_config("gptq" if algo == "gptq" else "mpokit", bits, args.ability_group)
            compress_(model, cfg, progress=False, **(calib if algo == "gptq" else {}))
        t = time.perf_counter()
        res = evaluate_abilities(model, tok, **sizes, data_dir=DATA)
        name = f"int{bits} g{args.ability_group}" + (" GPTQ" if algo == "gptq" else "")
        row = {"weights": "dense fp32" if bits is None else name,
               **{k: r.score for k, r in res.items()}, "seconds": time.perf_counter() - t,
               "detail": {k: r.to_dict() for k, r in res.items()}}
        out["runs"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "detail"}), flush=True)
        _save("abilities", out)
        if bits is not None:
            del model
            gc.collect()
    return out


def _embed(model, tok, sentences, batch: int = 32):
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, len(sentences), batch):
            enc = tok(sentences[i:i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
            h = model(**enc).last_hidden_state  # (B, T, 384)
            mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            outs.append(torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1))  # mean pooling
    return torch.cat(outs)


def part_minilm(args) -> dict:
    from transformers import AutoModel, AutoTokenizer

    from mpokit import compress_
    from mpokit.io.models import minilm_path
    from mpokit.surgery import find_targets
    from mpokit.train.data import read_sst2

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    sentences = [text for _, text in read_sst2(DATA / "sst2" / "dev.tsv", limit=args.minilm_n)]
    ref = _embed(dense, tok, sentences)
    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    names = find_targets(dense, targets)
    out = {"model": "all-MiniLM-L6-v2 (float32)", "sentences": f"first {len(sentences)} SST-2 dev sentences",
           "metric": "cosine(mean-pooled normalized embedding, float model's); weight SQNR over encoder linears",
           "dense_weight_bytes": _module_weight_bytes(dense, names), "runs": []}
    train = [text for _, text in read_sst2(DATA / "sst2" / "train.tsv", limit=4000)]
    calib = {"tokenizer": tok, "calibration_text": " ".join(train)}  # train sentences, never dev
    for group in args.groups:
        for bits in args.bits:
            for peer in [p for p in ("mpokit", "gptq", "mpokit-float", "quanto") if p in args.peers]:
                if (peer == "quanto" and bits == 3) or (peer == "gptq" and bits == 8):
                    continue
                model = copy.deepcopy(dense)
                note, sqnr = "", None
                if peer.startswith("mpokit") or peer == "gptq":
                    cfg = mpokit_config(peer, bits, group, target_modules=targets)
                    rep = compress_(model, cfg, progress=False, **(calib if peer == "gptq" else {}))
                    sqnr = sum(r.detail["sqnr_db"] for r in rep.layers) / len(rep.layers)
                else:
                    note = quantize_quanto(model, names, bits, group)
                    sqnr = _quanto_sqnr(dense, model, names)
                cos = (_embed(model, tok, sentences) * ref).sum(-1)
                row = {"peer": peer, "bits": bits, "group": group, "mean_cosine": cos.mean().item(),
                       "min_cosine": cos.min().item(), "mean_weight_sqnr_db": sqnr,
                       "weight_bytes_ratio": _module_weight_bytes(model, names) / out["dense_weight_bytes"], "note": note}
                out["runs"].append(row)
                print(json.dumps(row), flush=True)
                _save("minilm", out)
    return out


def _quanto_sqnr(dense, model, names) -> float:
    from mpokit.ops.quant import sqnr_db
    from mpokit.surgery import get_module

    vals = [sqnr_db(get_module(dense, n).weight, get_module(model, n).weight.dequantize()) for n in names]
    return sum(vals) / len(vals)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


TABLE_COLUMNS = {
    "weights": ["peer", "bits", "group", "perplexity", "ppl_ratio", "bits_per_weight", "note"],
    "kv": ["kind", "bits", "residual", "perplexity", "ppl_ratio", "kv_bytes_ratio"],
    "abilities": ["weights", "icl_sst2", "cot_arithmetic", "instruction_following"],
    "minilm": ["peer", "bits", "group", "mean_cosine", "min_cosine", "mean_weight_sqnr_db", "bits_per_weight"],
}


def _markdown(rows: list[dict], cols: list[str]) -> str:
    from mpokit.eval.table import fmt

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def print_tables(markdown: bool = False) -> None:
    from mpokit.eval.table import print_table

    for part, cols in TABLE_COLUMNS.items():
        for path in sorted(RESULTS.glob(f"bench_quant_{part}*.json")):
            data = json.loads(path.read_text())
            for r in data["runs"]:  # stored bytes per weight, scales and zero points included (dense: 32)
                if "weight_bytes_ratio" in r:
                    r["bits_per_weight"] = 32 * r["weight_bytes_ratio"]
            if markdown:
                print(f"\n{path.name}\n\n{_markdown(data['runs'], cols)}")
            else:
                print_table(data["runs"], cols, title=f"{path.name}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=["weights", "kv", "abilities", "minilm"],
                   choices=["weights", "kv", "abilities", "minilm"])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    p.add_argument("--groups", type=int, nargs="+", default=[128, 64])
    p.add_argument("--peers", nargs="+", default=["mpokit", "gptq", "quanto", "torchao"],
                   help="also: gptq-minmax, mpokit-float, mpokit-clip (ablations)")
    p.add_argument("--calib-tokens", type=int, default=8192, help="GPTQ calibration tokens (WikiText-2 valid)")
    p.add_argument("--calib-context", type=int, default=None, help="GPTQ calibration window (default: QuantConfig's)")
    p.add_argument("--peer-path", default=None, help="extra folder on sys.path (e.g. a side install of torchao)")
    p.add_argument("--kv-bits", type=int, nargs="+", default=[8, 4, 2])
    p.add_argument("--kv-kinds", nargs="+",
                   default=["decoquant", "rtn", "decoquant-kc", "rtn-kc", "decoquant-kcr", "rtn-kcr", "quanto"])
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--residual", type=int, default=None, help="16-bit window (default: each preset's)")
    p.add_argument("--ability-group", type=int, default=128)
    p.add_argument("--ability-gptq-bits", type=int, nargs="*", default=[4, 3], help="abilities with GPTQ weights")
    p.add_argument("--icl-n", type=int, default=100)
    p.add_argument("--cot-n", type=int, default=30)
    p.add_argument("--if-n", type=int, default=27)
    p.add_argument("--minilm-n", type=int, default=872)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--suffix", default="", help="results/bench_quant_<part><suffix>.json (e.g. _g64)")
    p.add_argument("--tables-only", action="store_true", help="print the tables of the saved results")
    p.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    args = p.parse_args()
    SUFFIX[0] = args.suffix
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.peer_path:
        sys.path.insert(0, args.peer_path)
    if not args.tables_only:
        for part in args.parts:
            {"weights": part_weights, "kv": part_kv, "abilities": part_abilities, "minilm": part_minilm}[part](args)
    print_tables(args.markdown)


if __name__ == "__main__":
    main()
