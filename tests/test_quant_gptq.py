"""ops/gptq + QuantConfig(algorithm="gptq"): output error below RTN's, packed storage, sequential calibration, CLI."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from mpokit import compress_, load_compressed, save_compressed, unload_
from mpokit.layers.mpo import MPOLinear
from mpokit.layers.quant import QuantLinear
from mpokit.methods import MPOConfig, QuantConfig
from mpokit.methods.presets import build_config, needs_calibration
from mpokit.ops.gptq import gptq_quantize, output_error
from mpokit.ops.quant import dequantize, fake_quantize, quantize


def _correlated_inputs(cols: int, n: int = 2048) -> torch.Tensor:
    """(n, cols) inputs whose channels are strongly mixed, as real activations are."""
    mix = torch.eye(cols) + 2 * torch.randn(cols, cols) / cols ** 0.5
    return torch.randn(n, cols) @ mix


def _dq(q) -> torch.Tensor:
    return dequantize(q.codes, q.scale, q.offset, q.bits, q.group_size)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_rtn_on_correlated_inputs(bits, act_order):
    w = torch.randn(48, 128)
    x = _correlated_inputs(128)
    gram = (x.T @ x).double()
    q = gptq_quantize(w, gram, bits, 32, act_order=act_order)
    gptq_err = output_error(w, _dq(q), gram)
    rtn_err = output_error(w, fake_quantize(w, bits, 32), gram)
    assert gptq_err < 0.85 * rtn_err
    # it trades weight error for output error: the weights themselves move further than RTN's
    assert (w - _dq(q)).norm() > (w - fake_quantize(w, bits, 32)).norm()


def test_gptq_is_rtn_when_inputs_are_uncorrelated():
    """Negative control: with H diagonal no error is fed forward, so GPTQ must give RTN's codes exactly."""
    w = torch.randn(16, 64)
    gram = torch.diag(torch.rand(64) + 0.5).double()
    q, r = gptq_quantize(w, gram, 3, 16), quantize(w, 3, 16)
    assert torch.equal(q.codes, r.codes) and torch.equal(q.scale, r.scale) and torch.equal(q.offset, r.offset)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_range_search_weights_error_by_input_energy(bits):
    """With H diagonal (no error feedback) the search picks, per group, the range with the least
    H-weighted error: never worse than min/max, better at low bits, and not the unweighted choice."""
    from mpokit.ops.quant import DEFAULT_CLIP_RATIOS

    torch.manual_seed(0)
    w = torch.randn(32, 64)
    energy = torch.rand(64) ** 4 * 10 + 0.01  # a few inputs carry most of the energy
    gram = torch.diag(energy).double()
    weighted = lambda q: float(((w - _dq(q)).square() * energy).sum())
    plain = gptq_quantize(w, gram, bits, 16)
    searched = gptq_quantize(w, gram, bits, 16, clip_ratios=DEFAULT_CLIP_RATIOS)
    assert weighted(searched) < 0.97 * weighted(plain)
    unweighted = quantize(w, bits, 16, clip_ratios=DEFAULT_CLIP_RATIOS)  # weight-MSE search (RTN's)
    assert weighted(searched) < weighted(unweighted)


@pytest.mark.parametrize("symmetric,zero_point", [(False, True), (False, False), (True, False)])
def test_gptq_codes_pack_into_quantlinear(symmetric, zero_point):
    w, bias = torch.randn(24, 80), torch.randn(24)
    x = _correlated_inputs(80, 512)
    q = gptq_quantize(w, (x.T @ x).double(), 4, 32, symmetric=symmetric, zero_point=zero_point)  # ragged last group
    layer = QuantLinear.from_quantized(q, bias)
    assert torch.equal(layer.weight, _dq(q)) and layer.bias is not None
    rtn = QuantLinear.from_weight(w, bias, bits=4, group_size=32, symmetric=symmetric, zero_point=zero_point)
    assert layer.storage_bytes() == rtn.storage_bytes()  # same packed layout, same bytes
    assert torch.allclose(layer(x[:3]), x[:3] @ _dq(q).T + bias, atol=1e-5)
    with pytest.raises(ValueError, match="expected codes"):
        QuantLinear(80, 24, bits=3, group_size=32).qweight.set_quantized(q)


def test_dead_inputs_and_bad_shapes():
    w = torch.randn(8, 32)
    x = _correlated_inputs(32, 256)
    x[:, 5] = 0  # an input channel that never fires
    q = gptq_quantize(w, (x.T @ x).double(), 4, 16)
    assert _dq(q)[:, 5].abs().max() < 1e-6  # free weight: set to 0 (0 is exact with integer zero points)
    with pytest.raises(ValueError, match="Gram"):
        gptq_quantize(w, torch.eye(31), 4, 16)


