"""KV-cache methods (DecoQuant, RTN, their -kc/-kcr/-rk/-long layouts, quanto) and the per-window cache factory."""
from mpokit.methods.kv_cache.config import (DecoQuantKCConfig, DecoQuantKCRConfig, DecoQuantKVConfig, DecoQuantLongConfig,
                                            DecoQuantRKConfig, QuantoKVConfig, RTNKCConfig, RTNKCRConfig, RTNKVConfig, RTNLongConfig)
from mpokit.methods.kv_cache.factory import KV_PRESETS, KVCacheFactory, kv_cache_config, make_kv_cache

__all__ = ["DecoQuantKVConfig", "RTNKVConfig", "DecoQuantKCConfig", "RTNKCConfig", "DecoQuantKCRConfig",
           "RTNKCRConfig", "DecoQuantRKConfig", "DecoQuantLongConfig", "RTNLongConfig", "QuantoKVConfig", "KVCacheFactory",
           "kv_cache_config", "make_kv_cache", "KV_PRESETS"]
