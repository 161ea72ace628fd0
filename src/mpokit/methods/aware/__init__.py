from mpokit.methods.aware.config import AwareConfig
from mpokit.methods.aware.transform import aware_compress

__all__ = ["AwareConfig", "aware_compress"]
