"""mpokit eval: perplexity (and sizes) of a model or checkpoint."""
from __future__ import annotations

from mpokit.cli.common import emit_json, print_table

HELP = "perplexity over the first N tokens of a text in windows of L tokens, plus parameter/byte counts"


def add_arguments(p) -> None:
    p.add_argument("model", nargs="?", default=None, help="checkpoint folder, alias, .gguf or hub id (default: smollm2)")
    p.add_argument("--text", default=None, help="text file (default: offline pydoc corpus shipped with Python)")
    p.add_argument("--dataset", default=None, help="Hugging Face dataset 'name[:config[:split]]' (needs `datasets`)")
    p.add_argument("--tokens", type=int, default=8192, help="tokens to evaluate (default 8192)")
    p.add_argument("--context", type=int, default=512, help="window length (default 512)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", default=None, help="write results as JSON here")


def run(args) -> int:
    from mpokit.eval.perplexity import load_corpus, perplexity
    from mpokit.eval.size import count_params, param_bytes
    from mpokit.io.models import load_model

    corpus = load_corpus(args.text, args.dataset)  # fail on a bad path before loading the model
    loaded = load_model(args.model)
    res = perplexity(loaded.model, loaded.tokenizer, corpus.text, tokens=args.tokens, context=args.context,
                     batch_size=args.batch_size, corpus_name=corpus.name)
    out = {"model": loaded.source, **res.to_dict(), "params": count_params(loaded.model),
           "bytes": param_bytes(loaded.model)}
    print_table([out], ["model", "corpus", "tokens", "context", "perplexity", "params", "bytes", "seconds"])
    emit_json(args.json, out)
    return 0
