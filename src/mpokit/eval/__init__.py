from mpokit.eval.perplexity import Corpus, PerplexityResult, load_corpus, perplexity, tokenize_prefix
from mpokit.eval.size import count_params, param_bytes, size_report

__all__ = ["Corpus", "PerplexityResult", "load_corpus", "perplexity", "tokenize_prefix", "count_params",
           "param_bytes", "size_report"]
