"""Text corpora: a file, a Hugging Face dataset, or the offline default; and their token ids.

Every calibrated method and every perplexity figure reads its text here, so the default
corpus and the tokenization rule are chosen in one place.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Corpus", "load_corpus", "tokenize_prefix"]


@dataclass
class Corpus:
    text: str
    name: str


def load_corpus(text_file: str | None = None, dataset: str | None = None) -> Corpus:
    """A text file, a Hugging Face dataset ("name[:config[:split]]"), or the offline default.

    The default is the pydoc topics text that ships with CPython, so nothing is downloaded.
    """
    if text_file:
        path = Path(text_file)
        if not path.is_file():
            raise FileNotFoundError(f"missing text file: {path}")
        return Corpus(path.read_text(encoding="utf-8", errors="replace"), str(path))
    if dataset:
        try:
            import datasets
        except ImportError:
            raise ImportError("--dataset needs the `datasets` package: pip install datasets") from None
        name, config, split = (dataset.split(":") + [None, None])[:3]
        ds = datasets.load_dataset(name, config, split=split or "test")
        column = "text" if "text" in ds.column_names else ds.column_names[0]
        return Corpus("\n\n".join(ds[column]), f"hf:{dataset}")
    from pydoc_data.topics import topics

    return Corpus("\n\n".join(topics[k] for k in sorted(topics)), "pydoc_data.topics (offline default, ships with Python)")


def tokenize_prefix(tokenizer, text: str, tokens: int) -> torch.Tensor:
    """Token ids of the start of `text`, at least `tokens` long when the text allows."""
    chars = max(4096, tokens * 8)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) > tokens or chars >= len(text):
            return torch.tensor(ids[:tokens], dtype=torch.long)
        chars *= 2
