"""Issue 15, item 4: `finetune --resume` verifies Trainer checkpoints, falls back to the newest valid one
and says so, keeps a bounded number of them, and survives a SIGKILL at a random point of a fine-tune.

Run: .venv/bin/python -m pytest tests/test_faults_train.py -q
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from test_faults_cli import model_folder, words_text
from test_train import TEXT, Tok, _stop_at

from mpokit.train import TextWindows, fit
from mpokit.train.checkpoints import MANIFEST, ResumeError, trainer_checkpoints, verify_checkpoint

KW = dict(max_steps=4, batch_size=2, lr=5e-3, seed=3, save_steps=1)


def _data():
    return TextWindows(Tok(), TEXT, seq_len=16)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 4-step run's weights, and a run stopped after step 3 with checkpoints 1, 2, 3."""
    root = tmp_path_factory.mktemp("faults_train")
    torch.manual_seed(0)
    ref = tiny_llama()
    fit(ref, _data(), str(root / "ref"), **{**KW, "save_steps": None})
    torch.manual_seed(0)
    fit(tiny_llama(), _data(), str(root / "stopped"), callbacks=[_stop_at(3)], **KW)
    assert [p.name for p in trainer_checkpoints(root / "stopped")] == ["checkpoint-3", "checkpoint-2", "checkpoint-1"]
    assert all(verify_checkpoint(p) is None and (p / MANIFEST).is_file() for p in trainer_checkpoints(root / "stopped"))
    return {"ref": _weights(ref), "stopped": root / "stopped"}


