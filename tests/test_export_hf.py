"""export/hf: self-contained transformers folders. Every kind of mpokit model is exported, then loaded by
transformers in a Python that cannot import mpokit (-S, site-packages only, sys.modules['mpokit'] = None);
its logits must match the in-memory mpokit model within 1e-5 (float32) and generate() the same tokens.
Also: the modeling file's own checks (no mpokit import, unpacking bit-equal to ops/quant.py), sharding,
the CLI, refusals, and a negative control (a corrupted scale changes the logits)."""
from __future__ import annotations

import ast
import json
import shutil
import textwrap

import pytest
import torch

import mpokit
from conftest import run_without_mpokit, tiny_bert, tiny_gpt2
from mpokit.cli.main import main
from mpokit.export import FORMATS, HFOptions, export_hf
from mpokit.export.hf import MODELING_FILE, template_files
from mpokit.export.hf_template import modeling_mpokit_export as template
from mpokit.export.hf_template import mpokit_export_layers as layers
from mpokit.export.hf_template import mpokit_export_ops as ops
from mpokit.io.checkpoint import is_checkpoint
from test_export_gguf import TOKENIZER, assert_export_refuses, tiny_model

pytest.importorskip("accelerate")


def _batches(vocab: int, n: int = 6, length: int = 32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (1, length), generator=gen) for _ in range(n)]


def _moe(**kw):
    return mpokit.MoEficationConfig(**{"num_experts": 8, "top_k": 2, "router_steps": 30, "router_batch": 64,
                                       "cluster_backend": "lsa", **kw})


def _compress(model, *configs, batches=False):
    for config in configs:
        extra = {"batches": _batches(model.config.vocab_size)} if batches else {}
        mpokit.compress_(model, config, progress=False, **extra)
    return model


CASES = {  # name -> () -> compressed model in memory
    "mpo": lambda: _compress(tiny_model(), mpokit.MPOConfig(max_bond=4)),
    "mpo-tied-embedding": lambda: _compress(tiny_model(), mpokit.MPOConfig(max_bond=8, target_modules=[
        "embed_tokens", "q_proj", "down_proj"])),
    "mpo-contract": lambda: _compress(tiny_model(), mpokit.MPOConfig(max_bond=3, forward_mode="contract",
                                                                     target_modules=["embed_tokens", "q_proj"])),
    "lowrank": lambda: _compress(tiny_model(tie=False), mpokit.MPOConfig(lowrank=True, max_bond=8)),
    "aware": lambda: _compress(tiny_model(), mpokit.AwareConfig(budget=0.6), batches=True),
    "share": lambda: _compress(tiny_model(), mpokit.ShareConfig(groups=0, max_bond=6, sweeps=2)),
    "int4-g32": lambda: _compress(tiny_model(), mpokit.QuantConfig(bits=4, group_size=32)),
    "int8-sym": lambda: _compress(tiny_model(), mpokit.QuantConfig(bits=8, group_size=64, symmetric=True)),
    "int3-float-offsets": lambda: _compress(tiny_model(), mpokit.QuantConfig(bits=3, group_size=48,
                                                                             zero_point=False, fit_groups=False)),
    "int4-embeddings-8-tied": lambda: _compress(tiny_model(), mpokit.QuantConfig(bits=4, group_size=32,
                                                                                 embeddings=8)),
    "int8-embeddings-4-untied": lambda: _compress(tiny_model(tie=False), mpokit.QuantConfig(
        bits=8, group_size=64, embeddings=4)),
    "quant-mpo": lambda: _compress(tiny_model(), mpokit.MPOConfig(max_bond=8),
                                   mpokit.QuantConfig(bits=4, group_size=32, mpo_cores="central")),
    "mixed": lambda: _compress(tiny_model(), mpokit.MixedConfig(bits_per_weight=3.0, bits_choices=(2, 3),
                                                                factor_bits=(4,), group_size=16,
                                                                max_rank_fraction=0.25), batches=True),
    "moefication": lambda: _compress(tiny_model(), _moe(shared_experts=1), batches=True),
    "mpoe": lambda: _compress(tiny_model(), mpokit.MPOEConfig(num_experts=4, top_k=2, max_bond=4)),
    "upcycled-top1": lambda: _compress(tiny_model(), mpokit.MPOEConfig(num_experts=4, top_k=1, expert_type="dense",
                                                                       noise=0.1)),
    "gpt2-mpo": lambda: _compress(tiny_gpt2(), mpokit.MPOConfig(max_bond=4)),
    "bert-moefication": lambda: _compress(tiny_bert(), _moe(num_experts=4, top_k=1), batches=True),
}
AUTO = {"bert-moefication": "AutoModelForSequenceClassification"}  # the others: AutoModelForCausalLM

