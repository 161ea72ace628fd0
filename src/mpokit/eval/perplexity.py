"""Perplexity over the first N tokens of a text, in non-overlapping windows of a fixed context.

Every figure must name its corpus, N and the context length; `perplexity` returns them.
Each window scores tokens 2..L of the window from the tokens before it (the first
token of a window has no context and is not scored).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mpokit.data.corpus import Corpus, load_corpus, tokenize_prefix  # re-exported: callers import them here too
from mpokit.surgery.offload import input_device

__all__ = ["Corpus", "load_corpus", "perplexity", "PerplexityResult", "tokenize_prefix", "max_positions",
           "check_positions"]


def max_positions(model_or_config) -> int | None:
    """The longest sequence the model's position embeddings cover (None when the config does not say)."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_positions(model, length: int, what: str = "context") -> None:
    """Refuse windows longer than the model's positions (GPT-2's position table would be indexed past its end)."""
    limit = max_positions(model)
    if limit is not None and length > limit:
        raise ValueError(f"expected {what} <= {limit} (the model's maximum positions), got {length}")


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
    # chunked evaluation: window pieces fed (over all windows), and how many read cached states of earlier pieces
    chunks: int = 0
    cache_reads: int = 0

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
    The result counts the window pieces fed (`chunks`, summed over windows) and those that attended
    to cached states (`cache_reads`); a figure meant to measure a cache needs cache_reads > 0.
    """
    if tokens < 2 or context < 2:
        raise ValueError(f"expected tokens >= 2 and context >= 2, got tokens={tokens}, context={context}")
    if batch_size < 1:
        raise ValueError(f"expected batch_size >= 1, got {batch_size}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"expected chunk >= 1 (an integer), got {chunk}")
    check_positions(model, min(context, tokens), "context")
    ids = tokenize_prefix(tokenizer, text, tokens)
    if ids.numel() < 2:
        raise ValueError(f"expected a text of at least 2 tokens, got {ids.numel()}")
    windows = [ids[i:i + context] for i in range(0, ids.numel(), context)]
    windows = [w for w in windows if w.numel() >= 2]
    device = input_device(model)
    total_nll, scored, start = 0.0, 0, time.perf_counter()
    counts = {"chunks": 0, "cache_reads": 0}
    model.eval()
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    for batch in tqdm(batches, desc="perplexity", disable=not progress):
        for group in _same_length(batch):
            x = torch.stack(group).to(device)  # (B, T)
            logits = _window_logits(model, x, cache_factory, chunk, counts)  # (B, T, V)
            total_nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                         reduction="sum").item()
            scored += x[:, 1:].numel()
    nll = total_nll / scored
    return PerplexityResult(perplexity=math.exp(nll), tokens=int(ids.numel()), scored_tokens=scored, context=context,
                            windows=len(windows), nll=nll, seconds=time.perf_counter() - start, corpus=corpus_name,
                            **counts)


def _window_logits(model, x: torch.Tensor, cache_factory, chunk: int | None, counts: dict[str, int]) -> torch.Tensor:
    """Logits (B, T, V) of a batch of windows, in one forward or in chunks through one cache.

    counts["chunks"] / counts["cache_reads"]: window pieces fed / those that attended to earlier states in the cache."""
    if chunk is None:
        kwargs = {"past_key_values": cache_factory(), "use_cache": True} if cache_factory else {}
        return model(input_ids=x, **kwargs).logits.float()
    if cache_factory is None:
        from transformers import DynamicCache

        cache = DynamicCache()
    else:
        cache = cache_factory()
    pieces = []
    for s in range(0, x.shape[1], chunk):
        counts["chunks"] += x.shape[0]  # per window of the batch
        counts["cache_reads"] += x.shape[0] * int(cache.get_seq_length() > 0)
        pieces.append(model(input_ids=x[:, s:s + chunk], past_key_values=cache, use_cache=True).logits.float())
    return torch.cat(pieces, dim=1)  # each piece (B, chunk, V)


def _same_length(batch: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Split a batch so that the (shorter) last window runs on its own."""
    groups: dict[int, list[torch.Tensor]] = {}
    for w in batch:
        groups.setdefault(w.numel(), []).append(w)
    return list(groups.values())
