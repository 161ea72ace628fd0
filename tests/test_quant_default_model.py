"""Quantization on the real default model (SmolLM2-135M-Instruct, from a Q4_1 GGUF). Slow: ~1 min."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mpokit import load_model
from mpokit.cli.main import main
from mpokit.eval import perplexity
from mpokit.ops.quant import fake_quantize, sqnr_db

TEST_TEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2" / "test.txt"


@pytest.fixture(scope="module")
def smollm2():
    loaded = load_model(None)
    return loaded.model, loaded.tokenizer


@pytest.mark.slow
def test_q4_1_source_grid_is_lossless_so_benchmarks_use_other_groups(smollm2):
    """The weights were stored as Q4_1 (4-bit, groups of 32, float min offset): re-quantizing on that
    grid recovers them exactly (and proves nothing), while groups of 128 or 64 do not line up with it."""
    w = smollm2[0].model.layers[3].mlp.down_proj.weight.detach()  # (576, 1536)
    assert sqnr_db(w, fake_quantize(w, 4, 32, zero_point=False)) > 60
    s128, s64 = sqnr_db(w, fake_quantize(w, 4, 128)), sqnr_db(w, fake_quantize(w, 4, 64))
    assert 12 < s128 < s64 < 35


@pytest.mark.slow
def test_kv_cache_in_the_loop_on_the_real_model(smollm2, tmp_path):
    if not TEST_TEXT.is_file():
        pytest.skip(f"missing evaluation text {TEST_TEXT}")
    out = tmp_path / "kv.json"
    rc = main(["eval", "--text", str(TEST_TEXT), "--tokens", "512", "--context", "256", "--kv-cache", "decoquant",
               "--kv-bits", "4", "--json", str(out)])
    assert rc == 0
    import json

    res = json.loads(out.read_text())
    model, tok = smollm2
    base = perplexity(model, tok, TEST_TEXT.read_text(), tokens=512, context=256, progress=False, chunk=64)
    assert res["chunk"] == 64 and res["kv_cache"] == "decoquant"
    assert 1.0 < res["perplexity"] / base.perplexity < 1.05
    assert res["kv_bytes_ratio"] < 0.40  # 16 of 256 tokens stay 16-bit here
    with torch.no_grad():  # and generation runs through the cache
        from mpokit.layers.kv_cache import DecoQuantCache

        ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
        gen = model.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=DecoQuantCache(model.config))
    assert gen.shape[1] == ids.shape[1] + 6


@pytest.mark.slow
def test_rotated_values_beat_plain_rtn_at_2_bits_on_the_real_model(smollm2):
    """The -kcr presets exist because rotation measurably helps real 2-bit caches (bench: 1.21x -> 1.14x)."""
    if not TEST_TEXT.is_file():
        pytest.skip(f"missing evaluation text {TEST_TEXT}")
    from mpokit.methods.kv_cache import KVCacheFactory

    model, tok = smollm2
    text = TEST_TEXT.read_text()
    ppl = {kind: perplexity(model, tok, text, tokens=1024, context=512, progress=False, chunk=64,
                            cache_factory=KVCacheFactory(kind, model.config, bits=2)).perplexity
           for kind in ("rtn-kc", "rtn-kcr")}
    assert ppl["rtn-kcr"] < 0.97 * ppl["rtn-kc"]
