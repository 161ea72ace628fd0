"""mpokit eval: perplexity (and sizes) of a model or checkpoint."""
from __future__ import annotations

from mpokit.cli.common import emit_json, print_table

# layers.kv_cache.KV_CACHE_KINDS, spelled out so that parsing arguments does not import transformers
CLI_KV_KINDS = ("decoquant", "rtn", "decoquant-kc", "rtn-kc", "decoquant-kcr", "rtn-kcr", "quanto")
HELP = "perplexity over the first N tokens of a text in windows of L tokens, plus parameter/byte counts"


def add_arguments(p) -> None:
    p.add_argument("model", nargs="?", default=None, help="checkpoint folder, alias, .gguf or hub id (default: smollm2)")
    p.add_argument("--text", default=None, help="text file (default: offline pydoc corpus shipped with Python)")
    p.add_argument("--dataset", default=None, help="Hugging Face dataset 'name[:config[:split]]' (needs `datasets`)")
    p.add_argument("--tokens", type=int, default=8192, help="tokens to evaluate (default 8192)")
    p.add_argument("--context", type=int, default=512, help="window length (default 512)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--kv-cache", default=None, choices=CLI_KV_KINDS,
                   help="evaluate with a quantized KV cache in the loop (windows fed in --chunk pieces); "
                        "-kc: keys per channel over 64-token blocks + 4 16-bit sink tokens (better at 2 bits); "
                        "-kcr: also Hadamard-rotated values (best at 2 bits)")
    p.add_argument("--kv-bits", type=int, default=4, help="KV cache bits (default 4; quanto: 2 or 4)")
    p.add_argument("--kv-residual", type=int, default=None,
                   help="newest tokens kept in 16 bits (default 16; 0 for the -kc caches)")
    p.add_argument("--chunk", type=int, default=None,
                   help="feed each window in pieces of this many tokens through the cache (default 64 with --kv-cache)")
    p.add_argument("--abilities", action="store_true",
                   help="also score in-context learning (SST-2), CoT arithmetic and instruction following")
    p.add_argument("--json", default=None, help="write results as JSON here")


def run(args) -> int:
    from mpokit.eval.perplexity import load_corpus, perplexity
    from mpokit.eval.size import count_params, param_bytes
    from mpokit.io.models import load_model

    corpus = load_corpus(args.text, args.dataset)  # fail on a bad path before loading the model
    loaded = load_model(args.model)
    factory, chunk = None, args.chunk
    if args.kv_cache:
        from mpokit.layers.kv_cache import KVCacheFactory

        factory = KVCacheFactory(args.kv_cache, loaded.model.config, bits=args.kv_bits, residual_length=args.kv_residual)
        chunk = chunk or 64
    res = perplexity(loaded.model, loaded.tokenizer, corpus.text, tokens=args.tokens, context=args.context,
                     batch_size=args.batch_size, corpus_name=corpus.name, cache_factory=factory, chunk=chunk)
    out = {"model": loaded.source, **res.to_dict(), "params": count_params(loaded.model),
           "bytes": param_bytes(loaded.model), "chunk": chunk}
    columns = ["model", "corpus", "tokens", "context", "perplexity", "params", "bytes", "seconds"]
    if factory is not None:
        from mpokit.layers.kv_cache import KV_PRESETS

        residual = args.kv_residual if args.kv_residual is not None else \
            KV_PRESETS.get(args.kv_cache, {}).get("residual_length", 16)
        out.update(kv_cache=args.kv_cache, kv_bits=args.kv_bits, kv_residual=residual,
                   kv_bytes_ratio=factory.bytes_ratio(),
                   kv_eval=f"each window fed in chunks of {chunk} tokens through one cache: later chunks attend "
                           f"to the quantized states of earlier ones; bytes vs a 16-bit cache at window end")
        columns[5:5] = ["kv_cache", "kv_bits", "kv_bytes_ratio"]
    print_table([out], columns)
    if args.abilities:
        from mpokit.eval.abilities import evaluate_abilities

        results = evaluate_abilities(loaded.model, loaded.tokenizer)
        out["abilities"] = {k: r.to_dict() for k, r in results.items()}
        print_table([{"name": k, "score": r.score, "n": r.n, "chance": r.chance, "seconds": r.seconds}
                     for k, r in results.items()], ["name", "score", "n", "chance", "seconds"], title="abilities")
    emit_json(args.json, out)
    return 0
