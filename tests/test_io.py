"""io/: save/load bit-exact, generate after reload, bad checkpoints, atomic writes."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama

from mpokit import MPOConfig, compress_, load_compressed, save_compressed
from mpokit.io import CheckpointError, atomic_dir, is_checkpoint, write_json
from mpokit.io.checkpoint import META_FILE, WEIGHTS_FILE
from mpokit.layers.mpo import MPOEmbedding, MPOLinear

TIED = ["embed_tokens", "lm_head", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def compressed_llama(**kw):
    model = tiny_llama(**kw)
    compress_(model, MPOConfig(budget=0.5, target_modules=TIED), progress=False)
    return model


def assert_state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture
def saved(tmp_path):
    model = compressed_llama()
    path = save_compressed(model, tmp_path / "ckpt")
    return model, path


def test_save_load_bit_exact_with_tied_embeddings(saved):
    model, path = saved
    assert is_checkpoint(path) and not is_checkpoint(path.parent)
    loaded = load_compressed(path)
    assert_state_equal(model, loaded)
    emb, head = loaded.model.embed_tokens, loaded.lm_head
    assert isinstance(emb, MPOEmbedding) and isinstance(head, MPOLinear)
    assert head.cores is emb.cores  # still one set of weights after reload
    assert loaded.model.layers[0].mlp.up_proj.bonds == model.model.layers[0].mlp.up_proj.bonds
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    meta = json.loads((path / META_FILE).read_text())
    assert meta["mpokit_version"] and meta["methods"][0]["method"] == "mpo-datafree" and meta["methods"][0]["budget"] == 0.5
    assert loaded._mpokit_methods == meta["methods"]


def test_generate_after_reload_gives_identical_tokens(saved):
    model, path = saved
    loaded = load_compressed(path)
    prompt = torch.randint(0, 128, (1, 6))
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    a, b = model.generate(prompt, **kw), loaded.generate(prompt, **kw)
    assert a.shape == (1, 14) and torch.equal(a, b)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_bert, lambda: tiny_llama(tie=False)], ids=["gpt2", "bert", "untied"])
def test_save_load_other_architectures(tmp_path, make):
    model = make()
    compress_(model, MPOConfig(max_bond=4), progress=False)
    loaded = load_compressed(save_compressed(model, tmp_path / "c"))
    assert type(loaded) is type(model)
    assert_state_equal(model, loaded)
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_uncompressed_model_round_trips(tmp_path, llama):
    loaded = load_compressed(save_compressed(llama, tmp_path / "plain"))
    assert_state_equal(llama, loaded)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="missing checkpoint folder"):
        load_compressed(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=f"without {META_FILE}"):
        load_compressed(tmp_path / "empty")


def test_missing_weights_file(saved):
    _, path = saved
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="missing weights file"):
        load_compressed(path)


def _flip_bytes(file, offset, count=4):
    data = bytearray(file.read_bytes())
    for k in range(offset, offset + count):
        data[k] ^= 0xFF
    file.write_bytes(bytes(data))


def test_corrupt_weights_are_detected(saved):
    _, path = saved
    weights = path / WEIGHTS_FILE
    _flip_bytes(weights, weights.stat().st_size - 100)  # inside the tensor data
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_compressed(path)


def test_corrupt_header_without_hash_check(saved):
    _, path = saved
    _flip_bytes(path / WEIGHTS_FILE, 10)  # inside the JSON header
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_compressed(path, verify=False)


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_weights(saved, verify):
    _, path = saved
    weights = path / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_compressed(path, verify=verify)


def test_corrupt_meta_json(saved):
    _, path = saved
    text = (path / META_FILE).read_text()
    (path / META_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match=f"corrupt .*{META_FILE}"):
        load_compressed(path)


def test_newer_format_is_refused(saved):
    _, path = saved
    meta = json.loads((path / META_FILE).read_text())
    meta["format_version"] = 99
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="upgrade mpokit"):
        load_compressed(path)


def test_wrong_model_config(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["hidden_size"] = 32
    cfg["head_dim"] = 8
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match"):
        load_compressed(path)


def test_weights_from_another_model(tmp_path, saved):
    _, path = saved
    other = tiny_llama(layers=1)
    compress_(other, MPOConfig(budget=0.5, target_modules=TIED), progress=False)
    other_path = save_compressed(other, tmp_path / "other")
    shutil.copy(other_path / WEIGHTS_FILE, path / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="sha256"):
        load_compressed(path)
    with pytest.raises(CheckpointError, match="does not match its model description"):
        load_compressed(path, verify=False)  # the structural check catches it too


def test_unknown_layer_type(saved):
    _, path = saved
    meta = json.loads((path / META_FILE).read_text())
    next(iter(meta["layers"].values()))["type"] = "WarpLinear"
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown layer type 'WarpLinear'"):
        load_compressed(path)


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failed_save_keeps_existing_checkpoint(saved, monkeypatch):
    import safetensors.torch

    model, path = saved
    before = _snapshot(path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(compressed_llama(), path, overwrite=True)
    assert _snapshot(path) == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]  # no temp folders left behind
    assert_state_equal(model, load_compressed(path))


def test_save_overwrites_whole_folder(saved):
    _, path = saved
    (path / "stale.txt").write_text("old")
    model = tiny_llama()
    compress_(model, MPOConfig(max_bond=3), progress=False)
    with pytest.raises(ValueError, match="exists; pass --overwrite"):  # replacing a checkpoint is asked for
        save_compressed(model, path)
    assert (path / "stale.txt").read_text() == "old"
    save_compressed(model, path, overwrite=True)
    assert not (path / "stale.txt").exists()
    assert_state_equal(model, load_compressed(path))


def test_atomic_dir_and_write_json(tmp_path):
    target = tmp_path / "d"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "x").write_text("partial")
            raise RuntimeError("interrupted")
    assert not target.exists() and os.listdir(tmp_path) == []
    write_json(tmp_path / "a.json", {"k": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"k": 1}
    assert os.listdir(tmp_path) == ["a.json"]


def test_atomic_writes_get_normal_permissions(tmp_path):
    """mkstemp/mkdtemp make owner-only entries; saved files must get the umask-based mode."""
    mask = os.umask(0o022)
    try:
        write_json(tmp_path / "r.json", {"k": 1})
        with atomic_dir(tmp_path / "ckpt") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(mask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755


def test_sharded_save_loads_bit_exact_and_checks_its_shards(tmp_path):
    """Above max_shard_size the weights are split as transformers writes them: shards plus an index."""
    from mpokit.io.checkpoint import INDEX_FILE
    from mpokit.report.collect import read_checkpoint

    model = compressed_llama()
    path = save_compressed(model, tmp_path / "sharded", max_shard_size=20_000)
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (path / WEIGHTS_FILE).exists() and (path / INDEX_FILE).is_file()
    loaded = load_compressed(path)
    assert_state_equal(model, loaded)
    single = save_compressed(model, tmp_path / "single")  # negative control: the default keeps one file
    assert (single / WEIGHTS_FILE).is_file() and not (single / INDEX_FILE).exists()
    sizes = read_checkpoint(path).layers  # the report reads every shard's header
    assert sum(l.bytes or 0 for l in sizes) == sum(l.bytes or 0 for l in read_checkpoint(single).layers) > 0
    shards[1].unlink()
    with pytest.raises(CheckpointError, match="missing weight shards"):
        load_compressed(path, verify=False)
    (path / INDEX_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt shard index"):
        load_compressed(path, verify=False)
    with pytest.raises(ValueError, match="max_shard_size"):
        save_compressed(model, tmp_path / "bad", max_shard_size="lots")
