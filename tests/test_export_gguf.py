"""export/: GGUF block packing against gguf's reference, and tiny llama models round-tripped through
transformers' gguf_file= loader (logits equal where the GGUF grid is mpokit's, close where it is not)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mpokit
from mpokit.cli.main import main
from mpokit.export import GGUFOptions, export_gguf
from mpokit.export.blocks import decode, pack_q4_0, pack_q4_1, pack_q5_0, pack_q8_0
from mpokit.export.tensors import rope_permutation

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")


# ---- a tiny byte-level BPE tokenizer and llama model -----------------------------------------------
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}  # the 256 byte tokens
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


TOKENIZER = tiny_tokenizer()


def tiny_model(tie: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(TOKENIZER), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def quantized(tie: bool = True, **kw):
    model = tiny_model(tie)
    mpokit.compress_(model, mpokit.QuantConfig(**kw), progress=False)
    return model


def load_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@torch.no_grad()
def logits_pair(model, path):
    x = torch.randint(0, len(TOKENIZER), (2, 24), generator=torch.Generator().manual_seed(1))
    return model(x).logits, load_gguf(path)(x).logits


# ---- block packing ---------------------------------------------------------------------------------
def _scales(rows, nb):
    return (torch.rand(rows, nb) * 0.1 + 1e-3).to(torch.float16)  # (rows, nb) block scales


@pytest.mark.parametrize("kind", ["Q4_0", "Q5_0", "Q8_0"])
def test_packing_equals_ggufs_own_quantizer_on_grid_values(kind):
    """Values on a block grid whose extreme code is present: gguf.quants.quantize recovers the same
    d and codes, so its bytes must equal ours byte for byte."""
    rows, cols = 6, 128
    d = _scales(rows, cols // 32)
    dcol = d.float().repeat_interleave(32, 1)  # (rows, cols)
    if kind == "Q8_0":
        q = torch.randint(-127, 128, (rows, cols))
        q[:, ::32] = 127  # amax = 127 d in every block
        ours, w = pack_q8_0(q, d), q * dcol
    else:
        top = 16 if kind == "Q4_0" else 32
        q = torch.randint(1, top, (rows, cols))
        q[:, ::32] = 0  # the most negative code: gguf picks d = that value / -(top / 2)
        ours = pack_q4_0(q, d) if kind == "Q4_0" else pack_q5_0(q, d)
        w = (q - top // 2) * dcol
    theirs = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[kind])
    assert ours.shape == theirs.shape and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, theirs)
    assert torch.equal(decode(ours, kind).reshape(rows, cols), w.float())


def test_q4_1_packing_decodes_with_ggufs_dequantizer():
    rows, cols = 5, 96
    d, m = _scales(rows, 3), (torch.randn(rows, 3) * 0.2).to(torch.float16)
    q = torch.randint(0, 16, (rows, cols))
    w = q * d.float().repeat_interleave(32, 1) + m.float().repeat_interleave(32, 1)  # GGUF's d * q + m, in float32
    assert torch.equal(decode(pack_q4_1(q, d, m), "Q4_1").reshape(rows, cols), w)


@pytest.mark.parametrize("pack, q, nb", [(pack_q4_0, 16, 1), (pack_q5_0, 32, 1), (pack_q8_0, 128, 1)])
def test_codes_out_of_range_are_refused(pack, q, nb):
    with pytest.raises(ValueError, match="expected .* codes in"):
        pack(torch.full((1, 32), q), torch.ones(1, nb, dtype=torch.float16))


def test_rope_permutation_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(4 * 16 * 3, dtype=np.float32).reshape(64, 3)  # 4 heads of 16 rows
    exported = w[rope_permutation(64, 4).numpy()]
    assert not np.array_equal(exported, w)  # it does move rows
    back = LlamaTensorProcessor(config={})._reverse_permute_weights(exported, 4, 4)
    np.testing.assert_array_equal(back, w)


# ---- round trips through transformers ---------------------------------------------------------------
EXACT = [  # (QuantConfig keywords, GGUFOptions keywords, GGUF type of the layer weights)
    ({"bits": 4, "group_size": 32, "symmetric": True}, {}, "Q4_0"),
    ({"bits": 4, "group_size": 64, "zero_point": False}, {}, "Q4_1"),
    ({"bits": 4, "group_size": 32}, {"int4_zero_point": "q5_0"}, "Q5_0"),
    ({"bits": 3, "group_size": 64}, {}, "Q4_0"),
    ({"bits": 2, "group_size": 32, "zero_point": False}, {}, "Q4_1"),
    ({"bits": 8, "group_size": 64, "symmetric": True}, {}, "Q8_0"),
]


@pytest.mark.parametrize("config, options, kind", EXACT)
def test_exact_grids_give_equal_logits(tmp_path, config, options, kind):
    model = quantized(tie=kind != "Q4_0", **config)  # the untied case writes output.weight too
    report = export_gguf(model, tmp_path / "m.gguf", GGUFOptions(**options), tokenizer=TOKENIZER)
    layers = [t for t in report["tensors"] if t["name"].startswith("blk.") and len(t["shape"]) == 2]
    assert len(layers) == 14 and {t["type"] for t in layers} == {kind}
    assert all(t["exact"] and t["max_abs_diff"] == 0 for t in report["tensors"])
    assert any(t["name"] == "output.weight" for t in report["tensors"]) == (kind == "Q4_0")
    a, b = logits_pair(model, tmp_path / "m.gguf")
    assert torch.equal(a, b)


def test_zero_point_q4_1_is_off_by_the_rounded_offsets_only(tmp_path):
    model = quantized(bits=4, group_size=32)
    report = export_gguf(model, tmp_path / "q41.gguf", tokenizer=TOKENIZER)
    layers = [t for t in report["tensors"] if t["type"] == "Q4_1"]
    assert len(layers) == 14 and not any(t["exact"] for t in layers)
    assert 0 < sum(t["inexact_blocks"] for t in layers) < sum(t["blocks"] for t in layers)
    # the bound of rounding m = -z*s to float16: half an ulp, 2^-11 of |z*s| at most
    bound = max(float((m.qweight.offset.float() * m.qweight.scale.float()).abs().max())
                for m in model.modules() if hasattr(m, "qweight")) * 2 ** -11
    assert 0 < max(t["max_abs_diff"] for t in layers) <= bound * 1.01  # + float32 rounding of d*q + m
    a, b = logits_pair(model, tmp_path / "q41.gguf")
    assert not torch.equal(a, b) and (a - b).abs().max() < 1e-3 * a.abs().max()
    # the same codes in Q5_0 are exact: the difference above is the offsets' rounding, nothing else
    export_gguf(model, tmp_path / "q50.gguf", GGUFOptions(int4_zero_point="q5_0"), tokenizer=TOKENIZER)
    assert torch.equal(*logits_pair(model, tmp_path / "q50.gguf"))


@pytest.mark.parametrize("config, options, kind, how", [
    ({"bits": 4, "group_size": 48, "fit_groups": False}, {}, "F16", "groups straddle 32-value blocks"),
    ({"bits": 4, "group_size": 48, "fit_groups": False}, {"convert": "q8_0"}, "Q8_0", "gguf's Q8_0 quantizer"),
    ({"bits": 8, "group_size": 64}, {}, "F16", "no GGUF type holds an 8-bit offset grid"),
    ({"bits": 8, "group_size": 64}, {"convert": "q8_0"}, "Q8_0", "where it fits int8"),
])
def test_grids_without_a_gguf_type_are_reported_converted(tmp_path, config, options, kind, how):
    model = quantized(**config)
    report = export_gguf(model, tmp_path / "c.gguf", GGUFOptions(**options), tokenizer=TOKENIZER)
    layers = [t for t in report["tensors"] if t["name"].startswith("blk.") and len(t["shape"]) == 2]
    assert {t["type"] for t in layers} == {kind}
    assert all(how in t["how"] and not t["exact"] and t["max_abs_diff"] > 0 for t in layers)
    a, b = logits_pair(model, tmp_path / "c.gguf")
    assert (a - b).abs().max() < 2e-2 * a.abs().max()
    f32 = export_gguf(model, tmp_path / "f.gguf", GGUFOptions(convert="f32"), tokenizer=TOKENIZER)
    assert all(t["exact"] for t in f32["tensors"])  # dequantized float32 holds every value
    assert torch.equal(*logits_pair(model, tmp_path / "f.gguf"))


def test_tokenizer_round_trips(tmp_path):
    from transformers import AutoTokenizer

    export_gguf(quantized(bits=4, group_size=32, symmetric=True), tmp_path / "t.gguf", tokenizer=TOKENIZER)
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    text = "hello the world, <|endoftext|> then the end"
    assert back(text)["input_ids"] == TOKENIZER(text)["input_ids"]


def test_mpo_layers_are_written_dense_and_said_so(tmp_path):
    model = tiny_model()
    mpokit.compress_(model, mpokit.MPOConfig(budget=0.6), progress=False)
    report = export_gguf(model, tmp_path / "mpo.gguf", tokenizer=TOKENIZER)
    assert any("structure is not carried" in n for n in report["notes"])
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "MPOLinear"  # the input model is untouched
    a, b = logits_pair(model, tmp_path / "mpo.gguf")
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_metadata_is_copied_from_a_source_gguf(tmp_path):
    source = tmp_path / "source.gguf"
    export_gguf(tiny_model(), source, tokenizer=TOKENIZER)
    report = export_gguf(quantized(bits=4, group_size=32, symmetric=True), tmp_path / "q.gguf", metadata_from=source)
    assert report["metadata_from"] == str(source)
    fields = gguf.GGUFReader(tmp_path / "q.gguf").fields
    assert fields["tokenizer.ggml.tokens"].contents() == gguf.GGUFReader(source).fields["tokenizer.ggml.tokens"].contents()
    assert fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match="expected .* to describe the exported model.*embedding_length"):
        export_gguf(other, tmp_path / "o.gguf", metadata_from=source)


# ---- checkpoints, the CLI, and refusals ------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    mpokit.save_compressed(quantized(bits=4, group_size=64, zero_point=False), root / "ckpt", TOKENIZER)
    return root


def test_cli_exports_a_checkpoint(ckpt, capsys):
    out, js = ckpt / "cli.gguf", ckpt / "cli.json"
    assert main(["export", str(ckpt / "ckpt"), "--format", "gguf", "--out", str(out), "--json", str(js)]) == 0
    report = json.loads(js.read_text())
    assert report["metadata_from"] == "Hugging Face tokenizer"
    assert {(r["type"], r["tensors"], r["exact"]) for r in report["summary"] if r["type"] == "Q4_1"} == {("Q4_1", 14, 14)}
    assert "Q4_1" in capsys.readouterr().out
    model = mpokit.load_compressed(ckpt / "ckpt")
    assert torch.equal(*logits_pair(model, out))


def assert_export_refuses(root, args: list[str], default_out: str, capsys, message: str, fmt: list[str] = ()) -> None:
    """`mpokit export` with `args` ({root} filled in; --out default_out unless given) exits 2 with one line
    holding `message`."""
    argv = ["export"] + [a.format(root=root) for a in args] + list(fmt)
    if "--out" not in argv:
        argv += ["--out", str(root / default_out)]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["{root}"], "expected an mpokit checkpoint"),  # a folder without mpokit.json
    (["{root}/ckpt", "--out", "{root}/cli-exists.gguf"], "exists; pass --overwrite"),
    (["{root}/ckpt", "--out", "{root}/ckpt/inside.gguf"], "inside the input"),
    (["{root}/ckpt", "--out", "{root}/model.bin"], "ending in .gguf"),
    (["{root}/gpt2"], "expected a llama-architecture model"),
])
def test_cli_bad_input_exits_2(ckpt, capsys, args, message):
    from conftest import tiny_gpt2

    (ckpt / "cli-exists.gguf").write_bytes(b"not ours")
    if not (ckpt / "gpt2").exists():
        mpokit.save_compressed(tiny_gpt2(), ckpt / "gpt2")
    assert_export_refuses(ckpt, args, "never.gguf", capsys, message)
    assert (ckpt / "cli-exists.gguf").read_bytes() == b"not ours" and not (ckpt / "never.gguf").exists()


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    import mpokit.export.gguf as g

    def boom(path, kv, tensors):
        path.write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(g, "_write", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(quantized(bits=4, group_size=32), tmp_path / "x.gguf", tokenizer=TOKENIZER)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_when_asked(tmp_path):
    model = quantized(bits=4, group_size=32, symmetric=True)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    (tmp_path / ".m.gguf.999999999.abcd1234.tmp").write_bytes(b"left by a killed export")
    with pytest.raises(FileExistsError):
        export_gguf(model, out, tokenizer=TOKENIZER)
    assert out.read_bytes() == b"old"
    export_gguf(model, out, tokenizer=TOKENIZER, overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_options_are_validated():
    with pytest.raises(ValueError, match="expected convert in"):
        GGUFOptions(convert="q4_k")


# ---- the real default model ------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_exports_exactly_with_q5_0(tmp_path):
    """SmolLM2 int4 g128 (integer zero points) as Q5_0: bit-equal logits, metadata from the shipped GGUF."""
    from mpokit.io.models import default_gguf_path

    loaded = mpokit.load_model(None)
    mpokit.compress_(loaded.model, mpokit.QuantConfig(bits=4, group_size=128), progress=False)
    mpokit.save_compressed(loaded.model, tmp_path / "ckpt", loaded.tokenizer, extra={"source": loaded.source})
    report = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", GGUFOptions(int4_zero_point="q5_0"))
    assert report["metadata_from"] == str(default_gguf_path())
    assert all(t["exact"] for t in report["tensors"])
    assert {t["type"] for t in report["tensors"] if t["name"] == "token_embd.weight"} == {"Q8_0"}  # as shipped
    x = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(mpokit.load_compressed(tmp_path / "ckpt")(x).logits, load_gguf(tmp_path / "m.gguf")(x).logits)
