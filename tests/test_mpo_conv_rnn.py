"""MPOConv2d, MPOLSTM, MPOGRU: torch's numerics, surgery through compress_, undo, save/load, training."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mpokit import MPOConfig, compress_, load_compressed, save_compressed, unload_
from mpokit.layers import LAYERS
from mpokit.layers.mpo_conv import MPOConv2d
from mpokit.layers.mpo_rnn import MPOGRU, MPOLSTM, MPORNN

CONV_ARGS = [dict(), dict(stride=2, padding=1, dilation=2), dict(padding="same", dilation=2, bias=False),
             dict(padding="same"), dict(padding=(2, 0))]  # "same" with kernel width 2: one pad column, on the right


class TinyNet(nn.Module):
    """A conv, an LSTM over the image rows and a GRU: every new layer type in one model."""

    def __init__(self, batch_first: bool = True, bidirectional: bool = False, **conv):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, **{"padding": 1, **conv})
        self.lstm = nn.LSTM(8 * 6, 12, num_layers=2, batch_first=batch_first, bidirectional=bidirectional)
        self.gru = nn.GRU(12 * (2 if bidirectional else 1), 10, batch_first=batch_first)
        self.head = nn.Linear(10, 5)
        self.batch_first = batch_first

    def forward(self, x):  # x (B, 3, 6, 6)
        f = torch.relu(self.conv(x))  # (B, 8, 6, 6)
        seq = f.permute(0, 2, 1, 3).flatten(2)  # (B, rows, 8*6)
        if not self.batch_first:
            seq = seq.transpose(0, 1)
        out, (h, c) = self.lstm(seq)
        out, g = self.gru(out)
        return self.head(out), h, c, g


def outputs(model, x):
    with torch.no_grad():
        return model(x)


def max_rel(a, b) -> float:
    return max(((p - q).norm() / q.norm()).item() for p, q in zip(a, b))


TARGETS = ["conv", "lstm", "gru"]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_full_bond_compression_recovers_the_network_and_undo_gives_torch_modules(batch_first, bidirectional):
    torch.manual_seed(0)
    net = TinyNet(batch_first, bidirectional).eval()
    x = torch.randn(4, 3, 6, 6)
    ref = outputs(net, x)
    report = compress_(net, MPOConfig(target_modules=TARGETS), progress=False)
    assert [type(getattr(net, n)) for n in TARGETS] == [MPOConv2d, MPOLSTM, MPOGRU]
    assert {r.name for r in report.layers} == set(TARGETS) and all(r.rel_error < 1e-6 for r in report.layers)
    got = outputs(net, x)
    assert max_rel(got, ref) < 1e-5  # float32, exact at full bonds
    unload_(net)
    assert [type(getattr(net, n)) for n in TARGETS] == [nn.Conv2d, nn.LSTM, nn.GRU]
    torch.testing.assert_close(outputs(net, x), got, rtol=1e-5, atol=1e-6)  # undo = the compressed network


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("kw", CONV_ARGS)
@pytest.mark.parametrize("lowrank", [False, True])
def test_conv_paths_equal_f_conv2d_in_float64(kw, lowrank):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, (3, 2), **kw).double()
    x = torch.randn(2, 4, 9, 7, dtype=torch.double)
    layer = MPOConv2d.from_conv(conv, lowrank=lowrank)
    for mode in ("dense", "contract", "auto"):
        layer.forward_mode = mode
        assert (layer(x) - conv(x)).norm() / conv(x).norm() < 1e-10, mode
    assert layer(x[0]).shape == conv(x[0]).shape  # unbatched input


@pytest.mark.parametrize("cls,kind", [(MPOLSTM, nn.LSTM), (MPOGRU, nn.GRU)])
@pytest.mark.parametrize("batch_first", [True, False])
def test_rnn_recurrence_equals_torch_in_float64_with_initial_state(cls, kind, batch_first):
    torch.manual_seed(2)
    rnn = kind(5, 7, num_layers=3, batch_first=batch_first, bidirectional=True).double()
    x = torch.randn(3, 4, 5, dtype=torch.double)  # (B, T, in) or (T, B, in)
    h0 = torch.randn(6, 3 if batch_first else 4, 7, dtype=torch.double)
    hx = (h0, torch.randn_like(h0)) if kind is nn.LSTM else h0
    ref = rnn(x, hx)
    layer = cls.from_rnn(rnn)
    flat = lambda o: [o[0], *(o[1] if isinstance(o[1], tuple) else (o[1],))]  # noqa: E731
    for mode in ("dense", "contract", "auto"):
        layer.forward_mode = mode
        assert max_rel(flat(layer(x, hx)), flat(ref)) < 1e-10, mode
    unbatched = layer(x[0] if batch_first else x[:, 0])
    assert unbatched[0].shape == rnn(x[0] if batch_first else x[:, 0])[0].shape


def test_truncation_changes_outputs_within_the_error_bound_and_keeps_the_budget():
    torch.manual_seed(3)
    net = TinyNet().eval()
    x = torch.randn(4, 3, 6, 6)
    ref = outputs(net, x)
    dense = {"conv": net.conv.weight.detach().reshape(8, -1).clone(),
             **{f"lstm.{k}": v.detach().clone() for k, v in net.lstm.named_parameters() if k.startswith("weight")}}
    before = sum(w.numel() for w in dense.values()) + sum(
        v.numel() for k, v in net.gru.named_parameters() if k.startswith("weight"))
    report = compress_(net, MPOConfig(budget=0.3, target_modules=TARGETS), progress=False)
    assert report.params_before == before and report.params_after <= 0.3 * before
    assert report.params_after >= 0.25 * before  # the budget is spent, not left over
    assert max_rel(outputs(net, x), ref) > 1e-2  # negative control: truncation is not a no-op
    err = (net.conv.full_weight() - dense["conv"]).norm().item()
    assert 1e-3 < err <= net.conv.info.error_bound * (1 + 1e-4) + 1e-6  # TT-SVD's bound holds
    for key, m in net.lstm.mpo.items():
        err = (m.full_weight() - dense[f"lstm.{key}"]).norm().item()
        assert 1e-3 < err <= m.info.error_bound * (1 + 1e-4) + 1e-6, key


def test_lowrank_conv_is_a_rank_r_conv_then_1x1_and_wins_by_flops():
    torch.manual_seed(4)
    conv = nn.Conv2d(16, 32, 3, padding=1)
    net = nn.Sequential(conv)
    compress_(net, MPOConfig(target_modules=["0"], lowrank=True, max_bond=4), progress=False)
    layer = net[0]
    assert layer.is_lowrank and layer.bonds == [4]
    with torch.no_grad():
        assert layer.choose_path(2 * 8 * 8) == "contract"  # 4 * (144 + 32) << 32 * 144 per pixel
        x = torch.randn(2, 16, 8, 8)
        torch.testing.assert_close(layer(x), torch.nn.functional.conv2d(x, layer.kernel(), layer.bias, padding=1),
                                   rtol=1e-5, atol=1e-5)


def test_rnn_local_dims_and_budget_per_matrix_names():
    torch.manual_seed(5)
    net = TinyNet()
    compress_(net, MPOConfig(target_modules=["lstm"], max_bond=3,
                             local_dims={"lstm.weight_hh_l1": [[4, 3, 4], [2, 3, 2]]}), progress=False)
    assert net.lstm.mpo["weight_hh_l1"].out_dims == [4, 3, 4] and net.lstm.mpo["weight_hh_l1"].in_dims == [2, 3, 2]
    assert all(max(m.bonds) <= 3 for m in net.lstm.mpo.values())


def test_save_load_round_trip_is_bit_exact_for_a_conv_in_a_transformers_model(tmp_path):
    from transformers import LayoutLMv3Config, LayoutLMv3ForSequenceClassification

    torch.manual_seed(6)
    cfg = LayoutLMv3Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64, max_2d_position_embeddings=64,
                           coordinate_size=4, shape_size=8, input_size=32, patch_size=8, rel_pos_bins=8,
                           max_rel_pos=16, rel_2d_pos_bins=8, max_rel_2d_pos=16, num_labels=2)
    model = LayoutLMv3ForSequenceClassification(cfg).eval()
    compress_(model, MPOConfig(target_modules=["patch_embed.proj"], max_bond=6), progress=False)
    assert isinstance(model.layoutlmv3.patch_embed.proj, MPOConv2d)
    ids, px = torch.randint(0, 64, (2, 5)), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=px).logits
    loaded = load_compressed(save_compressed(model, tmp_path / "ck"))
    assert isinstance(loaded.layoutlmv3.patch_embed.proj, MPOConv2d)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, pixel_values=px).logits, before)


@pytest.mark.parametrize("name", ["conv", "lstm", "gru"])
def test_layer_round_trip_through_spec_and_safetensors_is_bit_exact(name, tmp_path):
    """What io does per layer (a spec in JSON, tensors in safetensors), for layers outside transformers models."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(7)
    net = TinyNet(bidirectional=True).eval()
    compress_(net, MPOConfig(target_modules=[name], budget=0.5), progress=False)
    layer = getattr(net, name)
    save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, str(tmp_path / "w.safetensors"))
    spec = json.loads(json.dumps(layer.spec()))
    again = LAYERS[spec["type"]].from_spec(spec)
    again.load_state_dict(load_file(str(tmp_path / "w.safetensors")), strict=True)
    setattr(net, name, again.eval())
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        out = net(x)
    setattr(net, name, layer)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(out, net(x)))


