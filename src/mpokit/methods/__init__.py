"""One package per method; importing this module registers them all."""
from mpokit.methods.base import REGISTRY, MethodConfig, Report, compress_, config_from_dict, register
from mpokit.methods.mpo import MPOConfig

__all__ = ["REGISTRY", "MethodConfig", "Report", "compress_", "config_from_dict", "register", "MPOConfig"]
