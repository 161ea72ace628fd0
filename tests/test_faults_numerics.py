"""Issue 15, items 6 and 9: tied weights stay tied (or are refused) and size reports match the saved file;
casts to float16 never leave MPO or quantized layers silently inf.

Run: pytest tests/test_faults_numerics.py
"""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from mpokit import compress_, load_compressed, save_compressed
from mpokit.eval.size import param_bytes
from mpokit.layers.mpo import CastOverflowError, MPOLinear
from mpokit.layers.quant import QuantLinear
from mpokit.layers.quant_mpo import QuantMPOLinear
from mpokit.methods import MPOConfig
from mpokit.methods.presets import build_config
from mpokit.surgery import get_module, set_module, shared_outside
from conftest import tiny_llama

FP16_MAX = torch.finfo(torch.float16).max
AWARE = ["svd", "asvd", "whitened-svd", "mpo"]  # AwareConfig presets (mpo = the default activation-aware one)


# ---- item 6: tied weights ----------------------------------------------------------------------------------

def calibration_batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (1, 64), generator=g) for _ in range(8)]  # 512 tokens


def config_for(preset: str, targets):
    opts = {} if preset in ("quant", "gptq") else {"budget": 0.5, "calibration_tokens": 512}
    if preset == "gptq":
        opts["calibration_tokens"] = 512
    return build_config(preset, target_modules=targets, **opts)


def file_size(path) -> tuple[int, int]:
    """(elements, bytes) of every tensor stored in the checkpoint's safetensors file."""
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        tensors = [f.get_tensor(k) for k in f.keys()]
    return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


def tie_kept(model) -> bool:
    """lm_head and embed_tokens read one weight: the same Parameter, or the same MPO cores."""
    head, emb = model.lm_head, model.model.embed_tokens
    if isinstance(getattr(head, "weight", None), torch.nn.Parameter):
        return head.weight is getattr(emb, "weight", None)
    return getattr(head, "cores", None) is not None and getattr(emb, "cores", None) is head.cores


