"""integrations/lm_eval_adapter: lm-evaluation-harness on mpokit models, offline.

The task is a local YAML over a local JSON-lines file (dataset_path: json + data_files), so the
harness runs with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set and every socket connection refused and
recorded: a test that reached the network fails. Its scores are checked against log-likelihoods
computed here from the model's own logits, with a negative control (the same rows with the labels
flipped score 1 - acc, which differs from acc on an odd number of rows).
(The adapter's two older tests moved here from test_abilities.py.)
"""
from __future__ import annotations

import json
import socket

import pytest
import torch
from torch import nn

from mpokit.cli.main import main
from mpokit.integrations.lm_eval_adapter import is_lm_eval_available
from test_abilities import tiny_llama_for, word_tokenizer

needs_lm_eval = pytest.mark.skipif(not is_lm_eval_available(), reason="lm-eval is not installed (pip install lm-eval)")

ROWS = [("a great film", 1), ("an awful film", 0), ("good", 1), ("the film was bad", 0), ("great", 1)]  # odd count
CHOICES = ("negative", "positive")
TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Review: {{{{sentence}}}} Sentiment:"
doc_to_choice: ["negative", "positive"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network: the hub's offline switches on (env and the already-imported flags), datasets' cache
    in tmp_path, and socket connections refused; yields the list of attempted connections."""
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    attempts = []

    def refuse(sock, address, *args):
        attempts.append(address)
        raise OSError(f"network access in an offline test: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield attempts
    assert attempts == [], f"the test tried to reach the network: {attempts}"


def write_task(folder, name: str, rows=ROWS):
    """A task YAML `name`.yaml over a JSON-lines file beside it (absolute path: data_files are read from the cwd)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"sentence": s, "label": y}) + "\n" for s, y in rows))
    path = folder / f"{name}.yaml"
    path.write_text(TASK_YAML.format(name=name, data=data))
    return path


@torch.no_grad()
def continuation_logprob(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) from the model's logits, as the harness defines it."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])  # (1, T)
    logp = torch.log_softmax(model(ids).logits[0].float(), -1)  # (T, V)
    return sum(logp[len(ctx) + i - 1, t].item() for i, t in enumerate(cont))


def quantized_tiny_model():
    from mpokit import compress_
    from mpokit.methods import QuantConfig

    tok = word_tokenizer()
    model = tiny_llama_for(tok)
    compress_(model, QuantConfig(bits=4, group_size=16), progress=False)
    return model, tok


@needs_lm_eval
def test_local_yaml_task_scores_like_the_model(offline, tmp_path):
    from mpokit.integrations.lm_eval_adapter import run_lm_eval

    model, tok = quantized_tiny_model()
    tasks = [write_task(tmp_path / "tasks", "tiny_sentiment"),
             write_task(tmp_path / "tasks", "tiny_sentiment_flipped", [(s, 1 - y) for s, y in ROWS])]
    res = run_lm_eval(model, [str(p) for p in tasks], tokenizer=tok, batch_size=2)
    lls = [[continuation_logprob(model, tok, f"Review: {s} Sentiment:", f" {c}") for c in CHOICES] for s, _ in ROWS]
    picked = [max(range(2), key=lambda k: ll[k]) for ll in lls]
    acc = sum(p == y for p, (_, y) in zip(picked, ROWS)) / len(ROWS)
    for sample in res["samples"]["tiny_sentiment"]:
        got = [r[0][0] for r in sample["resps"]]  # one (loglikelihood, is_greedy) per choice
        assert got == pytest.approx(lls[sample["doc_id"]], abs=1e-4)
    assert res["results"]["tiny_sentiment"]["acc,none"] == pytest.approx(acc)
    assert res["n-samples"]["tiny_sentiment"]["effective"] == len(ROWS)
    flipped = res["results"]["tiny_sentiment_flipped"]["acc,none"]
    assert flipped == pytest.approx(1 - acc) and flipped != pytest.approx(acc)  # the labels come from the file


@needs_lm_eval
def test_task_specs_are_checked_before_any_model(tmp_path):
    from mpokit.integrations.lm_eval_adapter import task_manager_for

    with pytest.raises(FileNotFoundError, match="no such lm-eval task file"):
        task_manager_for(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("dataset_path: json\n")
    with pytest.raises(ValueError, match="with a `task:`"):
        task_manager_for(str(tmp_path / "bad.yaml"))
    (tmp_path / "broken.yaml").write_text("task: [unclosed\n")
    with pytest.raises(ValueError, match="does not parse"):
        task_manager_for(str(tmp_path / "broken.yaml"))
    manager, names = task_manager_for(str(write_task(tmp_path / "ok", "tiny_ok")))
    assert names == ["tiny_ok"] and manager.all_tasks == ["tiny_ok"]  # the harness's own tasks not indexed


@pytest.fixture
def model_dir(tmp_path):
    """The tiny llama and its word tokenizer as a Hugging Face folder, plus a text for perplexity."""
    tok = word_tokenizer()
    model = tiny_llama_for(tok)
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    (tmp_path / "text.txt").write_text(" ".join(s for s, _ in ROWS * 8))
    return tmp_path


@needs_lm_eval
def test_cli_eval_runs_a_local_yaml_task(offline, model_dir, capsys):
    task = write_task(model_dir / "tasks", "tiny_sentiment")
    out = model_dir / "eval.json"
    assert main(["eval", str(model_dir / "hf"), "--text", str(model_dir / "text.txt"), "--tokens", "32",
                 "--context", "16", "--device", "cpu", "--lm-eval", str(task), "--lm-eval-limit", "3",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["perplexity"] > 1 and res["device"] == "cpu"  # the rest of the eval JSON is still there
    lm = res["lm_eval"]
    assert lm["tasks"] == [str(task)] and lm["limit"] == 3
    assert lm["n-samples"]["tiny_sentiment"]["effective"] == 3
    acc = lm["results"]["tiny_sentiment"]["acc,none"]
    assert acc in (0.0, 1 / 3, 2 / 3, 1.0)
    printed = capsys.readouterr().out
    assert "lm-eval" in printed and "tiny_sentiment" in printed and "acc" in printed


@needs_lm_eval
def test_cli_bad_task_name_is_one_line_exit_2(model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", str(model_dir / "hf"), "--text", str(model_dir / "text.txt"), "--lm-eval", "arc_easyy"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("mpokit: error: expected a registered lm-eval task") and "'arc_easyy'" in err
    assert "did you mean" in err and "arc_easy" in err


def test_cli_lm_eval_options_need_lm_eval(model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", str(model_dir / "hf"), "--lm-eval-limit", "3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--lm-eval-limit only with --lm-eval" in err


@needs_lm_eval
def test_lm_eval_adapter_scores_like_the_model():
    from lm_eval.api.instance import Instance

    from mpokit.integrations.lm_eval_adapter import mpokit_lm

    model, tok = quantized_tiny_model()
    lm = mpokit_lm(model, tok, batch_size=1)
    context, continuation = "the film was", " great"
    req = Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)
    (ll, _), = lm.loglikelihood([req])
    assert ll == pytest.approx(continuation_logprob(model, tok, context, continuation), abs=1e-4)


def test_lm_eval_adapter_says_how_to_install(monkeypatch):
    from mpokit.integrations import lm_eval_adapter

    monkeypatch.setattr(lm_eval_adapter, "is_lm_eval_available", lambda: False)
    with pytest.raises(ImportError, match="pip install lm-eval"):
        lm_eval_adapter.mpokit_lm(nn.Linear(2, 2))
