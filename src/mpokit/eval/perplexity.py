"""Perplexity over the first N tokens of a text, in non-overlapping windows of a fixed context.

Every figure must name its corpus, N and the context length; `perplexity` returns them.
Each window scores tokens 2..L of the window from the tokens before it (the first
token of a window has no context and is not scored).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["Corpus", "load_corpus", "perplexity", "PerplexityResult", "tokenize_prefix"]


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


@dataclass
class PerplexityResult:
    perplexity: float
    tokens: int  # tokens fed to the model
    scored_tokens: int  # tokens whose probability was scored
    context: int
    windows: int
    nll: float  # mean negative log-likelihood (nats/token)
    seconds: float
    corpus: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(model, tokenizer, text: str, tokens: int = 8192, context: int = 512, batch_size: int = 4,
               progress: bool = True, corpus_name: str = "", cache_factory=None,
               chunk: int | None = None) -> PerplexityResult:
    """Perplexity of a causal LM over the first `tokens` tokens of `text`, windows of `context`.

    cache_factory: optional callable returning a transformers Cache, used so that
    quantized KV caches sit in the loop (the windows are then fed one batch at a time).
    chunk: feed each window in pieces of `chunk` tokens through one cache per window, so
    later pieces attend to the cached (e.g. quantized) states of earlier ones; without
    it a window runs in one forward and a cache is written but never read back.
    """
    if tokens < 2 or context < 2:
        raise ValueError(f"expected tokens >= 2 and context >= 2, got tokens={tokens}, context={context}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"expected chunk >= 1, got {chunk}")
    ids = tokenize_prefix(tokenizer, text, tokens)
    if ids.numel() < 2:
        raise ValueError(f"expected a text of at least 2 tokens, got {ids.numel()}")
    windows = [ids[i:i + context] for i in range(0, ids.numel(), context)]
    windows = [w for w in windows if w.numel() >= 2]
    device = next(model.parameters()).device
    total_nll, scored, start = 0.0, 0, time.perf_counter()
    model.eval()
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    for batch in tqdm(batches, desc="perplexity", disable=not progress):
        for group in _same_length(batch):
            x = torch.stack(group).to(device)  # (B, T)
            logits = _window_logits(model, x, cache_factory, chunk)  # (B, T, V)
            total_nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                         reduction="sum").item()
            scored += x[:, 1:].numel()
    nll = total_nll / scored
    return PerplexityResult(perplexity=math.exp(nll), tokens=int(ids.numel()), scored_tokens=scored, context=context,
                            windows=len(windows), nll=nll, seconds=time.perf_counter() - start, corpus=corpus_name)


def _window_logits(model, x: torch.Tensor, cache_factory, chunk: int | None) -> torch.Tensor:
    """Logits (B, T, V) of a batch of windows, in one forward or in chunks through one cache."""
    if chunk is None:
        kwargs = {"past_key_values": cache_factory(), "use_cache": True} if cache_factory else {}
        return model(input_ids=x, **kwargs).logits.float()
    if cache_factory is None:
        from transformers import DynamicCache

        cache = DynamicCache()
    else:
        cache = cache_factory()
    pieces = [model(input_ids=x[:, s:s + chunk], past_key_values=cache, use_cache=True).logits.float()
              for s in range(0, x.shape[1], chunk)]  # each (B, chunk, V)
    return torch.cat(pieces, dim=1)


def _same_length(batch: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Split a batch so that the (shorter) last window runs on its own."""
    groups: dict[int, list[torch.Tensor]] = {}
    for w in batch:
        groups.setdefault(w.numel(), []).append(w)
    return list(groups.values())