@pytest.fixture(scope="module")
def dense_size(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense") / "ckpt"
    save_compressed(tiny_llama(tie=True), path)
    return file_size(path)


def check_report_matches_file(model, report, path, dense_size, aware: bool) -> None:
    params0, bytes0 = dense_size
    params1, bytes1 = file_size(path)
    extra = report.extra
    # the file shrinks by exactly what the report says the targets lost (shared storage counted once)
    assert bytes1 == bytes0 - extra["bytes_before"] + extra["bytes_after"], (bytes0, bytes1, extra)
    if aware:  # float32 cores: parameter counts are element counts of the file
        assert params1 == params0 - report.params_before + report.params_after
        assert extra["bytes_before"] == 4 * report.params_before and extra["bytes_after"] == 4 * report.params_after
    assert param_bytes(model) == bytes1  # eval's size report counts what the file stores


@pytest.mark.parametrize("targets", [["lm_head"], ["lm_head", "q_proj"], None], ids=["lm_head", "lm_head+q", "default"])
@pytest.mark.parametrize("preset", ["quant", "gptq", *AWARE])
def test_tied_lm_head_kept_or_refused_and_report_matches_file(preset, targets, dense_size, tmp_path):
    if preset == "gptq" and targets is None:
        pytest.skip("covered by the quant default row (same byte accounting)")
    model = tiny_llama(tie=True)
    config = config_for(preset, targets)
    kw = {"batches": calibration_batches(), "progress": False}
    if preset in ("quant", "gptq") and targets is not None:  # quantized storage cannot be tied yet: refused
        with pytest.raises(ValueError, match=r"lm_head with model\.embed_tokens.*untie.*--exclude lm_head"):
            compress_(model, config, **kw)
        assert tie_kept(model) and type(model.lm_head) is torch.nn.Linear  # nothing changed
        return
    report = compress_(model, config, **kw)
    assert tie_kept(model)
    if targets is not None:  # lm_head factorized; embed_tokens shares its cores
        assert isinstance(model.lm_head, MPOLinear) and model.model.embed_tokens.tied_to == "lm_head"
        assert report.extra["tied"] == {"model.embed_tokens": "lm_head"}
        assert report.layers[-1].name == "lm_head" and report.kept_fraction < 0.6
    save_compressed(model, tmp_path / "ckpt")
    check_report_matches_file(model, report, tmp_path / "ckpt", dense_size, aware=preset in AWARE)
    loaded = load_compressed(tmp_path / "ckpt")
    assert tie_kept(loaded)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("preset", ["quant", "svd"])
def test_negative_control_untied_result_fails_the_checks(preset, dense_size, tmp_path, monkeypatch):
    """With the guards switched off (the old behaviour), the same checks fail: the tie is gone and
    the file no longer matches the report (it grows while the report claims a saving)."""
    import mpokit.methods.aware.transform as aware
    import mpokit.methods.quant.transform as quant

    monkeypatch.setattr(quant, "check_unshared", lambda model, names: None)
    monkeypatch.setattr(aware, "tied_partners", lambda model, names: (names, {}))
    model = tiny_llama(tie=True)
    report = compress_(model, config_for(preset, ["lm_head"]), batches=calibration_batches(), progress=False)
    assert not tie_kept(model)
    save_compressed(model, tmp_path / "ckpt")
    assert file_size(tmp_path / "ckpt")[1] > dense_size[1]  # the untied copy makes the file bigger
    with pytest.raises(AssertionError):
        check_report_matches_file(model, report, tmp_path / "ckpt", dense_size, aware=preset != "quant")


def test_quant_refuses_mpo_layers_that_share_cores():
    # embed_tokens shares lm_head's cores (tied_to), the reverse direction of the usual tie
    model = tiny_llama(tie=True)
    compress_(model, MPOConfig(max_bond=8, target_modules=["lm_head", "q_proj"]), progress=False)
    assert model.model.embed_tokens.tied_to == "lm_head"
    assert shared_outside(model, ["lm_head", "model.layers.0.self_attn.q_proj"]) == {"lm_head": ["model.embed_tokens"]}
    with pytest.raises(ValueError, match="embed_tokens"):
        compress_(model, build_config("quant", target_modules=["lm_head"]), progress=False)
    assert isinstance(model.lm_head, MPOLinear) and model.model.embed_tokens.cores is model.lm_head.cores
    # cross-layer shared central cores (method share) are refused too
    shared = tiny_llama(tie=False)
    compress_(shared, build_config("share", target_modules=["up_proj"], max_bond=4), progress=False)
    with pytest.raises(ValueError, match="no other layer shares"):
        compress_(shared, build_config("quant", target_modules=["up_proj"]), progress=False)


# ---- item 9: float16 casts ---------------------------------------------------------------------------------

def big_mpo(scale=1e4, forward_mode="auto"):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 48, generator=g) * scale  # entries ~1e4: representable in float16
    return MPOLinear.from_weight(w, torch.randn(96, generator=g), num_cores=3, max_bond=16, forward_mode=forward_mode)


def small_input():
    return torch.randn(4, 48, generator=torch.Generator().manual_seed(2)) * 1e-3  # outputs ~1e2: fit float16


@pytest.mark.parametrize("cast", [lambda m: m.half(), lambda m: m.to(torch.float16)], ids=["half", "to"])
@pytest.mark.parametrize("mode", ["dense", "contract"])
def test_mpo_float16_cast_of_large_weights_stays_finite_and_close(cast, mode):
    layer = big_mpo(forward_mode=mode)
    # negative control: TT-SVD leaves the whole norm in the last core, which plain float16 cannot hold
    assert layer.cores[-1].detach().abs().max() > FP16_MAX
    assert not torch.isfinite(layer.cores[-1].detach().half()).all()
    x = small_input()
    with torch.no_grad():
        ref = layer(x)
        half = cast(copy.deepcopy(layer))
        out = half(x.half()).float()
    assert all(c.dtype == torch.float16 and torch.isfinite(c).all() for c in half.cores)
    assert torch.isfinite(out).all()
    assert (out - ref).norm() / ref.norm() < 3e-3  # float16 rounding only


def test_rebalancing_is_exact_and_keeps_tied_cores_shared():
    layer = big_mpo()
    before = layer.full_weight().detach().clone()
    exps = layer.balance_norms_()
    assert sum(exps) == 0 and exps[-1] < 0
    assert torch.equal(layer.full_weight().detach(), before)  # powers of two: the product is bit-identical
    norms = [float(c.detach().norm()) for c in layer.cores]
    assert max(norms) / min(norms) < 4
    # tied layers keep sharing (one ParameterList) through a float16 cast
    model = tiny_llama(tie=True)
    compress_(model, MPOConfig(max_bond=8, target_modules=["embed_tokens", "lm_head"]), progress=False)
    with torch.no_grad():  # the last core too large for float16, the weight itself not
        last = model.lm_head.cores[-1]
        factor = 0.5 * FP16_MAX / float(model.lm_head.full_weight().abs().max())
        assert float(last.abs().max()) * factor > FP16_MAX
        last.mul_(factor)
        ref = model.lm_head.full_weight().clone()
        model.half()
    assert model.lm_head.cores is model.model.embed_tokens.cores
    assert all(torch.isfinite(c).all() for c in model.lm_head.cores)
    assert (model.lm_head.full_weight().float() - ref).norm() / ref.norm() < 3e-3


