"""export/compressed_tensors: tiny llama models written as compressed-tensors folders and loaded back by
plain transformers (weights bit-equal to mpokit's, logits equal), once in a Python that cannot import
mpokit; the grids the format cannot hold, the CLI, and the refusals."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

import mpokit
from conftest import run_without_mpokit
from mpokit.cli.main import main
from mpokit.export import CTOptions, export_compressed_tensors
from mpokit.io.checkpoint import is_checkpoint
from test_export_gguf import TOKENIZER, assert_export_refuses, quantized, tiny_model

pytest.importorskip("compressed_tensors")


def mpokit_logits(model, x):
    """mpokit's reference forward (float32 dequantize + F.linear), not its packed CPU kernels."""
    from mpokit.layers.quant import set_kernel_

    set_kernel_(model, "reference")
    with torch.no_grad():
        return model(x).logits


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def tokens(n: int = 24):
    return torch.randint(0, len(TOKENIZER), (2, n), generator=torch.Generator().manual_seed(1))


def assert_same_model(model, path):
    """Logits within 1e-5 of the logit scale, and every quantized weight bit-equal after loading."""
    x = tokens()
    ref = mpokit_logits(model, x)
    back = load(path)
    with torch.no_grad():
        out = back(x).logits  # the first forward also decompresses a compressed-path model
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    for name, m in model.named_modules():
        if hasattr(m, "qweight"):
            assert torch.equal(back.get_submodule(name).weight, m.qweight.dequantize(torch.float32)), name
    return back


def quant_rows(report):
    return [t for t in report["tensors"] if t["type"].startswith("int")]


EXACT = [  # (QuantConfig keywords, tie embeddings, written type)
    ({"bits": 4, "group_size": 32}, True, "int4 g32 asym"),
    ({"bits": 4, "group_size": 64}, False, "int4 g64 asym"),
    ({"bits": 4, "group_size": 64, "symmetric": True}, True, "int4 g64 sym"),
    ({"bits": 8, "group_size": 64}, True, "int8 g64 asym"),
    ({"bits": 8, "group_size": 32, "symmetric": True}, False, "int8 g32 sym"),
    ({"bits": 3, "group_size": 32}, True, "int3 g32 asym"),
]


@pytest.mark.parametrize("config, tie, kind", EXACT)
def test_exact_grids_load_in_plain_transformers(tmp_path, config, tie, kind):
    model = quantized(tie=tie, **config)
    report = export_compressed_tensors(model, tmp_path / "m", tokenizer=TOKENIZER)
    rows = quant_rows(report)
    assert len(rows) == 14 and {t["type"] for t in rows} == {kind}
    assert all(t["exact"] and t["max_abs_diff"] == 0 for t in report["tensors"])
    qc = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    (group,) = qc["config_groups"].values()
    w = group["weights"]
    assert (w["num_bits"], w["group_size"], w["symmetric"], w["strategy"]) == (config["bits"], config["group_size"],
                                                                                config.get("symmetric", False), "group")
    assert qc.get("dequantize", False) == (not config.get("symmetric", False))  # asymmetric: see the module doc
    assert qc["ignore"] == ["lm_head"]  # a Linear left float, tied or not
    back = assert_same_model(model, tmp_path / "m")
    assert type(back.model.layers[0].self_attn.q_proj).__name__ == "Linear"


def test_files_hold_what_the_compressed_tensors_packer_writes(tmp_path):
    from safetensors.torch import load_file

    model = quantized(bits=4, group_size=32)
    export_compressed_tensors(model, tmp_path / "m", tokenizer=TOKENIZER)
    state = load_file(tmp_path / "m" / "model.safetensors")
    q = "model.layers.0.mlp.down_proj"  # (64, 128): 4 groups per row
    assert {k.rpartition(".")[2] for k in state if k.startswith(q + ".")} == {
        "weight_packed", "weight_scale", "weight_zero_point", "weight_shape"}
    assert state[f"{q}.weight_packed"].shape == (64, 16) and state[f"{q}.weight_packed"].dtype == torch.int32
    assert state[f"{q}.weight_scale"].dtype == torch.float32 and state[f"{q}.weight_scale"].shape == (64, 4)
    assert state[f"{q}.weight_zero_point"].shape == (8, 4)  # packed along the rows, 8 per int32
    assert state[f"{q}.weight_shape"].tolist() == [64, 128]
    assert state["model.embed_tokens.weight"].dtype == torch.float32 and "lm_head.weight" not in state
    assert state["model.norm.weight"].dtype == torch.float16  # all ones: float16 is exact
    # the codes: compressed-tensors' own unpacker gives q - 8 and z - 8
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from mpokit.ops.quant import unpack_bits

    qt = model.get_submodule(q).qweight
    codes = unpack_bits(qt.packed, 4, 64 * 128).reshape(64, 128).to(torch.int16)
    assert torch.equal(unpack_from_int32(state[f"{q}.weight_packed"], 4, torch.Size([64, 128])).to(torch.int16),
                       codes - 8)
    zero = unpack_from_int32(state[f"{q}.weight_zero_point"], 4, torch.Size([64, 4]), packed_dim=0)
    assert torch.equal(zero.to(torch.int16), qt.offset.to(torch.int16) - 8)


