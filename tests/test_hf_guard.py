"""Issue 13 item 1: plain transformers never loads an mpokit folder silently with random weights."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers

import mpokit
from mpokit.io.checkpoint import META_FILE


@pytest.fixture
def saved(tmp_path, llama):
    mpokit.compress_(llama, mpokit.MPOConfig(max_bond=4))
    path = tmp_path / "ckpt"
    mpokit.save_compressed(llama, path)
    return llama, path


def test_plain_from_pretrained_refuses(saved):
    _, path = saved
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoConfig.from_pretrained(path)


def test_trust_remote_code_loads_through_mpokit(saved):
    model, path = saved
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    ids = torch.randint(0, 100, (1, 12))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert any(type(m).__name__ == "MPOLinear" for m in loaded.modules())


def test_without_mpokit_the_error_says_what_the_folder_is(saved):
    _, path = saved
    code = ("import sys; sys.modules['mpokit'] = None\n"  # as if mpokit were not installed
            "import transformers\n"
            f"transformers.AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "is an mpokit checkpoint" in r.stderr and "mpokit export" in r.stderr


def test_the_real_config_is_kept_and_read_back(saved):
    model, path = saved
    raw = json.loads((path / "config.json").read_text())
    assert raw["model_type"] == "mpokit" and raw["mpokit_model_type"] == "llama"
    assert raw["hidden_size"] == model.config.hidden_size  # still readable by a person
    assert json.loads((path / META_FILE).read_text())["format_version"] == 3


def test_format_2_folders_with_a_plain_config_still_load(saved):
    model, path = saved
    model.config.save_pretrained(path)  # the plain config.json that format 2 wrote
    (path / "mpokit_loader.py").unlink()
    meta = json.loads((path / META_FILE).read_text())
    meta["format_version"] = 2
    (path / META_FILE).write_text(json.dumps(meta))
    ids = torch.randint(0, 100, (1, 12))
    assert torch.equal(mpokit.load_compressed(path, verify=False)(ids).logits, model(ids).logits)


def test_loading_never_allocates_the_dense_skeleton(saved, monkeypatch):
    """Issue 12 item 2: the architecture is built on the meta device and only the stored tensors are
    materialised (a quantized model never holds the dense float32 weights while loading)."""
    from mpokit.io import checkpoint

    model, path = saved
    seen = {}
    build = checkpoint._build_model

    def spy(*args, **kwargs):
        skeleton = build(*args, **kwargs)
        seen["real"] = [n for n, p in skeleton.named_parameters() if not p.is_meta]
        return skeleton

    monkeypatch.setattr(checkpoint, "_build_model", spy)
    loaded = mpokit.load_compressed(path)
    assert seen["real"] == []  # every parameter waited on meta for the stored tensor
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    ids = torch.randint(0, 100, (1, 12))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_loading_a_checkpoint_with_its_tokenizer_never_asks_for_remote_code(saved, tmp_path):
    """The guard config.json must not make the tokenizer load prompt for trust_remote_code."""
    from test_export_gguf import TOKENIZER

    model, _ = saved
    path = tmp_path / "with-tokenizer"
    mpokit.save_compressed(model, path, TOKENIZER)
    code = f"import mpokit; t = mpokit.load_model({str(path)!r}).tokenizer; print('ids', t('ab').input_ids)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "ids [" in r.stdout
    assert "custom code" not in r.stdout + r.stderr and "model of type `mpokit`" not in r.stdout + r.stderr
