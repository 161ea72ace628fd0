"""Caches by name, and a factory that makes a fresh cache per evaluation window and measures its bytes."""
from __future__ import annotations

from typing import Any

from mpokit.methods.base import MethodConfig, get_method, method_names

__all__ = ["kv_cache_config", "make_kv_cache", "KVCacheFactory", "KV_PRESETS"]


def kv_cache_config(kind: str, bits: int = 4, residual_length: int | None = None, **kw: Any) -> MethodConfig:
    """The config registered as `kind` (residual_length None: the method's own default)."""
    if kind not in method_names("kv-cache"):
        raise ValueError(f"expected a kv cache kind in {tuple(method_names('kv-cache'))}, got {kind!r}")
    if residual_length is not None:
        kw["residual_length"] = residual_length
    return get_method(kind, "kv-cache")(bits=bits, **kw)


def make_kv_cache(kind: str, config, bits: int = 4, residual_length: int | None = None, **kw: Any):
    """A fresh cache of method `kind` for a model with this (transformers) config."""
    return kv_cache_config(kind, bits, residual_length, **kw).make_cache(config)


def _presets() -> dict[str, dict[str, Any]]:
    """Name -> settings of every KV-cache method (for reports)."""
    out = {}
    for name in method_names("kv-cache"):
        settings = get_method(name, "kv-cache")().to_dict()
        out[name] = {k: v for k, v in settings.items() if k not in ("method", "version", "target_modules",
                                                                    "exclude_modules")}
    return out


KV_PRESETS = _presets()


class KVCacheFactory:
    """Callable making a fresh cache per evaluation batch, measuring each one's bytes when the next is made."""

    def __init__(self, kind: str | MethodConfig, config, bits: int = 4, residual_length: int | None = None, **kw):
        self.method = kind if isinstance(kind, MethodConfig) else kv_cache_config(kind, bits, residual_length, **kw)
        self.config = config
        self.held = self.fp16 = 0
        self._last = None
        self.method.make_cache(config)  # fail early on settings the model cannot take

    def __call__(self):
        self._measure()
        self._last = self.method.make_cache(self.config)
        return self._last

    def _measure(self) -> None:
        from mpokit.layers.kv_cache import kv_cache_bytes

        if self._last is not None:
            held, fp16 = kv_cache_bytes(self._last)
            self.held, self.fp16 = self.held + held, self.fp16 + fp16
            self._last = None

    def bytes_ratio(self) -> float:
        """Bytes held / 16-bit bytes, summed over the caches made so far (each at its fullest)."""
        self._measure()
        return self.held / self.fp16 if self.fp16 else float("nan")
