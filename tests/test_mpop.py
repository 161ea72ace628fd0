import pytest
import torch

from conftest import ByteTokenizer as Tok, tiny_llama
from mpokit.methods.mpop import (auxiliary_parameters, central_parameters, decompose_, dimension_squeeze_, mpo_linears,
                                 mpop_, squeeze_layer_, squeeze_schedule)
from mpokit.train import TextWindows, count_trainable, fit

TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def test_mpop_trains_only_auxiliary_cores(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 16))
    before = model(ids).logits
    decompose_(model, target_modules=["q_proj", "up_proj"])
    torch.testing.assert_close(model(ids).logits, before, atol=1e-4, rtol=1e-3)  # lossless start
    n = mpop_(model)
    aux, central = auxiliary_parameters(model), central_parameters(model)
    assert n == sum(p.numel() for p in aux) == count_trainable(model)
    assert n < 0.2 * sum(p.numel() for p in central)
    c0 = [p.detach().clone() for p in central]
    a0 = [p.detach().clone() for p in aux]
    other = model.model.embed_tokens.weight.detach().clone()
    res = fit(model, TextWindows(Tok(), TEXT, seq_len=16), str(tmp_path), max_steps=3, batch_size=2, lr=1e-2)
    assert res.trainable_params == n
    assert all(torch.equal(p, q) for p, q in zip(central, c0))
    assert all(not torch.equal(p, q) for p, q in zip(aux, a0))
    assert torch.equal(model.model.embed_tokens.weight, other)


def test_mpop_requires_mpo_layers():
    with pytest.raises(ValueError, match="MPOLinear"):
        mpop_(tiny_llama())


def test_squeeze_layer_and_schedule():
    model = tiny_llama()
    decompose_(model, target_modules=["up_proj"])
    _, layer = mpo_linears(model)[0]
    w = layer.full_weight().detach().clone()
    err = squeeze_layer_(layer, 4)
    assert max(layer.bonds) <= 4 and err > 0
    assert abs(float((layer.full_weight().detach() - w).norm() / w.norm()) - err) < 1e-4  # reported error is the real one
    assert squeeze_schedule(64, 8, 3) == [32, 16, 8]
    assert squeeze_schedule(8, 16, 3) == [16]


def test_dimension_squeeze_trains_between_cuts(tmp_path):
    model = tiny_llama()
    decompose_(model, target_modules=["up_proj", "down_proj"])
    data = TextWindows(Tok(), TEXT, seq_len=16)
    steps = []
    log = dimension_squeeze_(model, 4, 2, lambda: steps.append(
        fit(model, data, str(tmp_path / str(len(steps))), max_steps=2, batch_size=2, lr=1e-3)))
    assert [e["max_bond"] for e in log] == squeeze_schedule(16, 4, 2) and len(steps) == 2
    assert all(max(m.bonds) <= 4 for _, m in mpo_linears(model))
    assert log[-1]["core_params"] < log[0]["core_params"]
    assert all(s.global_step == 2 for s in steps)
