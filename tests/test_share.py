"""Cross-layer sharing of MPO central cores: the fit, the method, budgets, save/load, unload."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from mpokit import compress_, load_compressed, save_compressed, unload_
from mpokit.eval import count_params
from mpokit.layers import MPOLinear
from mpokit.methods.share import ShareConfig, weight_types
from mpokit.ops.shared_tt import fit_shared_central, from_three_way, to_three_way




OD, ID = [2, 3, 4], [3, 2, 2]  # a 24 x 12 matrix; n = (6, 6, 8)


def test_three_way_round_trip():
    w = torch.randn(24, 12, dtype=torch.float64)
    assert torch.equal(from_three_way(to_three_way(w, OD, ID), OD, ID), w)


def test_single_matrix_full_bonds_is_exact_and_truncation_is_not():
    w = torch.randn(24, 12, dtype=torch.float64)
    fit = fit_shared_central([w], OD, ID, 6, 8)
    assert fit.relative_errors[0] < 1e-10
    cut = fit_shared_central([w], OD, ID, 2, 2)
    assert cut.relative_errors[0] > 0.1


def test_shared_fit_lowers_error_and_beats_a_foreign_central():
    mats = [torch.randn(24, 12, dtype=torch.float64) for _ in range(3)]
    fit = fit_shared_central(mats, OD, ID, 4, 5, sweeps=6)
    assert all(b <= a * (1 + 1e-9) for a, b in zip(fit.history, fit.history[1:]))  # ALS never goes up
    first = fit_shared_central(mats, OD, ID, 4, 5, init="first")
    assert sum(fit.relative_errors) < sum(first.relative_errors)  # a fitted central serves all layers better
    assert first.relative_errors[0] < min(first.relative_errors[1:])  # "first" fits its own layer best
    assert fit.central.shape == (4, 3, 2, 5) and fit.left[0].shape == (1, 2, 3, 4) and fit.right[0].shape == (5, 4, 2, 1)


def test_weight_types_groups_by_layer_index():
    types = weight_types(["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj", "model.layers.0.self_attn.q_proj"])
    assert types == {"model.layers.*.mlp.up_proj": [(0, "model.layers.0.mlp.up_proj"), (1, "model.layers.1.mlp.up_proj")],
                     "model.layers.*.self_attn.q_proj": [(0, "model.layers.0.self_attn.q_proj")]}
    with pytest.raises(ValueError, match="numbered layers"):
        weight_types(["lm_head"])


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))


def test_group_of_one_at_full_bond_is_lossless_and_sharing_is_not():
    model = tiny_llama()
    before = _logits(model, IDS)
    compress_(model, ShareConfig(groups=1, sweeps=1), progress=False)
    torch.testing.assert_close(_logits(model, IDS), before, rtol=1e-4, atol=1e-4)
    shared = tiny_llama()
    compress_(shared, ShareConfig(groups=0, sweeps=2), progress=False)
    assert not torch.allclose(_logits(shared, IDS), before, atol=1e-3)


def test_central_is_one_parameter_and_parameters_saved():
    alone, model = tiny_llama(layers=4), tiny_llama(layers=4)
    r_alone = compress_(alone, ShareConfig(groups=1, max_bond=6), progress=False)
    r_pairs = compress_(model, ShareConfig(groups=2, max_bond=6), progress=False)
    q = [model.model.layers[i].self_attn.q_proj for i in range(4)]
    assert all(isinstance(m, MPOLinear) for m in q)
    assert q[0].cores[1] is q[1].cores[1] and q[2].cores[1] is q[3].cores[1] and q[1].cores[1] is not q[2].cores[1]
    assert q[0].cores[0] is not q[1].cores[0]  # auxiliary cores stay per layer
    saved = count_params(alone) - count_params(model)
    assert saved > 0 and r_pairs.extra["params_saved_by_sharing"] == saved
    assert r_alone.extra["params_saved_by_sharing"] == 0
    assert r_pairs.params_after == r_alone.params_after - saved  # the report counts each central once


def test_budget_is_respected_per_weight_type():
    model = tiny_llama(layers=4)
    report = compress_(model, ShareConfig(groups=0, budget=0.2), progress=False)
    assert report.kept_fraction <= 0.2
    assert report.kept_fraction > 0.1  # the planner spends most of it
    with pytest.raises(ValueError, match="at most one"):
        ShareConfig(budget=0.2, max_bond=4)


def test_training_moves_a_shared_central_for_all_layers():
    model = tiny_llama()
    compress_(model, ShareConfig(groups=0, max_bond=4), progress=False)
    q0, q1 = model.model.layers[0].self_attn.q_proj, model.model.layers[1].self_attn.q_proj
    start = q0.cores[1].detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    assert not torch.equal(q0.cores[1], start) and q0.cores[1] is q1.cores[1]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_save_load_keeps_sharing_and_unload_restores_linears(make, tmp_path):
    model = make()
    compress_(model, ShareConfig(groups=0, max_bond=5), progress=False)
    ids = IDS % model.config.vocab_size
    save_compressed(model, tmp_path / "ckpt")
    loaded = load_compressed(tmp_path / "ckpt")
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert count_params(loaded) == count_params(model)
    after = _logits(model, ids)
    unload_(model)
    assert not any(isinstance(m, MPOLinear) for m in model.modules())
    torch.testing.assert_close(_logits(model, ids), after, rtol=1e-5, atol=1e-5)