def test_a_wrong_code_mapping_is_caught(tmp_path, monkeypatch):
    """Negative control: zero points off by one give inexact rows and other logits."""
    import mpokit.export.compressed_tensors as ct

    def shifted(q, key=None):
        grid = ct_grid(q, key)
        grid.zero_point = (grid.zero_point.to(torch.int16) + 1).clamp(-8, 7).to(torch.int8)
        return grid

    ct_grid = ct.ct_grid
    monkeypatch.setattr(ct, "ct_grid", shifted)
    model = quantized(bits=4, group_size=32)
    report = export_compressed_tensors(model, tmp_path / "m", tokenizer=TOKENIZER)
    assert not any(t["exact"] for t in quant_rows(report))
    x = tokens()
    with torch.no_grad():
        assert (load(tmp_path / "m")(x).logits - mpokit_logits(model, x)).abs().max() > 1e-3


def tiny_model_96(seed: int = 0):
    """Hidden size 96: at group 64, fit_groups gives the 96-column layers groups of 32 and down_proj
    (128 columns) groups of 64, as SmolLM2's 576 columns get 96 at 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(TOKENIZER), hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_layer_group_sizes(tmp_path, symmetric):
    """Symmetric: a config group per group size. Asymmetric: one scheme with groups of gcd(32, 64), the
    only form transformers' dequantize-while-loading path decodes (it uses one scheme for every layer)."""
    model = tiny_model_96()
    mpokit.compress_(model, mpokit.QuantConfig(bits=4, group_size=64, symmetric=symmetric), progress=False)
    report = export_compressed_tensors(model, tmp_path / "m", tokenizer=TOKENIZER)
    groups = {g["group_size"]: g for g in report["config_groups"].values()}
    if symmetric:
        assert set(groups) == {32, 64} and groups[64]["targets"] == [r"re:.*\.down_proj$"]
        assert groups[32]["layers"] == 12 and len(groups[32]["targets"]) == 6
    else:
        assert set(groups) == {32} and groups[32]["layers"] == 14
        down = [t for t in report["tensors"] if t["name"].endswith("down_proj.weight")]
        assert all("groups of 64 over 128 columns written as groups of 32" in t["how"] for t in down)
    assert all(t["exact"] for t in report["tensors"])
    assert_same_model(model, tmp_path / "m")


def test_mixed_bits_share_one_asymmetric_scheme(tmp_path):
    model = tiny_model_96()
    mpokit.compress_(model, mpokit.QuantConfig(bits=8, group_size=32, symmetric=True, target_modules=["down_proj"]),
                     progress=False)
    mpokit.compress_(model, mpokit.QuantConfig(bits=4, group_size=32, target_modules=r".*(q|k|v|o|gate|up)_proj$"),
                     progress=False)
    report = export_compressed_tensors(model, tmp_path / "m", tokenizer=TOKENIZER)
    assert [(g["bits"], g["group_size"], g["symmetric"]) for g in report["config_groups"].values()] == [(8, 32, False)]
    rows = {t["name"].split(".")[-2]: t["how"] for t in quant_rows(report)}
    assert "4-bit codes written as 8-bit" in rows["q_proj"] and "zero point 0" in rows["down_proj"]
    assert_same_model(model, tmp_path / "m")


