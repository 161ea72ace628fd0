"""cli/: compress -> inspect -> eval on a tiny Hugging Face folder, and error exits."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_llama

from mpokit.cli.main import main

WORDS = ("the a of to and in is was for on that with as by at from his her it an were are which this "
         "be or has had first one their its new after who they have two been but not all she during time "
         "may year into more some when there city can would than other he".split())


def tiny_tokenizer():
    """A word-level tokenizer over WORDS (ids < 128, the tiny llama's vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: k + 2 for k, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


def save_model_and_text(root, words: int) -> None:
    """root/hf: a tiny word-level llama as a Hugging Face folder; root/text.txt: `words` random words of it."""
    torch.manual_seed(0)
    model, tok = tiny_llama(), tiny_tokenizer()
    model.save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    g = torch.Generator().manual_seed(1)
    (root / "text.txt").write_text(" ".join(WORDS[int(k)] for k in torch.randint(0, len(WORDS), (words,), generator=g)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """An HF model folder, a text file, and one compressed checkpoint made by the CLI."""
    root = tmp_path_factory.mktemp("cli")
    save_model_and_text(root, 600)
    code = main(["compress", "--model", str(root / "hf"), "--method", "mpo-datafree", "--budget", "0.5",
                 "--out", str(root / "ckpt"),
                 "--json", str(root / "compress.json"), "--layers"])
    assert code == 0
    return root


def test_compress_report(workdir):
    report = json.loads((workdir / "compress.json").read_text())
    assert report["config"]["method"] == "mpo-datafree"  # the data-free MPOConfig: CLI name == config.method
    assert report["config"]["budget"] == 0.5
    assert len(report["layers"]) == 14
    assert 0.49 <= report["kept_fraction"] <= 0.5
    assert report["params_after"] < report["params_before"]


def test_inspect_has_one_entry_per_compressed_layer(workdir, capsys):
    assert main(["inspect", str(workdir / "ckpt"), "--json", str(workdir / "inspect.json")]) == 0
    out = json.loads((workdir / "inspect.json").read_text())
    layers = out["layers"]
    assert len(layers) == 14
    assert {e["layer"] for e in layers} == {r["name"] for r in json.loads((workdir / "compress.json").read_text())["layers"]}
    for e in layers:
        assert e["type"] == "MPOLinear" and len(e["bonds"]) == 2 and len(e["out_dims"]) == 3
        assert 0 < e["kept"] <= 1.1 and e["rel_error"] is not None and 0 <= e["rel_error"] < 1
    assert out["methods"][0]["method"] == "mpo-datafree"
    assert "14 compressed layers" in capsys.readouterr().out


def test_eval_json_keys(workdir):
    ev = workdir / "eval.json"
    assert main(["eval", str(workdir / "ckpt"), "--text", str(workdir / "text.txt"), "--tokens", "256",
                 "--context", "64", "--json", str(ev)]) == 0
    res = json.loads(ev.read_text())
    assert {"perplexity", "tokens", "context", "params"} <= set(res)
    assert isinstance(res["perplexity"], float) and math.isfinite(res["perplexity"]) and res["perplexity"] > 1
    assert res["tokens"] == 256 and res["context"] == 64
    assert isinstance(res["params"], int) and res["corpus"].endswith("text.txt")
    # the compressed model has fewer parameters than the dense one it came from
    dense = workdir / "eval_dense.json"
    assert main(["eval", str(workdir / "hf"), "--text", str(workdir / "text.txt"), "--tokens", "256",
                 "--context", "64", "--json", str(dense)]) == 0
    assert json.loads(dense.read_text())["params"] > res["params"]


def test_compress_max_bond_num_cores_and_targets(workdir):
    out = workdir / "mb"
    assert main(["compress", "--model", str(workdir / "hf"), "--method", "mpo-datafree", "--max-bond", "4",
                 "--num-cores", "2", "--targets", "up_proj,down_proj", "--out", str(out),
                 "--json", str(workdir / "mb.json")]) == 0
    report = json.loads((workdir / "mb.json").read_text())
    assert len(report["layers"]) == 4
    assert all(r["detail"]["bonds"] == [4] and len(r["detail"]["out_dims"]) == 2 for r in report["layers"])


@pytest.mark.parametrize("argv,message", [
    (["eval", "{ckpt}", "--text", "{root}/no_such.txt"], "missing text file"),
    (["eval", "{root}/no_such_model", "--text", "{root}/text.txt"], "missing model path"),
    (["inspect", "{root}/no_such_ckpt"], "missing checkpoint folder"),
    (["compress", "--model", "{root}/no_such_model", "--out", "{root}/x"], "missing model path"),
    (["compress", "--model", "{root}/hf", "--method", "mpo-datafree", "--budget", "1.5", "--out", "{root}/x"],
     r"budget in (0, 1]"),
    (["compress", "--model", "{root}/hf", "--method", "mpo-datafree", "--targets", "q_prj", "--out", "{root}/x"],
     "unknown module name 'q_prj'"),
])
def test_error_exits(workdir, capsys, argv, message):
    argv = [a.format(root=workdir, ckpt=workdir / "ckpt") for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "mpokit: error:" in err and message in err
    assert not (workdir / "x").exists()  # nothing half-written


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and "mpokit" in capsys.readouterr().out


def test_default_method_is_activation_aware(workdir, tmp_path):
    """`--method mpo` (the default) calibrates on a text file and saves a loadable checkpoint."""
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{i % 40}" for i in range(400)))
    out = tmp_path / "aware"
    assert main(["compress", "--model", str(workdir / "hf"), "--budget", "0.6", "--calibration", str(calib),
                 "--calibration-tokens", "64", "--out", str(out), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["config"]["method"] == "mpo" and report["calibration"] == str(calib)
    assert report["kept_fraction"] <= 0.6
    assert main(["eval", str(out), "--text", str(calib), "--tokens", "64", "--context", "32",
                 "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["perplexity"] > 1


def test_option_not_applying_to_method_is_an_error(workdir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--model", str(workdir / "hf"), "--method", "svd", "--max-bond", "4",
              "--out", str(tmp_path / "x")])
    assert "do not apply" in capsys.readouterr().err


def test_a_new_compression_method_needs_only_its_config(workdir):
    """A method defined outside mpokit (here: in this test) with one registration is offered by
    `mpokit compress` with its own flag, applied, recorded in the checkpoint and loaded back."""
    from dataclasses import dataclass
    from typing import ClassVar

    from mpokit.methods.base import METHODS, REGISTRY, MethodConfig, Report, option, register

    @dataclass
    class ScaleHeadConfig(MethodConfig):
        method: ClassVar[str] = "scale-head-test"
        factor: float = option(1.0, "multiply the LM head by this", type=float)

    @register(ScaleHeadConfig)
    def scale_head_(model, config, **kwargs):
        import torch

        with torch.no_grad():
            model.lm_head.weight.mul_(config.factor)
        return Report(config.method)

    try:
        out = workdir / "scaled"
        assert main(["compress", "--model", str(workdir / "hf"), "--method", "scale-head-test", "--factor", "0",
                     "--out", str(out)]) == 0
        from mpokit.io.checkpoint import load_compressed

        model = load_compressed(out)
        assert model._mpokit_methods[-1]["method"] == "scale-head-test"
        assert float(model.lm_head.weight.detach().abs().max()) == 0.0
    finally:
        METHODS.pop("scale-head-test", None)
        REGISTRY.pop(ScaleHeadConfig, None)
