"""KV-cache methods: each named setting is a registered config that makes a fresh cache.

"decoquant"/"rtn": per-token keys and values (DecoQuant as published, and its ablation without
the decomposition), a 16-token 16-bit window. "-kc": keys per channel over 64-token blocks with
4 sink tokens kept in 16 bits and no extra window (partial key blocks wait in 16 bits): much
better at 2 bits. "-kcr": the same, with values (DecoQuant: their large core) rotated by a
Hadamard matrix before quantization. "-rk": -kcr with the keys rotated as well; "-long": -rk with
32-token key blocks and a 32-token 16-bit window, for 2 bits at 1024-2048-token contexts (both tuned
on WikiText-2 valid, with a float history for fast decoding). Outlier key channels in 16 bits
(`key_outliers`) are an option, in no preset: rotating the keys did better for no bytes. "quanto": transformers' QuantizedCache with the optimum-quanto backend, the baseline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mpokit.methods.base import MethodConfig, option
from mpokit.methods.checks import check_ints, nonnegative_int, positive_int

__all__ = ["DecoQuantKVConfig", "RTNKVConfig", "DecoQuantKCConfig", "RTNKCConfig", "DecoQuantKCRConfig",
           "RTNKCRConfig", "DecoQuantRKConfig", "DecoQuantLongConfig", "RTNLongConfig", "QuantoKVConfig"]


@dataclass
class DecoQuantKVConfig(MethodConfig):
    """DecoQuant (per-token codes of the large core, a 16-bit small core per layer and head).

    bits: code bits; residual_length: newest tokens kept in 16 bits; small_dim: side of the small
    core (None: plain RTN); key_group: quantize keys per channel over blocks of this many tokens
    (None: per token); sink_length: first tokens kept in 16 bits; rotate: Hadamard-rotate values;
    token_group: tokens sharing one value range (None: one per token)."""

    method: ClassVar[str] = "decoquant"
    kind: ClassVar[str] = "kv-cache"
    bits: int = option(4, "KV cache bits (quanto: 2 or 4)", flag="--kv-bits", type=positive_int)
    residual_length: int = option(16, "newest tokens kept in 16 bits", flag="--kv-residual", type=nonnegative_int)
    small_dim: int | None = 16
    key_group: int | None = None
    sink_length: int = 0
    rotate: bool = False
    token_group: int | None = None
    clip_search: bool = True
    zero_point: bool = True
    rotate_keys: bool = False
    key_outliers: int = option(0, "key channels per head kept in 16 bits (per-channel keys only)",
                               flag="--kv-key-outliers", type=nonnegative_int)
    float_history: str | None = None

    def __post_init__(self) -> None:
        from mpokit.layers.kv_history import HISTORY_DTYPES

        check_ints(self, 1, ["bits"])
        check_ints(self, 0, ["residual_length", "sink_length", "key_outliers"])
        check_ints(self, 1, ["small_dim", "key_group", "token_group"], optional=True)
        if self.key_outliers and not self.key_group:
            raise ValueError("expected key_outliers only with per-channel keys (key_group), got key_group=None")
        if self.float_history is not None and self.float_history not in HISTORY_DTYPES:
            raise ValueError(f"expected float_history in {HISTORY_DTYPES} or None, got {self.float_history!r}")

    def make_cache(self, model_config):
        """A fresh, empty cache for one generation or evaluation window."""
        from mpokit.layers.kv_cache import DecoQuantCache

        return DecoQuantCache(model_config, bits=self.bits, residual_length=self.residual_length,
                              small_dim=self.small_dim, clip_search=self.clip_search, zero_point=self.zero_point,
                              key_group=self.key_group, sink_length=self.sink_length, token_group=self.token_group,
                              rotate=self.rotate, rotate_keys=self.rotate_keys, key_outliers=self.key_outliers,
                              float_history=self.float_history)


@dataclass
class RTNKVConfig(DecoQuantKVConfig):
    method: ClassVar[str] = "rtn"
    small_dim: int | None = None


@dataclass
class DecoQuantKCConfig(DecoQuantKVConfig):
    method: ClassVar[str] = "decoquant-kc"
    residual_length: int = 0
    key_group: int | None = 64
    sink_length: int = 4


@dataclass
class RTNKCConfig(DecoQuantKCConfig):
    method: ClassVar[str] = "rtn-kc"
    small_dim: int | None = None


@dataclass
class DecoQuantKCRConfig(DecoQuantKCConfig):
    method: ClassVar[str] = "decoquant-kcr"
    rotate: bool = True


@dataclass
class RTNKCRConfig(DecoQuantKCRConfig):
    method: ClassVar[str] = "rtn-kcr"
    small_dim: int | None = None


@dataclass
class DecoQuantRKConfig(DecoQuantKCRConfig):
    """-kcr with the keys rotated too (the Hadamard matrix before their per-channel quantization): no extra
    bytes, less error than -kcr at every bit width measured (docs/benchmarks/kv-long.md); the 4-bit
    setting. Keeps a float16 float history, so decoding dequantizes each token once."""

    method: ClassVar[str] = "decoquant-rk"
    rotate_keys: bool = True
    float_history: str | None = "float16"


@dataclass
class DecoQuantLongConfig(DecoQuantRKConfig):
    """-rk with keys per channel over 32-token blocks and a 32-token 16-bit window of the newest tokens:
    the 2-bit setting (the window's bytes weigh less the longer the context)."""

    method: ClassVar[str] = "decoquant-long"
    key_group: int | None = 32
    residual_length: int = 32


@dataclass
class RTNLongConfig(DecoQuantLongConfig):
    method: ClassVar[str] = "rtn-long"
    small_dim: int | None = None


@dataclass
class QuantoKVConfig(MethodConfig):
    """transformers' QuantizedCache, optimum-quanto backend: one scale/shift per token and head."""

    method: ClassVar[str] = "quanto"
    kind: ClassVar[str] = "kv-cache"
    bits: int = 4
    residual_length: int = 16

    def __post_init__(self) -> None:
        if self.bits not in (2, 4):
            raise ValueError(f"expected bits in (2, 4) for the quanto backend, got {self.bits}")
        check_ints(self, 0, ["residual_length"])

    def make_cache(self, model_config):
        from transformers import QuantizedCache

        text = model_config.get_text_config(decoder=True)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return QuantizedCache("quanto", model_config, nbits=self.bits, axis_key=0, axis_value=0, q_group_size=head_dim,
                              residual_length=self.residual_length)
