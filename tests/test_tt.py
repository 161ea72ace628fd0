"""ops/tt + ops/contract: TT-SVD exactness, truncation bound, budgets, contraction, FLOPs."""
from __future__ import annotations

import math

import pytest
import torch

from mpokit.ops.contract import contract_flops, dense_flops, reconstruct_flops, tt_apply, tt_rows
from mpokit.ops.factorize import choose_local_dims
from mpokit.ops.tt import (core_shapes, count_params, full_bonds, pad_matrix, tt_svd, tt_svd_to_budget, tt_to_matrix)

# (out_dims, in_dims): balanced 2/3/4-core layouts, uneven ones, and the low-rank 2-core (out,1)x(1,in)
LAYOUTS = [
    ([4, 8], [6, 4]),
    ([4, 6, 4], [3, 4, 4]),
    ([2, 3, 4, 2], [2, 2, 3, 2]),
    ([8, 2, 3], [1, 5, 7]),
    ([24, 1], [1, 20]),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b)).item()


def random_matrix(out_dims, in_dims, dtype=torch.float64):
    return torch.randn(math.prod(out_dims), math.prod(in_dims), dtype=dtype)


@pytest.mark.parametrize("out_dims,in_dims", LAYOUTS)
def test_full_bond_recovery_float64(out_dims, in_dims):
    w = random_matrix(out_dims, in_dims)
    cores, info = tt_svd(w, out_dims, in_dims)
    assert info.bonds == full_bonds(out_dims, in_dims)
    assert [tuple(c.shape[1:3]) for c in cores] == list(zip(out_dims, in_dims))
    assert rel_err(tt_to_matrix(cores), w) < 1e-10
    assert info.error_bound < 1e-10 * info.norm


@pytest.mark.parametrize("out_dims,in_dims", LAYOUTS)
def test_full_bond_recovery_float32(out_dims, in_dims):
    w = random_matrix(out_dims, in_dims, torch.float32)
    cores, _ = tt_svd(w, out_dims, in_dims, compute_dtype=torch.float32)
    assert cores[0].dtype == torch.float32
    assert rel_err(tt_to_matrix(cores), w) < 1e-5


@pytest.mark.parametrize("rows,cols", [(97, 61), (13, 29), (30, 7)])
def test_padded_prime_dims_recover_exactly(rows, cols):
    w = torch.randn(rows, cols, dtype=torch.float64)
    od, idd = choose_local_dims(rows, 3), choose_local_dims(cols, 3)
    padded = pad_matrix(w, math.prod(od), math.prod(idd))
    assert padded.shape == (math.prod(od), math.prod(idd))
    assert torch.equal(padded[:rows, :cols], w) and padded[rows:].abs().sum() == 0
    cores, _ = tt_svd(padded, od, idd)
    assert rel_err(tt_to_matrix(cores)[:rows, :cols], w) < 1e-10


@pytest.mark.parametrize("out_dims,in_dims", LAYOUTS)
@pytest.mark.parametrize("truncation", [{"max_bond": 3}, {"cutoff": 0.3}, {"max_bond": [2, 5, 3]}])
def test_truncation_error_bound_and_negative_control(out_dims, in_dims, truncation):
    if isinstance(truncation.get("max_bond"), list):
        truncation = {"max_bond": truncation["max_bond"][: len(out_dims) - 1]}
    w = random_matrix(out_dims, in_dims)
    cores, info = tt_svd(w, out_dims, in_dims, **truncation)
    err = torch.linalg.matrix_norm(w - tt_to_matrix(cores)).item()
    # ||W - MPO(W)||_F <= sqrt(sum e_k^2); TT-SVD with left-orthonormal cores makes it an equality
    assert err <= info.error_bound * (1 + 1e-9) + 1e-12
    assert err == pytest.approx(info.error_bound, rel=1e-6)
    if "cutoff" in truncation:
        assert info.relative_error <= truncation["cutoff"] + 1e-12
    # negative control: a random (full-rank) matrix really is changed by truncation
    assert info.bonds != full_bonds(out_dims, in_dims)
    assert err > 1e-3 * info.norm
    assert not torch.allclose(tt_to_matrix(cores), w)


