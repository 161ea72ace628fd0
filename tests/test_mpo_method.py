"""methods/mpo: MPOConfig validation, compress_ in place, global budget, tied weights."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from mpokit import MPOConfig, compress_
from mpokit.layers.mpo import MPOEmbedding, MPOLinear
from mpokit.methods.base import config_from_dict
from mpokit.methods.presets import build_config
from mpokit.surgery import find_targets, get_module


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("budget", [0.99, 0.9, 0.7, 0.5, 0.3, 0.1])  # 1.0 keeps layers dense: test_faults_budget.py
def test_budget_honoured_within_one_percent(budget):
    model = tiny_llama()
    before = sum(get_module(model, n).weight.numel() for n in find_targets(model))
    report = compress_(model, MPOConfig(budget=budget), progress=False)
    after = sum(get_module(model, n).core_params() for n in find_targets(model, types=(MPOLinear,)))
    assert report.params_before == before and report.params_after == after
    assert after <= budget * before  # never over budget ...
    assert after >= (budget - 0.01) * before  # ... and within 1% of it
    assert all(len(get_module(model, r.name).cores) == 3 for r in report.layers)


@pytest.mark.parametrize("cfg", [MPOConfig(budget=0.5, lowrank=True), MPOConfig(budget=0.4, num_cores=4)])
def test_budget_other_layouts(cfg):
    report = compress_(tiny_llama(), cfg, progress=False)
    assert cfg.budget - 0.01 <= report.kept_fraction <= cfg.budget


def test_lossless_compression_keeps_logits(llama):
    ids = torch.randint(0, 128, (2, 12))
    reference = logits(llama, ids)
    report = compress_(llama, MPOConfig(), progress=False)
    assert len(report.layers) == 14 and all(r.rel_error < 1e-6 for r in report.layers)
    assert isinstance(llama.model.layers[0].mlp.down_proj, MPOLinear)
    assert torch.allclose(logits(llama, ids), reference, atol=1e-4)
    assert llama._mpokit_methods[-1]["method"] == "mpo-datafree"


def test_truncation_changes_logits_and_errors_grow_as_budget_shrinks():
    ids = torch.randint(0, 128, (2, 12))
    reference = logits(tiny_llama(), ids)
    errs = []
    for budget in (0.9, 0.5, 0.2):
        model = tiny_llama()
        report = compress_(model, MPOConfig(budget=budget), progress=False)
        assert not torch.allclose(logits(model, ids), reference, atol=1e-3)
        errs.append(sum(r.rel_error for r in report.layers))
    assert errs[0] < errs[1] < errs[2]


def test_tied_embedding_and_lm_head_share_one_set_of_cores(llama):
    ids = torch.randint(0, 128, (2, 12))
    report = compress_(llama, MPOConfig(max_bond=8, target_modules=["embed_tokens", "lm_head"]), progress=False)
    emb, head = llama.model.embed_tokens, llama.lm_head
    assert isinstance(emb, MPOEmbedding) and isinstance(head, MPOLinear)
    assert head.cores is emb.cores and head.tied_to == "model.embed_tokens"
    assert len(report.layers) == 1 and report.extra["tied"] == {"lm_head": "model.embed_tokens"}
    with torch.no_grad():
        assert torch.equal(head.weight, emb.weight)
        emb.cores[0].mul_(2.0)  # one edit reaches both
        assert torch.equal(head.weight, emb.weight)
    assert torch.isfinite(logits(llama, ids)).all()


def test_gpt2_conv1d_compress(gpt2):
    ids = torch.randint(0, 96, (1, 10))
    reference = logits(gpt2, ids)
    compress_(gpt2, MPOConfig(), progress=False)
    assert isinstance(gpt2.transformer.h[0].attn.c_attn, MPOLinear)
    assert gpt2.transformer.h[0].attn.c_attn.orig_type == "Conv1D"
    assert torch.allclose(logits(gpt2, ids), reference, atol=1e-4)


def test_local_dims_override(llama):
    cfg = MPOConfig(local_dims={"mlp.up_proj": [[2, 8, 8], [4, 4, 4]]}, max_bond=4)
    compress_(llama, cfg, progress=False)
    up = llama.model.layers[1].mlp.up_proj
    assert up.out_dims == [2, 8, 8] and up.in_dims == [4, 4, 4]
    assert llama.model.layers[1].mlp.gate_proj.out_dims != [2, 8, 8]


@pytest.mark.parametrize("kw,match", [
    ({"budget": 0.0}, r"budget in \(0, 1\]"),
    ({"budget": 1.5}, r"budget in \(0, 1\]"),
    ({"budget": -0.2}, r"budget in \(0, 1\]"),
    ({"budget": 0.5, "max_bond": 4}, "at most one of"),
    ({"max_bond": 0}, "max_bond >= 1"),
    ({"cutoff": 1.0}, "cutoff in"),
    ({"num_cores": 1}, "num_cores >= 2"),
    ({"forward_mode": "fast"}, "forward_mode"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        MPOConfig(**kw)


def test_unknown_module_name_raises_and_model_is_untouched(llama):
    ids = torch.randint(0, 128, (1, 8))
    reference = logits(llama, ids)
    with pytest.raises(ValueError, match="'q_projection'"):
        compress_(llama, MPOConfig(target_modules=["q_proj", "q_projection"]), progress=False)
    assert not any(isinstance(m, MPOLinear) for m in llama.modules())
    assert torch.equal(logits(llama, ids), reference)


def test_nan_weights_raise_naming_nan(llama):
    with torch.no_grad():
        llama.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        compress_(llama, MPOConfig(budget=0.5), progress=False)
    with pytest.raises(ValueError, match="NaN/Inf"):
        compress_(llama, MPOConfig(max_bond=4), progress=False)


def test_zero_layer_compresses(llama):
    with torch.no_grad():
        llama.model.layers[0].self_attn.o_proj.weight.zero_()
    report = compress_(llama, MPOConfig(budget=0.5), progress=False)
    assert all(torch.isfinite(c).all() for c in llama.model.layers[0].self_attn.o_proj.cores)
    assert torch.isfinite(logits(llama, torch.randint(0, 128, (1, 8)))).all()
    assert report.kept_fraction <= 0.5


def test_config_json_round_trip_and_presets():
    cfg = MPOConfig(budget=0.3, target_modules=["q_proj"], local_dims={"q_proj": [[4, 4, 4], [4, 4, 4]]})
    again = config_from_dict(cfg.to_dict())
    assert again == cfg and again.to_json() == cfg.to_json()
    with pytest.raises(ValueError, match="unknown MPOConfig fields"):
        MPOConfig.from_dict({"budgett": 0.3})
    with pytest.raises(ValueError, match="known method"):
        config_from_dict({"method": "nope"})
    preset = build_config("mpo-datafree", budget=0.5)
    assert isinstance(preset, MPOConfig) and preset.num_cores == 3 and preset.budget == 0.5
    with pytest.raises(ValueError, match="unknown method"):
        build_config("nope")


def test_compress_rejects_unregistered_config(llama):
    with pytest.raises(TypeError, match="registered method config"):
        compress_(llama, object())
