"""One package per method; importing this module registers them all."""
from mpokit.methods.base import REGISTRY, MethodConfig, Report, compress_, config_from_dict, register
from mpokit.methods.aware import AwareConfig
from mpokit.methods.moefication import MoEficationConfig
from mpokit.methods.mpo import MPOConfig
from mpokit.methods.mpoe import MPOEConfig
from mpokit.methods.quant import QuantConfig
from mpokit.methods.share import ShareConfig

__all__ = ["MoEficationConfig", "MPOEConfig", "ShareConfig", "REGISTRY", "MethodConfig", "Report", "compress_", "config_from_dict", "register", "AwareConfig", "MPOConfig", "QuantConfig"]
