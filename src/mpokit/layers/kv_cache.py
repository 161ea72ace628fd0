"""Low-bit KV caches for transformers' generation and evaluation: DecoQuant and plain RTN.

Both store each cached token's key/value row (per head, `head_dim` values) as packed b-bit
codes with a 16-bit scale and an 8-bit zero point per token, keep the `residual_length` most recent tokens
in 16 bits, and quantize a token once, when it leaves that window. DecoQuant first splits
the rows into a large core (quantized) and a small 16-bit core per layer and head (see
`mpokit.ops.decoquant`), fitted once 16 tokens are at hand. RTN quantizes the rows directly:
the ablation at the same bits and the same layout. Options beyond the paper, used by the
"-kc" presets: keys quantized per channel over blocks of tokens (KIVI's layout) and a few
16-bit "sink" tokens at the start of the sequence; for long contexts: a Hadamard rotation of the
keys, a few outlier key channels kept in 16 bits, and a float history (`mpokit.layers.kv_history`)
so that decoding dequantizes each token once instead of the whole history at every step.

The layers subclass transformers' `BaseQuantizedLayer` (codes are appended to, never
re-quantized as in transformers' KIVI-style QuantizedLayer); the caches subclass `Cache`.
The named settings (decoquant, rtn, -kc, -kcr, quanto) are configs in mpokit.methods.kv_cache.
Per-token min/max ranges are refined by a small MSE search over range shrink factors.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import BaseQuantizedLayer, Cache

from mpokit.layers.kv_history import FloatHistory
from mpokit.ops.decoquant import fit_small_core, from_large_core, to_large_core
from mpokit.ops.kv_quant import (PackedTokens, dequantize_tokens, largest_channels, merge_channels,
                                 orthonormal_mixer, quantize_channels, quantize_tokens, split_channels)
from mpokit.ops.quant import DEFAULT_CLIP_RATIOS, check_bits

__all__ = ["KVQuantLayer", "DecoQuantCache", "RTNKVCache", "kv_cache_bytes", "orthonormal_mixer"]

MIN_FIT_TOKENS = 16  # DecoQuant's small core is fitted once this many exact tokens are at hand
KV_CLIP_RATIOS = DEFAULT_CLIP_RATIOS[::2]  # 1.0, 0.95, ..., 0.6: per-token range search at quantize time
STORE_DTYPE = torch.float16  # residual window, scales, offsets and small cores


class KVQuantLayer(BaseQuantizedLayer):
    """One attention layer's cache: packed low-bit tokens + a 16-bit window of the newest ones.

    small_dim=None gives plain per-token RTN; an int gives DecoQuant with a (small_dim x
    small_dim) 16-bit small core per head for keys and for values.
    sink_length: the first tokens of the sequence also keep a 16-bit copy, used instead of their
    codes (attention sinks: every query attends to them, so their error reaches every output);
    they are left out of the quantization ranges. Their codes stay, so blocks stay aligned.
    key_group=None quantizes keys per token (DecoQuant as published); an int G quantizes keys
    per channel over blocks of G tokens instead (KIVI's key layout: key outliers sit in fixed
    channels), leaving the 16-bit window when a whole block has passed it; the decomposition
    then applies to the values only.
    token_group: channels sharing one scale in per-token rows (None = the whole head row, as
    published); e.g. 32 halves the range each scale must cover, at one more scale per row.
    rotate: per-token rows (DecoQuant: their large core) are multiplied by a fixed orthonormal
    matrix (Hadamard when the head size is a power of 2) before quantization and by its transpose
    after, so a few outlier channels no longer set every token's range (QuaRot's idea; the matrix
    is derived, not stored). Measured on SmolLM2 at 2 bits it matters more than the decomposition.
    rotate_keys: the same rotation for keys in either layout (rotate alone turns it on for per-token keys).
    key_outliers: with per-channel keys, this many channels per head (the largest in magnitude over the
    first quantized tokens, sinks left out) are kept in 16 bits for every token and left out of the codes.
    float_history: None dequantizes the whole history at every update (least memory); "model" or
    "float16" keeps a float copy dequantized once per token (fast decoding; its bytes: `working_bytes`).
    """

    def __init__(self, bits: int = 4, residual_length: int = 16, small_dim: int | None = 16, alpha: float = 0.5,
                 clip_search: bool = True, zero_point: bool = True, key_group: int | None = None,
                 sink_length: int = 0, token_group: int | None = None, rotate: bool = False,
                 rotate_keys: bool = False, key_outliers: int = 0, float_history: str | None = None):
        super().__init__()
        self.rotate, self.rotate_keys = rotate, rotate_keys
        if key_outliers < 0 or (key_outliers and not key_group):
            raise ValueError(f"expected key_outliers >= 0, and only with per-channel keys (key_group), got "
                             f"key_outliers={key_outliers}, key_group={key_group}")
        self.key_outliers = key_outliers
        self.history = None if float_history is None else FloatHistory(float_history)
        if token_group is not None and token_group < 1:
            raise ValueError(f"expected token_group >= 1 or None, got {token_group}")
        self.token_group = token_group
        if key_group is not None and key_group < 2:
            raise ValueError(f"expected key_group >= 2 or None, got {key_group}")
        if sink_length < 0:
            raise ValueError(f"expected sink_length >= 0, got {sink_length}")
        self.key_group, self.sink_length = key_group, sink_length
        self.zero_point = zero_point  # integer zero points (0 exact): better 2-bit perplexity than float offsets
        check_bits(bits)
        if residual_length < 0:
            raise ValueError(f"expected residual_length >= 0, got {residual_length}")
        self.bits, self.residual_length, self.small_dim, self.alpha = bits, residual_length, small_dim, alpha
        self.clip = KV_CLIP_RATIOS if clip_search else None
        self._small: dict[str, torch.Tensor] = {}  # "k"/"v" -> (H, d2, d2) float16 small core
        self._small_inv: dict[str, torch.Tensor] = {}  # derived from _small (not stored, not counted)
        self._n_plain: dict[str, int] = {}  # tokens quantized before the small core was fitted
        self._outliers: tuple[torch.Tensor, torch.Tensor] | None = None  # (H, n) outlier, (H, D - n) kept channels
        self._outlier_k: torch.Tensor | None = None  # (B, H, quantized tokens, n) float16

    # ---- quantized storage --------------------------------------------------------------
    def _per_token(self, which: str) -> bool:
        return not (which == "k" and self.key_group)

    def _decomposed(self, which: str) -> bool:
        return self.small_dim is not None and self._per_token(which)

    def _rotated(self, which: str) -> bool:
        if which == "k":
            return self.rotate_keys or (self.rotate and self._per_token("k"))
        return self.rotate

    def _maybe_fit(self, which: str, rows: torch.Tensor) -> None:
        """Fit the small core once MIN_FIT_TOKENS exact non-sink tokens are at hand (rows (B, H, n, D)),
        shared by the batch; tokens quantized before that are stored without decomposition."""
        if not self._decomposed(which) or which in self._small:
            return
        stored = self._quantized_keys if which == "k" else self._quantized_values
        if stored is not None:  # tokens already stored without decomposition count too (dequantized)
            rows = torch.cat([self.dequantize_range(which, stored, 0)[..., self.sink_length:, :].float(), rows.float()],
                             dim=-2)
        if rows.shape[-2] < MIN_FIT_TOKENS:
            return
        h, d = rows.shape[1], rows.shape[-1]
        flat = rows.float().transpose(0, 1).reshape(h, -1, d)  # (H, B*n, D)
        self._small[which] = fit_small_core(flat, self.small_dim, self.alpha).to(STORE_DTYPE)
        self._small_inv[which] = torch.linalg.inv(self._small[which].float())

    def _encode(self, x: torch.Tensor, which: str) -> torch.Tensor:
        """Rows -> what gets quantized: the large core (DecoQuant), then the rotation if any."""
        if self._decomposed(which):
            if which not in self._small:
                self._n_plain[which] = self._n_plain.get(which, 0) + x.shape[-2]
            else:
                x = to_large_core(x.float(), self._small_inv[which])
        return x @ orthonormal_mixer(x.shape[-1], x.device) if self._rotated(which) else x

    def _decode(self, large: torch.Tensor, which: str, start: int = 0) -> torch.Tensor:
        """Inverse of `_encode` for tokens start..start+n-1 of the sequence (large (B, H, n, D))."""
        x = large @ orthonormal_mixer(large.shape[-1], large.device).T if self._rotated(which) else large
        if self._decomposed(which) and which in self._small:
            n = max(self._n_plain.get(which, 0) - start, 0)  # the first tokens were stored before the core was fitted
            x = torch.cat([x[..., :n, :], from_large_core(x[..., n:, :], self._small[which].float())], dim=-2)
        return x

    def _quantize(self, tensor: torch.Tensor, which: str = "k") -> PackedTokens:
        if which == "k" and self.key_group:
            x = tensor.float() @ orthonormal_mixer(tensor.shape[-1], tensor.device) if self._rotated("k") else tensor.float()
            if self.key_outliers:
                if self._outliers is None:
                    self._outliers = largest_channels(x, self.key_outliers)
                out = split_channels(x, self._outliers[0]).to(STORE_DTYPE)  # (B, H, n, outliers)
                self._outlier_k = out if self._outlier_k is None else torch.cat([self._outlier_k, out], dim=-2)
                x = split_channels(x, self._outliers[1])  # (B, H, n, D - outliers): what gets quantized
            return quantize_channels(x, self.bits, self.key_group, self.clip, self.zero_point)
        return quantize_tokens(self._encode(tensor.float(), which), self.bits, self.clip, self.zero_point,
                               self.token_group)

    def dequantize_range(self, which: str, q_tensor: PackedTokens, start: int) -> torch.Tensor:
        """States (B, H, n, D) in the compute dtype of packed tokens start..start+n-1 of the sequence, with
        their 16-bit parts put back (outlier key channels, sink tokens)."""
        x = dequantize_tokens(q_tensor, self.bits, self.head_dim, torch.float32)
        if which == "k" and self.key_group:
            if self.key_outliers:
                out = self._outlier_k[:, :, start:start + x.shape[-2]]  # (B, H, n, outliers)
                x = merge_channels([(x, self._outliers[1]), (out, self._outliers[0])], self.head_dim)
            if self._rotated("k"):
                x = x @ orthonormal_mixer(x.shape[-1], x.device).T
        else:
            x = self._decode(x, which, start)
        x = x.to(self.dtype)
        sink = self._sink_k if which == "k" else self._sink_v
        n = min(sink.shape[-2] - start, x.shape[-2])
        if n > 0:  # sink tokens: their 16-bit copies replace their codes
            x = torch.cat([sink[..., start:start + n, :].to(x.dtype), x[..., n:, :]], dim=-2)
        return x

    def _dequantize(self, q_tensor: PackedTokens, which: str = "k") -> torch.Tensor:  # BaseQuantizedLayer's hook
        return self.dequantize_range(which, q_tensor, 0)

    def compact_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every cached token's keys and values (B, H, T, D), dequantized now (the path without a float history)."""
        parts_k, parts_v = [], []
        if self._quantized_keys is not None:
            parts_k.append(self.dequantize_range("k", self._quantized_keys, 0))
            parts_v.append(self.dequantize_range("v", self._quantized_values, 0))
        return (torch.cat(parts_k + [self.keys.to(self.dtype)], dim=-2),
                torch.cat(parts_v + [self.values.to(self.dtype)], dim=-2))

    # ---- the Cache layer interface ---------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head_dim = key_states.shape[-1]
        self.keys = key_states.new_zeros((*key_states.shape[:2], 0, key_states.shape[-1]), dtype=STORE_DTYPE)
        self.values = value_states.new_zeros((*value_states.shape[:2], 0, value_states.shape[-1]), dtype=STORE_DTYPE)
        self._sink_k, self._sink_v = self.keys.clone(), self.values.clone()  # (B, H, <= sink_length, D) float16
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # the current tokens attend to their own exact states, as with transformers' quantized caches
        if self.history is not None:
            keys, values = self.history.read(self, key_states, value_states)
        else:
            old_k, old_v = self.compact_states()
            keys, values = torch.cat([old_k, key_states], dim=-2), torch.cat([old_v, value_states], dim=-2)
        self.cumulative_length += key_states.shape[-2]
        self._push(key_states, value_states)
        return keys, values

    def _without_sink(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x (B, H, n, D) holds tokens start..start+n-1; sink tokens among them are replaced by the mean of
        the others, so that their (16-bit, kept aside) outliers do not stretch the quantization ranges."""
        n_sink = min(max(self.sink_length - start, 0), x.shape[-2])
        if n_sink == 0:
            return x
        rest = x[..., n_sink:, :]
        filler = rest.mean(-2, keepdim=True) if rest.shape[-2] else torch.zeros_like(x[..., :1, :])
        return torch.cat([filler.expand(*x.shape[:2], n_sink, x.shape[-1]), rest], dim=-2)

    def _push(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Append to the 16-bit window; tokens pushed out of it are quantized (once)."""
        start = 0 if self._quantized_keys is None else self._quantized_keys.length  # sequence index of window[0]
        res_k = torch.cat([self.keys, key_states.to(STORE_DTYPE)], dim=-2)
        res_v = torch.cat([self.values, value_states.to(STORE_DTYPE)], dim=-2)
        to_sink = min(self.sink_length - self._sink_k.shape[-2], res_k.shape[-2] - (self._sink_k.shape[-2] - start))
        if to_sink > 0:  # copy the first tokens of the sequence aside, in 16 bits
            first = self._sink_k.shape[-2] - start
            self._sink_k = torch.cat([self._sink_k, res_k[..., first:first + to_sink, :]], dim=-2)
            self._sink_v = torch.cat([self._sink_v, res_v[..., first:first + to_sink, :]], dim=-2)
        overflow = res_k.shape[-2] - self.residual_length
        if self.key_group:  # keys leave the window in whole blocks
            overflow = overflow // self.key_group * self.key_group
        if overflow > 0:
            # quantize from the exact states where we have them (the fp16 window only for older tokens)
            exact_k = torch.cat([self.keys.to(key_states.dtype), key_states], dim=-2)
            exact_v = torch.cat([self.values.to(value_states.dtype), value_states], dim=-2)
            skip = max(self.sink_length - start, 0)  # fit on the tokens at hand, sinks left out
            self._maybe_fit("k", exact_k[..., skip:, :])
            self._maybe_fit("v", exact_v[..., skip:, :])
            exact_k, exact_v = exact_k[..., :overflow, :], exact_v[..., :overflow, :]
            qk = self._quantize(self._without_sink(exact_k, start), "k")
            qv = self._quantize(self._without_sink(exact_v, start), "v")
            self._quantized_keys = qk if self._quantized_keys is None else self._quantized_keys.cat(qk)
            self._quantized_values = qv if self._quantized_values is None else self._quantized_values.cat(qv)
            if self.history is not None:  # written into the float history at the next update
                self.history.pending.append((start, qk, qv))
            res_k, res_v = res_k[..., overflow:, :], res_v[..., overflow:, :]
        self.keys, self.values = res_k, res_v

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def reset(self) -> None:
        super().reset()
        self._small, self._small_inv, self._n_plain = {}, {}, {}
        self._outliers = self._outlier_k = None
        if self.history is not None:
            self.history.reset()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest `-tokens_to_remove` tokens (negative, as transformers' DynamicLayer takes it)."""
        if tokens_to_remove > 0:
            raise ValueError(f"expected a negative number of tokens to remove, got {tokens_to_remove}")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        from_window = min(n, self.keys.shape[-2])
        self.keys, self.values = self.keys[..., : self.keys.shape[-2] - from_window, :], \
            self.values[..., : self.values.shape[-2] - from_window, :]
        rest = n - from_window
        if rest and self.key_group:
            raise ValueError("expected to crop only inside the 16-bit window when keys are quantized per channel")
        if rest and self._quantized_keys is not None:
            keep = self._quantized_keys.length - rest
            self._quantized_keys = self._quantized_keys.map(lambda t: t[:, :, :keep])
            self._quantized_values = self._quantized_values.map(lambda t: t[:, :, :keep])
        self.cumulative_length -= n
        if self.history is not None:
            self.history.reset()  # rebuilt from the packed tokens at the next update
        keep = min(self._sink_k.shape[-2], self.cumulative_length)
        self._sink_k, self._sink_v = self._sink_k[..., :keep, :], self._sink_v[..., :keep, :]

    def _batch_map(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self._sink_k, self._sink_v = fn(self._sink_k), fn(self._sink_v)
        if self._quantized_keys is not None:
            self._quantized_keys, self._quantized_values = self._quantized_keys.map(fn), self._quantized_values.map(fn)
        if self._outlier_k is not None:
            self._outlier_k = fn(self._outlier_k)
        if self.history is not None:
            self.history.map(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch_map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch_map(lambda t: t[indices, ...])

    # ---- accounting -----------------------------------------------------------------------
    def storage_bytes(self) -> int:
        """Bytes held: packed codes, scales, offsets, small cores, the 16-bit window, sinks and outlier
        channels (with their channel indices). The float history is not in it: see `working_bytes`."""
        if not self.is_initialized:
            return 0
        total = (self.keys.numel() + self.values.numel() + self._sink_k.numel() + self._sink_v.numel()) * 2  # fp16
        if self._quantized_keys is not None:
            total += self._quantized_keys.nbytes() + self._quantized_values.nbytes()
        extra = list(self._small.values()) + ([self._outlier_k, *self._outliers] if self._outlier_k is not None else [])
        return total + sum(t.numel() * t.element_size() for t in extra)

    def working_bytes(self) -> int:
        """Bytes of the float history (a dequantized copy kept for speed; 0 without one)."""
        return 0 if self.history is None else self.history.nbytes()

    def fp16_bytes(self) -> int:
        """What a 16-bit cache would hold for the same tokens."""
        if not self.is_initialized:
            return 0
        b, h, _, d = self.keys.shape
        return 2 * b * h * self.cumulative_length * d * 2


def _full_attention_layers(config) -> int:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None) or []
    if any(t != "full_attention" for t in types):
        raise ValueError(f"expected a model with full-attention layers only, got layer types {sorted(set(types))}")
    return text.num_hidden_layers


class DecoQuantCache(Cache):
    """DecoQuant KV cache: `model.generate(..., past_key_values=DecoQuantCache(model.config, bits=4))`."""

    def __init__(self, config=None, bits: int = 4, residual_length: int = 16, small_dim: int | None = 16,
                 alpha: float = 0.5, clip_search: bool = True, num_layers: int | None = None,
                 zero_point: bool = True, key_group: int | None = None, sink_length: int = 0,
                 token_group: int | None = None, rotate: bool = False, rotate_keys: bool = False,
                 key_outliers: int = 0, float_history: str | None = None):
        if num_layers is None:
            if config is None:
                raise ValueError("expected a model config or num_layers, got neither")
            num_layers = _full_attention_layers(config)
        self.bits, self.residual_length = bits, residual_length
        super().__init__(layers=[KVQuantLayer(bits, residual_length, small_dim, alpha, clip_search, zero_point,
                                              key_group, sink_length, token_group, rotate, rotate_keys,
                                              key_outliers, float_history)
                                 for _ in range(num_layers)])

    def storage_bytes(self) -> int:
        return sum(layer.storage_bytes() for layer in self.layers)

    def fp16_bytes(self) -> int:
        return sum(layer.fp16_bytes() for layer in self.layers)

    def working_bytes(self) -> int:
        """Bytes of the layers' float histories (0 without them)."""
        return sum(layer.working_bytes() for layer in self.layers)


class RTNKVCache(DecoQuantCache):
    """Plain round-to-nearest per-token KV quantization: DecoQuant's ablation (no decomposition)."""

    def __init__(self, config=None, bits: int = 4, residual_length: int = 16, clip_search: bool = True,
                 num_layers: int | None = None, zero_point: bool = True, key_group: int | None = None,
                 sink_length: int = 0, token_group: int | None = None, rotate: bool = False, **kw):
        super().__init__(config, bits, residual_length, small_dim=None, clip_search=clip_search, num_layers=num_layers,
                         zero_point=zero_point, key_group=key_group, sink_length=sink_length,
                         token_group=token_group, rotate=rotate, **kw)


def _tensor_bytes(t) -> int:
    """Bytes of a tensor, or of the inner tensors of a tensor subclass (quanto's packed QTensors)."""
    if t is None:
        return 0
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor:
        return sum(_tensor_bytes(getattr(t, name)) for name in flatten()[0])
    return t.numel() * t.element_size()


def kv_cache_bytes(cache) -> tuple[int, int]:
    """(bytes held, bytes a 16-bit cache would hold) for mpokit caches and transformers' caches."""
    if hasattr(cache, "storage_bytes"):
        return cache.storage_bytes(), cache.fp16_bytes()
    held = fp16 = 0
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        held += _tensor_bytes(layer.keys) + _tensor_bytes(layer.values)
        held += _tensor_bytes(getattr(layer, "_quantized_keys", None)) + _tensor_bytes(getattr(layer, "_quantized_values", None))
        b, h, _, d = layer.keys.shape if layer.keys.dim() == 4 else (0, 0, 0, 0)
        if b == 0:  # empty window: read the shape from the quantized keys
            b, h, _, d = layer._quantized_keys.shape
        fp16 += 2 * b * h * layer.get_seq_length() * d * 2
    return held, fp16
