"""mpokit: compress and adapt transformer models with matrix product operators."""
from mpokit.io import load_compressed, load_model, save_compressed
from mpokit.layers import MPOEmbedding, MPOLinear
from mpokit.methods import MethodConfig, MPOConfig, Report, compress_
from mpokit.surgery import unload_
from mpokit.version import __version__

__all__ = ["__version__", "compress_", "unload_", "save_compressed", "load_compressed", "load_model",
           "MPOLinear", "MPOEmbedding", "MethodConfig", "MPOConfig", "Report"]
