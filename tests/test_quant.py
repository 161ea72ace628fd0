"""layers/quant + methods/quant: packed storage, forward, save/load, unload, MPO combination."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from conftest import tiny_bert, tiny_gpt2, tiny_llama
from mpokit import compress_, load_compressed, save_compressed, unload_
from mpokit.eval.size import param_bytes
from mpokit.layers.mpo import MPOLinear
from mpokit.layers.quant import QuantLinear
from mpokit.layers.quant_mpo import QuantMPOLinear, select_cores
from mpokit.methods import MPOConfig, QuantConfig, config_from_dict
from mpokit.methods.presets import build_config
from mpokit.ops.quant import fake_quantize, sqnr_db


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantlinear_storage_is_packed(bits):
    lin = nn.Linear(576, 96)
    q = QuantLinear.from_linear(lin, bits=bits, group_size=128)
    groups = math.ceil(576 / 128)  # 576 is not a multiple of 128: the last group holds 64 columns
    assert q.qweight.packed.numel() == math.ceil(96 * 576 * bits / 8)
    assert q.storage_bytes() == math.ceil(96 * 576 * bits / 8) + 96 * groups * (2 + 1) + 96 * 4  # fp16 scale, uint8 zero
    assert q.storage_bytes() < (bits / 32 + 0.02) * 96 * 576 * 4 + 96 * 4
    assert not any(t.dtype.is_floating_point and t.numel() == 96 * 576 for t in q.state_dict().values())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantlinear_forward_matches_fake_quant(bits):
    lin = nn.Linear(64, 48)
    q = QuantLinear.from_linear(lin, bits=bits, group_size=32, clip_ratios=None)
    w_hat = fake_quantize(lin.weight.detach(), bits, 32)
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        assert torch.allclose(q(x), nn.functional.linear(x, w_hat, lin.bias), atol=1e-5)
        assert not torch.allclose(q(x), lin(x), atol=1e-4)  # negative control: it did quantize
    assert torch.equal(q.to_linear().weight, w_hat)


def test_cache_weight_gives_identical_outputs():
    lin = nn.Linear(64, 48)
    a = QuantLinear.from_linear(lin, bits=3, group_size=32)
    b = QuantLinear.from_linear(lin, bits=3, group_size=32, cache_weight=True)
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x)) and torch.equal(b(x), b(x))


def test_dtype_conversion_keeps_scales_16_bit():
    q = QuantLinear.from_linear(nn.Linear(64, 32), bits=4, group_size=32).to(torch.float64)
    assert q.qweight.scale.dtype == torch.float16 and q.qweight.packed.dtype == torch.uint8
    assert q(torch.randn(2, 64, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_method_roundtrip_save_load_unload(make, tmp_path):
    model = make()
    ids = torch.randint(0, 90, (2, 12))
    with torch.no_grad():
        dense = model(ids).logits
    before = param_bytes(model)
    report = compress_(model, QuantConfig(bits=4, group_size=32), progress=False)
    assert report.extra["bytes_ratio"] < 0.2 and param_bytes(model) < before
    assert all(r.detail["sqnr_db"] > 15 for r in report.layers)
    with torch.no_grad():
        out = model(ids).logits
    assert 0 < (out - dense).norm() / dense.norm() < 0.2
    save_compressed(model, tmp_path / "q")
    loaded = load_compressed(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)
    assert param_bytes(loaded) == param_bytes(model)
    unload_(model)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, out, atol=1e-5)


def test_fewer_bits_fewer_bytes_more_error():
    results = []
    for bits in (8, 4, 3, 2):
        model = tiny_llama()
        rep = compress_(model, QuantConfig(bits=bits, group_size=32), progress=False)
        results.append((rep.extra["bytes_after"], sum(r.rel_error for r in rep.layers)))
    assert [b for b, _ in results] == sorted([b for b, _ in results], reverse=True)
    assert [e for _, e in results] == sorted(e for _, e in results)


def test_targets_and_encoder():
    model = tiny_bert()
    compress_(model, QuantConfig(bits=8, group_size=16, target_modules=["intermediate.dense"]), progress=False)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["bert.encoder.layer.0.intermediate.dense"] == "QuantLinear"
    assert kinds["bert.encoder.layer.0.attention.self.query"] == "Linear"


def test_config_validation_and_json():
    for bad in ({"bits": 5}, {"group_size": 0}, {"mpo_cores": "middle"}):
        with pytest.raises(ValueError, match="expected"):
            QuantConfig(**bad)
    cfg = QuantConfig(bits=3, group_size=64, symmetric=True)
    assert config_from_dict(cfg.to_dict()) == cfg
    assert build_config("quant", bits=2, group_size=64) == QuantConfig(bits=2, group_size=64)
    with pytest.raises(ValueError, match="do not apply"):
        build_config("quant", budget=0.5)


@pytest.mark.parametrize("which", ["all", "central", "auxiliary"])
def test_mpo_cores_quantized(which, tmp_path):
    model = tiny_llama()
    compress_(model, MPOConfig(num_cores=3), progress=False)
    ids = torch.randint(0, 90, (1, 10))
    with torch.no_grad():
        mpo_out = model(ids).logits
    mpo_bytes = param_bytes(model)
    compress_(model, QuantConfig(bits=4, group_size=32, mpo_cores=which), progress=False)
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, QuantMPOLinear)
    assert layer.quantized == select_cores(layer.shapes, which)
    assert param_bytes(model) < mpo_bytes
    with torch.no_grad():
        out = model(ids).logits
    assert 0 < (out - mpo_out).norm() / mpo_out.norm() < 0.2
    save_compressed(model, tmp_path / "qm")
    with torch.no_grad():
        assert torch.equal(load_compressed(tmp_path / "qm")(ids).logits, out)
    back = layer.to_mpo()
    assert isinstance(back, MPOLinear)
    assert sqnr_db(back.full_weight().detach(), layer.full_weight().detach()) > 100


def test_quantized_central_core_costs_most_bytes_saved():
    model = tiny_llama()
    compress_(model, MPOConfig(num_cores=3), progress=False)
    sizes = {}
    for which in ("central", "auxiliary"):
        m = copy.deepcopy(model)
        compress_(m, QuantConfig(bits=4, group_size=32, mpo_cores=which), progress=False)
        sizes[which] = param_bytes(m)
    assert sizes["central"] < sizes["auxiliary"]


def test_cli_compress_quant_then_eval_with_kv_cache(tmp_path):
    import json

    from mpokit.cli.main import main
    from test_abilities import WORDS, tiny_llama_for, word_tokenizer

    tok = word_tokenizer()
    model = tiny_llama_for(tok)
    model.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS[3 + i % (len(WORDS) - 3)] for i in range(600)))
    rc = main(["compress", "--model", str(tmp_path / "dense"), "--method", "quant", "--bits", "3", "--group-size", "16",
               "--out", str(tmp_path / "q3"), "--json", str(tmp_path / "c.json")])
    assert rc == 0
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["config"]["bits"] == 3 and report["config"]["group_size"] == 16 and report["bytes_ratio"] < 0.2
    rc = main(["eval", str(tmp_path / "q3"), "--text", str(text), "--tokens", "256", "--context", "128",
               "--kv-cache", "rtn", "--kv-bits", "4", "--abilities", "--json", str(tmp_path / "e.json")])
    assert rc == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["perplexity"] > 1 and 0 < res["kv_bytes_ratio"] < 1 and res["chunk"] == 64
    assert res["kv_residual"] == 16 and "chunks of 64" in res["kv_eval"]
    assert set(res["abilities"]) == {"icl_sst2", "cot_arithmetic", "instruction_following"}
    assert all(0 <= r["score"] <= 1 and r["n"] > 0 for r in res["abilities"].values())
    with pytest.raises(SystemExit):  # --bits does not apply to MPO methods
        main(["compress", "--model", str(tmp_path / "dense"), "--method", "mpo-datafree", "--bits", "3",
              "--out", str(tmp_path / "bad")])