def _batches(vocab: int, n: int = 6, length: int = 32) -> list[torch.Tensor]:
    return [torch.randint(0, vocab, (1, length)) for _ in range(n)]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_gptq_method_roundtrip_save_load_unload(make, tmp_path):
    model = make()
    ids = torch.randint(0, 90, (2, 12))
    report = compress_(model, QuantConfig(algorithm="gptq", bits=3, group_size=16), batches=_batches(90),
                       progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == len(report.layers) > 0 and {r.kind for r in report.layers} == {"gptq"}
    assert report.extra["calibration_tokens"] == 6 * 32 and report.extra["bytes_ratio"] < 0.2
    gptq_err = sum(r.detail["output_rel_error"] for r in report.layers)
    rtn_err = sum(r.detail["rtn_output_rel_error"] for r in report.layers)
    assert gptq_err < rtn_err
    with torch.no_grad():
        out = model(ids).logits
    save_compressed(model, tmp_path / "g")
    loaded = load_compressed(tmp_path / "g")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)
    unload_(model)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, out, atol=1e-5)


def test_gptq_calibrates_sequentially_on_quantized_blocks():
    """Block 1's Gram must come from block 0 as quantized: its recorded RTN output error (computed on that
    Gram) differs from what a dense-model Gram gives, and block 0's does not."""
    from mpokit.calibration.stats import collect_input_stats

    model, batches = tiny_llama(), _batches(128)
    dense = tiny_llama()
    dense.load_state_dict(model.state_dict())
    name0, name1 = "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"
    stats = collect_input_stats(dense, [name0, name1], batches, progress=False)
    report = compress_(model, QuantConfig(algorithm="gptq", bits=2, group_size=16), batches=batches, progress=False)
    rec = {r.name: r.detail for r in report.layers}
    w0, w1 = dense.get_submodule(name0).weight, dense.get_submodule(name1).weight
    dense0 = output_error(w0, fake_quantize(w0, 2, 16), stats.gram(name0))
    dense1 = output_error(w1, fake_quantize(w1, 2, 16), stats.gram(name1))
    assert rec[name0]["rtn_output_rel_error"] == pytest.approx(dense0, rel=1e-4)
    assert rec[name1]["rtn_output_rel_error"] != pytest.approx(dense1, rel=1e-3)


def test_gptq_config_and_errors():
    assert needs_calibration(QuantConfig(algorithm="gptq")) and not needs_calibration(QuantConfig())
    assert build_config("gptq", bits=3).algorithm == "gptq"
    for bad in ({"algorithm": "awq"}, {"damp": 0.0},
                {"calibration_tokens": 1}):
        with pytest.raises(ValueError, match="expected"):
            QuantConfig(**bad)
    with pytest.raises(ValueError, match="tokenizer"):
        compress_(tiny_llama(), QuantConfig(algorithm="gptq"), progress=False)
    model = tiny_llama()
    compress_(model, MPOConfig(num_cores=2, max_bond=8, target_modules=["down_proj"]), progress=False)
    assert any(isinstance(m, MPOLinear) for m in model.modules())
    with pytest.raises(ValueError, match="MPO layers"):
        compress_(model, QuantConfig(algorithm="gptq"), batches=_batches(128), progress=False)


def dense_folder_and_text(tmp_path):
    """A tiny word-level llama saved as a Hugging Face folder, and a calibration text in its vocabulary."""
    from test_abilities import WORDS, tiny_llama_for, word_tokenizer

    tok = word_tokenizer()
    model = tiny_llama_for(tok)
    model.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(WORDS[3 + (i * 7) % (len(WORDS) - 3)] for i in range(800)))
    return tmp_path / "dense", text


def test_cli_compress_gptq(tmp_path):
    from mpokit.cli.main import main

    _, text = dense_folder_and_text(tmp_path)
    rc = main(["compress", "--model", str(tmp_path / "dense"), "--method", "gptq", "--bits", "4", "--group-size",
               "16", "--calibration", str(text), "--calibration-tokens", "256", "--out", str(tmp_path / "g4"),
               "--json", str(tmp_path / "c.json")])
    assert rc == 0
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["config"]["algorithm"] == "gptq" and report["calibration_tokens"] == 256
    assert report["calibration"] is not None and report["bytes_ratio"] < 0.25
    loaded = load_compressed(tmp_path / "g4")
    assert any(isinstance(m, QuantLinear) for m in loaded.modules())


def test_stacked_calibration_windows_give_the_same_statistics():
    from mpokit.calibration.stats import collect_input_stats
    from mpokit.methods.quant.transform import _stack_windows

    windows = [torch.randint(0, 128, (1, 8)) for _ in range(5)] + [torch.randint(0, 128, (1, 3))]
    stacked = _stack_windows(windows, 2)
    assert [tuple(b.shape) for b in stacked] == [(2, 8), (2, 8), (1, 8), (1, 3)]
    model, name = tiny_llama(), "model.layers.1.mlp.down_proj"
    one = collect_input_stats(model, [name], windows, progress=False).gram(name)
    many = collect_input_stats(model, [name], stacked, progress=False).gram(name)
    assert torch.allclose(one, many, rtol=1e-4, atol=1e-4)
