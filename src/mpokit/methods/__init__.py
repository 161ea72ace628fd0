"""One package per method; importing this module registers them all (see methods/base.py)."""
from mpokit.methods.base import (METHODS, REGISTRY, MethodConfig, Report, compress_, config_from_dict, get_method,
                                 method_names, register)
from mpokit.methods.aware import (ASVDConfig, AwareConfig, AwareGlobalConfig, MPO3CoreConfig, SVDConfig,
                                  WhitenedSVDConfig)
from mpokit.methods.dejavu import DejaVuConfig
from mpokit.methods.mixed import MixedConfig
from mpokit.methods.moefication import MoEficationConfig, MoEficationRefitConfig
from mpokit.methods.mpo import MPOConfig
from mpokit.methods.mpoe import MPOEConfig
from mpokit.methods.quant import GPTQConfig, QuantConfig
from mpokit.methods.share import ShareConfig
from mpokit.methods.full import FullConfig
from mpokit.methods.kd import KDConfig
from mpokit.methods.kv_cache import (DecoQuantKCConfig, DecoQuantKCRConfig, DecoQuantKVConfig, QuantoKVConfig,
                                     RTNKCConfig, RTNKCRConfig, RTNKVConfig)
from mpokit.methods.lora import LoRAConfig
from mpokit.methods.mpop import MPOPConfig, RecoverConfig
from mpokit.methods.opdf import OPDFConfig
from mpokit.methods.opf import OPFConfig

__all__ = ["METHODS", "REGISTRY", "MethodConfig", "Report", "compress_", "config_from_dict", "get_method",
           "method_names", "register", "AwareConfig", "MPO3CoreConfig", "AwareGlobalConfig", "WhitenedSVDConfig",
           "ASVDConfig", "SVDConfig", "MixedConfig", "MPOConfig", "QuantConfig", "GPTQConfig", "MoEficationConfig",
           "MoEficationRefitConfig", "DejaVuConfig", "MPOEConfig", "ShareConfig", "FullConfig", "KDConfig",
           "LoRAConfig", "MPOPConfig", "RecoverConfig", "OPFConfig", "OPDFConfig", "DecoQuantKVConfig", "RTNKVConfig",
           "DecoQuantKCConfig", "RTNKCConfig", "DecoQuantKCRConfig", "RTNKCRConfig", "QuantoKVConfig"]