def test_short_last_groups_are_written_as_smaller_groups(tmp_path):
    model = quantized(bits=4, group_size=48, fit_groups=False)  # 64 columns: groups of 48 and 16
    report = export_compressed_tensors(model, tmp_path / "m", tokenizer=TOKENIZER)
    rows = quant_rows(report)
    assert {t["type"] for t in rows} == {"int4 g16 asym"} and all(t["exact"] for t in rows)
    assert all("written as groups of 16" in t["how"] for t in rows)
    assert_same_model(model, tmp_path / "m")


def test_float_offsets_are_written_dense_or_refused(tmp_path):
    model = quantized(bits=4, group_size=32, zero_point=False)
    with pytest.raises(ValueError, match="float offsets.*--unsupported dense"):
        export_compressed_tensors(model, tmp_path / "no", CTOptions(unsupported="error"), tokenizer=TOKENIZER)
    assert list(tmp_path.iterdir()) == []
    report = export_compressed_tensors(model, tmp_path / "m", tokenizer=TOKENIZER)
    layers = [t for t in report["tensors"] if t["name"].startswith("model.layers.") and len(t["shape"]) == 2]
    assert len(layers) == 14 and all(t["type"] == "F32" and t["exact"] and "float offsets" in t["how"]
                                     for t in layers)
    assert any("14 quantized layers written as dense" in n for n in report["notes"])
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    assert_same_model(model, tmp_path / "m")


def test_dense_f16_says_what_it_rounded(tmp_path):
    model = quantized(bits=4, group_size=32, symmetric=True)
    report = export_compressed_tensors(model, tmp_path / "m", CTOptions(dense="f16"), tokenizer=TOKENIZER)
    (embed,) = [t for t in report["tensors"] if t["name"] == "model.embed_tokens.weight"]
    assert embed["type"] == "F16" and not embed["exact"] and 0 < embed["max_abs_diff"] < 1e-3
    x = tokens()
    with torch.no_grad():
        a, b = mpokit_logits(model, x), load(tmp_path / "m")(x).logits
    assert not torch.equal(a, b) and (a - b).abs().max() < 1e-2 * a.abs().max()


def test_mpo_layers_are_written_as_their_dense_product(tmp_path):
    model = tiny_model()
    mpokit.compress_(model, mpokit.MPOConfig(budget=0.6), progress=False)
    report = export_compressed_tensors(model, tmp_path / "m", tokenizer=TOKENIZER)
    assert any("structure is not carried" in n for n in report["notes"])
    assert any("dense product" in t["how"] for t in report["tensors"])
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "MPOLinear"  # the input is untouched
    x = tokens()
    with torch.no_grad():
        assert torch.allclose(model(x).logits, load(tmp_path / "m")(x).logits, atol=1e-5, rtol=1e-5)


_NO_MPOKIT = textwrap.dedent("""
    import torch
    from transformers import AutoModelForCausalLM
    folder, io = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.load(io + "/x.pt")).logits
    torch.save(logits, io + "/logits.pt")
    assert not any(m.startswith("mpokit") for m in sys.modules)
""")


@pytest.mark.parametrize("config", [{"bits": 4, "group_size": 64}, {"bits": 4, "group_size": 32, "symmetric": True}])
def test_the_folder_loads_where_mpokit_cannot_be_imported(tmp_path, config):
    """In a Python that cannot import mpokit (conftest.run_without_mpokit)."""
    model = quantized(**config)
    export_compressed_tensors(model, tmp_path / "m", tokenizer=TOKENIZER)
    x = tokens()
    torch.save(x, tmp_path / "x.pt")
    run_without_mpokit(_NO_MPOKIT, [tmp_path / "m", tmp_path], tmp_path, 300)
    ref = mpokit_logits(model, x)
    assert (torch.load(tmp_path / "logits.pt") - ref).abs().max() <= 1e-5 * ref.abs().max()


# ---- checkpoints, the CLI, and refusals ------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-ct")
    mpokit.save_compressed(quantized(bits=4, group_size=64), root / "ckpt", TOKENIZER)
    return root


def test_cli_exports_a_checkpoint(ckpt, capsys):
    from transformers import AutoTokenizer

    out, js = ckpt / "cli-ct", ckpt / "cli.json"
    assert main(["export", str(ckpt / "ckpt"), "--format", "compressed-tensors", "--out", str(out),
                 "--json", str(js)]) == 0
    report = json.loads(js.read_text())
    assert {(r["type"], r["tensors"], r["exact"]) for r in report["summary"] if r["type"].startswith("int")} == {
        ("int4 g64 asym", 14, 14)}
    assert "int4 g64 asym" in capsys.readouterr().out
    assert_same_model(mpokit.load_compressed(ckpt / "ckpt"), out)
    text = "hello the world, <|endoftext|> then the end"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == TOKENIZER(text)["input_ids"]


