"""surgery/: target matching, default targets per architecture, tied weights, unload_."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

from mpokit import MPOConfig, compress_, unload_
from mpokit.layers.mpo import MPOLinear, MPOModule
from mpokit.surgery import default_targets, find_targets, get_module, set_module, tied_groups, weight_matrix


def test_default_targets_llama(llama):
    names = find_targets(llama)
    assert len(names) == 2 * 7
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.1.mlp.down_proj" in names
    assert "lm_head" not in names and "model.embed_tokens" not in names  # embeddings are opt-in


def test_default_targets_gpt2_and_bert(gpt2, bert):
    g = find_targets(gpt2)
    assert len(g) == 2 * 4 and all(type(get_module(gpt2, n)).__name__ == "Conv1D" for n in g)
    b = find_targets(bert)
    assert len(b) == 2 * 6
    assert "bert.encoder.layer.0.attention.output.dense" in b and "bert.encoder.layer.1.output.dense" in b
    assert "bert.pooler.dense" not in b and "classifier" not in b


def test_exact_suffix_regex_and_excludes(llama):
    assert find_targets(llama, ["model.layers.0.self_attn.q_proj"]) == ["model.layers.0.self_attn.q_proj"]
    assert find_targets(llama, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert find_targets(llama, r".*\.1\.mlp\.(up|down)_proj") == ["model.layers.1.mlp.up_proj",
                                                                   "model.layers.1.mlp.down_proj"]
    names = find_targets(llama, ["mlp.gate_proj", "mlp.up_proj"], exclude_modules=["layers.0.mlp.up_proj"])
    assert names == ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    names = find_targets(llama, None, exclude_modules=r"model\.layers\.0\..*")
    assert len(names) == 7 and all(".layers.1." in n for n in names)
    # suffix matching is on whole name parts: "proj" is not a suffix of "q_proj"
    with pytest.raises(ValueError, match="'proj'"):
        find_targets(llama, ["proj"])


def test_unknown_module_name_is_named_in_the_error(llama):
    with pytest.raises(ValueError, match="unknown module name 'q_prj'"):
        find_targets(llama, ["q_proj", "q_prj"])
    with pytest.raises(ValueError, match="at least one layer"):
        find_targets(llama, r"nothing\.like\.this")
    with pytest.raises(ValueError, match="unknown module name 'model.nope'"):
        get_module(llama, "model.nope")


def test_unknown_architecture_needs_explicit_targets():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="expected target_modules"):
        default_targets(Net())
    assert find_targets(Net(), ["fc"]) == ["fc"]


def test_tied_groups_and_weight_matrix(llama, gpt2, bert):
    assert tied_groups(llama) == [["lm_head", "model.embed_tokens"]]
    assert tied_groups(tiny_llama(tie=False)) == []
    assert tied_groups(bert) == []
    conv = get_module(gpt2, "transformer.h.0.mlp.c_fc")
    assert weight_matrix(conv).shape == (4 * 48, 48)  # Conv1D stores (in, out); the matrix is (out, in)


def test_set_module_returns_the_old_one(llama):
    old = get_module(llama, "model.layers.0.mlp.up_proj")
    new = MPOLinear.from_linear(old)
    assert set_module(llama, "model.layers.0.mlp.up_proj", new) is old
    assert get_module(llama, "model.layers.0.mlp.up_proj") is new


def _inputs(vocab):
    return torch.randint(0, vocab, (2, 9))


def _outputs(model, ids):
    """Logits and the last hidden state (a tiny classifier head alone would hide differences)."""
    out = model(input_ids=ids, output_hidden_states=True)
    return torch.cat([out.logits.flatten(), out.hidden_states[-1].flatten()])


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_bert], ids=["llama", "gpt2", "bert"])
def test_unload_round_trip_output_equality(make):
    model = make()
    ids = _inputs(model.config.vocab_size)
    with torch.no_grad():
        reference = _outputs(model, ids)
    compress_(model, MPOConfig(max_bond=4), progress=False)
    assert any(isinstance(m, MPOModule) for m in model.modules())
    with torch.no_grad():
        compressed = _outputs(model, ids)
    unload_(model)
    kinds = {type(get_module(model, n)).__name__ for n in find_targets(model)}
    assert not any(isinstance(m, MPOModule) for m in model.modules())
    assert kinds == ({"Conv1D"} if make is tiny_gpt2 else {"Linear"})
    with torch.no_grad():
        merged = _outputs(model, ids)
    assert torch.allclose(merged, compressed, atol=1e-5)  # merge is exact up to float32 rounding
    assert not torch.allclose(compressed, reference, atol=1e-3)  # negative control: truncation mattered


def test_unload_keeps_tied_embeddings_tied(llama):
    ids = _inputs(128)
    compress_(llama, MPOConfig(max_bond=6, target_modules=["embed_tokens", "lm_head", "q_proj"]), progress=False)
    with torch.no_grad():
        compressed = llama(input_ids=ids).logits
    unload_(llama)
    assert type(llama.model.embed_tokens) is nn.Embedding and type(llama.lm_head) is nn.Linear
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.allclose(llama(input_ids=ids).logits, compressed, atol=1e-5)
    assert llama._mpokit_methods == []
