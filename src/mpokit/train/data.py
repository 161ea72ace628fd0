"""Datasets for the Trainer wrappers: causal-LM windows of a text, SST-2 sentences."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from mpokit.data import read_sst2, shared_data_dir  # re-exported: the one reader and data-folder rule

__all__ = ["TextWindows", "SST2", "read_sst2", "shared_data_dir"]


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
