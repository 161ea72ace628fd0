"""MPOE: MPO experts sharing central cores, upcycled from a dense FFN; and the dense-expert baseline."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_bert, tiny_gpt2, tiny_llama
from mpokit import compress_, load_compressed, save_compressed, unload_
from mpokit.layers.mpoe import MPOEFFN, UpcycledMoE, mask_grad
from mpokit.methods.mpoe import MPOEConfig, moe_aux_loss, routed_layers




def _ids(vocab: int, batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_bert])
@pytest.mark.parametrize("expert_type,top_k", [("mpo", 2), ("mpo", 1), ("dense", 2)])
def test_upcycled_layer_starts_equal_to_dense(make, expert_type, top_k):
    model = make()
    ids = _ids(model.config.vocab_size)
    before = _logits(model, ids)
    report = compress_(model, MPOEConfig(num_experts=4, top_k=top_k, expert_type=expert_type), progress=False)
    layers = routed_layers(model)
    assert len(layers) == 2 and all(isinstance(m, MPOEFFN if expert_type == "mpo" else UpcycledMoE) for m in layers)
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-4, atol=1e-4)
    assert report.extra["expert_type"] == expert_type


def test_truncated_experts_differ_and_report_error():
    model = tiny_llama()
    ids = _ids(128)
    before = _logits(model, ids)
    report = compress_(model, MPOEConfig(num_experts=4, max_bond=4), progress=False)
    assert min(min(r.detail["truncation_error"].values()) for r in report.layers) > 0.05
    assert not torch.allclose(_logits(model, ids), before, atol=1e-3)


def test_central_core_is_shared_and_parameters_saved():
    model = tiny_llama()
    report = compress_(model, MPOEConfig(num_experts=8), progress=False)
    layer = routed_layers(model)[0]
    for mpo in layer.mpos.values():
        central = mpo.central()
        assert central.dim() == 4  # one core, no expert dimension
        assert all(p.shape[0] == 8 and p.dim() == 5 for p in mpo.auxiliary_parameters())
        assert central.numel() > max(p[0].numel() for p in mpo.auxiliary_parameters())
    dense_experts = compress_(tiny_llama(), MPOEConfig(num_experts=8, expert_type="dense"), progress=False)
    assert report.params_after < dense_experts.params_after
    assert report.extra["fewer_than_dense_experts"] > 2.5
    assert dense_experts.extra["fewer_than_dense_experts"] == pytest.approx(1.0)


def test_grad_mask_zeroes_part_of_the_central_gradient():
    x = torch.randn(50, 40, requires_grad=True)
    (mask_grad(x, 0.5) * 3).sum().backward()
    zero = (x.grad == 0).float().mean().item()
    assert 0.35 < zero < 0.65 and torch.all((x.grad == 0) | (x.grad == 3))
    y = torch.randn(50, 40, requires_grad=True)
    (mask_grad(y, 0.0) * 3).sum().backward()  # negative control: no mask, no zeros
    assert (y.grad == 0).sum() == 0


def _train(model, steps=15, lr=3e-3, coef=0.01):
    params = [p for m in routed_layers(model) for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    ids = _ids(model.config.vocab_size, batch=4, length=24)
    model.train()
    losses = []
    for _ in range(steps):
        out = model(input_ids=ids, labels=ids)
        loss = out.loss + coef * moe_aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return model.eval(), losses


def test_training_updates_experts_separately_and_unloads_exactly():
    model = tiny_llama()
    compress_(model, MPOEConfig(num_experts=4, top_k=2, grad_mask=0.5), progress=False)
    layer = routed_layers(model)[0]
    model, losses = _train(model)
    assert losses[-1] < losses[0]
    assert moe_aux_loss(model).item() > 0  # stored by the last training forward
    aux = layer.mpos["up"].auxiliary_parameters()[0]
    assert not torch.allclose(aux[0], aux[1])  # the experts drifted apart
    ids = _ids(128)
    after = _logits(model, ids)
    assert moe_aux_loss(model).item() == 0  # an eval forward stores no balance loss
    unload_(model)  # MPO experts -> dense experts, same routing
    assert all(isinstance(m, UpcycledMoE) for m in routed_layers(model))
    torch.testing.assert_close(_logits(model, ids), after, rtol=1e-5, atol=1e-5)


def test_balance_loss_in_training_mode():
    model = tiny_llama()
    compress_(model, MPOEConfig(num_experts=4, top_k=1), progress=False)
    model.train()
    model(input_ids=_ids(128))
    aux = moe_aux_loss(model)
    assert aux.requires_grad and aux.item() >= 2 * 0.99  # >= 1 per layer; 1 = perfectly balanced
    aux.backward()
    assert routed_layers(model)[0].router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("expert_type", ["mpo", "dense"])
def test_save_load_round_trip(expert_type, tmp_path):
    model = tiny_llama()
    compress_(model, MPOEConfig(num_experts=4, expert_type=expert_type, noise=0.1), progress=False)
    model, _ = _train(model, steps=3)
    ids = _ids(128)
    save_compressed(model, tmp_path / "ckpt")
    loaded = load_compressed(tmp_path / "ckpt")
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert [m.spec() for m in routed_layers(loaded)] == [m.spec() for m in routed_layers(model)]


def test_config_errors():
    with pytest.raises(ValueError, match="top_k"):
        MPOEConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="expert_type"):
        MPOEConfig(expert_type="switch")
    with pytest.raises(ValueError, match="grad_mask"):
        MPOEConfig(grad_mask=1.0)


def test_balance_cores_keeps_the_matrix_and_equalizes_scales():
    from mpokit.layers.mpoe import balance_cores
    from mpokit.ops.tt import tt_svd, tt_to_matrix

    w = torch.randn(24, 12, dtype=torch.float64)
    cores, _ = tt_svd(w, [2, 3, 4], [3, 2, 2])
    rms = [c.pow(2).mean().sqrt().item() for c in cores]
    assert max(rms) / min(rms) > 5  # TT-SVD leaves the norm in the last core
    balanced = balance_cores(cores)
    torch.testing.assert_close(tt_to_matrix(balanced), w, rtol=1e-10, atol=1e-10)
    rms = [c.pow(2).mean().sqrt().item() for c in balanced]
    assert max(rms) / min(rms) < 1 + 1e-9