_LOAD = textwrap.dedent("""
    import json, sys, traceback
    from pathlib import Path
    sys.modules["mpokit"] = None  # stays hidden (run_without_mpokit checked it is not importable)
    import torch, transformers
    results = {}
    for name, folder, auto, x in torch.load(sys.argv[1]):
        try:
            model = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True).eval()
            layers = model.config.mpokit_layers
            ties = [getattr(model.get_submodule(n), a) is getattr(model.get_submodule(s["tied_to"]), a)
                    for n, s in layers.items() if s["tied_to"]
                    for a in (("cores",) if hasattr(model.get_submodule(n), "cores") else ("qweight",))]
            ties += [model.get_parameter(a) is model.get_parameter(k)
                     for a, k in model.config.mpokit_tied_parameters.items()]
            with torch.no_grad():
                out = {"logits": model(x).logits, "ties": ties, "class": type(model).__name__,
                       "types": {n: type(model.get_submodule(n)).__name__ for n in layers}}
            if (Path(folder) / "tokenizer_config.json").is_file():
                tok = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
                out["ids"] = tok("hello the world, <|endoftext|> then the end")["input_ids"]
            if auto == "AutoModelForCausalLM":
                out["generated"] = model.generate(x[:1, :6], max_new_tokens=3, do_sample=False, pad_token_id=0)
            results[name] = out
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    assert not [m for m, v in sys.modules.items() if m.startswith("mpokit") and v is not None]
    torch.save(results, sys.argv[2])
""")


def load_without_mpokit(root, jobs: list[tuple]) -> dict:
    """Load each (name, folder, auto class, input ids) in one Python without mpokit; logits and more back."""
    torch.save(jobs, root / "jobs.pt")
    run_without_mpokit(_LOAD, [root / "jobs.pt", root / "results.pt"], root, 900, OMP_NUM_THREADS="1",
                       HF_MODULES_CACHE=str(root / "modules"), HF_HUB_OFFLINE="1")
    return torch.load(root / "results.pt")


@torch.no_grad()
def reference(model, x, generate: bool) -> dict:
    from mpokit.layers.quant import set_kernel_

    set_kernel_(model, "reference")  # float32: what "auto" takes anyway
    out = {"logits": model(x).logits}
    if generate:
        out["generated"] = model.generate(x[:1, :6], max_new_tokens=3, do_sample=False, pad_token_id=0)
    return out


