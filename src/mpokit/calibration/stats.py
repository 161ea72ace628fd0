"""Per-layer input statistics from calibration text, for activation-aware compression.

For a linear layer y = W x the output error of a replacement M over calibration inputs
X is ||(W - M) X^T||_F^2 = tr((W - M) G (W - M)^T) with G = X^T X, so the Gram matrix G
(in x in) is all a layer needs. Layers that read the same tensor (q/k/v, gate/up) share
one G. Collected with forward hooks in one streaming pass: memory is one G per distinct
input, never the activations themselves.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from mpokit.data import Calibration, tokenize_prefix
from mpokit.data.corpus import default_calibration_corpus
from mpokit.surgery.offload import input_device
from mpokit.surgery.replace import get_module

__all__ = ["InputStats", "GramAccumulator", "collect_input_stats", "calibration_batches", "resolve_calibration"]


@dataclass
class InputStats:
    """Gram matrices of layer inputs: stats.gram(name) -> (in, in) float64, plus token count."""

    grams: dict[int, torch.Tensor] = field(default_factory=dict)  # by shared-input group id
    group_of: dict[str, int] = field(default_factory=dict)  # layer name -> group id
    tokens: int = 0
    # X_ref^T X: inputs of the original model against inputs of the (partly) compressed one
    cross: dict[int, torch.Tensor] = field(default_factory=dict)

    def cross_gram(self, name: str) -> torch.Tensor | None:
        return self.cross.get(self.group_of.get(name, -1))

    def gram(self, name: str) -> torch.Tensor:
        if name not in self.group_of:
            raise KeyError(f"no calibration statistics for layer {name!r}")
        return self.grams[self.group_of[name]]

    def mean_abs_proxy(self, name: str) -> torch.Tensor:
        """sqrt(E[x_j^2]) per input channel: the diagonal scale used by ASVD-style methods."""
        return (torch.diagonal(self.gram(name)) / max(self.tokens, 1)).clamp_min(0).sqrt()


def calibration_batches(tokenizer, text: str, tokens: int = 16384, context: int = 512) -> list[torch.Tensor]:
    """Non-overlapping windows (1, context) covering the first `tokens` tokens of text."""
    return _windows(tokenize_prefix(tokenizer, text, tokens), context)


def _windows(ids: torch.Tensor, context: int) -> list[torch.Tensor]:
    return [ids[i:i + context].unsqueeze(0) for i in range(0, ids.numel() - 1, context)]


def resolve_calibration(calibration: Calibration | None, tokenizer, tokens: int, context: int,
                        purpose: str) -> list[torch.Tensor]:
    """Token windows (1, context) for a calibrated method: the one place calibration input is resolved.

    calibration.batches are used as they are; else windows of calibration.text (None:
    data.corpus.default_calibration_corpus) tokenized by `tokenizer`. `tokens` and `context` (the
    method config's) apply where the Calibration leaves them None. The text must give at least one
    calibration window (min(tokens, context) tokens); fewer tokens than `tokens` are used with a warning.
    """
    calibration = Calibration() if calibration is None else calibration
    tokens = calibration.tokens if calibration.tokens is not None else tokens
    context = calibration.context if calibration.context is not None else context
    batches = calibration.batches
    if batches is not None:
        batches = list(batches)
        if not batches or sum(b.numel() for b in batches) < 2:
            raise ValueError(f"expected calibration batches with at least 2 tokens for {purpose}, got "
                             f"{sum(b.numel() for b in batches)} tokens in {len(batches)} batches")
        return batches
    if tokenizer is None:
        raise ValueError(f"expected a tokenizer (compress_(model, config, tokenizer=tok)) or calibration batches "
                         f"for {purpose}, got neither")
    text = calibration.text if calibration.text is not None else default_calibration_corpus().text
    ids = tokenize_prefix(tokenizer, text, tokens)
    have, need = ids.numel(), max(2, min(tokens, context))
    if have < need:
        raise ValueError(f"expected a calibration text of at least {need} tokens (one calibration window: "
                         f"min(calibration_tokens={tokens}, calibration_context={context})) for {purpose}, "
                         f"got {have} tokens")
    if have < tokens:
        warnings.warn(f"calibration: the text gives {have} tokens, fewer than the {tokens} requested for {purpose}; "
                      f"the statistics rest on {have} tokens", UserWarning, stacklevel=2)
    return _windows(ids, context)


def _add(store: dict[int, torch.Tensor], key: int, value: torch.Tensor) -> None:
    value = value.double()
    store[key] = store[key] + value if key in store else value


class GramAccumulator:
    """Forward pre-hooks that add X^T X of each named layer's input into InputStats.

    Layers fed the very same tensor object in turn (q/k/v, gate/up) share one Gram.
    Call new_forward() before each forward pass and detach() at the end.
    """

    def __init__(self, model: nn.Module, names: list[str]):
        self.stats = InputStats()
        self.reference: dict[int, torch.Tensor] | None = None  # group -> reference input of this forward
        self.recording: dict[int, torch.Tensor] | None = None  # when set, store inputs instead of adding
        self._last: tuple = (None, None)  # (input tensor, group) of the previous hooked call
        self._accumulated: set[int] = set()  # groups already added in this forward
        self._seen: dict[int, tuple[int, int, str]] = {}  # group -> (tokens added, input width, first layer)
        self._hooks = [get_module(model, n).register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def fn(module, args):
            x, stats = args[0], self.stats
            group = stats.group_of.get(name)
            if group is None:
                group = self._last[1] if x is self._last[0] else len(set(stats.group_of.values()))
                stats.group_of[name] = group
            self._last = (x, group)
            if group in self._accumulated:
                return
            self._accumulated.add(group)
            x2 = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
            if self.recording is not None:
                self.recording[group] = x2
                return
            _add(stats.grams, group, x2.T @ x2)  # (in, in); float32 products, float64 running sum
            seen = self._seen.get(group, (0, x2.shape[1], name))
            self._seen[group] = (seen[0] + x2.shape[0], seen[1], seen[2])
            if self.reference is not None:
                _add(stats.cross, group, self.reference[group].T @ x2)
        return fn

    def new_forward(self) -> None:
        self._accumulated.clear()
        self._last = (None, None)

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        warn_if_rank_deficient(self._seen.values())
        self._seen = {}


def warn_if_rank_deficient(seen) -> None:
    """Warn when a layer saw fewer calibration tokens than it has inputs: X^T X is then singular.

    seen: (tokens, input width, layer name) per input group; the message names no layer, so that
    Python shows it once, not once per block. Whitening (SVD-LLM) and GPTQ invert
    X^T X; below `width` tokens it has rank <= tokens and only the damping keeps it invertible,
    so the reported errors are optimistic for inputs unlike the calibration text.
    """
    short = [(t, w, n) for t, w, n in seen if 0 < t < w]
    if short:
        tokens = min(t for t, _, _ in short)
        width = max(w for _, w, _ in short)
        warnings.warn(f"calibration: {tokens} tokens reached layers with up to {width} inputs: "
                      f"their input Gram X^T X has rank <= {tokens} < {width}, so activation-aware methods fit the "
                      f"calibration text only; use at least {width} calibration tokens (many more is better)",
                      UserWarning, stacklevel=3)


@torch.no_grad()
def collect_input_stats(model: nn.Module, names: list[str], batches: list[torch.Tensor],
                        progress: bool = True) -> InputStats:
    """Run the batches through the whole model, accumulating X^T X at the input of each named layer.

    Holds every layer's Gram at once; `calibration.blocks.stream_blocks` avoids that.
    """
    acc = GramAccumulator(model, names)
    device = input_device(model)
    try:
        for batch in tqdm(batches, desc="calibration", disable=not progress):
            acc.new_forward()
            model(input_ids=batch.to(device))
            acc.stats.tokens += batch.numel()
    finally:
        acc.detach()
    return acc.stats
