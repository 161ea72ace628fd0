"""layers/kv_cache + ops/decoquant: exact split, per-token codes, residual window, generate, perplexity."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from mpokit.eval.perplexity import perplexity
from mpokit.layers.kv_cache import DecoQuantCache, KVQuantLayer, RTNKVCache, kv_cache_bytes, orthonormal_mixer
from mpokit.methods.kv_cache import KVCacheFactory, make_kv_cache
from mpokit.ops.decoquant import fit_small_core, from_large_core, to_large_core
from mpokit.ops.quant import sqnr_db


def outlier_rows(n=96, d=64, seed=0):
    """Key-like rows: a few channels carry most of the magnitude, as in real attention keys."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, [3, 17, 40]] *= 12.0
    return x


def test_decomposition_is_exact_before_quantization():
    x = outlier_rows()
    for small_dim in (8, 16, 64):
        small = fit_small_core(x, small_dim)
        assert small.shape == (small_dim, small_dim)
        large = to_large_core(x, torch.linalg.inv(small))
        assert large.shape == x.shape
        assert torch.allclose(from_large_core(large, small), x, atol=1e-4)
    with pytest.raises(ValueError, match="expected small_dim"):
        fit_small_core(x, 48)


def test_small_core_narrows_the_large_core_range():
    x = outlier_rows()
    small = fit_small_core(x, 16)
    large = to_large_core(x, torch.linalg.inv(small))
    spread = lambda t: (t.amax(-1) - t.amin(-1)) / t.std(-1)  # per-token range in units of its spread
    assert spread(large).mean() < spread(x).mean()


def test_rank_deficient_fit_stays_finite():
    x = torch.randn(1, 64)  # one token: the 16x16 Gram matrix has rank 4
    small = fit_small_core(x, 16)
    assert torch.isfinite(torch.linalg.inv(small)).all()


def _layer_roundtrip(layer: KVQuantLayer, k: torch.Tensor) -> torch.Tensor:
    layer.update(k, k.clone())
    keys, _ = layer.update(k[:, :, :1], k[:, :, :1])  # one more token: read the cache back
    return keys[:, :, :-1]


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_decoquant_beats_rtn_on_outlier_keys(bits):
    k = outlier_rows(n=128).reshape(1, 1, 128, 64)
    # float offsets: a range that must also hold 0 (zero points) blurs the range effect tested here
    rtn = _layer_roundtrip(KVQuantLayer(bits, residual_length=0, small_dim=None, zero_point=False), k)
    deco = _layer_roundtrip(KVQuantLayer(bits, residual_length=0, small_dim=16, zero_point=False), k)
    assert not torch.equal(rtn, k)  # both did quantize
    assert sqnr_db(k, deco) > sqnr_db(k, rtn)


def test_residual_window_is_exact_and_quantized_once():
    layer = KVQuantLayer(2, residual_length=5, small_dim=16)
    k = torch.randn(2, 3, 12, 64)
    keys, _ = layer.update(k, k)
    assert torch.equal(keys, k)  # the current tokens see themselves exactly
    assert layer.get_seq_length() == 12 and layer.keys.shape[-2] == 5 and layer._quantized_keys.length == 7
    first_codes = layer._quantized_keys.packed.clone()
    keys2, _ = layer.update(k[:, :, :3], k[:, :, :3])
    assert keys2.shape[-2] == 15 and layer._quantized_keys.length == 10
    assert torch.equal(layer._quantized_keys.packed[:, :, :7], first_codes)  # old tokens not re-quantized
    assert torch.allclose(keys2[:, :, 10:12], k[:, :, 10:12].half().float())  # 16-bit window
    assert not torch.allclose(keys2[:, :, :7], k[:, :, :7], atol=1e-2)


def test_per_channel_keys_beat_per_token_keys_on_channel_outliers():
    k = outlier_rows(n=128).reshape(1, 1, 128, 64)
    k[..., 5] += 6.0  # a channel with a large offset, as real keys have
    token = _layer_roundtrip(KVQuantLayer(2, residual_length=0, small_dim=None, zero_point=False), k)
    channel = _layer_roundtrip(KVQuantLayer(2, residual_length=0, small_dim=None, key_group=32, zero_point=False), k)
    assert sqnr_db(k, channel) > sqnr_db(k, token) + 3


