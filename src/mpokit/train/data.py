"""Datasets for the Trainer wrappers: causal-LM windows of a text, SST-2 sentences; the held-out tail of a text."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mpokit.data import read_sst2, shared_data_dir  # re-exported: the one reader and data-folder rule

__all__ = ["TextWindows", "SST2", "read_sst2", "shared_data_dir", "HeldOut", "hold_out_tail", "read_text", "same_text"]


class TextWindows(Dataset):
    """Non-overlapping windows of `seq_len` tokens of one text; labels = input ids (HF shifts them)."""

    def __init__(self, tokenizer, text: str, seq_len: int = 128, max_windows: int | None = None):
        if seq_len < 2:
            raise ValueError(f"expected seq_len >= 2, got {seq_len}")
        ids = tokenizer(text, return_tensors="pt").input_ids[0]  # (T,)
        n = len(ids) // seq_len
        if max_windows is not None:
            n = min(n, max_windows)
        if n < 1:
            raise ValueError(f"expected a text of at least {seq_len} tokens, got {len(ids)}")
        self.windows = ids[: n * seq_len].reshape(n, seq_len)  # (n, seq_len)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        w = self.windows[i]
        return {"input_ids": w, "labels": w.clone()}


class SST2(Dataset):
    """Tokenized SST-2 rows; pad in the collator (transformers.DataCollatorWithPadding)."""

    def __init__(self, tokenizer, path: str | Path, max_len: int = 64, limit: int | None = None):
        rows = read_sst2(path, limit)
        enc = tokenizer([s for _, s in rows], truncation=True, max_length=max_len)
        self.items = [{"input_ids": enc["input_ids"][k], "attention_mask": enc["attention_mask"][k], "labels": y}
                      for k, (y, _) in enumerate(rows)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def read_text(spec: str) -> tuple[str, str]:
    """(text, name) of a text file or a named corpus ("mix": mpokit.data.corpus.mix_corpus)."""
    from mpokit.data import load_corpus

    if not spec:
        raise ValueError(f"expected a text file or 'mix', got {spec!r}")
    corpus = load_corpus(spec)
    return corpus.text, corpus.name


def same_text(a: str | None, b: str | None) -> bool:
    """Whether two text arguments name the same text (the same corpus name, or the same file)."""
    if not a or not b:
        return False
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


@dataclass
class HeldOut:
    """A text cut in two at `cut` (a character offset): training reads text[:cut], evaluation text[cut:]."""

    train_text: str
    eval_text: str
    cut: int
    fraction: float  # of the characters, held out

    def note(self, what: str = "--data") -> str:
        return (f"evaluated on a held-out {self.fraction:.0%} of {what} (characters {self.cut}-"
                f"{self.cut + len(self.eval_text)}), not trained on")


def hold_out_tail(tokenizer, text: str, fraction: float = 0.1, min_tokens: int = 0) -> HeldOut:
    """Hold out the tail of `text`: `fraction` of its characters, grown (up to half the text) until it
    holds at least min_tokens tokens; the cut moves forward to the next line start when one is near."""
    if not 0 < fraction <= 0.5:
        raise ValueError(f"expected a held-out fraction in (0, 0.5], got {fraction}")
    n = len(text)
    tail = max(1, math.ceil(fraction * n))
    while tail < n // 2 and len(tokenizer(text[n - tail:], return_tensors="pt").input_ids[0]) < min_tokens:
        tail = min(n // 2, 2 * tail)
    cut = n - tail
    line = text.find("\n", cut, cut + 200)
    if line >= 0 and line + 1 < n:
        cut = line + 1  # a clean start; the held-out part is at most a line shorter
    return HeldOut(text[:cut], text[cut:], cut, (n - cut) / n)
