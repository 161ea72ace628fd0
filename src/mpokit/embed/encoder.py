"""Sentence embeddings from a transformer encoder: mean pooling over the attention mask, then L2 norm.

That is what sentence-transformers does for all-MiniLM-L6-v2 (its modules.json: Transformer ->
Pooling(mean) -> Normalize, max_seq_length 256), so the vectors match that library's without
needing it. The encoder is the embedded MiniLM by default (found through mpokit.io.models, never
downloaded) or anything load_model accepts: an HF folder, an mpokit checkpoint, a hub id.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

__all__ = ["SentenceEncoder", "load_encoder", "mean_pool", "DEFAULT_ENCODER"]

DEFAULT_ENCODER = "minilm"  # mpokit.io.models.ENCODER_MODEL: the embedded all-MiniLM-L6-v2
_FALLBACK_MAX_LENGTH = 512


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states where mask is 1, then L2-normalised: (B, T, H), (B, T) -> (B, H)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    summed = (hidden * m).sum(dim=1)  # (B, H)
    counts = m.sum(dim=1).clamp(min=1e-9)  # (B, 1): sentence-transformers' clamp for empty rows
    return torch.nn.functional.normalize(summed / counts, p=2, dim=-1)  # (B, H)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide the load report and weight-loading bar (the task head is expected to be fresh; we drop it)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _max_length(path: Path | None, tokenizer, model: nn.Module) -> int:
    """sentence_bert_config.json's max_seq_length when the folder has one, else what tokenizer and model allow."""
    if path is not None and (path / "sentence_bert_config.json").is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError, OSError):
            return int(json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"])
    limits = [getattr(tokenizer, "model_max_length", None), getattr(model.config, "max_position_embeddings", None)]
    limits = [int(v) for v in limits if isinstance(v, int) and 0 < v < 1_000_000]
    return min(limits) if limits else _FALLBACK_MAX_LENGTH


@dataclass
class SentenceEncoder:
    """An encoder and its tokenizer; encode(texts) -> (N, H) float32 unit vectors."""

    model: nn.Module  # the bare encoder (BertModel, ...), not a task head
    tokenizer: object
    max_length: int
    source: str = "in-memory model"  # what a saved index records to load the same encoder again

    def __post_init__(self):
        if self.max_length < 1:
            raise ValueError(f"expected max_length >= 1, got {self.max_length}")
        if getattr(self.tokenizer, "pad_token", None) is None:
            raise ValueError("expected a tokenizer with a pad token (batches are padded and masked)")

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """(N, H) float32 L2-normalised sentence embeddings, in the order of `texts`."""
        if isinstance(texts, str):
            raise TypeError("expected a list of texts, got one string (wrap it in a list)")
        if batch_size < 1:
            raise ValueError(f"expected batch_size >= 1, got {batch_size}")
        texts = list(texts)
        out = torch.empty(len(texts), self.dim, dtype=torch.float32)  # (N, H)
        # Longest first: batches of similar lengths waste less padding; rows go back in place.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="encoding", unit="batch", total=len(starts))
        self.model.eval()
        for s in starts:
            rows = order[s:s + batch_size]
            enc = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            keep = set(getattr(self.tokenizer, "model_input_names", ())) or {"input_ids", "attention_mask"}
            enc = {k: v for k, v in enc.items() if k in keep | {"input_ids", "attention_mask"}}
            hidden = self.model(**enc).last_hidden_state  # (B, T, H)
            out[rows] = mean_pool(hidden.float(), enc["attention_mask"])
        return out


def _bare_encoder(model: nn.Module) -> nn.Module:
    """The encoder under a task head (BertForSequenceClassification.bert), or the model itself."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def load_encoder(spec: str | None = None, max_length: int | None = None) -> SentenceEncoder:
    """The embedded MiniLM (spec None or "minilm") or any encoder mpokit.io.models.load_model finds."""
    from mpokit.io.models import ENCODER_MODEL, load_model

    spec = spec or ENCODER_MODEL
    with _quiet_transformers():
        loaded = load_model(spec, task="classification")  # the encoder's weights are all checked to be present
    model = _bare_encoder(loaded.model).eval()
    limit = _max_length(loaded.path, loaded.tokenizer, model)
    # A local folder is recorded as an absolute path, so a saved index finds it from any folder.
    source = ENCODER_MODEL if spec == ENCODER_MODEL else \
        str(Path(spec).expanduser().resolve()) if Path(spec).expanduser().exists() else str(spec)
    return SentenceEncoder(model, loaded.tokenizer, min(max_length, limit) if max_length else limit, source)