def _copy(runs, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(runs["stopped"], run)
    return run


def _flip_bytes(path: Path, count: int = 64) -> None:
    """Corrupt `count` bytes near the end of a file (tensor data, not the header); the size stays."""
    data = bytearray(path.read_bytes())
    for k in range(len(data) - 200, len(data) - 200 + count):
        data[k] ^= 0x5A
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


DAMAGE = {
    "corrupt weights": lambda c: _flip_bytes(c / "model.safetensors"),
    "corrupt optimizer": lambda c: _flip_bytes(c / "optimizer.pt"),
    "truncated weights": lambda c: _truncate(c / "model.safetensors"),
    "no trainer_state.json": lambda c: (c / "trainer_state.json").unlink(),
    "no weights": lambda c: (c / "model.safetensors").unlink(),
    # written before this manifest existed, or killed between the Trainer's save and the manifest:
    # verified by loading every file in full
    "no manifest, truncated weights": lambda c: ((c / MANIFEST).unlink(), _truncate(c / "model.safetensors")),
    "no manifest, truncated optimizer": lambda c: ((c / MANIFEST).unlink(), _truncate(c / "optimizer.pt")),
    "no manifest, no optimizer": lambda c: ((c / MANIFEST).unlink(), (c / "optimizer.pt").unlink()),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_falls_back_to_the_newest_valid_checkpoint(runs, tmp_path, capsys, damage):
    run = _copy(runs, tmp_path)
    DAMAGE[damage](run / "checkpoint-3")
    assert verify_checkpoint(run / "checkpoint-3") is not None
    torch.manual_seed(123)  # a fresh process: other weights until the checkpoint is loaded
    model = tiny_llama()
    res = fit(model, _data(), str(run), resume=True, **KW)
    err = capsys.readouterr().err
    assert res.global_step == 4 and res.resumed_from == str(run / "checkpoint-2")
    assert f"skipping checkpoint {run / 'checkpoint-3'}" in err and f"resuming from {run / 'checkpoint-2'}" in err
    assert "Traceback" not in err
    _assert_same(_weights(model), runs["ref"])  # exactly the uninterrupted run: nothing of the bad checkpoint used
    # the bad folder is kept aside (Trainer ignores it) and the kept checkpoints stay bounded (default 3)
    assert (run / "invalid-checkpoint-3").is_dir()
    assert [p.name for p in trainer_checkpoints(run)] == ["checkpoint-4", "checkpoint-3", "checkpoint-2"]
    assert all(verify_checkpoint(p) is None for p in trainer_checkpoints(run))


def test_a_valid_checkpoint_without_manifest_is_used(runs, tmp_path, capsys):
    run = _copy(runs, tmp_path)
    (run / "checkpoint-3" / MANIFEST).unlink()  # killed right after the Trainer's save
    assert verify_checkpoint(run / "checkpoint-3") is None  # full load
    model = tiny_llama()
    res = fit(model, _data(), str(run), resume=True, **KW)
    assert res.resumed_from == str(run / "checkpoint-3") and "skipping" not in capsys.readouterr().err
    _assert_same(_weights(model), runs["ref"])


def test_no_valid_checkpoint_starts_afresh_and_says_so(runs, tmp_path, capsys):
    run = _copy(runs, tmp_path)
    for c in trainer_checkpoints(run):
        _flip_bytes(c / "model.safetensors")
    torch.manual_seed(0)
    model = tiny_llama()
    res = fit(model, _data(), str(run), resume=True, **KW)
    err = capsys.readouterr().err
    assert res.resumed_from is None and res.global_step == 4
    assert err.count("skipping checkpoint") == 3 and "no valid checkpoint" in err and "starts from step 0" in err
    _assert_same(_weights(model), runs["ref"])  # from the same start as the reference


def test_resume_with_no_checkpoint_says_so(tmp_path, capsys):
    res = fit(tiny_llama(), _data(), str(tmp_path / "new"), resume=True, **{**KW, "max_steps": 1})
    assert res.global_step == 1 and "no checkpoint in" in capsys.readouterr().err


def test_an_explicit_bad_checkpoint_is_refused(runs, tmp_path):
    run = _copy(runs, tmp_path)
    _truncate(run / "checkpoint-3" / "model.safetensors")
    with pytest.raises(ResumeError, match=r"cannot resume from .*checkpoint-3: model.safetensors has \d+ bytes"):
        fit(tiny_llama(), _data(), str(run), resume=str(run / "checkpoint-3"), **KW)
    with pytest.raises(FileNotFoundError, match="missing checkpoint"):
        fit(tiny_llama(), _data(), str(run), resume=str(run / "checkpoint-9"), **KW)
    assert (run / "checkpoint-3").is_dir()  # an explicit path is never moved


def test_save_total_limit(tmp_path):
    fit(tiny_llama(), _data(), str(tmp_path / "r"), save_total_limit=2, **KW)
    assert [p.name for p in trainer_checkpoints(tmp_path / "r")] == ["checkpoint-4", "checkpoint-3"]
    with pytest.raises(ValueError, match="save_total_limit"):
        fit(tiny_llama(), _data(), str(tmp_path / "r"), save_total_limit=0, **KW)


# ---- the CLI: a SIGKILL at a random point of a fine-tune, then --resume -------------------------------------------

MAX_STEPS = 10


def _finetune_argv(root: Path, out: Path) -> list[str]:
    return ["finetune", str(root / "hf"), "--method", "full", "--task", "lm", "--data", str(root / "text.txt"),
            "--max-steps", str(MAX_STEPS), "--batch-size", "2", "--seq-len", "16", "--tokens", "64", "--context", "32",
            "--lr", "5e-3", "--save-steps", "1", "--out", str(out)]


def _saved_weights(path: Path) -> dict[str, torch.Tensor]:
    from mpokit.io.checkpoint import load_compressed

    return _weights(load_compressed(path))


def test_sigkill_during_finetune_then_resume(tmp_path, capsys):
    from mpokit.cli.main import main

    model_folder(tmp_path / "hf")
    (tmp_path / "text.txt").write_text(words_text(400))
    seed = int(time.time() * 1000) % 100_000
    rng = random.Random(seed)
    kill_after = rng.randint(2, MAX_STEPS - 3)  # checkpoint-N seen before the kill (it may still be being written)
    delay = rng.uniform(0.0, 0.3)  # then somewhere in the next steps: a save, a step, a manifest
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "killed.log"
    with open(log, "wb") as f:  # a file, not a pipe: a full pipe would stall the child
        proc = subprocess.Popen([sys.executable, "-m", "mpokit.cli.main", *_finetune_argv(tmp_path, out)], env=env,
                                stdout=subprocess.DEVNULL, stderr=f)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            steps = [int(p.name.split("-")[1]) for p in trainer_checkpoints(out / "trainer")]
            if steps and max(steps) >= kill_after:
                break
            time.sleep(0.01)
        time.sleep(delay)
        assert proc.poll() is None, f"the fine-tune ended before the kill (seed {seed}): {log.read_text()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    if (out / "model").exists():  # on an idle machine the kill may land after training, in the final save
        _saved_weights(out / "model")  # then what is there is whole (atomic save), or loading raises

    # resume (in this process: one interpreter start less) and an uninterrupted reference run
    assert main([*_finetune_argv(tmp_path, out), "--resume", "--json", str(tmp_path / "resumed.json")]) == 0, seed
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert main([*_finetune_argv(tmp_path, tmp_path / "ref"), "--json", str(tmp_path / "ref.json")]) == 0
    resumed, ref = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("resumed", "ref"))
    assert resumed["global_step"] == ref["global_step"] == MAX_STEPS
    assert resumed["resumed_from"] is not None, (seed, err)
    assert int(Path(resumed["resumed_from"]).name.split("-")[1]) >= kill_after - 1, (seed, resumed["resumed_from"])
    _assert_same(_saved_weights(Path(resumed["saved"])), _saved_weights(Path(ref["saved"])))
    assert resumed["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-4)
    assert len(trainer_checkpoints(out / "trainer")) <= 3  # --save-total-limit default


def test_resume_of_a_finished_run_takes_no_extra_step(tmp_path, capsys):
    """Trainer resumed at its final checkpoint takes one step past max_steps; fit loads it instead."""
    from mpokit.cli.main import main

    model_folder(tmp_path / "hf")
    (tmp_path / "text.txt").write_text(words_text(400))
    out = tmp_path / "run"
    assert main([*_finetune_argv(tmp_path, out), "--json", str(tmp_path / "first.json")]) == 0
    first = _saved_weights(out / "model")
    assert main([*_finetune_argv(tmp_path, out), "--resume", "--json", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["global_step"] == MAX_STEPS and again["resumed_from"] is not None
    _assert_same(_saved_weights(out / "model"), first)