def _corrupt_a_scale(src, dst) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.qweight.scale"
    state[key] = state[key] * 2
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case exported and loaded once, in one subprocess: {name: (mpokit reference, loaded, report)}."""
    root = tmp_path_factory.mktemp("export-hf")
    refs, reports, jobs, xs = {}, {}, [], {}
    for name, build in {**CASES, "sharded": CASES["int4-embeddings-8-tied"]}.items():
        model = build()
        xs[name] = x = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
        options = HFOptions(max_shard_size="20KB") if name == "sharded" else None
        reports[name] = export_hf(model, root / name, options, tokenizer=TOKENIZER)
        auto = AUTO.get(name, "AutoModelForCausalLM")
        refs[name] = reference(model, x, auto == "AutoModelForCausalLM")
        jobs.append((name, str(root / name), auto, x))
    _corrupt_a_scale(root / "int4-g32", root / "corrupted")
    jobs.append(("corrupted", str(root / "corrupted"), "AutoModelForCausalLM", xs["int4-g32"]))
    refs["corrupted"] = refs["int4-g32"]
    mpokit.save_compressed(CASES["int4-embeddings-8-tied"](), root / "ckpt", TOKENIZER)
    assert main(["export", str(root / "ckpt"), "--format", "hf", "--out", str(root / "cli"),
                 "--json", str(root / "cli.json"), "--max-shard-size", "30KB"]) == 0
    refs["cli"] = reference(mpokit.load_compressed(root / "ckpt"), xs["mpo"], True)
    reports["cli"] = json.loads((root / "cli.json").read_text())
    jobs.append(("cli", str(root / "cli"), "AutoModelForCausalLM", xs["mpo"]))
    loaded = load_without_mpokit(root, jobs)
    return root, {n: (refs[n], loaded[n], reports.get(n)) for n in refs}


@pytest.mark.parametrize("name", [*CASES, "sharded", "cli"])
def test_loads_without_mpokit_with_the_same_logits(exported, name):
    ref, back, report = exported[1][name]
    assert "error" not in back, back.get("error")
    assert back["class"].startswith("MpokitExported")
    assert (back["logits"] - ref["logits"]).abs().max() <= 1e-5
    if "generated" in ref:
        assert torch.equal(back["generated"], ref["generated"])
    layers = json.loads((exported[0] / name / "config.json").read_text())["mpokit_layers"]
    assert back["types"] == {n: s["type"] for n, s in layers.items()} and layers  # rebuilt, not densified
    assert all(back["ties"])
    assert report["dense"] == []


def test_a_corrupted_scale_changes_the_logits(exported):
    """Negative control: the comparison above can fail."""
    ref, back, _ = exported[1]["corrupted"]
    assert (back["logits"] - ref["logits"]).abs().max() > 1e-3


def test_ties_are_stored_once_and_come_back(exported):
    root, results = exported
    from safetensors import safe_open

    with safe_open(root / "int4-embeddings-8-tied" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.qweight.packed" in keys and not any(k.startswith("lm_head.") for k in keys)
    assert results["int4-embeddings-8-tied"][1]["ties"] == [True]
    assert len(results["share"][1]["ties"]) >= 6  # q/k/v/o/gate/up/down centrals: one parameter for both layers
    assert results["mpo-tied-embedding"][1]["types"]["lm_head"] == "MPOLinear"


def test_sharded_folders_have_an_index_and_shards(exported):
    root, results = exported
    for name in ("sharded", "cli"):
        index = json.loads((root / name / "model.safetensors.index.json").read_text())
        shards = sorted(p.name for p in (root / name).glob("model-*-of-*.safetensors"))
        assert len(shards) >= 2 and set(index["weight_map"].values()) == set(shards)
        assert results[name][2]["shards"] == shards
    assert not (root / "int4-g32" / "model.safetensors.index.json").exists()


def test_config_is_the_source_config_with_the_layers(exported):
    root, results = exported
    cfg = json.loads((root / "mpo" / "config.json").read_text())
    assert cfg["model_type"] == "mpokit_export_llama" and cfg["hidden_size"] == 64 and cfg["dtype"] == "float32"
    assert cfg["architectures"] == ["MpokitExportedLlamaForCausalLM"]
    assert cfg["auto_map"] == {"AutoConfig": "modeling_mpokit_export.MpokitExportedLlamaConfig",
                               "AutoModelForCausalLM": "modeling_mpokit_export.MpokitExportedLlamaForCausalLM"}
    spec = cfg["mpokit_layers"]["model.layers.0.self_attn.q_proj"]
    assert spec["type"] == "MPOLinear" and spec["orig_type"] == "Linear"
    files = template_files()
    assert [p.name for p in files] == [MODELING_FILE, "mpokit_export_layers.py", "mpokit_export_ops.py"]
    assert all((root / "mpo" / p.name).read_bytes() == p.read_bytes() for p in files)
    assert results["cli"][2]["layers"] == {"QuantLinear": 15, "QuantEmbedding": 1}
    assert json.loads((root / "bert-moefication" / "config.json").read_text())["auto_map"][
        "AutoModelForSequenceClassification"] == "modeling_mpokit_export.MpokitExportedBertForSequenceClassification"


def test_plain_transformers_refuses_without_trust_remote_code(exported):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(exported[0] / "mpo", trust_remote_code=False)


def test_the_tokenizer_is_written_and_loads_without_mpokit(exported):
    ids = TOKENIZER("hello the world, <|endoftext|> then the end")["input_ids"]
    assert exported[1]["cli"][1]["ids"] == ids  # the checkpoint's own tokenizer
    assert exported[1]["mpo"][1]["ids"] == ids  # the one given to export_hf


# ---- the modeling file on its own ------------------------------------------------------------------
@pytest.mark.parametrize("path", template_files(), ids=lambda p: p.name)
def test_the_modeling_files_import_torch_and_transformers_only(path):
    tree = ast.parse(path.read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
    assert roots <= {"math", "torch", "transformers"}  # no mpokit
    local = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
    assert local <= {"mpokit_export_layers", "mpokit_export_ops"}  # each other, copied beside them


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(37,), (5, 24), (3, 61)])
def test_unpacking_is_bit_equal_to_ops_quant(bits, shape):
    from mpokit.ops.quant import pack_bits, unpack_bits

    codes = torch.randint(0, 2 ** bits, shape, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert torch.equal(ops.unpack_bits(packed, bits, shape[-1]), unpack_bits(packed, bits, shape[-1]))
    assert torch.equal(ops.unpack_bits(packed, bits, shape[-1]), codes)


@pytest.mark.parametrize("symmetric, zero_point", [(True, True), (False, True), (False, False)])
def test_dequantize_is_bit_equal_to_ops_quant(symmetric, zero_point):
    from mpokit.ops.quant import dequantize, quantize

    q = quantize(torch.randn(6, 100), 4, 32, symmetric=symmetric, zero_point=zero_point)  # a short last group
    assert torch.equal(ops.dequantize(q.codes, q.scale, q.offset, 4, 32),
                       dequantize(q.codes, q.scale, q.offset, 4, 32))


def test_mpo_math_equals_ops():
    from mpokit.ops.contract import tt_apply, tt_rows
    from mpokit.ops.tt import tt_svd, tt_to_matrix

    cores, _ = tt_svd(torch.randn(24, 30), [2, 3, 4], [5, 3, 2], max_bond=5)
    cores = [c.float() for c in cores]
    x, ids = torch.randn(7, 30), torch.tensor([0, 5, 23, 11])
    assert torch.equal(ops.tt_to_matrix(cores), tt_to_matrix(cores))
    assert torch.equal(ops.tt_apply(x, cores), tt_apply(x, cores))
    assert torch.equal(ops.tt_rows(ids, cores), tt_rows(ids, cores))


# ---- in-process checks, the CLI and refusals --------------------------------------------------------
def _load_here(folder):
    """The exported class straight from the template module (no remote-code machinery)."""
    config = json.loads((folder / "config.json").read_text())
    return getattr(template, config["architectures"][0]).from_pretrained(folder).eval()


def test_a_layer_type_the_file_does_not_rebuild_is_written_dense(tmp_path, monkeypatch):
    model = CASES["moefication"]()
    monkeypatch.delitem(layers.LAYERS, "MoEFFN")
    report = export_hf(model, tmp_path / "m", tokenizer=TOKENIZER)
    assert report["dense"] == [f"model.layers.{i}.mlp" for i in range(2)] and report["layers"] == {}
    assert any("MoEFFN written as its dense weight" in n for n in report["notes"])
    monkeypatch.undo()
    x = torch.randint(0, len(TOKENIZER), (2, 12))
    from mpokit import unload_

    with torch.no_grad():
        dense = unload_(model)(x).logits
        assert (_load_here(tmp_path / "m")(x).logits - dense).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-hf-cli")
    mpokit.save_compressed(CASES["int4-g32"](), root / "ckpt", TOKENIZER)
    return root


@pytest.mark.parametrize("args, message", [
    (["{root}/missing"], "missing checkpoint folder"),
    (["{root}", "--out", "{root}/never"], "expected an mpokit checkpoint"),  # a folder without mpokit.json
    (["{root}/ckpt", "--out", "{root}/ckpt"], "replace the input model"),
    (["{root}/ckpt", "--out", "{root}/ckpt/inside"], "inside the input"),
    (["{root}/ckpt", "--out", "{root}/exists"], "exists; pass --overwrite"),
    (["{root}/ckpt", "--out", "{root}/not-an-export", "--overwrite"], f"no {MODELING_FILE}"),
    (["{root}/ckpt", "--int4-zero-point", "q5_0"], "--int4-zero-point, which does not apply"),
    (["{root}/ckpt", "--dense", "f16"], "--dense, which does not apply"),
    (["{root}/ckpt", "--max-shard-size", "lots"], "expected max_shard_size"),
])
def test_cli_bad_input_exits_2(ckpt, capsys, args, message):
    (ckpt / "exists").mkdir(exist_ok=True)
    (ckpt / "exists" / "config.json").write_text("{}")
    (ckpt / "exists" / MODELING_FILE).write_text("")
    (ckpt / "not-an-export").mkdir(exist_ok=True)
    (ckpt / "not-an-export" / "config.json").write_text("{}")
    assert_export_refuses(ckpt, args, "never", capsys, message, ["--format", "hf"])
    assert (ckpt / "exists" / "config.json").read_text() == "{}" and (ckpt / "not-an-export" / "config.json").exists()
    assert not (ckpt / "never").exists() and not (ckpt / "ckpt" / "inside").exists()
    assert is_checkpoint(ckpt / "ckpt")


def test_other_formats_refuse_the_hf_option(ckpt, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", str(ckpt / "ckpt"), "--format", "gguf", "--out", str(ckpt / "x.gguf"),
              "--max-shard-size", "1GB"])
    assert e.value.code == 2 and "--max-shard-size, which does not apply" in capsys.readouterr().err


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    import mpokit.export.hf as hf

    monkeypatch.setattr(hf, "template_files", lambda folder: [tmp_path / "gone.py"])  # after weights and config
    with pytest.raises(FileNotFoundError):
        export_hf(CASES["int4-g32"](), tmp_path / "x", tokenizer=TOKENIZER)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_overwrite_replaces_an_export_only_when_asked(tmp_path):
    out = tmp_path / "m"
    export_hf(CASES["int4-g32"](), out)
    model = CASES["mpo"]()
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        export_hf(model, out)
    report = export_hf(model, out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m"] and report["layers"] == {"MPOLinear": 14}
    assert any("no tokenizer written" in n for n in report["notes"])
    x = torch.randint(0, len(TOKENIZER), (2, 12))
    with torch.no_grad():
        assert (_load_here(out)(x).logits - model(x).logits).abs().max() <= 1e-5


def test_a_wrong_modeling_file_is_caught_before_writing(tmp_path, monkeypatch):
    """The exported class is built on the meta device and its state dict compared before anything is written."""
    spec_of = layers.QuantizedTensor.__init__

    def wrong(self, rows, cols, *args):
        spec_of(self, rows + 1, cols, *args)

    monkeypatch.setattr(layers.QuantizedTensor, "__init__", wrong)
    with pytest.raises(RuntimeError, match="do not rebuild this model"):
        export_hf(CASES["int4-g32"](), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_options_and_formats():
    assert FORMATS["hf"] is export_hf
    with pytest.raises(ValueError, match="expected max_shard_size"):
        HFOptions(max_shard_size=0)
    with pytest.raises(ValueError, match="expected a transformers model"):
        export_hf(torch.nn.Linear(2, 2), "/nonexistent/never")