def test_rotation_spreads_channel_outliers_for_per_token_rows():
    v = outlier_rows(n=128).reshape(1, 1, 128, 64)
    plain = _layer_roundtrip(KVQuantLayer(4, residual_length=0, small_dim=None), v)
    rotated = _layer_roundtrip(KVQuantLayer(4, residual_length=0, small_dim=None, rotate=True), v)
    normal = [c for c in range(64) if c not in (3, 17, 40)]  # plain RTN's outlier-set ranges round these to 0
    assert sqnr_db(v[..., normal], rotated[..., normal]) > sqnr_db(v[..., normal], plain[..., normal]) + 3
    assert sqnr_db(v, rotated) > sqnr_db(v, plain)
    gauss = torch.randn(1, 1, 128, 64)  # negative control: nothing to spread, no real gain
    gain = (sqnr_db(gauss, _layer_roundtrip(KVQuantLayer(4, residual_length=0, small_dim=None, rotate=True), gauss))
            - sqnr_db(gauss, _layer_roundtrip(KVQuantLayer(4, residual_length=0, small_dim=None), gauss)))
    assert gain < 1.5


@pytest.mark.parametrize("d", [64, 48])
def test_rotation_is_orthonormal_and_exact_at_8_bits(d):
    r = orthonormal_mixer(d)
    assert torch.allclose(r @ r.T, torch.eye(d), atol=1e-5)
    k = torch.randn(1, 2, 40, d)
    for small_dim in (None, 16):
        keys = _layer_roundtrip(KVQuantLayer(8, residual_length=0, small_dim=small_dim, rotate=True), k)
        assert sqnr_db(k, keys) > 35


def test_token_groups_add_scales_and_cut_error():
    k = outlier_rows(n=64).reshape(1, 1, 64, 64)
    whole, grouped = KVQuantLayer(2, residual_length=0, small_dim=None), KVQuantLayer(2, 0, None, token_group=16)
    assert sqnr_db(k, _layer_roundtrip(grouped, k)) > sqnr_db(k, _layer_roundtrip(whole, k)) + 1
    assert grouped._quantized_keys.scale.shape == (1, 1, 65, 4)
    extra = 65 * 3 * 3 * 2  # 3 more (fp16 scale + uint8 zero point) groups per token, keys and values
    assert grouped.storage_bytes() - whole.storage_bytes() == extra
    with pytest.raises(ValueError, match="token group dividing"):
        KVQuantLayer(2, 0, None, token_group=24).update(k, k)


def test_key_blocks_leave_the_window_whole():
    layer = KVQuantLayer(4, residual_length=0, small_dim=16, key_group=8)
    k = torch.randn(1, 2, 21, 64)
    layer.update(k, k)
    assert layer._quantized_keys.length == 16 and layer.keys.shape[-2] == 5  # 2 blocks of 8; 5 wait in 16 bits
    assert layer._quantized_values.length == 16
    keys, _ = layer.update(k[:, :, :3], k[:, :, :3])
    assert keys.shape[-2] == 24 and layer._quantized_keys.length == 24 and layer.keys.shape[-2] == 0
    with pytest.raises(ValueError, match="crop only inside"):
        layer.crop(-2)


def test_sink_tokens_are_exact_and_do_not_stretch_ranges():
    k = outlier_rows(n=64).reshape(1, 1, 64, 64)
    k[:, :, 0] *= 40  # a massive first token, as attention sinks have
    outs = {}
    for sink in (0, 2):
        layer = KVQuantLayer(2, residual_length=0, small_dim=None, key_group=16, sink_length=sink)
        for i in range(0, 64, 8):  # arrive a few at a time, as in generation
            layer.update(k[:, :, i:i + 8], k[:, :, i:i + 8])
        outs[sink], _ = layer.update(k[:, :, :1], k[:, :, :1])
        assert layer.get_seq_length() == 65
    assert torch.allclose(outs[2][:, :, :2], k[:, :, :2], rtol=1e-3)  # 16-bit copies
    assert sqnr_db(k[:, :, 2:64], outs[2][:, :, 2:64]) > sqnr_db(k[:, :, 2:64], outs[0][:, :, 2:64]) + 3


def test_small_core_waits_for_enough_tokens():
    layer = KVQuantLayer(4, residual_length=0, small_dim=16)
    k = outlier_rows(n=40).reshape(1, 1, 40, 64)
    for i in range(0, 40, 4):
        layer.update(k[:, :, i:i + 4], k[:, :, i:i + 4])
    assert layer._n_plain["k"] == 12  # 3 pushes of 4 before 16 tokens were at hand
    assert layer._small["k"].shape == (1, 16, 16)
    keys, _ = layer.update(k[:, :, :1], k[:, :, :1])
    assert sqnr_db(k, keys[:, :, :40]) > 15


