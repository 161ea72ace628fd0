from mpokit.methods.quant.config import GPTQConfig, QuantConfig
from mpokit.methods.quant.transform import quant_compress_

__all__ = ["QuantConfig", "GPTQConfig", "quant_compress_"]
