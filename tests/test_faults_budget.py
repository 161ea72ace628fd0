"""Issue 15 item 7: `--budget 1.0` with mpo-datafree lost accuracy silently (mean layer error 0.26).

Budget 1.0 means no loss: a layer is its full-bond (exact) MPO where that is no larger than the
dense layer, else it stays dense. Budget 0.5 is the negative control.
"""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from mpokit import MPOConfig, compress_, load_compressed, save_compressed
from mpokit.surgery import find_targets, get_module
from mpokit.surgery.targets import weight_matrix


def weights(model) -> dict[str, torch.Tensor]:
    return {n: weight_matrix(get_module(model, n)).detach().clone() for n in find_targets(model)}


def layer_errors(model, before: dict[str, torch.Tensor]) -> list[float]:
    return [float(torch.linalg.matrix_norm(weight_matrix(get_module(model, n)).detach() - w) / torch.linalg.matrix_norm(w))
            for n, w in before.items()]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_mpo_datafree_budget_one_is_lossless(tmp_path):
    for make in (tiny_llama, tiny_gpt2):
        model = make()
        ids = torch.randint(0, model.config.vocab_size, (2, 12))
        before, reference = weights(model), logits(model, ids)
        report = compress_(model, MPOConfig(budget=1.0), progress=False)
        reported = [r.rel_error for r in report.layers]
        assert sum(reported) / len(reported) < 1e-5  # what the CLI prints as mean_rel_error
        measured = layer_errors(model, before)
        assert sum(measured) / len(measured) < 1e-5 and max(measured) < 1e-5
        assert report.kept_fraction <= 1.0
        assert torch.allclose(logits(model, ids), reference, atol=1e-5)
        save_compressed(model, tmp_path / make.__name__)
        assert torch.allclose(logits(load_compressed(tmp_path / make.__name__), ids), reference, atol=1e-5)


def test_budget_one_keeps_a_layer_dense_only_where_its_exact_mpo_is_larger():
    model = tiny_llama()
    report = compress_(model, MPOConfig(budget=1.0), progress=False)
    # a full-bond MPO of a generic matrix always has more parameters than the matrix
    assert {r.kind for r in report.layers} == {"dense"}
    assert all(r.params_after == r.params_before for r in report.layers)
    assert all(isinstance(get_module(model, r.name), torch.nn.Linear) for r in report.layers)


def test_budget_half_is_lossy_negative_control():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 12))
    before, reference = weights(model), logits(model, ids)
    report = compress_(model, MPOConfig(budget=0.5), progress=False)
    measured = layer_errors(model, before)
    assert sum(measured) / len(measured) > 0.1
    assert sum(r.rel_error for r in report.layers) / len(report.layers) > 0.1
    assert report.kept_fraction <= 0.5
    assert not torch.allclose(logits(model, ids), reference, atol=1e-3)


@pytest.mark.parametrize("kwargs", [{"max_bond": 0}, {"max_bond": -3}, {"cutoff": float("nan")}, {"cutoff": -0.1}])
def test_tt_svd_rejects_bad_truncation(kwargs):
    """Issue 15 item 13 at the ops level: max_bond 0 used to become rank 1, a NaN cutoff lossless."""
    import torch

    from mpokit.ops.tt import tt_svd

    with pytest.raises(ValueError, match="expected"):
        tt_svd(torch.randn(8, 8), [2, 4], [4, 2], **kwargs)
