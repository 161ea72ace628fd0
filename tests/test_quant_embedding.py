"""Issue 12 item 2: QuantEmbedding, and the tied lm_head sharing its QuantizedTensor (one copy in memory,
in the checkpoint and after unload_), through RTN, GPTQ, the CLI and the GGUF/compressed-tensors exports."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from conftest import tiny_llama
from mpokit import compress_, load_compressed, save_compressed
from mpokit.eval.size import param_bytes
from mpokit.io.validate import CheckpointError
from mpokit.layers import LAYERS, layer_modules
from mpokit.layers.quant import QuantizedTensor, QuantLinear
from mpokit.layers.quant_embedding import QuantEmbedding
from mpokit.methods import QuantConfig
from mpokit.methods.presets import build_config
from mpokit.ops.quant import sqnr_db
from mpokit.surgery.unload import unload_


def table(rows=40, cols=32, seed=0) -> nn.Embedding:
    emb = nn.Embedding(rows, cols, padding_idx=3)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)))
    return emb


def ids(shape=(2, 16), vocab=128, seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def stored_keys(path) -> list[str]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return list(f.keys())


def tied(model) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head.qweight is emb.qweight if hasattr(head, "qweight") else head.weight is emb.weight


# ---- the layer ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, group, symmetric", [(8, None, False), (8, 8, True), (4, None, False), (4, 16, True),
                                                    (2, 8, False)])
def test_lookup_equals_f_embedding_of_the_dequantized_table(bits, group, symmetric):
    emb = table()
    q = QuantEmbedding.from_embedding(emb, bits=bits, group_size=group, symmetric=symmetric)
    assert q.group_size == (group or 32) and q.padding_idx == 3 and "QuantEmbedding" in LAYERS
    x = torch.tensor([[0, 3, 39, 5], [39, 39, 1, 3]])
    full = q.qweight.dequantize(torch.float32)
    assert torch.equal(q(x), F.embedding(x, full))
    assert not torch.equal(full, emb.weight)  # it is quantized: a lossy copy ...
    assert sqnr_db(emb.weight, full) > {8: 40, 4: 15, 2: 5}[bits]  # ... close to the table
    dense = q.to_dense()
    assert type(dense) is nn.Embedding and dense.padding_idx == 3 and torch.equal(dense(x), q(x))
    assert q(torch.zeros(0, dtype=torch.long)).shape == (0, 32)


def test_bad_ids_fail_like_nn_embedding():
    emb = table()
    q = QuantEmbedding.from_embedding(emb)
    for bad in (torch.tensor([40]), torch.tensor([[0, -1]])):
        with pytest.raises(IndexError):
            emb(bad)
        with pytest.raises(IndexError, match=r"expected token ids in \[0, 40\)"):
            q(bad)
    with pytest.raises(TypeError, match="integer token ids"):
        q(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="divisible by 8"):
        QuantEmbedding(10, 5, bits=4)


def test_lookup_dequantizes_only_the_requested_rows(monkeypatch):
    import mpokit.layers.quant as qe  # QuantizedTensor.dequantize_rows dequantizes there

    q = QuantEmbedding.from_embedding(table(), bits=4)
    expected = q.qweight.dequantize()[torch.tensor([7, 2, 7])]
    seen = []

    def counting(codes, *args, **kwargs):
        seen.append(codes.shape[0])
        return real(codes, *args, **kwargs)

    def refuse(self, dtype=torch.float32):
        raise AssertionError("the whole table was dequantized")

    real = qe.dequantize
    monkeypatch.setattr(qe, "dequantize", counting)
    monkeypatch.setattr(QuantizedTensor, "dequantize", refuse)
    assert torch.equal(q(torch.tensor([7, 2, 7])), expected)
    assert seen == [3]  # three rows, not 40
    with pytest.raises(AssertionError, match="whole table"):
        q.weight  # the negative control: reading .weight does build it


def test_storage_bytes_and_spec_round_trip():
    q = QuantEmbedding.from_embedding(table(40, 32), bits=4, group_size=16)
    assert q.storage_bytes() == 40 * 32 // 2 + 40 * 2 * 2 + 40 * 2  # codes + fp16 scales + uint8 zero points
    assert QuantEmbedding.from_embedding(table(40, 32)).storage_bytes() == 40 * 32 + 40 * 2 + 40
    back = QuantEmbedding.from_spec(json.loads(json.dumps(q.spec())))
    back.load_state_dict(q.state_dict())
    x = torch.tensor([1, 3, 39])
    assert torch.equal(back(x), q(x)) and back.spec() == q.spec()


def test_casts_follow_the_model_dtype():
    q = QuantEmbedding.from_embedding(table())
    assert q.to(torch.bfloat16)(torch.tensor([1])).dtype == torch.bfloat16
    assert q.qweight.scale.dtype == torch.float16 and q.qweight.packed.dtype == torch.uint8


# ---- the method --------------------------------------------------------------------------------------------

def test_config_validates_and_round_trips():
    with pytest.raises(ValueError, match="expected embeddings in"):
        QuantConfig(embeddings=6)
    with pytest.raises(ValueError, match="embedding_group_size >= 1"):
        QuantConfig(embeddings=8, embedding_group_size=0)
    c = QuantConfig(bits=4, embeddings=8, embedding_group_size=32)
    assert build_config("quant", embeddings=8).embeddings == 8
    from mpokit.methods.base import config_from_dict

    assert config_from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_default_keeps_embeddings_float_and_refuses_a_tied_lm_head():
    model = tiny_llama(tie=True)
    compress_(model, QuantConfig(bits=4, group_size=32), progress=False)
    assert type(model.model.embed_tokens) is nn.Embedding and tied(model)
    with pytest.raises(ValueError, match="untie the shared weight"):
        compress_(tiny_llama(tie=True), QuantConfig(target_modules=["lm_head"]), progress=False)


@pytest.mark.parametrize("embeddings, head_path, floor_db", [(8, "int8", 40), (4, "int4", 15)])
def test_tied_table_is_one_quantized_tensor(embeddings, head_path, floor_db, tmp_path):
    dense = tiny_llama(tie=True)
    model = tiny_llama(tie=True)
    model.load_state_dict(dense.state_dict())
    report = compress_(model, QuantConfig(bits=4, group_size=32, embeddings=embeddings), progress=False)
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear)
    assert head.qweight is emb.qweight and head.tied_to == "model.embed_tokens" and emb.bits == embeddings
    assert emb.group_size == 64 and head.kernel_path() == head_path  # one group per row
    assert report.extra["tied"] == {"lm_head": "model.embed_tokens"}
    rec = next(r for r in report.layers if r.name == "model.embed_tokens")
    assert rec.kind == "quant-embedding" and rec.detail["bits"] == embeddings and rec.detail["sqnr_db"] > floor_db
    assert not any(r.name == "lm_head" for r in report.layers)  # its codes are the embedding's
    x = ids()
    a, b = logits(model, x), logits(dense, x)
    err = ((a - b).norm() / b.norm()).item()
    ref = tiny_llama(tie=True)
    ref.load_state_dict(dense.state_dict())
    compress_(ref, QuantConfig(bits=4, group_size=32), progress=False)  # the same model, float table
    base = ((logits(ref, x) - b).norm() / b.norm()).item()
    assert 0 < err < (base * 1.05 + 1e-3 if embeddings == 8 else 0.5)  # 8-bit: ~ the int4 layers' error alone

    # save: the table once, lm_head as aliases of it; the report says what the file holds
    path = save_compressed(model, tmp_path / "ckpt")
    keys = stored_keys(path)
    assert not any(k.startswith("lm_head") for k in keys) and "model.embed_tokens.qweight.packed" in keys
    assert not any(k == "model.embed_tokens.weight" for k in keys)
    meta = json.loads((path / "mpokit.json").read_text())
    assert meta["layers"]["lm_head"]["tied_to"] == "model.embed_tokens"
    assert meta["aliases"]["lm_head.qweight.packed"] == "model.embed_tokens.qweight.packed"
    assert param_bytes(model) == sum(t.numel() * t.element_size() for t in _tensors(path))
    dense_file = save_compressed(dense, tmp_path / "dense")
    saved = sum(t.numel() * t.element_size() for t in _tensors(dense_file)) - param_bytes(model)
    assert saved == report.extra["bytes_before"] - report.extra["bytes_after"]  # the report matches the file

    loaded = load_compressed(path)
    assert loaded.lm_head.qweight is loaded.model.embed_tokens.qweight
    assert loaded.lm_head.tied_to == "model.embed_tokens"
    assert torch.equal(logits(loaded, x), a)
    unload_(loaded)
    assert type(loaded.lm_head) is nn.Linear and tied(loaded)
    assert torch.allclose(logits(loaded, x), a, atol=1e-5)


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return [f.get_tensor(k) for k in f.keys()]


def test_tied_lm_head_as_a_target_is_taken_by_the_embedding_path():
    model = tiny_llama(tie=True)
    compress_(model, QuantConfig(target_modules=["lm_head", "q_proj"], group_size=32, embeddings=8), progress=False)
    assert model.lm_head.qweight is model.model.embed_tokens.qweight and model.lm_head.bits == 8
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear


def test_untied_lm_head_is_quantized_on_its_own(tmp_path):
    model = tiny_llama(tie=False)
    report = compress_(model, QuantConfig(bits=4, group_size=32, embeddings=8), progress=False)
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(head, QuantLinear) and head.qweight is not emb.qweight and getattr(head, "tied_to", None) is None
    assert head.bits == 8 and head.group_size == 64 and head.kernel_path() == "int8"
    assert {"model.embed_tokens", "lm_head"} <= {r.name for r in report.layers} and "tied" not in report.extra
    path = save_compressed(model, tmp_path / "ckpt")
    assert "lm_head.qweight.packed" in stored_keys(path)
    loaded = load_compressed(path)
    assert loaded.lm_head.qweight is not loaded.model.embed_tokens.qweight
    x = ids()
    assert torch.equal(logits(loaded, x), logits(model, x))
    unload_(loaded)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight


def test_gptq_quantizes_the_table_rtn():
    model = tiny_llama(tie=True)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 128, (1, 64), generator=g) for _ in range(4)]
    report = compress_(model, build_config("gptq", group_size=32, calibration_tokens=256, embeddings=8),
                       batches=batches, progress=False)
    kinds = {r.name: r.kind for r in report.layers}
    assert kinds["model.embed_tokens"] == "quant-embedding" and kinds["model.layers.0.self_attn.q_proj"] == "gptq"
    assert tied(model) and isinstance(model.model.embed_tokens, QuantEmbedding)


def test_a_tie_between_other_quantized_tables_is_refused(tmp_path):
    model = tiny_llama(tie=True)
    compress_(model, QuantConfig(bits=4, group_size=32, embeddings=8), progress=False)
    path = save_compressed(model, tmp_path / "ckpt")
    meta = json.loads((path / "mpokit.json").read_text())
    meta["layers"]["lm_head"]["tied_to"] = "model.layers.0.self_attn.q_proj"  # a 4-bit 64x64 table
    (path / "mpokit.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="another layout"):
        load_compressed(path, verify=False)


def test_half_and_bfloat16_models_run_the_tied_head():
    model = tiny_llama(tie=True)
    compress_(model, QuantConfig(bits=4, group_size=32, embeddings=8), progress=False)
    x = ids()
    ref = logits(model, x)
    model.to(torch.bfloat16)
    assert model.lm_head.qweight is model.model.embed_tokens.qweight and model.model.embed_tokens.compute_dtype \
        == torch.bfloat16 and model.lm_head.kernel_path() == "int8"
    out = logits(model, x)
    assert out.dtype == torch.bfloat16 and ((out.float() - ref).norm() / ref.norm()) < 0.05


# ---- CLI and exports ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory):
    from test_cli import WORDS, tiny_tokenizer

    root = tmp_path_factory.mktemp("qe_cli")
    torch.manual_seed(0)
    tiny_llama().save_pretrained(root / "hf")
    tiny_tokenizer().save_pretrained(root / "hf")
    g = torch.Generator().manual_seed(1)
    (root / "text.txt").write_text(" ".join(WORDS[int(k)] for k in torch.randint(0, len(WORDS), (400,), generator=g)))
    return root


def test_cli_compress_embeddings_then_eval_and_inspect(cli_dir):
    from mpokit.cli.main import main

    out = cli_dir / "q"
    assert main(["compress", "--model", str(cli_dir / "hf"), "--method", "quant", "--bits", "4", "--group-size", "32",
                 "--embeddings", "8", "--out", str(out), "--json", str(cli_dir / "c.json")]) == 0
    report = json.loads((cli_dir / "c.json").read_text())
    assert report["config"]["embeddings"] == 8 and report["tied"] == {"lm_head": "model.embed_tokens"}
    meta = json.loads((out / "mpokit.json").read_text())
    assert meta["layers"]["model.embed_tokens"]["type"] == "QuantEmbedding"
    assert main(["eval", str(out), "--text", str(cli_dir / "text.txt"), "--tokens", "128", "--context", "64",
                 "--json", str(cli_dir / "e.json")]) == 0
    ev = json.loads((cli_dir / "e.json").read_text())
    assert ev["perplexity"] > 1 and ev["bytes"] == param_bytes(load_compressed(out))
    assert main(["inspect", str(out), "--json", str(cli_dir / "i.json")]) == 0
    rows = {r["layer"]: r for r in json.loads((cli_dir / "i.json").read_text())["layers"]}
    assert rows["lm_head"]["tied_to"] == "model.embed_tokens" and rows["model.embed_tokens"]["type"] == "QuantEmbedding"


def test_densified_copy_undoes_the_table_and_reties_the_head():
    from mpokit.export.tensors import GGUF_CODES, densified_copy

    model = tiny_llama(tie=True)
    compress_(model, QuantConfig(bits=4, group_size=32, embeddings=8), progress=False)
    dense, notes = densified_copy(model)
    assert type(dense.model.embed_tokens) is nn.Embedding and type(dense.lm_head) is nn.Linear and tied(dense)
    assert any("model.embed_tokens: QuantEmbedding" in n for n in notes)
    assert all(isinstance(m, QuantLinear) for _, m in layer_modules(dense))  # the int4 layers keep their codes
    x = ids()
    assert torch.allclose(logits(dense, x), logits(model, x), atol=1e-5)
    kept, _ = densified_copy(model, keep=GGUF_CODES)
    assert kept is model


@pytest.mark.parametrize("symmetric, kind", [(True, "Q8_0"), (False, "F16")])
def test_gguf_export_writes_the_table_once(tmp_path, symmetric, kind):
    pytest.importorskip("gguf")
    from test_export_gguf import TOKENIZER, logits_pair, quantized

    from mpokit.export import export_gguf

    model = quantized(tie=True, bits=4, group_size=32, symmetric=symmetric, embeddings=8)
    report = export_gguf(model, tmp_path / "m.gguf", tokenizer=TOKENIZER)
    rows = {t["name"]: t for t in report["tensors"]}
    assert "output.weight" not in rows and rows["token_embd.weight"]["type"] == kind  # llama.cpp reuses token_embd
    assert rows["token_embd.weight"]["exact"] == symmetric  # 8-bit symmetric per-row groups are Q8_0 blocks
    a, b = logits_pair(model, tmp_path / "m.gguf")
    assert torch.equal(a, b) if symmetric else (a - b).abs().max() < 1e-2 * a.abs().max()


def test_compressed_tensors_export_writes_the_table_dense(tmp_path):
    pytest.importorskip("compressed_tensors")
    from test_export_gguf import TOKENIZER, quantized
    from transformers import AutoModelForCausalLM

    from mpokit.export import export_compressed_tensors

    model = quantized(tie=True, bits=4, group_size=32, symmetric=True, embeddings=8)
    report = export_compressed_tensors(model, tmp_path / "ct", tokenizer=TOKENIZER)
    assert any("QuantEmbedding" in n for n in report["notes"])
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    assert back.lm_head.weight is back.model.embed_tokens.weight
    x = ids(vocab=back.config.vocab_size)
    assert torch.allclose(logits(back, x), logits(model, x), atol=1e-4)
