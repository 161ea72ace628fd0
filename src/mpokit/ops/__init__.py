"""Pure tensor math on torch tensors: no nn.Module, no transformers."""
from mpokit.ops.budget import Candidate, best_within, hull, plan
from mpokit.ops.contract import contract_flops, dense_flops, reconstruct_flops, tt_apply, tt_rows
from mpokit.ops.factorize import balanced_factors, choose_local_dims, mountain_order, prime_factors
from mpokit.ops.tt import (TTInfo, bond_ladder, bond_raises, bonds_for_budget, check_finite, core_shapes, count_params,
                           full_bonds, pad_matrix, tt_svd, tt_svd_to_budget, tt_to_matrix, tt_truncate)

__all__ = [
    "Candidate", "best_within", "hull", "plan", "contract_flops", "dense_flops", "reconstruct_flops", "tt_apply",
    "tt_rows", "balanced_factors", "choose_local_dims", "mountain_order", "prime_factors", "TTInfo", "check_finite", "core_shapes",
    "count_params", "full_bonds", "pad_matrix", "tt_svd", "tt_svd_to_budget", "tt_to_matrix",
    "tt_truncate", "bond_ladder", "bond_raises", "bonds_for_budget",
]
