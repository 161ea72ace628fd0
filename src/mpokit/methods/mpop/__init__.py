"""MPOP: lightweight fine-tuning of auxiliary MPO cores, plus dimension squeezing."""
from mpokit.methods.mpop.core import (auxiliary_parameters, central_parameters, decompose_, dimension_squeeze_,
                                      mpo_linears, mpop_, squeeze_layer_, squeeze_schedule)

__all__ = ["auxiliary_parameters", "central_parameters", "decompose_", "dimension_squeeze_", "mpo_linears", "mpop_",
           "squeeze_layer_", "squeeze_schedule"]
