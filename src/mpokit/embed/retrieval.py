"""An offline retrieval task from WikiText-2: the first sentence of a paragraph finds the rest of it.

WikiText-2 is tokenized text: one paragraph per line, ` = Heading = ` lines for sections, blank
lines around the headings, and ` @-@ `, ` @,@ `, ` @.@ ` for joined punctuation. Consecutive lines
are separate paragraphs (the dataset's own unit): joining them up to the next heading or blank line
would make section-long documents (~2,000 characters on average in test) that a 256-token encoder
truncates. A paragraph with at least
three sentences gives a pair (query = its first sentence, document = the other sentences); every
pair's document is a distractor for every other query. Sentences end at a ` . `, ` ! ` or ` ? `
token (decimal points are ` @.@ `, so they do not split).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Pair", "paragraphs", "split_sentences", "detokenize", "retrieval_pairs", "recall_at_k",
           "wikitext_path"]

_HEADING = re.compile(r"^\s*=.*=\s*$")
_SENTENCE_END = re.compile(r"(?<= [.!?]) (?=\S)")  # the space after a standalone end mark
_JOINERS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
_SPACE_BEFORE = re.compile(r" ([.,;:!?%)\]]|'s\b|n't\b|'re\b|'ve\b|'ll\b|'d\b|'m\b)")
_SPACE_AFTER = re.compile(r"([(\[$]) ")


@dataclass
class Pair:
    query: str
    document: str
    sentences: int  # in the whole paragraph


def wikitext_path(split: str = "test") -> Path:
    """The shared WikiText-2 file of a split (valid, test), through mpokit.data's data folder."""
    from mpokit.data import shared_data_dir

    if split not in ("valid", "test"):
        raise ValueError(f"expected a WikiText-2 split of valid or test, got {split!r}")
    path = shared_data_dir() / "wikitext-2" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"missing WikiText-2 file: {path} (set MPOKIT_DATA to the data folder)")
    return path


def paragraphs(text: str) -> list[str]:
    """The paragraphs of a WikiText file: its lines that are neither blank nor headings (stripped)."""
    return [line.strip() for line in text.splitlines() if line.strip() and not _HEADING.match(line)]


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of one tokenized paragraph (still tokenized)."""
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]


def detokenize(text: str) -> str:
    """Undo WikiText's spacing (`a @-@ b` -> `a-b`, `word ,` -> `word,`) so the encoder sees plain text."""
    for token, joined in _JOINERS:
        text = text.replace(token, joined)
    return _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", text))


def retrieval_pairs(text: str, min_sentences: int = 3, limit: int | None = None) -> list[Pair]:
    """(first sentence, rest of paragraph) for every paragraph of >= min_sentences sentences, in order."""
    if min_sentences < 2:
        raise ValueError(f"expected min_sentences >= 2 (a query and a document), got {min_sentences}")
    pairs = []
    for p in paragraphs(text):
        sentences = split_sentences(p)
        if len(sentences) >= min_sentences:
            pairs.append(Pair(detokenize(sentences[0]), detokenize(" ".join(sentences[1:])), len(sentences)))
            if limit is not None and len(pairs) >= limit:
                break
    return pairs


def recall_at_k(ids: torch.Tensor, truth: torch.Tensor, k: int) -> float:
    """Share of queries whose true id is among their first k results: ids (Q, >=k), truth (Q,)."""
    if ids.dim() != 2 or ids.shape[0] != truth.shape[0] or ids.shape[1] < k:
        raise ValueError(f"expected result ids (Q, >= {k}) for {truth.shape[0]} queries, got {tuple(ids.shape)}")
    return (ids[:, :k] == truth.unsqueeze(1)).any(dim=1).float().mean().item()
