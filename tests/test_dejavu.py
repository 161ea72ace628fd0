"""Neuron-sparse FFNs (layers/sparse_ffn.py, methods/dejavu): the decode (gather) path equals the prefill (masked)
path for every selector, keep = N is the dense FFN, predictor training beats the static baseline, the refit lowers
the output error, undo and save/load round-trip, and bad input is refused."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_bert, tiny_gpt2, tiny_llama
from mpokit import compress_, load_compressed, save_compressed, unload_
from mpokit.cli.inspect import layer_rows
from mpokit.data import Calibration
from mpokit.io.checkpoint import read_meta
from mpokit.layers.ffn import DenseFFN
from mpokit.layers.sparse_ffn import GATED_SELECTORS, LOWRANK_SELECTORS, SELECTORS, NeuronSparseFFN
from mpokit.methods.dejavu import DejaVuConfig
from mpokit.methods.dejavu.predictor import selection_quality
from mpokit.surgery.ffn import find_ffns


def _ffn(gated: bool, bias: bool, n: int = 32, d: int = 16) -> DenseFFN:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return DenseFFN(up=r(n, d), down=r(d, n), act="silu" if gated else "gelu", gate=r(n, d) if gated else None,
                    up_bias=r(n) if bias else None, gate_bias=r(n) if bias and gated else None,
                    down_bias=r(d) if bias else None)


def _masked_reference(ffn: DenseFFN, layer: NeuronSparseFFN, x: torch.Tensor) -> torch.Tensor:
    """The dense FFN with every neuron outside the layer's selection zeroed, from DenseFFN's own formula."""
    h = ffn.hidden_states(x)
    keep = torch.zeros_like(h).scatter_(1, layer.scores(x, hidden=h).topk(layer.keep, -1).indices, 1.0)
    return torch.nn.functional.linear(h * keep, ffn.down, ffn.down_bias)


@pytest.mark.parametrize("selector", ["predictor", "gate", "lowrank", "gate-lowrank", "static"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gated", [True, False])
def test_decode_gather_equals_prefill_mask_and_the_reference(selector, bias, gated):
    if selector in GATED_SELECTORS and not gated:
        pytest.skip("the gate selectors need a gate")
    ffn = _ffn(gated, bias)
    layer = NeuronSparseFFN.from_dense(ffn, keep=8, selector=selector, predictor_rank=4,
                                       site_kind="gated" if gated else "mlp")
    torch.nn.init.normal_(layer.static_scores)  # a ranking to use
    if selector in LOWRANK_SELECTORS:
        layer.fit_lowrank_(torch.randn(64, 16))
    x = torch.randn(3, 16)
    with torch.no_grad():
        decode = layer(x)  # 3 tokens <= gather_tokens: gathered rows
        layer.gather_tokens = 0
        prefill = layer(x)  # dense, masked
        expected = _masked_reference(ffn, layer, x)
    torch.testing.assert_close(decode, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prefill, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, ffn(x), atol=1e-3)  # negative control: a quarter is not the whole FFN


def test_keep_all_is_the_dense_ffn_and_undo_round_trips():
    ffn = _ffn(True, True)
    layer = NeuronSparseFFN.from_dense(ffn, keep=32, selector="gate")
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ffn(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x[:1]), ffn(x[:1]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.to_dense()(x), ffn(x), rtol=1e-6, atol=1e-6)


def test_active_params_count_what_a_decoded_token_reads():
    ffn = _ffn(True, False, n=32, d=16)
    pred = NeuronSparseFFN.from_dense(ffn, keep=8, selector="predictor", predictor_rank=4)
    assert pred.active_params() == 8 * (2 * 16 + 16) + (16 * 4 + 4 * 32 + 32)
    gate = NeuronSparseFFN.from_dense(ffn, keep=8, selector="gate")
    assert gate.active_params() == 32 * 16 + 8 * (16 + 16)
    low = NeuronSparseFFN.from_dense(ffn, keep=8, selector="lowrank", predictor_rank=4)
    assert low.active_params() == 8 * (2 * 16 + 16) + (4 * 16 + 32 * 2 * 4)
    gate_low = NeuronSparseFFN.from_dense(ffn, keep=8, selector="gate-lowrank", predictor_rank=4)
    assert gate_low.active_params() == 32 * 16 + 8 * (16 + 16) + (4 * 16 + 32 * 4)


@pytest.mark.parametrize("selector", ["lowrank", "gate-lowrank"])
def test_the_lowrank_estimate_at_full_rank_is_exact_and_degrades_below_it(selector):
    ffn = _ffn(True, True)
    x = torch.randn(200, 16) * torch.linspace(3, 0.1, 16)  # most variance in a few directions
    hidden = ffn.hidden_states(x)
    full = NeuronSparseFFN.from_dense(ffn, keep=8, selector=selector, predictor_rank=16)
    full.fit_lowrank_(x)
    torch.testing.assert_close(full.scores(x), hidden.abs(), rtol=1e-4, atol=1e-4)
    low = NeuronSparseFFN.from_dense(ffn, keep=8, selector=selector, predictor_rank=2)
    low.fit_lowrank_(x)
    quality = {r: selection_quality(layer.scores(x), hidden, 8)["recall"] for r, layer in ((16, full), (2, low))}
    assert quality[16] == pytest.approx(1.0) and quality[2] < 0.95, quality
    with pytest.raises(ValueError, match="low-rank selector"):
        NeuronSparseFFN.from_dense(ffn, keep=8, selector="gate").fit_lowrank_(x)


def test_bad_layer_arguments_are_refused():
    with pytest.raises(ValueError, match="selector in"):
        NeuronSparseFFN.from_dense(_ffn(True, False), keep=8, selector="psychic")
    with pytest.raises(ValueError, match="gated FFN"):
        NeuronSparseFFN.from_dense(_ffn(False, False), keep=8, selector="gate")
    with pytest.raises(ValueError, match="keep"):
        NeuronSparseFFN.from_dense(_ffn(True, False), keep=33)
    with pytest.raises(ValueError, match="keep_fraction"):
        DejaVuConfig(keep_fraction=0)
    assert set(SELECTORS) == {"predictor", "gate", "lowrank", "gate-lowrank", "static", "oracle"}


def _batches(vocab: int, n: int = 8, length: int = 64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (1, length), generator=gen) for _ in range(n)]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_trained_predictor_beats_the_static_choice():
    recalls = {}
    for selector in ("static", "predictor", "gate", "lowrank", "gate-lowrank", "oracle"):
        model = tiny_llama()
        config = DejaVuConfig(selector=selector, predictor_rank=32, predictor_steps=400, predictor_batch=256)
        report = compress_(model, config, progress=False, calibration=Calibration(batches=_batches(128, 32)))
        recalls[selector] = report.extra["mean_recall"]
    assert recalls["oracle"] == pytest.approx(1.0)
    for selector in ("predictor", "gate", "lowrank", "gate-lowrank"):
        assert recalls[selector] > recalls["static"] + 0.1, recalls


@pytest.mark.parametrize("arch,selector", [("llama", "predictor"), ("gpt2", "predictor"), ("bert", "predictor"),
                                           ("llama", "gate-lowrank"), ("gpt2", "lowrank")])
def test_compress_undo_save_load(arch, selector, tmp_path):
    model = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}[arch]()
    ids = _batches(model.config.vocab_size, 1, 16)[0]
    before = _logits(model, ids)
    config = DejaVuConfig(selector=selector, predictor_rank=8, predictor_steps=50, predictor_batch=64, refit=True)
    report = compress_(model, config,
                       progress=False, calibration=Calibration(batches=_batches(model.config.vocab_size)))
    layers = [m for m in model.modules() if isinstance(m, NeuronSparseFFN)]
    assert len(layers) == len(report.layers) == 2
    assert report.extra["ffn_active_ratio"] < (0.6 if selector in GATED_SELECTORS else 0.5)
    assert all(r.detail["rel_error_after"] < r.detail["rel_error_before"] for r in report.layers)  # the refit
    sparse = _logits(model, ids)
    assert not torch.allclose(sparse, before, atol=1e-4)
    back = load_compressed(save_compressed(model, tmp_path / "ckpt", extra={"report": report.to_dict()}))
    torch.testing.assert_close(_logits(back, ids), sparse, rtol=1e-5, atol=1e-5)
    rows = [r for r in layer_rows(read_meta(tmp_path / "ckpt"))  # mpokit inspect: sizes and errors from the report
            if r["type"] == "NeuronSparseFFN"]  # (BERT's act and output modules stay behind as passthroughs)
    assert [r["rel_error"] for r in rows] == [r.detail["rel_error_after"] for r in report.layers]
    assert all(r["params"] == sum(t.numel() for t in m.state_dict().values()) for r, m in zip(rows, layers))
    unload_(model)  # the refit FFNs, dense again
    assert find_ffns(model) and not any(isinstance(m, NeuronSparseFFN) for m in model.modules())


def test_gate_selector_on_a_model_without_gates_is_refused():
    with pytest.raises(ValueError, match="gated FFNs for selector='gate'"):
        compress_(tiny_gpt2(), DejaVuConfig(selector="gate"), progress=False,
                  calibration=Calibration(batches=_batches(96)))