def test_unrepresentable_weight_raises_naming_the_layer():
    model = tiny_llama(tie=False)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(1e7)  # entries ~1e5 > float16's 65504
    compress_(model, MPOConfig(max_bond=8, target_modules=["q_proj"]), progress=False)
    with pytest.raises(CastOverflowError, match=r"'model\.layers\.0\.self_attn\.q_proj'.*float16.*bfloat16"):
        copy.deepcopy(model).half()
    bf16 = copy.deepcopy(model).to(torch.bfloat16)  # the suggested dtype works
    assert all(torch.isfinite(p).all() for p in bf16.parameters())


def test_cores_shared_across_layers_are_not_rebalanced_alone(tmp_path):
    model = tiny_llama(tie=False)
    compress_(model, build_config("share", target_modules=["up_proj"], max_bond=4), progress=False)
    save_compressed(model, tmp_path / "ckpt")
    loaded = load_compressed(tmp_path / "ckpt")  # the sharing is known after loading too
    for m in (model, loaded):
        layers = [get_module(m, f"model.layers.{i}.mlp.up_proj") for i in range(2)]
        assert layers[0].cores[1] is layers[1].cores[1] and layers[1].shared_with
        with torch.no_grad():  # a large own core: rebalancing it alone would change the other layer's product
            layers[0].cores[2].mul_(2 * FP16_MAX / float(layers[0].cores[2].abs().max()))
        other = layers[1].full_weight().detach().clone()
        with pytest.raises(CastOverflowError, match="share a central core"):
            layers[0].half()
        assert torch.equal(layers[1].full_weight().detach(), other)


def test_set_cores_into_float16_layer_balances():
    w = torch.randn(96, 48, generator=torch.Generator().manual_seed(3)) * 1e4
    layer = MPOLinear.from_weight(w.half(), None, num_cores=3)  # full bond: exact up to float16 rounding
    assert all(torch.isfinite(c).all() for c in layer.cores)
    assert (layer.full_weight().float() - w).norm() / w.norm() < 3e-3


@pytest.mark.parametrize("which", ["all", "central", "auxiliary"])
def test_quant_mpo_float16_cast_stays_finite_and_close(which):
    mpo = big_mpo()
    q = QuantMPOLinear.from_mpo(mpo, which, bits=8, group_size=32)
    x = small_input()
    with torch.no_grad():
        ref = q(x)
        half = copy.deepcopy(q).half()
        out = half(x.half()).float()
    assert torch.isfinite(out).all() and (out - ref).norm() / ref.norm() < 3e-3
    assert torch.isfinite(half.full_weight()).all()


def test_quantized_layers_raise_instead_of_inf():
    g = torch.Generator().manual_seed(4)
    fits = QuantLinear.from_weight(torch.randn(64, 64, generator=g) * 1e4, bits=8, group_size=32)
    assert torch.isfinite(copy.deepcopy(fits).half().weight).all()
    too_big = QuantLinear.from_weight(torch.randn(64, 64, generator=g) * 1e5, bits=8, group_size=32)
    with pytest.raises(CastOverflowError, match="QuantLinear 64x64.*float16.*bfloat16"):
        too_big.half()
    with pytest.raises(CastOverflowError, match="float16 quantization scales overflow"):
        QuantLinear.from_weight(torch.randn(64, 64, generator=g) * 1e9, bits=4, group_size=32)
    # cores whose 16-bit scales would overflow are rebalanced before quantizing (product unchanged)
    huge = big_mpo(scale=1e7)
    assert max(float(c.detach().abs().max()) for c in huge.cores) > 1e6
    q = QuantMPOLinear.from_mpo(huge, "all", bits=8, group_size=32)
    w = huge.full_weight().detach()
    assert (q.full_weight() - w).norm() / w.norm() < 0.05