def test_bytes_accounting():
    layer = KVQuantLayer(4, residual_length=0, small_dim=16)
    k = torch.randn(1, 2, 400, 64)
    layer.update(k, k)
    per_token = 64 * 4 // 8 + 2 + 1  # codes + fp16 scale + uint8 zero point
    small = 2 * 2 * 16 * 16 * 2  # keys and values, 2 heads, 16x16 float16
    assert layer.storage_bytes() == 2 * 2 * 400 * per_token + small
    assert layer.fp16_bytes() == 2 * 2 * 400 * 64 * 2
    assert layer.storage_bytes() / layer.fp16_bytes() < 0.30


def test_crop_and_beam_reorder():
    layer = KVQuantLayer(8, residual_length=4, small_dim=16)
    k = torch.randn(2, 1, 10, 64)
    layer.update(k, k)
    layer.reorder_cache(torch.tensor([1, 0]))
    keys, _ = layer.update(k[:, :, :1], k[:, :, :1])
    assert torch.allclose(keys[0, :, :10], k[1], atol=0.05)
    layer.crop(-6)
    assert layer.get_seq_length() == 5 and layer.keys.shape[-2] == 0 and layer._quantized_keys.length == 5


@pytest.mark.parametrize("kind", ["decoquant", "rtn", "decoquant-kcr"])
def test_generate_with_cache(kind):
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 12))
    ref = model.generate(ids, max_new_tokens=12, do_sample=False)
    extra = {"small_dim": 4} if kind.startswith("decoquant") else {}  # tiny heads (16 dims): a 4x4 small core
    if kind.endswith("kcr"):
        extra["key_group"] = 4
    cache = make_kv_cache(kind, model.config, bits=8, residual_length=4, **extra)
    out = model.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=cache)
    assert torch.equal(out, ref)  # 8-bit is close enough for greedy decoding of a tiny model
    held, fp16 = kv_cache_bytes(cache)
    assert cache.get_seq_length() == 23 and 0 < held
    assert held < fp16 or kind.endswith("kcr")  # 23 tokens: the 16-bit sink copies can outweigh the savings


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 128 for c in text]}


def test_chunked_perplexity_puts_the_cache_in_the_loop():
    model, tok = tiny_llama(), CharTokenizer()
    text = "the quick brown fox jumps over the lazy dog. " * 30
    base = perplexity(model, tok, text, tokens=256, context=64, progress=False)
    chunked = perplexity(model, tok, text, tokens=256, context=64, progress=False, chunk=16)
    assert chunked.perplexity == pytest.approx(base.perplexity, rel=1e-5)
    # one forward per window: the quantized cache is written but never read
    one_shot = perplexity(model, tok, text, tokens=256, context=64, progress=False,
                          cache_factory=lambda: RTNKVCache(model.config, bits=2, residual_length=0))
    assert one_shot.perplexity == pytest.approx(base.perplexity, rel=1e-5)
    factory = KVCacheFactory("rtn", model.config, bits=2, residual_length=0)
    looped = perplexity(model, tok, text, tokens=256, context=64, progress=False, chunk=16, cache_factory=factory)
    assert looped.perplexity != pytest.approx(base.perplexity, rel=1e-4)
    assert 0 < factory.bytes_ratio() < 0.5


def test_quanto_backend_bytes():
    pytest.importorskip("optimum.quanto")
    model = tiny_llama()
    cache = make_kv_cache("quanto", model.config, bits=4, residual_length=4)
    model(torch.randint(0, 128, (1, 40)), past_key_values=cache, use_cache=True)
    held, fp16 = kv_cache_bytes(cache)
    assert 0 < held < fp16


def test_cli_lists_every_cache_kind():
    import argparse

    from mpokit.cli.evaluate import add_arguments
    from mpokit.methods.base import method_names

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    kinds = next(a for a in parser._actions if a.dest == "kv_cache").choices
    assert sorted(kinds) == method_names("kv-cache") == sorted(["decoquant", "rtn", "decoquant-kc", "rtn-kc",
                                                                "decoquant-kcr", "rtn-kcr", "decoquant-rk", "decoquant-long",
                                                                "rtn-long",
                                                                "quanto"])


def test_bad_settings():
    model = tiny_llama()
    with pytest.raises(ValueError, match="expected bits"):
        DecoQuantCache(model.config, bits=5)
    with pytest.raises(ValueError, match="expected a kv cache kind"):
        make_kv_cache("fp8x", model.config)
    with pytest.raises(ValueError, match="expected a model config"):
        DecoQuantCache()
