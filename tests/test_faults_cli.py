"""Issue 15, items 8, 10, 12, 13: bad input ends in one clear line and exit code 2, never a traceback;
internal errors point to a log file; KV figures always read the cache; calibration minimums; empty targets.

Run: .venv/bin/python -m pytest tests/test_faults_cli.py -q
"""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from test_cli import WORDS, tiny_tokenizer

from mpokit.cli.main import main


def words_text(n: int, seed: int = 1) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[int(k)] for k in torch.randint(0, len(WORDS), (n,), generator=g))


def model_folder(path, model=None):
    """A saved tiny HF model (default: the tiny llama, 128 positions) with the word-level test tokenizer."""
    torch.manual_seed(0)
    model = tiny_llama() if model is None else model
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_cli")
    model_folder(root / "hf")
    model_folder(root / "gpt2", tiny_gpt2())  # n_positions = 64
    (root / "text.txt").write_text(words_text(600))
    return root


def expect_user_error(capsys, argv, *needles: str) -> str:
    """main(argv) exits with code 2; stderr ends in one line `mpokit: error: ...` holding every needle, no traceback.

    (Progress bars of model loading may come before it.) Returns that line."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("mpokit: error: "), err
    assert sum("error" in line for line in lines) == 1, err
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


# ---- item 10: tracebacks and bad numeric flags ------------------------------------------------------------------

def test_invalid_targets_regex_is_a_usage_error(root, capsys):
    expect_user_error(capsys, ["compress", "--model", root / "hf", "--method", "mpo-datafree", "--targets-regex", "(",
                               "--out", root / "x"], "--targets-regex", "regular expression")
    assert not (root / "x").exists()


def test_invalid_regex_in_the_library_is_a_value_error(llama):
    from mpokit.surgery import find_targets

    with pytest.raises(ValueError, match="regular expression"):
        find_targets(llama, "mlp.(up")


def test_context_beyond_the_models_positions(root, capsys):
    # GPT-2's position table has 64 rows: a 128-token window would index past it
    expect_user_error(capsys, ["eval", root / "gpt2", "--text", root / "text.txt", "--tokens", "256", "--context", "128"],
                      "--context <= 64", "got 128")


def test_context_within_the_models_positions_runs(root, tmp_path):
    assert main(["eval", str(root / "gpt2"), "--text", str(root / "text.txt"), "--tokens", "128", "--context", "64",
                 "--json", str(tmp_path / "e.json")]) == 0
    assert math.isfinite(json.loads((tmp_path / "e.json").read_text())["perplexity"])


def test_finetune_seq_len_beyond_positions(root, tmp_path, capsys):
    expect_user_error(capsys, ["finetune", root / "gpt2", "--method", "full", "--task", "lm", "--data",
                               root / "text.txt", "--max-steps", "1", "--seq-len", "100", "--context", "32",
                               "--out", tmp_path / "o"], "--seq-len <= 64", "got 100")


@pytest.mark.parametrize("flags,needle", [
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-3"], "--batch-size"),
    (["--tokens", "-5"], "--tokens"),
    (["--context", "1"], "--context"),
    (["--batch-size", "four"], "expected an integer >= 1, got 'four'"),
    (["--chunk", "0"], "--chunk"),
    (["--chunk", "-64"], "--chunk"),
    (["--kv-cache", "rtn", "--kv-residual", "-1"], "--kv-residual"),
])
def test_bad_eval_numbers(root, capsys, flags, needle):
    expect_user_error(capsys, ["eval", root / "hf", "--text", root / "text.txt", *flags], needle)


@pytest.mark.parametrize("flags,needle", [
    (["--max-steps", "0"], "--max-steps"),
    (["--max-steps", "2", "--batch-size", "0"], "--batch-size"),
    (["--max-steps", "2", "--lr", "nan"], "--lr"),
    (["--max-steps", "2", "--lr", "-1e-3"], "--lr"),
    (["--max-steps", "2", "--save-steps", "0"], "--save-steps"),
    (["--max-steps", "2", "--save-total-limit", "0"], "--save-total-limit"),
    (["--max-steps", "2", "--grad-accum", "0"], "--grad-accum"),
    (["--max-steps", "2", "--warmup-steps", "-1"], "--warmup-steps"),
    (["--max-steps", "2", "--max-minutes", "0"], "--max-minutes"),
    (["--max-steps", "2", "--alpha", "1.5"], "--alpha"),
    (["--max-steps", "2", "--seq-len", "1"], "--seq-len"),
    (["--max-steps", "2", "--lora-targets", ""], "--lora-targets"),
])
def test_bad_finetune_numbers(root, tmp_path, capsys, flags, needle):
    expect_user_error(capsys, ["finetune", root / "hf", "--method", "full", "--task", "lm", "--data", root / "text.txt",
                               "--out", tmp_path / "o", *flags], needle)
    assert not (tmp_path / "o").exists()


def test_missing_required_flag_is_one_line(capsys):
    expect_user_error(capsys, ["compress"], "--out")


def test_library_validation_errors_are_user_errors(root, capsys):
    expect_user_error(capsys, ["compress", "--model", root / "hf", "--method", "mpo-datafree", "--max-bond", "0",
                               "--out", root / "x"], "expected max_bond >= 1, got 0")


def _boom(args):
    raise RuntimeError("something inside broke\nsecond line of the message")


def test_internal_error_is_one_line_with_a_log(root, capsys, monkeypatch, tmp_path):
    import mpokit.cli.inspect

    monkeypatch.setenv("MPOKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MPOKIT_DEBUG", raising=False)
    monkeypatch.setattr(mpokit.cli.inspect, "run", _boom)
    with pytest.raises(SystemExit) as exc:
        main(["inspect", str(root / "hf")])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("mpokit: error: internal error: RuntimeError: something inside broke (a bug in mpokit")
    assert "--debug" in lines[0] and "second line" not in lines[0]
    logs = list((tmp_path / "cache" / "logs").glob("error-*.log"))
    assert len(logs) == 1 and str(logs[0]) in lines[0]
    log = logs[0].read_text()
    assert "Traceback" in log and "_boom" in log and "second line of the message" in log


def test_debug_flag_shows_the_traceback(root, monkeypatch):
    import mpokit.cli.inspect

    monkeypatch.setattr(mpokit.cli.inspect, "run", _boom)
    with pytest.raises(RuntimeError, match="something inside broke"):
        main(["--debug", "inspect", str(root / "hf")])
    monkeypatch.undo()
    with pytest.raises((ValueError, OSError), match="no_such_ckpt"):  # user errors too
        main(["--debug", "inspect", str(root / "no_such_ckpt")])


def test_internal_errors_are_not_taken_for_user_errors():
    from mpokit.cli.main import is_user_error

    assert is_user_error(ValueError("expected x, got y")) and is_user_error(FileNotFoundError("f"))
    assert is_user_error(re.error("bad")) and is_user_error(ImportError("needs x: pip install x"))
    for e in (RuntimeError("x"), TypeError("x"), KeyError("x"), IndexError("x"), AttributeError("x"),
              ImportError("cannot import name 'foo' from 'mpokit'")):
        assert not is_user_error(e)


# ---- item 8: a KV-cache figure always reads the cache ------------------------------------------------------------

@pytest.mark.parametrize("flags", [
    ["--context", "64", "--chunk", "64"],
    ["--context", "32"],  # default chunk 64
    ["--tokens", "48", "--context", "512", "--chunk", "48"],  # the window is only `tokens` long
])
def test_kv_cache_refuses_windows_of_one_chunk(root, capsys, flags):
    expect_user_error(capsys, ["eval", root / "hf", "--text", root / "text.txt", "--tokens", "256", "--kv-cache", "rtn",
                               *flags], "longer than --chunk", "read the quantized cache")


def test_kv_cache_chunk_zero_is_refused_not_64(root, capsys):
    expect_user_error(capsys, ["eval", root / "hf", "--text", root / "text.txt", "--kv-cache", "rtn", "--chunk", "0"],
                      "--chunk", "got '0'")


def test_kv_cache_figure_reads_the_cache(root, tmp_path):
    out = tmp_path / "kv.json"
    assert main(["eval", str(root / "hf"), "--text", str(root / "text.txt"), "--tokens", "256", "--context", "64",
                 "--chunk", "16", "--kv-cache", "rtn", "--kv-bits", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["chunks"] == 4 * 4 and res["cache_reads"] == 4 * 3  # 4 windows of 4 chunks; 3 of each read the cache
    assert "12 of 16 chunks read the cache" in res["kv_eval"]
    assert 0 < res["kv_bytes_ratio"] < 1


def test_perplexity_counts_cache_reads(llama):
    from mpokit.eval.perplexity import perplexity
    from test_kv_cache import CharTokenizer

    text = "the quick brown fox jumps over the lazy dog. " * 10
    one = perplexity(llama, CharTokenizer(), text, tokens=128, context=64, chunk=64, progress=False)
    assert one.chunks == 2 and one.cache_reads == 0
    split = perplexity(llama, CharTokenizer(), text, tokens=128, context=64, chunk=16, progress=False)
    assert split.chunks == 8 and split.cache_reads == 6
    with pytest.raises(ValueError, match="chunk"):
        perplexity(llama, CharTokenizer(), text, tokens=128, context=64, chunk=0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(llama, CharTokenizer(), text, tokens=128, context=64, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="maximum positions"):
        perplexity(llama, CharTokenizer(), text * 10, tokens=512, context=256, progress=False)


# ---- item 12: calibration minimum and warnings --------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "the", "of a"])
def test_calibration_shorter_than_a_window_is_refused(root, tmp_path, capsys, text):
    calib = tmp_path / "calib.txt"
    calib.write_text(text)
    line = expect_user_error(capsys, ["compress", "--model", root / "hf", "--budget", "0.6", "--calibration", calib,
                                      "--calibration-tokens", "64", "--out", tmp_path / "x"],
                             "at least 64 tokens", "calibration_tokens=64", "calibration_context=512")
    got = len(text.split())
    assert f"got {got} tokens" in line
    assert not (tmp_path / "x").exists()


def test_calibration_below_the_input_width_warns(root, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(words_text(40))  # 40 tokens, layers read 64 (hidden) and 128 (FFN) inputs
    with pytest.warns(UserWarning, match=r"calibration: 40 tokens reached layers with up to 128 inputs"):
        assert main(["compress", "--model", str(root / "hf"), "--budget", "0.6", "--calibration", str(calib),
                     "--calibration-tokens", "40", "--out", str(tmp_path / "c")]) == 0


def test_calibration_fewer_tokens_than_requested_warns(llama):
    from mpokit.calibration.stats import resolve_calibration
    from mpokit.data import Calibration

    tok = tiny_tokenizer()
    with pytest.warns(UserWarning, match="gives 100 tokens, fewer than the 1000 requested"):
        batches = resolve_calibration(Calibration(text=words_text(100)), tok, 1000, 64, "a test")
    assert sum(b.numel() for b in batches) == 100
    with pytest.raises(ValueError, match="at least 64 tokens"):
        resolve_calibration(Calibration(text=words_text(50)), tok, 1000, 64, "a test")
    with pytest.raises(ValueError, match="at least 2 tokens"):
        resolve_calibration(Calibration(batches=[]), tok, 1000, 64, "a test")


# ---- item 13: empty targets and library configs --------------------------------------------------------------------

@pytest.mark.parametrize("flag,value,needle", [
    ("--targets", "", "expected at least one module name in --targets, got ''"),
    ("--targets", ",", "expected at least one module name in --targets"),
    ("--targets", "up_proj,,down_proj", "empty name"),
    ("--exclude", "", "expected at least one module name in --exclude"),
    ("--targets-regex", "", "regular expression"),
])
def test_empty_targets_are_an_error(root, capsys, flag, value, needle):
    expect_user_error(capsys, ["compress", "--model", root / "hf", "--method", "mpo-datafree", flag, value,
                               "--out", root / "x"], needle)
    assert not (root / "x").exists()


def test_empty_target_list_in_the_library(llama):
    from mpokit.surgery import find_targets

    with pytest.raises(ValueError, match=r"expected at least one module name in target_modules, got \[\]"):
        find_targets(llama, [])
    with pytest.raises(ValueError, match="non-empty module names"):
        find_targets(llama, ["up_proj", ""])
    assert find_targets(llama, ["up_proj"], exclude_modules=[]) == find_targets(llama, ["up_proj"])


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("cls,kwargs,needle", [
    ("mpo.config.MPOConfig", {"max_bond": 0}, "max_bond >= 1, got 0"),
    ("mpo.config.MPOConfig", {"max_bond": -2}, "max_bond >= 1, got -2"),
    ("mpo.config.MPOConfig", {"max_bond": 2.5}, "integer max_bond"),
    ("mpo.config.MPOConfig", {"max_bond": True}, "integer max_bond"),
    ("mpo.config.MPOConfig", {"cutoff": NAN}, "cutoff, got nan"),
    ("mpo.config.MPOConfig", {"cutoff": INF}, "cutoff, got inf"),
    ("mpo.config.MPOConfig", {"cutoff": -0.1}, "cutoff in [0, 1), got -0.1"),
    ("mpo.config.MPOConfig", {"budget": 0.0}, "budget in (0, 1], got 0.0"),
    ("mpo.config.MPOConfig", {"budget": 1.5}, "budget in (0, 1], got 1.5"),
    ("mpo.config.MPOConfig", {"budget": NAN}, "budget"),
    ("mpo.config.MPOConfig", {"num_cores": 2.0}, "integer num_cores"),
    ("aware.config.AwareConfig", {"budget": NAN}, "budget"),
    ("aware.config.AwareConfig", {"budget": True}, "budget"),
    ("aware.config.AwareConfig", {"alpha": NAN}, "alpha, got nan"),
    ("aware.config.AwareConfig", {"damp": -1.0}, "damp"),
    ("aware.config.AwareConfig", {"refine_steps": -1}, "refine_steps"),
    ("aware.config.AwareConfig", {"calibration_tokens": 1}, "calibration_tokens"),
    ("quant.config.QuantConfig", {"bits": 5}, "bits in (2, 3, 4, 8), got 5"),
    ("quant.config.QuantConfig", {"bits": True}, "integer bits"),
    ("quant.config.QuantConfig", {"group_size": 0}, "group_size >= 1, got 0"),
    ("quant.config.QuantConfig", {"damp": INF}, "damp, got inf"),
    ("share.config.ShareConfig", {"max_bond": 0}, "max_bond >= 1, got 0"),
    ("share.config.ShareConfig", {"budget": INF}, "budget"),
    ("share.config.ShareConfig", {"groups": 1.5}, "integer groups"),
    ("mpoe.config.MPOEConfig", {"max_bond": 0}, "max_bond >= 1, got 0"),
    ("mpoe.config.MPOEConfig", {"noise": NAN}, "noise, got nan"),
    ("mpoe.config.MPOEConfig", {"top_k": 0}, "top_k"),
    ("moefication.config.MoEficationConfig", {"router_lr": NAN}, "router_lr, got nan"),
    ("moefication.config.MoEficationConfig", {"top_k": 2.0}, "integer top_k"),
    ("moefication.config.MoEficationConfig", {"num_experts": 0}, "num_experts >= 1, got 0"),
])
def test_configs_reject_bad_values(cls, kwargs, needle):
    import importlib

    module, name = cls.rsplit(".", 1)
    config = getattr(importlib.import_module(f"mpokit.methods.{module}"), name)
    with pytest.raises(ValueError, match="expected") as exc:
        config(**kwargs)
    assert needle in str(exc.value)


def test_configs_accept_numpy_integers_and_json_round_trips():
    import numpy as np

    from mpokit.methods.base import config_from_dict
    from mpokit.methods.mpo.config import MPOConfig

    cfg = MPOConfig(max_bond=np.int64(4), num_cores=np.int32(3))
    assert config_from_dict(json.loads(json.dumps(MPOConfig(budget=1).to_dict()))).budget == 1
    assert cfg.max_bond == 4
