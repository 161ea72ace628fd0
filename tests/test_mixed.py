"""methods/mixed: one byte budget over GPTQ bit widths and low rank with quantized factors."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_llama
from mpokit import compress_, load_compressed, save_compressed, unload_
from mpokit.layers.quant import QuantizedTensor, QuantLinear
from mpokit.layers.quant_mpo import QuantMPOLinear
from mpokit.methods import GPTQConfig, MixedConfig
from mpokit.methods.mixed.candidates import (Grid, dense_cost, dequantized, layer_candidates, lowrank_codes,
                                             lowrank_cost, lowrank_ranks, weighted_error)
from mpokit.methods.mixed.transform import lowrank_layer
from mpokit.ops.quant import quantized_bytes


def _batches(vocab: int = 128, n: int = 6, length: int = 32) -> list[torch.Tensor]:
    return [torch.randint(0, vocab, (1, length)) for _ in range(n)]


def _layer_data(out: int = 48, inp: int = 64, n: int = 1024):
    mix = torch.eye(inp) + 2 * torch.randn(inp, inp) / inp ** 0.5
    x = torch.randn(n, inp) @ mix  # correlated inputs, as real activations are
    w = torch.randn(out, 8) @ torch.randn(8, inp) + 0.3 * torch.randn(out, inp)  # mostly low rank
    return w, (x.T @ x).double(), torch.rand(out) + 0.5


@pytest.mark.parametrize("rows,cols,bits,group", [(24, 80, 4, 32), (7, 96, 3, 96), (5, 33, 2, 16), (9, 64, 8, 64)])
def test_priced_bytes_are_the_stored_bytes(rows, cols, bits, group):
    for symmetric, zero_point in ((False, True), (False, False), (True, False)):
        t = QuantizedTensor(rows, cols, bits, group, symmetric, zero_point)
        assert quantized_bytes(rows, cols, bits, group, symmetric, zero_point) == t.storage_bytes()


def test_candidates_cost_and_error_order():
    w, gram, r = _layer_data()
    grid = Grid(32)
    found = layer_candidates(w, gram, r, (2, 3, 4, 8), (4, 8), [8, 32], grid, exact=True)
    dense = {c.choice[1]: c for c in found if c.choice[0] == "gptq"}
    assert [dense[b].error for b in (8, 4, 3, 2)] == sorted(dense[b].error for b in (8, 4, 3, 2))
    assert dense[4].cost == dense_cost(48, 64, 4, 32) and dense[8].error < 1e-3 * dense[2].error
    assert dense[8].cost == dense_cost(48, 64, 8, 64)  # 8 bits: one group per row, the int8 kernel's grid
    low = {c.choice[1:]: c for c in found if c.choice[0] == "lowrank"}
    assert set(low) == {(8, 4), (8, 8), (32, 4), (32, 8)}
    assert low[(8, 8)].cost == lowrank_cost(48, 64, 8, 8, 32)
    assert low[(32, 8)].error < low[(8, 8)].error  # more rank, less error
    assert low[(32, 8)].error < low[(32, 4)].error  # more bits, less error
    # a mostly rank-8 weight: rank 8 at 4 bits beats 2-bit dense at fewer bytes
    assert low[(8, 4)].cost < dense[2].cost and low[(8, 4)].error < dense[2].error
    # the GPTQ-free estimate is close to what GPTQ on the factors gives, and not below the truncation alone
    estimated = {c.choice[1:]: c for c in layer_candidates(w, gram, r, (4, 8), (4, 8), [8, 32], grid)
                 if c.choice[0] == "lowrank"}
    for key, c in low.items():
        assert 0.5 * c.error < estimated[key].error < 2.0 * c.error, key


def test_lowrank_factor_refit_and_layer():
    w, gram, r = _layer_data()
    codes = lowrank_codes(w, gram, r, 32, 8, Grid(32))
    w_hat = dequantized(codes.second) @ dequantized(codes.first)
    truncated = weighted_error(w, w_hat, gram, r) / weighted_error(w, torch.zeros_like(w), gram, r)
    assert 0 < truncated < 0.05  # the rank-8 signal is kept; a negative control: not exact
    bias = torch.randn(48)
    layer = lowrank_layer(codes, bias, torch.float32)
    x = torch.randn(3, 64)
    assert torch.allclose(layer(x), x @ w_hat.T + bias, atol=1e-4)
    assert layer.storage_bytes() == lowrank_cost(48, 64, 32, 8, 32) + 48 * 4
    assert torch.allclose(layer.to_dense().weight, w_hat, atol=1e-5)


def test_ranks_are_whole_groups_below_the_fraction():
    assert lowrank_ranks(576, 576, 96, 0.5, 4) == [96, 192, 288]
    assert lowrank_ranks(1536, 576, 96, 0.5, 2) == [192, 288]
    assert lowrank_ranks(64, 64, 96, 0.5, 4) == [] and lowrank_ranks(576, 576, 96, 0.5, 0) == []


def test_plan_of_one_width_is_exactly_gptq():
    """The same calibration stream and one candidate per layer: the mixed method must build GPTQ's codes."""
    a, b = tiny_llama(), tiny_llama()
    b.load_state_dict(a.state_dict())
    batches = _batches()
    compress_(a, GPTQConfig(bits=4, group_size=32), batches=batches, progress=False)
    report = compress_(b, MixedConfig(bits_per_weight=8, bits_choices=(4,), factor_bits=(), group_size=32,
                                      embeddings=None), batches=batches, progress=False)
    qa = {n: m for n, m in a.named_modules() if isinstance(m, QuantLinear)}
    qb = {n: m for n, m in b.named_modules() if isinstance(m, QuantLinear)}
    assert qa.keys() == qb.keys() and len(qa) == 14
    assert all(torch.equal(qa[n].qweight.packed, qb[n].qweight.packed) for n in qa)
    assert report.extra["choices"] == {"gptq 4": 14}


