"""MPOP: lightweight fine-tuning of auxiliary MPO cores, plus dimension squeezing; recovery trains all cores."""
from mpokit.methods.mpop.config import MPOPConfig, RecoverConfig
from mpokit.methods.mpop.core import (auxiliary_parameters, central_parameters, decompose_, dimension_squeeze_,
                                      mpo_linears, mpop_, squeeze_layer_, squeeze_schedule)

__all__ = ["MPOPConfig", "RecoverConfig", "auxiliary_parameters", "central_parameters", "decompose_",
           "dimension_squeeze_", "mpo_linears", "mpop_", "squeeze_layer_", "squeeze_schedule"]