@pytest.mark.parametrize("mode", ["dense", "contract"])
def test_cores_are_trainable_and_fine_tuning_lowers_the_loss(mode):
    torch.manual_seed(8)
    net = TinyNet()
    compress_(net, MPOConfig(target_modules=TARGETS, budget=0.4, forward_mode=mode), progress=False)
    cores = [p for n, p in net.named_parameters() if ".cores." in n]
    assert len(cores) == 3 + 2 * 2 * 3 + 2 * 3 and all(isinstance(p, nn.Parameter) and p.requires_grad for p in cores)
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 5, (16, 6))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = nn.functional.cross_entropy(net(x)[0].reshape(-1, 5), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cores)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_gradients_agree_between_paths():
    torch.manual_seed(9)
    rnn = nn.LSTM(6, 8, num_layers=2).double()
    x = torch.randn(5, 3, 6, dtype=torch.double)
    grads = []
    for mode in ("dense", "contract"):
        layer = MPOLSTM.from_rnn(rnn, max_bond=4, forward_mode=mode)
        layer(x)[0].square().sum().backward()
        grads.append([c.grad for m in layer.mpo.values() for c in m.cores])
    assert all(torch.allclose(a, b, rtol=1e-8, atol=1e-10) for a, b in zip(*grads))


def test_what_mpo_layers_cannot_stand_for_is_refused_before_any_edit():
    net = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="groups=1"):
        compress_(net, MPOConfig(target_modules=["0", "1"]), progress=False)
    assert type(net[1]) is nn.Linear  # untouched
    with pytest.raises(ValueError, match="padding_mode='zeros'"):
        compress_(nn.Sequential(nn.Conv2d(2, 2, 3, padding_mode="circular")), MPOConfig(target_modules=["0"]),
                  progress=False)
    with pytest.raises(ValueError, match="proj_size=0"):
        compress_(nn.Sequential(nn.LSTM(4, 8, proj_size=3)), MPOConfig(target_modules=["0"]), progress=False)
    with pytest.raises(ValueError, match="budget"):  # a matrix whose cheapest MPO is over its share
        compress_(nn.Sequential(nn.Conv2d(1, 4, 3)), MPOConfig(target_modules=["0"], budget=0.05, lowrank=True),
                  progress=False)
    layer = MPOLSTM.from_rnn(nn.LSTM(4, 8))
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(3, 2, 4), [3, 2])
    with pytest.raises(ValueError, match="packed sequences"):
        layer(packed)
    with pytest.raises(ValueError, match=r"input \(T, B, 4\)"):
        layer(torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match="hidden state of shape"):
        layer(torch.randn(3, 2, 4), (torch.zeros(1, 5, 8), torch.zeros(1, 5, 8)))


