"""mpokit: compress and adapt transformer models with matrix product operators.

The public API, as torchao keeps it: the in-place entry points, save/load, the calibration input
(`mpokit.Calibration`) and every registered method config (`mpokit.AwareConfig`, `mpokit.GPTQConfig`, ...).
"""
from mpokit.calibration.activations import offload_activations
from mpokit.data import Calibration
from mpokit.io import load_compressed, load_model, save_compressed
from mpokit.layers import MPOEmbedding, MPOLinear
from mpokit.methods import METHODS, MethodConfig, Report, compress_, get_method, method_names
from mpokit.methods import AwareConfig, GPTQConfig, MPOConfig, QuantConfig  # noqa: F401  (the common ones, spelled out)
from mpokit.surgery import unload_
from mpokit.version import __version__

# Every registered config by its class name: a new method package needs no line here.
globals().update({cls.__name__: cls for cls in METHODS.values()})

__all__ = ["__version__", "compress_", "Calibration", "offload_activations", "unload_", "save_compressed",
           "load_compressed", "load_model", "MPOLinear", "MPOEmbedding", "MethodConfig", "Report", "get_method", "method_names",
           *sorted(cls.__name__ for cls in METHODS.values())]