def test_budget_is_respected_and_buys_quality(tmp_path):
    batches, base = _batches(), tiny_llama()
    reports, models = {}, {}
    for bpw in (2.8, 3.5, 5.0):
        models[bpw] = tiny_llama()
        models[bpw].load_state_dict(base.state_dict())
        reports[bpw] = compress_(models[bpw], MixedConfig(bits_per_weight=bpw, group_size=32), batches=batches,
                                 progress=False)
    for bpw, rep in reports.items():
        weights = sum(r.params_before for r in rep.layers if r.kind != "quant-embedding")
        assert rep.extra["linear_bytes"] <= bpw * weights / 8 and rep.extra["bits_per_weight"] <= bpw
        assert rep.extra["bytes"] == rep.extra["linear_bytes"] + sum(
            r.detail["bytes_after"] for r in rep.layers if r.kind == "quant-embedding")
    losses = [reports[b].extra["planned_loss"] for b in (2.8, 3.5, 5.0)]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0]
    assert len({json.dumps(reports[b].extra["choices"]) for b in reports}) == 3  # the plans differ
    # the candidates of one run plan another budget: the same model as measuring again
    again = tiny_llama()
    again.load_state_dict(base.state_dict())
    reused = compress_(again, MixedConfig(bits_per_weight=3.5, group_size=32), batches=batches, progress=False,
                       candidates=reports[2.8].extra["candidates"])
    assert reused.extra["choices"] == reports[3.5].extra["choices"]
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), models[3.5].state_dict().values()))
    with pytest.raises(ValueError, match="exactly the targeted layers"):
        compress_(tiny_llama(), MixedConfig(group_size=32, target_modules=["q_proj"]), batches=batches,
                  progress=False, candidates=reports[2.8].extra["candidates"])
    with pytest.raises(ValueError, match="bits per weight"):
        compress_(tiny_llama(), MixedConfig(bits_per_weight=1.0, group_size=32), batches=batches, progress=False)


def test_mixed_model_with_lowrank_saves_loads_generates_and_unloads(tmp_path):
    model = tiny_llama()
    report = compress_(model, MixedConfig(bits_per_weight=3.0, bits_choices=(2,), factor_bits=(4,), group_size=16,
                                          max_rank_fraction=0.25), batches=_batches(), progress=False)
    kinds = {r.kind for r in report.layers}
    assert "lowrank-gptq" in kinds and any(isinstance(m, QuantMPOLinear) for m in model.modules())
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        out = model(ids).logits
    save_compressed(model, tmp_path / "m")
    loaded = load_compressed(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)
    assert loaded.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)
    unload_(model)
    assert not any(isinstance(m, (QuantLinear, QuantMPOLinear)) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, out, atol=1e-4)


