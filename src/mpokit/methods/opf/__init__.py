"""OPF: over-parameterized fine-tuning (expand to long MPOs, train, contract back)."""
from mpokit.methods.opf.config import OPFConfig
from mpokit.methods.opf.core import (contract_, expand_, expand_linear, fisher_scores, opf_layers, opf_layout,
                                     select_top, stable_rank_scores)

__all__ = ["OPFConfig", "contract_", "expand_", "expand_linear", "fisher_scores", "opf_layers", "opf_layout",
           "select_top", "stable_rank_scores"]
