"""KV-cache methods (DecoQuant, RTN, their -kc/-kcr layouts, quanto) and the per-window cache factory."""
from mpokit.methods.kv_cache.config import (DecoQuantKCConfig, DecoQuantKCRConfig, DecoQuantKVConfig, QuantoKVConfig,
                                            RTNKCConfig, RTNKCRConfig, RTNKVConfig)
from mpokit.methods.kv_cache.factory import KV_PRESETS, KVCacheFactory, kv_cache_config, make_kv_cache

__all__ = ["DecoQuantKVConfig", "RTNKVConfig", "DecoQuantKCConfig", "RTNKCConfig", "DecoQuantKCRConfig",
           "RTNKCRConfig", "QuantoKVConfig", "KVCacheFactory", "kv_cache_config", "make_kv_cache", "KV_PRESETS"]