@pytest.mark.parametrize("args, message", [
    (["{root}/missing"], "missing checkpoint folder"),
    (["{root}", "--out", "{root}/never"], "expected an mpokit checkpoint"),  # a folder without mpokit.json
    (["{root}/ckpt", "--out", "{root}/ckpt"], "replace the input model"),
    (["{root}/ckpt", "--out", "{root}/ckpt/inside"], "inside the input"),
    (["{root}/ckpt", "--out", "{root}/exists"], "exists; pass --overwrite"),
    (["{root}/ckpt", "--out", "{root}/not-a-model", "--overwrite"], "no config.json"),
    (["{root}/ckpt", "--int4-zero-point", "q5_0"], "--int4-zero-point, which does not apply"),
])
def test_cli_bad_input_exits_2(ckpt, capsys, args, message):
    (ckpt / "exists").mkdir(exist_ok=True)
    (ckpt / "exists" / "config.json").write_text("{}")
    (ckpt / "not-a-model").mkdir(exist_ok=True)
    (ckpt / "not-a-model" / "notes.txt").write_text("mine")
    assert_export_refuses(ckpt, args, "never", capsys, message, ["--format", "compressed-tensors"])
    assert (ckpt / "exists" / "config.json").read_text() == "{}" and (ckpt / "not-a-model" / "notes.txt").exists()
    assert not (ckpt / "never").exists() and not (ckpt / "ckpt" / "inside").exists()
    assert is_checkpoint(ckpt / "ckpt")


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    import mpokit.export.compressed_tensors as ct

    def boom(tmp, *args):
        (tmp / "config.json").write_text("{half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(ct, "_write", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_compressed_tensors(quantized(bits=4, group_size=32), tmp_path / "x", tokenizer=TOKENIZER)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_an_export_only_when_asked(tmp_path):
    out = tmp_path / "m"
    export_compressed_tensors(quantized(bits=4, group_size=32, symmetric=True), out, tokenizer=TOKENIZER)
    model = quantized(bits=8, group_size=64)
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        export_compressed_tensors(model, out, tokenizer=TOKENIZER)
    export_compressed_tensors(model, out, tokenizer=TOKENIZER, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert_same_model(model, out)


def test_options_are_validated():
    with pytest.raises(ValueError, match="expected unsupported in"):
        CTOptions(unsupported="skip")


# ---- the real default model ------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_int4_g128_loads_exactly(tmp_path):
    """SmolLM2 int4 g128: groups of 96 (576 columns) and 128 (down_proj), asymmetric, so one scheme of
    groups of 32; weights bit-equal and logits equal after a plain from_pretrained."""
    loaded = mpokit.load_model(None)
    mpokit.compress_(loaded.model, mpokit.QuantConfig(bits=4, group_size=128), progress=False)
    mpokit.save_compressed(loaded.model, tmp_path / "ckpt", loaded.tokenizer, extra={"source": loaded.source})
    report = export_compressed_tensors(tmp_path / "ckpt", tmp_path / "ct")
    assert all(t["exact"] for t in report["tensors"])
    assert [(g["bits"], g["group_size"], g["layers"]) for g in report["config_groups"].values()] == [(4, 32, 210)]
    assert_same_model(mpokit.load_compressed(tmp_path / "ckpt"), tmp_path / "ct")


def test_mpokit_loads_and_evaluates_a_compressed_tensors_folder(tmp_path):
    """Issue 13 item 5: `mpokit eval`/`load_model` take folders other tools wrote (here: ours, as CT)."""
    model = quantized(bits=4, group_size=32)
    export_compressed_tensors(model, tmp_path / "ct", CTOptions(), tokenizer=TOKENIZER)
    loaded = mpokit.load_model(tmp_path / "ct")
    x = tokens()
    with torch.no_grad():
        out = loaded.model(x).logits
    ref = mpokit_logits(model, x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 30)
    assert main(["eval", str(tmp_path / "ct"), "--text", str(text), "--tokens", "96", "--context", "48"]) == 0
