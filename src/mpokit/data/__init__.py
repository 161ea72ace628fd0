"""Data for calibration, evaluation and training: corpora and their tokenization (below eval and methods)."""
from mpokit.data.corpus import Corpus, load_corpus, tokenize_prefix

__all__ = ["Corpus", "load_corpus", "tokenize_prefix"]
