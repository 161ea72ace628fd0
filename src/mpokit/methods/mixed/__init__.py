from mpokit.methods.mixed.config import MixedConfig
from mpokit.methods.mixed.transform import mixed_compress_

__all__ = ["MixedConfig", "mixed_compress_"]
