"""The layer protocol (layers/base.py): every registered layer saves, loads, undoes and counts its
bytes the same way, and a layer type defined here works with io and surgery unchanged."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mpokit import load_compressed, save_compressed, unload_
from mpokit.io.checkpoint import LAYER_TYPES, META_FILE, CheckpointError
from mpokit.layers import LAYERS, MpokitLayer, layer_modules, register_layer
from mpokit.layers.ffn import DenseFFN, GatedMLP, Passthrough
from mpokit.layers.moe import MoEFFN
from mpokit.layers.mpo import MPOEmbedding, MPOLinear
from mpokit.layers.mpo_conv import MPOConv2d
from mpokit.layers.mpo_rnn import MPOGRU, MPOLSTM
from mpokit.layers.mpoe import MPOEFFN, UpcycledMoE
from mpokit.layers.quant import QuantLinear
from mpokit.layers.quant_embedding import QuantEmbedding
from mpokit.layers.quant_mpo import QuantMPOLinear
from mpokit.layers.sparse_ffn import NeuronSparseFFN
from mpokit.surgery import get_module, set_module, to_dense_module

from conftest import tiny_llama

BUILT_IN = {"MPOLinear", "MPOEmbedding", "QuantLinear", "QuantMPOLinear", "MoEFFN", "MPOEFFN", "UpcycledMoE",
            "Passthrough", "QuantEmbedding", "NeuronSparseFFN"}


def _ffn(gated: bool = True, n: int = 12, d: int = 8, bias: bool = False) -> DenseFFN:
    return DenseFFN(up=torch.randn(n, d), down=torch.randn(d, n), act="silu" if gated else "gelu_new",
                    gate=torch.randn(n, d) if gated else None, up_bias=torch.randn(n) if bias else None,
                    down_bias=torch.randn(d) if bias else None)


def _neuron_sparse() -> NeuronSparseFFN:
    """Every neuron kept (so undoing is exact), with a fitted low-rank estimator among its buffers."""
    layer = NeuronSparseFFN.from_dense(_ffn(bias=True), keep=12, selector="gate-lowrank", predictor_rank=4)
    layer.fit_lowrank_(torch.randn(32, 8))
    return layer


def _mpo_linear() -> MPOLinear:
    return MPOLinear.from_weight(torch.randn(12, 10), torch.randn(12), num_cores=2)


# type name -> (a tiny layer, an input for it); every registered type needs one
BUILDERS = {
    "MPOLinear": lambda: (_mpo_linear(), torch.randn(2, 3, 10)),
    "MPOEmbedding": lambda: (MPOEmbedding.from_embedding(nn.Embedding(20, 8), num_cores=2),
                             torch.randint(0, 20, (2, 5))),
    "QuantLinear": lambda: (QuantLinear.from_weight(torch.randn(12, 16), torch.randn(12), bits=4, group_size=8),
                            torch.randn(2, 3, 16)),
    "QuantEmbedding": lambda: (QuantEmbedding.from_embedding(nn.Embedding(20, 8), bits=4),
                               torch.randint(0, 20, (2, 5))),
    "QuantMPOLinear": lambda: (QuantMPOLinear.from_mpo(_mpo_linear(), "central", bits=4, group_size=4),
                               torch.randn(2, 3, 10)),
    "MoEFFN": lambda: (MoEFFN.from_dense(_ffn(), torch.arange(12) % 4, top_k=4, router_hidden=8),  # all experts
                       torch.randn(2, 3, 8)),
    "UpcycledMoE": lambda: (UpcycledMoE.from_dense(_ffn(bias=True), num_experts=3, top_k=2), torch.randn(2, 3, 8)),
    "MPOEFFN": lambda: (MPOEFFN.from_dense(_ffn(), num_experts=3, top_k=2, noise=0.1), torch.randn(2, 3, 8)),
    "Passthrough": lambda: (Passthrough(), torch.randn(2, 3, 8)),
    "NeuronSparseFFN": lambda: (_neuron_sparse(), torch.randn(2, 3, 8)),
    "MPOConv2d": lambda: (MPOConv2d.from_conv(nn.Conv2d(3, 8, 3, padding=1), num_cores=2), torch.randn(2, 3, 6, 6)),
    "MPOLSTM": lambda: (MPOLSTM.from_rnn(nn.LSTM(6, 8, num_layers=2), num_cores=2), torch.randn(4, 2, 6)),
    "MPOGRU": lambda: (MPOGRU.from_rnn(nn.GRU(6, 8, batch_first=True), num_cores=2), torch.randn(2, 4, 6)),
}


# what undoing gives: the module replaced, or for routed FFNs their dense form (upcycled experts are dense)
DENSE_FORMS = {"MPOLinear": nn.Linear, "MPOEmbedding": nn.Embedding, "QuantLinear": nn.Linear,
               "QuantEmbedding": nn.Embedding,
               "QuantMPOLinear": nn.Linear, "MoEFFN": GatedMLP, "MPOEFFN": UpcycledMoE, "UpcycledMoE": UpcycledMoE,
               "Passthrough": nn.Identity, "NeuronSparseFFN": GatedMLP, "MPOConv2d": nn.Conv2d, "MPOLSTM": nn.LSTM, "MPOGRU": nn.GRU}


def _equal(a, b) -> bool:
    """torch.equal, also over the (output, state) tuples of recurrent layers."""
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    if name not in BUILDERS:
        pytest.fail(f"registered layer type {name!r} has no builder in BUILDERS: add a tiny one")
    layer, x = BUILDERS[name]()
    return layer.eval(), x


def test_registry_holds_every_built_in_layer_and_no_abstract_base():
    assert set(LAYERS) >= BUILT_IN
    assert LAYER_TYPES is LAYERS  # the old name of the registry
    assert not {"MPOModule", "RoutedMoE", "MpokitLayer"} & set(LAYERS)
    assert all(issubclass(cls, MpokitLayer) and cls.__name__ == name for name, cls in LAYERS.items())


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_spec_round_trip_is_bit_exact(name):
    layer, x = _build(name)
    spec = json.loads(json.dumps(layer.spec()))  # what mpokit.json holds
    assert spec["type"] == name
    empty = LAYERS[name].from_spec(spec)
    empty.load_state_dict(layer.state_dict(), strict=True)
    empty.eval()
    with torch.no_grad():
        assert _equal(empty(x), layer(x))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_to_dense_equals_layer(name):
    layer, x = _build(name)
    dense = to_dense_module(layer).eval()
    with torch.no_grad():
        torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-5)
    assert type(dense) is DENSE_FORMS.get(name, type(dense))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_storage_bytes_is_an_int_counting_the_stored_tensors(name):
    layer, _ = _build(name)
    n = layer.storage_bytes()
    assert isinstance(n, int) and not isinstance(n, bool)
    assert (n > 0) == bool(layer.state_dict())  # only Passthrough stores nothing
    stored = sum(t.numel() * t.element_size() for t in layer.state_dict().values())  # nothing shared here
    assert n == stored
    if isinstance(layer, (QuantLinear, QuantMPOLinear, QuantEmbedding)):  # packed codes count packed, below the float weight
        assert n < sum(t.numel() * t.element_size() for t in layer.to_dense().state_dict().values())


@pytest.mark.parametrize("make", [lambda lin: MPOLinear.from_linear(lin, num_cores=2),
                                  lambda lin: QuantLinear.from_linear(lin, bits=8, group_size=8)])
def test_to_dense_gives_back_a_conv1d_for_gpt2_layers(make):
    from transformers.pytorch_utils import Conv1D

    layer = make(nn.Linear(16, 12))
    layer.orig_type = "Conv1D"
    dense = layer.to_dense()
    assert isinstance(dense, Conv1D) and dense.weight.shape == (16, 12)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("site_kind", ["gpt2", "bert"])
def test_moe_to_dense_for_plain_ffns(site_kind):
    ffn = _ffn(gated=False, bias=True)
    moe = MoEFFN.from_dense(ffn, torch.arange(12) % 3, top_k=3, site_kind=site_kind).eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(moe.to_dense()(x), ffn(x), rtol=1e-5, atol=1e-5)


def test_register_layer_refuses_a_class_outside_the_protocol():
    with pytest.raises(TypeError, match="MpokitLayer"):
        register_layer(nn.Linear)
    assert register_layer(MPOLinear) is MPOLinear and LAYERS["MPOLinear"] is MPOLinear


def test_a_second_class_cannot_take_a_layer_type_name():
    with pytest.raises(TypeError, match="expected a new layer type name, got 'MPOLinear'"):
        class MPOLinear(MpokitLayer, nn.Module):  # noqa: F811  would load every saved MPOLinear
            pass
    assert LAYERS["MPOLinear"].__module__ == "mpokit.layers.mpo"


@pytest.fixture
def scaled_linear():
    """A layer type defined outside mpokit: nothing but this class is written for it."""

    class ScaledLinear(MpokitLayer, nn.Module):
        """y = s * (x W^T) + b with a learned scalar s."""

        def __init__(self, in_features, out_features, device=None, dtype=None):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.weight = nn.Parameter(torch.zeros(out_features, in_features, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
            self.scale = nn.Parameter(torch.ones((), device=device, dtype=dtype))

        @classmethod
        def from_linear(cls, lin: nn.Linear, scale: float) -> "ScaledLinear":
            new = cls(lin.in_features, lin.out_features, dtype=lin.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(lin.weight / scale)
                new.bias.copy_(lin.bias if lin.bias is not None else torch.zeros_like(new.bias))
                new.scale.fill_(scale)
            return new

        def forward(self, x):
            return self.scale * nn.functional.linear(x, self.weight) + self.bias

        def spec(self):
            return {"type": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features}

        @classmethod
        def from_spec(cls, spec, device=None, dtype=None):
            return cls(spec["in_features"], spec["out_features"], device=device, dtype=dtype)

        def to_dense(self):
            lin = nn.Linear(self.in_features, self.out_features, dtype=self.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(self.scale * self.weight)
                lin.bias.copy_(self.bias)
            return lin

    assert LAYERS["ScaledLinear"] is ScaledLinear  # registered by being defined
    yield ScaledLinear
    del LAYERS["ScaledLinear"]


def test_a_new_layer_type_saves_loads_and_unloads_with_no_other_change(scaled_linear, tmp_path):
    model = tiny_llama()
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    for name in names:
        set_module(model, name, scaled_linear.from_linear(get_module(model, name), scale=4.0))
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        before = model(input_ids=ids).logits

    save_compressed(model, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / META_FILE).read_text())
    assert {n: s["type"] for n, s in meta["layers"].items()} == dict.fromkeys(names, "ScaledLinear")
    loaded = load_compressed(tmp_path / "ck")
    assert [n for n, _ in layer_modules(loaded)] == sorted(names)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, before)

    unload_(loaded)
    assert not layer_modules(loaded) and all(type(get_module(loaded, n)) is nn.Linear for n in names)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)


def test_unknown_layer_type_is_refused(scaled_linear, tmp_path):
    model = tiny_llama()
    name = "model.layers.0.mlp.down_proj"
    set_module(model, name, scaled_linear.from_linear(get_module(model, name), scale=2.0))
    path = save_compressed(model, tmp_path / "ck")
    meta_path = path / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["layers"][name]["type"] = "NoSuchLayer"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown layer type 'NoSuchLayer'"):
        load_compressed(path, verify=False)