def test_storage_counts_cores_and_biases():
    rnn = nn.GRU(6, 8, num_layers=2, bidirectional=True)
    layer = MPOGRU.from_rnn(rnn, max_bond=2)
    assert isinstance(layer, MPORNN)
    biases = sum(p.numel() for n, p in rnn.named_parameters() if n.startswith("bias"))
    assert layer.storage_bytes() == 4 * (layer.core_params() + biases)
    assert layer.core_params() < sum(p.numel() for n, p in rnn.named_parameters() if n.startswith("weight"))


def test_plain_networks_save_and_load_into_a_fresh_instance(tmp_path):
    """A plain nn.Module (no transformers class) round-trips bit-exactly into a freshly built instance."""
    from mpokit.io.checkpoint import CheckpointError

    net = TinyNet()
    compress_(net, MPOConfig(budget=0.5, target_modules=TARGETS), progress=False)
    assert any(isinstance(m, MPOConv2d) for m in net.modules()) and any(isinstance(m, MPORNN) for m in net.modules())
    x = torch.randn(2, 3, 6, 6)
    path = save_compressed(net, tmp_path / "net")
    assert not (path / "config.json").exists()
    fresh = TinyNet()
    loaded = load_compressed(path, model=fresh)
    assert loaded is fresh and all(torch.equal(a, b) for a, b in zip(outputs(net, x), outputs(loaded, x)))
    assert {type(m).__name__ for m in loaded.modules()} == {type(m).__name__ for m in net.modules()}
    with pytest.raises(CheckpointError, match="freshly built instance"):
        load_compressed(path)
    with pytest.raises(CheckpointError, match="expected model= an instance of"):
        load_compressed(path, model=nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="does not fit|does not match"):  # negative control: other sizes
        load_compressed(path, model=TinyNet(bidirectional=True))
