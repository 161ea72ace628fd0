from mpokit.methods.mpo.config import MPOConfig
from mpokit.methods.mpo.transform import mpo_compress_

__all__ = ["MPOConfig", "mpo_compress_"]
