"""The float history a quantized KV layer can keep so that decoding does not dequantize every step.

Without it, each `update` dequantizes the whole quantized history (unpacking, rotations, small
cores): at 2048 tokens of context on SmolLM2 that is ~70% of a decode step. With it, each piece
of tokens is dequantized once, when it is quantized, into a growing buffer in the compute dtype
(or float16) that also holds the exact states of the tokens not yet quantized; `update` then
writes the new tokens and returns a view, so a step costs O(new tokens) in cache work (transformers'
DynamicCache concatenates its whole history every step). The price is memory: the buffer is a
float copy of the cache, on top of the packed codes. Its bytes are reported by `nbytes()` and
never hidden in the packed storage figures.
"""
from __future__ import annotations

import torch

__all__ = ["FloatHistory", "HISTORY_DTYPES"]

HISTORY_DTYPES = ("model", "float16")  # buffer dtype: the model's compute dtype (returns views), or float16
MIN_CAPACITY = 256  # tokens; a full buffer grows by a quarter (at least this many tokens)


class FloatHistory:
    """What attention reads, kept across steps: dequantized tokens (written once each) + exact newer ones.

    Quantized pieces are staged in `pending` and written at the next `read`: the step that
    quantizes them still attends to their exact states (as the compact path does), and the view
    it returned is not changed under it. Likewise the tokens of the last step are rounded to the
    16-bit window's precision at the next `read`, so both paths return the same states."""

    def __init__(self, dtype: str = "model"):
        if dtype not in HISTORY_DTYPES:
            raise ValueError(f"expected a float history dtype in {HISTORY_DTYPES}, got {dtype!r}")
        self.dtype = dtype
        self.reset()

    def reset(self) -> None:
        self.k = self.v = None  # (B, H, capacity, D) buffers
        self.length = 0
        self.exact_from = 0  # tokens from here on were written exactly by the last read (not yet rounded)
        self.pending: list[tuple[int, object, object]] = []  # (first sequence index, packed keys, packed values)

    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()

    def _reserve(self, like: torch.Tensor, length: int, compute_dtype: torch.dtype) -> None:
        if self.k is not None and self.k.shape[2] >= length:
            return
        cap = length + max(MIN_CAPACITY, length // 4)  # amortized O(1) appends, at most 25% (or 256 tokens) unused
        dtype = compute_dtype if self.dtype == "model" else torch.float16
        new_k = like.new_empty((*like.shape[:2], cap, like.shape[-1]), dtype=dtype)  # (B, H, cap, D)
        new_v = torch.empty_like(new_k)
        if self.k is not None:
            new_k[:, :, :self.length], new_v[:, :, :self.length] = self.k[:, :, :self.length], self.v[:, :, :self.length]
        self.k, self.v = new_k, new_v

    def read(self, layer, key_states: torch.Tensor, value_states: torch.Tensor):
        """Keys/values (B, H, T, D) for this step: the history (rebuilt from the layer when empty) + the new states."""
        if self.k is None and layer.cumulative_length:  # first read after a crop, reset or a compact start
            old_k, old_v = layer.compact_states()
            self._reserve(old_k, old_k.shape[2], key_states.dtype)
            self.k[:, :, :old_k.shape[2]], self.v[:, :, :old_k.shape[2]] = old_k, old_v
            self.length, self.pending = old_k.shape[2], []
            self.exact_from = self.length
        for buf in (self.k, self.v):  # the last step's tokens, as the 16-bit window holds them
            if buf is not None and self.exact_from < self.length:
                buf[:, :, self.exact_from:self.length] = buf[:, :, self.exact_from:self.length].to(torch.float16)
        for start, qk, qv in self.pending:  # dequantize each piece once
            k, v = layer.dequantize_range("k", qk, start), layer.dequantize_range("v", qv, start)
            self.k[:, :, start:start + k.shape[2]], self.v[:, :, start:start + v.shape[2]] = k, v
        self.pending = []
        n = key_states.shape[2]
        self._reserve(key_states, self.length + n, key_states.dtype)
        self.k[:, :, self.length:self.length + n], self.v[:, :, self.length:self.length + n] = key_states, value_states
        self.exact_from, self.length = self.length, self.length + n
        keys, values = self.k[:, :, :self.length], self.v[:, :, :self.length]
        if keys.dtype != key_states.dtype:
            keys, values = keys.to(key_states.dtype), values.to(value_states.dtype)
        return keys, values

    def map(self, fn) -> None:
        """Apply a batch operation (beam reorder, repeat, select) to the buffers and the staged pieces."""
        if self.k is not None:
            self.k, self.v = fn(self.k), fn(self.v)
        self.pending = [(s, qk.map(fn), qv.map(fn)) for s, qk, qv in self.pending]