def test_config_errors():
    for bad in ({"bits_per_weight": 0}, {"bits_choices": (5,)}, {"factor_bits": (3,)}, {"target_bytes": 0},
                {"max_rank_fraction": 1.5}, {"embeddings": 6}):
        with pytest.raises(ValueError, match="expected"):
            MixedConfig(**bad)
    assert MixedConfig(embeddings=0).embeddings is None


def test_cli_compress_mixed(tmp_path):
    from mpokit.cli.main import main
    from test_quant_gptq import dense_folder_and_text

    dense, text = dense_folder_and_text(tmp_path)
    common = ["compress", "--model", str(dense), "--method", "mixed", "--group-size", "16",
              "--calibration", str(text), "--calibration-tokens", "256"]
    rc = main(common + ["--bits-per-weight", "4", "--out", str(tmp_path / "m3"), "--json", str(tmp_path / "c.json")])
    assert rc == 0
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["config"]["method"] == "mixed" and report["bits_per_weight"] <= 4
    assert report["bytes"] > 0 and report["choices"]
    assert report["peak_rss_mb"] > report["model_mb"] > 0  # every compress report carries its peak memory
    assert any(isinstance(m, QuantLinear) for m in load_compressed(tmp_path / "m3").modules())
    with pytest.raises(SystemExit) as e:
        main(common + ["--bits-per-weight", "0.5", "--out", str(tmp_path / "m05")])
    assert e.value.code == 2 and not (tmp_path / "m05").exists()


def test_gguf_export_writes_codes_and_densifies_lowrank(tmp_path):
    """GGUF has no low-rank tensors: the low-rank layers go dense and are listed; the GPTQ ones keep codes."""
    from mpokit.export.gguf import export_gguf
    from test_export_gguf import TOKENIZER, tiny_model

    model = tiny_model()
    compress_(model, MixedConfig(bits_per_weight=3.0, bits_choices=(2, 3), factor_bits=(4,), group_size=16,
                                 max_rank_fraction=0.25), batches=_batches(len(TOKENIZER)), progress=False)
    lowrank = [n for n, m in model.named_modules() if isinstance(m, QuantMPOLinear)]
    assert lowrank
    report = export_gguf(model, tmp_path / "m.gguf", tokenizer=TOKENIZER)
    notes = " ".join(report["notes"])
    assert all(n in notes for n in lowrank)
    model = tiny_model()  # groups of 32 fit GGUF's blocks: 2/3/4-bit codes are written as they are
    compress_(model, MixedConfig(bits_per_weight=3.0, bits_choices=(2, 3, 4), factor_bits=(), group_size=32),
              batches=_batches(len(TOKENIZER)), progress=False)
    rows = [t for t in export_gguf(model, tmp_path / "g.gguf", tokenizer=TOKENIZER)["tensors"]
            if t["name"].startswith("blk.") and "norm" not in t["name"]]
    assert rows and all(t["type"] in ("Q4_0", "Q4_1") for t in rows)
    assert all(t["exact"] for t in rows if t["type"] == "Q4_0")  # 2/3 bits; 4-bit Q4_1 rounds m = -z*s to fp16


def test_lowrank_layers_run_both_factors_on_the_packed_kernels():
    """A low-rank QuantMPOLinear with kernel-friendly groups takes the int4 kernel for both factors."""
    from mpokit.layers.quant import kernel_paths, set_kernel_
    from mpokit.ops import quant_kernels

    if not quant_kernels.kernels_available():
        pytest.skip("torch's packed CPU kernels are not available here")
    w, gram, r = _layer_data(out=96, inp=128)
    layer = lowrank_layer(lowrank_codes(w, gram, r, 32, 4, Grid(32)), None, torch.float32)
    x = torch.randn(2, 128)
    with torch.no_grad():
        reference = layer(x)
        assert kernel_paths(layer) == {"int4": 2}
        assert set_kernel_(layer, "always") == {"int4": 2}
        fast = layer(x)
        set_kernel_(layer, "reference")
        assert kernel_paths(layer) == {"reference": 2} and torch.equal(layer(x), reference)
    assert not torch.equal(fast, reference)  # the kernel ran (bfloat16 rounding)...
    assert (fast - reference).abs().max() <= 2e-2 * reference.abs().max()  # ...and agrees
    assert list(layer.state_dict()) == ["qcores.0.packed", "qcores.0.scale", "qcores.0.offset", "qcores.1.packed",
                                        "qcores.1.scale", "qcores.1.offset"]  # the views add no state
