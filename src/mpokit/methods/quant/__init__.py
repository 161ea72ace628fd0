from mpokit.methods.quant.config import QuantConfig
from mpokit.methods.quant.transform import quant_compress

__all__ = ["QuantConfig", "quant_compress"]
