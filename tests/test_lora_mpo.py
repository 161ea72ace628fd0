"""LoRA on top of MPO layers (PEFT custom module): adapters train, MPO cores stay frozen, merge is exact."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama

peft = pytest.importorskip("peft")


def _compressed_llama():
    from mpokit.methods.base import compress_
    from mpokit.methods.mpo import MPOConfig

    model = tiny_llama()
    compress_(model, MPOConfig(target_modules=["q_proj", "v_proj", "up_proj"], budget=0.5), progress=False)
    return model


def _peft(model, rank=4):
    from peft import LoraConfig, get_peft_model

    from mpokit.methods.lora.mpo_adapter import lora_config_for_mpo, mpo_lora_targets

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=mpo_lora_targets(model), lora_dropout=0.0)
    return get_peft_model(model, lora_config_for_mpo(cfg))


def test_tt_add_is_the_sum():
    from mpokit.ops.tt import tt_svd, tt_to_matrix
    from mpokit.methods.lora.mpo_adapter import tt_add

    a, b = torch.randn(12, 20, dtype=torch.float64), torch.randn(12, 20, dtype=torch.float64)
    ca, _ = tt_svd(a, [3, 4], [4, 5])
    cb, _ = tt_svd(b, [3, 4], [4, 5], max_bond=2)
    assert torch.allclose(tt_to_matrix(tt_add(ca, cb)), a + tt_to_matrix(cb), atol=1e-10)
    c3a, _ = tt_svd(a, [2, 2, 3], [2, 5, 2])
    c3b, _ = tt_svd(b, [2, 2, 3], [2, 5, 2])
    assert torch.allclose(tt_to_matrix(tt_add(c3a, c3b)), a + b, atol=1e-10)


def test_plain_peft_cannot_wrap_mpo_layers():  # negative control: why the custom module exists
    from peft import LoraConfig, get_peft_model

    from mpokit.methods.lora.mpo_adapter import mpo_lora_targets

    model = _compressed_llama()
    with pytest.raises(ValueError):
        get_peft_model(model, LoraConfig(r=4, target_modules=mpo_lora_targets(model)))


def test_lora_on_mpo_trains_adapter_and_freezes_cores():
    from mpokit.layers.mpo import MPOLinear

    model = _peft(_compressed_llama())
    wrapped = [m for m in model.modules() if type(m).__name__ == "MPOLoraLinear"]
    assert len(wrapped) == 6  # q, v, up in 2 layers
    cores = [p for m in model.modules() if isinstance(m, MPOLinear) for p in m.cores]
    assert cores and not any(p.requires_grad for p in cores)
    before = [p.detach().clone() for p in cores]
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n, _ in lora)
    lora_before = [p.detach().clone() for _, p in lora]
    ids = torch.randint(0, 128, (4, 16))
    opt = torch.optim.AdamW([p for _, p in lora], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(a, b) for a, b in zip(before, cores))
    assert all(not torch.equal(a, p) for a, (_, p) in zip(lora_before, lora))  # B starts at 0, A moves too


def test_merge_into_cores_keeps_outputs_and_architecture():
    from mpokit.layers.mpo import MPOLinear

    model = _peft(_compressed_llama())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # a nonzero adapter, else merging is trivially exact
    ids = torch.randint(0, 128, (2, 12))
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    merged = model.merge_and_unload()
    assert not any(type(m).__name__ == "MPOLoraLinear" for m in merged.modules())
    assert sum(isinstance(m, MPOLinear) for m in merged.modules()) == 6
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4)


def test_cli_finetune_lora_on_compressed_checkpoint(tmp_path):
    import json

    from test_train import _tiny_folder

    from mpokit.cli.main import main
    from mpokit.io.checkpoint import load_compressed, save_compressed
    from mpokit.io.models import load_model
    from mpokit.layers.mpo import MPOLinear
    from mpokit.methods.base import compress_
    from mpokit.methods.mpo import MPOConfig
    from mpokit.train.data import shared_data_dir

    loaded = load_model(str(_tiny_folder(tmp_path, "llama")))
    compress_(loaded.model, MPOConfig(target_modules=["up_proj", "down_proj"], budget=0.5), progress=False)
    ckpt = save_compressed(loaded.model, tmp_path / "ckpt", tokenizer=loaded.tokenizer)
    text = tmp_path / "t.txt"
    text.write_text((shared_data_dir() / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[:20000])
    rc = main(["finetune", str(ckpt), "--method", "lora", "--task", "lm", "--data", str(text), "--max-steps", "2",
               "--batch-size", "2", "--seq-len", "32", "--tokens", "256", "--context", "64", "--lora-rank", "2",
               "--scheduler", "cosine", "--warmup-steps", "1", "--out", str(tmp_path / "o"),
               "--json", str(tmp_path / "r.json")])
    assert rc == 0
    r = json.loads((tmp_path / "r.json").read_text())
    # rank-2 A (2 x in) and B (out x 2) on up (32->64) and down (64->32): 2 * (2*32 + 64*2) = 384
    assert r["trainable_params"] == 384 and r["perplexity"] > 1 and r["tokens_seen"] == 2 * 2 * 32
    saved = load_compressed(r["saved"])  # merged into the cores: still MPO layers, no PEFT wrapper
    assert sum(isinstance(m, MPOLinear) for m in saved.modules()) == 2
