"""Pure tensor math on torch tensors: no nn.Module, no transformers."""
from mpokit.ops.contract import contract_flops, dense_flops, reconstruct_flops, tt_apply, tt_rows
from mpokit.ops.factorize import balanced_factors, choose_local_dims, mountain_order, prime_factors
from mpokit.ops.tt import (TTInfo, check_finite, core_shapes, count_params, full_bonds, pad_matrix, tt_svd,
                           tt_svd_to_budget, tt_to_matrix, bonds_for_budget, fill_bonds)

__all__ = [
    "contract_flops", "dense_flops", "reconstruct_flops", "tt_apply", "tt_rows", "balanced_factors",
    "choose_local_dims", "mountain_order", "prime_factors", "TTInfo", "check_finite", "core_shapes",
    "count_params", "full_bonds", "pad_matrix", "tt_svd", "tt_svd_to_budget", "tt_to_matrix", "bonds_for_budget", "fill_bonds",
]