def test_cutoff_zero_is_lossless_and_bonds_shrink_with_cutoff():
    od, idd = [4, 6, 4], [3, 4, 4]
    w = random_matrix(od, idd)
    _, lossless = tt_svd(w, od, idd, cutoff=0.0)
    _, loose = tt_svd(w, od, idd, cutoff=0.5)
    assert lossless.bonds == full_bonds(od, idd)
    assert all(a <= b for a, b in zip(loose.bonds, lossless.bonds)) and loose.bonds != lossless.bonds


def _low_tt_rank(out_dims, in_dims, bond):
    """A matrix whose every TT unfolding has rank <= bond (built from random small cores)."""
    shapes = [(1 if k == 0 else bond, o, i, 1 if k == len(out_dims) - 1 else bond)
              for k, (o, i) in enumerate(zip(out_dims, in_dims))]
    return tt_to_matrix([torch.randn(s, dtype=torch.float64) for s in shapes])


@pytest.mark.parametrize("out_dims,in_dims", [([4, 6, 4], [3, 4, 4]), ([96, 1], [1, 48])])
def test_rank_deficient_and_zero_matrices_give_no_nan(out_dims, in_dims):
    rank2 = _low_tt_rank(out_dims, in_dims, 2)
    zero = torch.zeros_like(rank2)
    for w in (rank2, zero):
        for kw in ({}, {"max_bond": 4}, {"cutoff": 0.1}, {"cutoff": 0.0}):
            cores, info = tt_svd(w, out_dims, in_dims, **kw)
            rebuilt = tt_to_matrix(cores)
            assert all(torch.isfinite(c).all() for c in cores)
            assert math.isfinite(info.error_bound) and math.isfinite(info.relative_error)
            assert torch.allclose(rebuilt, w, atol=1e-9)  # bond >= 2 keeps everything of a TT-rank-2 matrix
    _, info = tt_svd(rank2, out_dims, in_dims, cutoff=1e-10)
    assert max(info.bonds) == 2  # rank revealed, not padded with noise
    _, info = tt_svd(zero, out_dims, in_dims, max_bond=2)
    assert info.relative_error == 0.0 and info.norm == 0.0
    cores, _ = tt_svd_to_budget(zero, out_dims, in_dims, zero.numel() // 2)
    assert all(torch.isfinite(c).all() for c in cores)
    assert tt_to_matrix(cores).abs().max() == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_weights_raise(bad):
    w = torch.randn(24, 24)
    w[3, 5] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        tt_svd(w, [4, 6], [6, 4])


def test_bad_layouts_raise():
    w = torch.randn(24, 24)
    with pytest.raises(ValueError, match="expected local dims"):
        tt_svd(w, [4, 5], [6, 4])
    with pytest.raises(ValueError, match="expected as many out dims"):
        tt_svd(w, [4, 6], [24])
    with pytest.raises(ValueError, match="expected 1 bond caps"):
        tt_svd(w, [4, 6], [6, 4], max_bond=[2, 2])
    with pytest.raises(ValueError, match="expected a 2-D"):
        tt_svd(torch.randn(24), [24], [1])
    with pytest.raises(ValueError, match="expected padded shape"):
        pad_matrix(w, 12, 24)


@pytest.mark.parametrize("out_dims,in_dims", [([4, 6, 4], [3, 4, 4]), ([2, 3, 4, 2], [2, 2, 3, 2]), ([96, 1], [1, 48])])
@pytest.mark.parametrize("fraction", [0.9, 0.5, 0.2])
def test_budget_truncation_fits_and_is_tight(out_dims, in_dims, fraction):
    w = random_matrix(out_dims, in_dims)
    max_params = int(fraction * w.numel())
    cores, info = tt_svd_to_budget(w, out_dims, in_dims, max_params)
    used = sum(c.numel() for c in cores)
    assert used == count_params(out_dims, in_dims, info.bonds)
    assert used <= max_params
    # tight: one more unit on the cheapest bond that can still grow would overflow the budget
    limits = full_bonds(out_dims, in_dims)
    growable = [k for k in range(len(info.bonds)) if info.bonds[k] < limits[k]]
    r = [1, *info.bonds, 1]
    cheapest = min(out_dims[k] * in_dims[k] * r[k] + out_dims[k + 1] * in_dims[k + 1] * r[k + 2] for k in growable)
    assert used + cheapest > max_params
    err = torch.linalg.matrix_norm(w - tt_to_matrix(cores)).item()
    assert err <= info.error_bound * (1 + 1e-9)


def test_budget_below_minimum_raises():
    with pytest.raises(ValueError, match="parameter budget"):
        tt_svd_to_budget(torch.randn(96, 48), [4, 6, 4], [3, 4, 4], 10)


@pytest.mark.parametrize("out_dims,in_dims", LAYOUTS)
@pytest.mark.parametrize("max_bond", [None, 3])
@pytest.mark.parametrize("order", ["ltr", "rtl", "auto"])
def test_contraction_equals_dense(out_dims, in_dims, max_bond, order):
    w = random_matrix(out_dims, in_dims)
    cores, _ = tt_svd(w, out_dims, in_dims, max_bond=max_bond)
    x = torch.randn(7, w.shape[1], dtype=torch.float64)
    expected = x @ tt_to_matrix(cores).T
    assert torch.allclose(tt_apply(x, cores, order=order), expected, rtol=1e-10, atol=1e-10)


def test_contraction_negative_control():
    """A permuted input must give a different answer (the test above can fail)."""
    od, idd = [4, 6, 4], [3, 4, 4]
    cores, _ = tt_svd(random_matrix(od, idd), od, idd)
    x = torch.randn(5, 48, dtype=torch.float64)
    assert not torch.allclose(tt_apply(x[:, torch.randperm(48)], cores), x @ tt_to_matrix(cores).T)


@pytest.mark.parametrize("out_dims,in_dims", LAYOUTS)
def test_row_gather_equals_table(out_dims, in_dims):
    w = random_matrix(out_dims, in_dims)
    cores, _ = tt_svd(w, out_dims, in_dims, max_bond=4)
    table = tt_to_matrix(cores)
    ids = torch.tensor([0, w.shape[0] - 1, 3, 3, w.shape[0] // 2])
    assert torch.allclose(tt_rows(ids, cores), table[ids], atol=1e-12)


def test_flop_estimates():
    od, idd = [8, 16, 12], [8, 9, 8]  # a 1536 x 576 FFN weight
    full = core_shapes(od, idd, full_bonds(od, idd))
    small = core_shapes(od, idd, [4, 4])
    assert dense_flops(512, 1536, 576) == 2 * 512 * 1536 * 576
    # lossless bonds cost more than the dense matmul; tiny bonds cost less; "auto" is the cheaper order
    assert contract_flops(512, full) > dense_flops(512, 1536, 576)
    assert contract_flops(512, small) < dense_flops(512, 1536, 576)
    assert contract_flops(512, small) == min(contract_flops(512, small, "ltr"), contract_flops(512, small, "rtl"))
    assert contract_flops(1024, small) == 2 * contract_flops(512, small)
    # low-rank U @ V: right-to-left is 2*B*r*(I+O); left-to-right would form a (B,O,r,I) intermediate
    lowrank = [(1, 1536, 1, 8), (8, 1, 576, 1)]
    assert contract_flops(512, lowrank, "rtl") == 2 * 512 * 8 * (576 + 1536)
    assert contract_flops(512, lowrank) == contract_flops(512, lowrank, "rtl")
    assert reconstruct_flops(lowrank) == 2 * 1536 * 8 * 576
