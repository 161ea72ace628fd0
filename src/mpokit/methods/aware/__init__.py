from mpokit.methods.aware.config import (ASVDConfig, AwareConfig, AwareGlobalConfig, MPO3CoreConfig, SVDConfig,
                                         WhitenedSVDConfig)
from mpokit.methods.aware.transform import aware_compress_

__all__ = ["AwareConfig", "MPO3CoreConfig", "AwareGlobalConfig", "WhitenedSVDConfig", "ASVDConfig", "SVDConfig", "aware_compress_"]
