"""Issue 12 item 1: QuantLinear on torch's packed int4/int8 CPU kernels, checked against the reference path."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mpokit
from mpokit.layers.quant import QuantLinear, kernel_paths, set_kernel_
from mpokit.ops import quant_kernels

pytestmark = pytest.mark.skipif(not quant_kernels.kernels_available(), reason="this torch has no CPU int4/int8 kernels")

# (bits, group, symmetric, zero_point) -> the path it takes over 192 input columns
GRIDS = [(4, 32, False, True, "int4"), (4, 96, False, True, "int4"), (4, 64, True, True, "int4"),
         (4, 64, False, False, "int4"), (3, 64, False, True, "int4"), (2, 32, True, True, "int4"),
         (2, 32, False, True, "int4"), (8, 192, False, True, "int8"), (8, 192, True, True, "int8"),
         (8, 192, False, False, "int8"), (8, 64, False, True, "reference"), (4, 40, False, True, "reference"),
         (4, 128, False, True, "reference")]  # 128 does not divide 192: ragged last group


def _layer(bits, group, symmetric, zero_point, bias=True) -> QuantLinear:
    w = torch.randn(80, 192) * 0.05
    return QuantLinear.from_weight(w, torch.randn(80) if bias else None, bits=bits, group_size=group,
                                   symmetric=symmetric, zero_point=zero_point)


def _rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("bits,group,symmetric,zero_point,path", GRIDS)
def test_kernel_matches_the_reference_within_bfloat16_rounding(bits, group, symmetric, zero_point, path):
    layer = _layer(bits, group, symmetric, zero_point)
    assert layer.kernel_path() == path
    x = torch.randn(3, 7, 192)
    w = layer.qweight.dequantize(torch.float32)
    exact = F.linear(x, w, layer.bias)
    with torch.no_grad():
        layer.kernel = "always"
        fast = layer(x)
        assert fast.dtype == x.dtype and fast.shape == exact.shape
        bf16 = layer(x.bfloat16())  # auto and always agree on bfloat16 inputs
    assert _rel(fast, exact) < (1e-6 if path == "reference" else 1e-2)
    assert _rel(bf16, F.linear(x.bfloat16(), w.bfloat16(), layer.bias.bfloat16())) < 2e-2


def test_auto_keeps_float32_exact_and_takes_the_kernel_for_bfloat16(monkeypatch):
    layer = _layer(4, 32, False, True)
    calls = []
    real = quant_kernels.int4_mm
    monkeypatch.setattr(quant_kernels, "int4_mm", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 192)
    with torch.no_grad():
        y = layer(x)
        assert not calls and torch.equal(y, F.linear(x, layer.weight, layer.bias))
        layer(x.bfloat16())
        assert calls == [1]
        layer.kernel = "reference"
        layer(x.bfloat16())
        assert calls == [1] and layer.kernel_path() == "reference"


def test_autograd_takes_the_reference_path():
    layer = _layer(4, 32, False, True)
    layer.kernel = "always"
    x = torch.randn(4, 192, requires_grad=True)
    layer(x).sum().backward()
    assert torch.allclose(x.grad, layer.weight.sum(0).expand(4, -1), atol=1e-5)


def test_new_codes_rebuild_the_kernel_copy():
    layer = _layer(4, 32, False, True, bias=False)
    layer.kernel = "always"
    x = torch.randn(2, 192)
    with torch.no_grad():
        before = layer(x)
        layer.qweight.set_from(torch.randn(80, 192) * 0.5)
        after = layer(x)
    assert _rel(after, F.linear(x, layer.weight)) < 1e-2 and _rel(after, before) > 0.1


def test_a_bfloat16_model_decodes_on_the_kernels_close_to_the_reference(llama):
    mpokit.compress_(llama, mpokit.QuantConfig(bits=4, group_size=32))
    model = llama.to(torch.bfloat16).eval()
    assert kernel_paths(model) == {"int4": sum(isinstance(m, QuantLinear) for m in model.modules())}
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        fast = model(ids).logits
        set_kernel_(model, "reference")
        ref = model(ids).logits
    assert _rel(fast, ref) < 5e-2
    set_kernel_(model, "auto")
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 16)
    with pytest.raises(ValueError, match="kernel"):
        set_kernel_(model, "fastest")


def test_cli_eval_in_bfloat16_reports_the_kernel_paths(tmp_path):
    import json

    from mpokit.cli.main import main
    from test_export_gguf import TOKENIZER, quantized

    mpokit.save_compressed(quantized(bits=4, group_size=32), tmp_path / "ckpt", TOKENIZER)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.json"
        assert main(["eval", str(tmp_path / "ckpt"), "--text", str(text), "--tokens", "128", "--context", "64",
                     "--dtype", dtype, "--json", str(out)]) == 0
        runs[dtype] = json.loads(out.read_text())
    assert runs["bfloat16"]["kernel_paths"] == runs["float32"]["kernel_paths"] == {"int4": 14}
    assert runs["bfloat16"]["dtype"] == "bfloat16"
    assert abs(runs["bfloat16"]["perplexity"] / runs["float32"]["perplexity"] - 1) < 0.02


def test_fast_takes_the_kernel_for_decoding_and_the_exact_path_for_prefill(monkeypatch):
    from mpokit.layers.quant import FAST_MAX_ROWS

    layer = _layer(4, 32, False, True)
    layer.kernel = "fast"
    calls = []
    real = quant_kernels.int4_mm
    monkeypatch.setattr(quant_kernels, "int4_mm", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        layer(torch.randn(1, 1, 192))
        assert calls == [1]
        x = torch.randn(1, FAST_MAX_ROWS + 1, 192)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias)) and calls == [1]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_large_layers_dequantize_a_slice_of_rows_at_a_time(monkeypatch, bits):
    import mpokit.layers.quant as quant

    layer = _layer(bits, 32, False, True)
    layer.kernel = "reference"
    x = torch.randn(3, 192)
    with torch.no_grad():
        whole = layer(x)
        monkeypatch.setattr(quant, "CHUNK_NUMEL", 192 * 7)  # 7 rows per slice: 80 rows in 12 slices
        calls = []
        real = layer.qweight.dequantize_rows
        monkeypatch.setattr(layer.qweight, "dequantize_rows", lambda r, d=torch.float32: calls.append(r) or real(r, d))
        sliced = layer(x)
    assert len(calls) == 12 and torch.allclose(sliced, whole, atol=1e-6)
    rows = torch.tensor([5, 0, 79])
    assert torch.equal(layer.qweight.dequantize_rows(rows), layer.qweight.dequantize()[rows])


def test_compress_in_bfloat16_saves_a_bfloat16_model_that_decodes_on_the_kernels(tmp_path):
    import json

    from mpokit.cli.main import main
    from test_export_gguf import TOKENIZER, tiny_model

    src = tmp_path / "src"
    tiny_model().save_pretrained(src)
    TOKENIZER.save_pretrained(src)
    out = tmp_path / "q"
    assert main(["compress", "--model", str(src), "--method", "quant", "--bits", "4", "--group-size", "32",
                 "--dtype", "bfloat16", "--out", str(out)]) == 0
    model = mpokit.load_compressed(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 30)
    js = tmp_path / "e.json"
    assert main(["eval", str(out), "--text", str(text), "--tokens", "96", "--context", "48", "--dtype", "bfloat16",
                 "--json", str(js)]) == 0
    assert json.loads(js.read_text())["kernel_paths"] == {"int4": 14}
