import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ByteTokenizer as Tok, tiny_llama
from mpokit.train import TextWindows, count_trainable, fit, read_sst2, shared_data_dir, train_only_

TEXT = "a stitch in time saves nine; many hands make light work. " * 30


def _stop_at(step):
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= step:
                control.should_training_stop = True  # the "kill": ends the run right after the checkpoint
            return control

    return Stop()


def test_text_windows():
    ds = TextWindows(Tok(), TEXT, seq_len=32, max_windows=5)
    assert len(ds) == 5 and ds[0]["input_ids"].shape == (32,)
    assert torch.equal(ds[1]["input_ids"], ds[1]["labels"])
    with pytest.raises(ValueError, match="at least"):
        TextWindows(Tok(), "short", seq_len=32)


def test_sst2_reader():
    rows = read_sst2(shared_data_dir() / "sst2" / "dev.tsv", limit=7)
    assert len(rows) == 7 and {y for y, _ in rows} <= {0, 1} and all(isinstance(s, str) and s for _, s in rows)
    with pytest.raises(FileNotFoundError):
        read_sst2(shared_data_dir() / "sst2" / "nope.tsv")


def test_train_only_counts_and_freezes():
    model = tiny_llama()
    head = model.model.layers[0].mlp.up_proj.weight
    assert train_only_(model, [head]) == head.numel() == count_trainable(model)
    with pytest.raises(ValueError):
        train_only_(model, [])


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    data = TextWindows(Tok(), TEXT, seq_len=16)
    kw = dict(max_steps=6, batch_size=2, lr=5e-3, seed=3)

    torch.manual_seed(0)
    ref = tiny_llama()
    full = fit(ref, data, str(tmp_path / "ref"), **kw)

    torch.manual_seed(0)
    model = tiny_llama()
    first = fit(model, data, str(tmp_path / "run"), save_steps=3, callbacks=[_stop_at(3)], **kw)
    assert first.global_step == 3
    ckpt = tmp_path / "run" / "checkpoint-3"
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "trainer_state.json").is_file()
    torch.manual_seed(123)  # a fresh process: different RNG, fresh weights
    model2 = tiny_llama()
    second = fit(model2, data, str(tmp_path / "run"), resume=True, **kw)
    assert second.global_step == 6
    assert first.losses[:3] == pytest.approx(full.losses[:3], rel=1e-5)
    assert second.losses[-3:] == pytest.approx(full.losses[-3:], rel=1e-4)
    for (n, p), q in zip(ref.named_parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=n)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 3


def test_resume_without_checkpoint_would_differ(tmp_path):
    # negative control: a run restarted from scratch for 3 steps does not reproduce the 6-step weights
    data = TextWindows(Tok(), TEXT, seq_len=16)
    torch.manual_seed(0)
    a = tiny_llama()
    fit(a, data, str(tmp_path / "a"), max_steps=6, batch_size=2, lr=5e-3, seed=3)
    torch.manual_seed(0)
    b = tiny_llama()
    fit(b, data, str(tmp_path / "b"), max_steps=3, batch_size=2, lr=5e-3, seed=3)
    assert not torch.allclose(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)


DDP_SCRIPT = r'''
import json, os, sys, torch
sys.path.insert(0, sys.argv[2])
torch.manual_seed(0)
from conftest import ByteTokenizer as Tok, tiny_llama
from mpokit.train import TextWindows, fit
from mpokit.methods.mpop import decompose_, mpop_


model = tiny_llama()
decompose_(model, target_modules=["up_proj"])
mpop_(model)
res = fit(model, TextWindows(Tok(), "hello distributed world. " * 40, seq_len=16), sys.argv[1], max_steps=2,
          batch_size=2, lr=1e-3)
import torch.distributed as dist
out = {"world": dist.get_world_size() if dist.is_initialized() else 1, "backend": dist.get_backend() if dist.is_initialized() else None,
       "step": res.global_step, "sum": float(sum(p.detach().sum() for p in model.parameters()))}
with open(os.path.join(sys.argv[1], f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
    json.dump(out, f)
'''


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path):
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if launcher is None:
        pytest.skip("accelerate launch is unavailable")
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    # `--cpu` selects accelerate's single-process launcher; `--multi_gpu` goes through torchrun, and with no
    # CUDA device torch.distributed falls back to gloo on CPU (checked below).
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", "29533", str(script), str(tmp_path), str(Path(__file__).parent)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["backend"] == "gloo" and r["step"] == 2 for r in ranks)
    assert ranks[0]["sum"] == pytest.approx(ranks[1]["sum"], rel=1e-6)  # DDP kept replicas in sync


def _tiny_folder(tmp_path, kind):
    """A tiny HF model folder that uses the embedded MiniLM tokenizer (no network)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from mpokit.io.models import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(
            vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64, num_labels=2))
    else:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True))
    path = tmp_path / kind
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("method", ["mpop", "opf", "lora", "full"])
def test_cli_finetune_sst2(tmp_path, method):
    from mpokit.cli.main import main
    from mpokit.io.checkpoint import load_compressed

    if method == "lora":
        pytest.importorskip("peft")
    model_dir = _tiny_folder(tmp_path, "bert")
    out_json = tmp_path / "r.json"
    rc = main(["finetune", str(model_dir), "--method", method, "--task", "sst2", "--data", str(shared_data_dir() / "sst2"),
               "--max-steps", "2", "--batch-size", "4", "--seq-len", "24", "--train-limit", "16", "--eval-limit", "16",
               *(["--opf-count", "1"] if method == "opf" else []), "--out", str(tmp_path / "out"),
               "--json", str(out_json)])
    assert rc == 0
    r = json.loads(out_json.read_text())
    assert 0 <= r["accuracy"] <= 1 and r["global_step"] == 2 and r["eval_rows"] == 16
    assert 0 < r["trainable_params"] <= r["params"] if method != "opf" else r["trainable_params"] > r["params"]
    if method in ("mpop", "lora"):
        assert r["trainable_params"] < 0.5 * r["params"]
    saved = load_compressed(r["saved"])
    if method == "opf":  # contracted back: the original architecture
        assert len(r["selected"]) == 1
        assert type(saved.get_submodule(r["selected"][0])) is torch.nn.Linear


def test_cli_finetune_lm_recover_needs_compressed_model(tmp_path):
    from mpokit.cli.main import main

    model_dir = _tiny_folder(tmp_path, "llama")
    text = tmp_path / "t.txt"
    text.write_text((shared_data_dir() / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[:20000])
    base = ["finetune", str(model_dir), "--task", "lm", "--data", str(text), "--max-steps", "2", "--batch-size", "2",
            "--seq-len", "32", "--tokens", "256", "--context", "64", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit):
        main(base + ["--method", "recover"])
    rc = main(base + ["--method", "mpop", "--squeeze-bond", "4", "--squeeze-steps", "2", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["perplexity"] > 1 and r["squeeze"][-1]["max_bond"] == 4


def test_cli_finetune_recover_compressed_checkpoint(tmp_path):
    from mpokit.cli.main import main
    from mpokit.io.checkpoint import save_compressed
    from mpokit.io.models import load_model
    from mpokit.methods.base import compress_
    from mpokit.methods.mpo import MPOConfig

    loaded = load_model(str(_tiny_folder(tmp_path, "llama")))
    compress_(loaded.model, MPOConfig(target_modules=["up_proj", "down_proj"], budget=0.5), progress=False)
    # the source recorded as mpokit compress does: recover distils from it by default
    ckpt = save_compressed(loaded.model, tmp_path / "ckpt", tokenizer=loaded.tokenizer, extra={"source": loaded.source})
    text = tmp_path / "t.txt"
    text.write_text((shared_data_dir() / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[:20000])
    rc = main(["finetune", str(ckpt), "--method", "recover", "--task", "lm", "--data", str(text), "--max-steps", "2",
               "--batch-size", "2", "--seq-len", "32", "--tokens", "256", "--context", "64", "--out", str(tmp_path / "o"),
               "--json", str(tmp_path / "r.json")])
    assert rc == 0
    r = json.loads((tmp_path / "r.json").read_text())
    cores = sum(p.numel() for n, p in loaded.model.named_parameters() if ".cores." in n)
    assert r["trainable_params"] == cores and r["perplexity"] > 1


def test_fit_time_limit_and_grad_accum(tmp_path):
    model = tiny_llama()
    ds = TextWindows(Tok(), TEXT, seq_len=16)
    full = fit(model, ds, str(tmp_path / "a"), max_steps=3, batch_size=2, grad_accum=2, lr=1e-3,
               lr_scheduler="cosine", warmup_steps=1)
    assert full.global_step == 3 and not full.stopped_by_time and full.seconds > 0  # negative control
    cut = fit(model, ds, str(tmp_path / "b"), max_steps=50, batch_size=2, lr=1e-3, max_minutes=1e-6)
    assert cut.global_step == 1 and cut.stopped_by_time
    with pytest.raises(ValueError, match="grad_accum"):
        fit(model, ds, str(tmp_path / "c"), max_steps=1, grad_accum=0)


def test_a_time_budget_fits_the_schedule_only_when_the_clock_comes_first(monkeypatch):
    """--max-minutes: after warmup the schedule follows max(step, elapsed fraction x max_steps): cosine is at
    half its rate half-way through the minutes, 0 at the limit; a run ahead of the clock follows its steps."""
    from transformers import get_cosine_schedule_with_warmup

    from mpokit.train import trainer as trainer_mod

    clock = [0.0]
    monkeypatch.setattr(trainer_mod.time, "perf_counter", lambda: clock[0])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=100)
    trainer_mod._fit_schedule_to_time(sched, 100, 2, budget_s=10.0)
    f = sched.lr_lambdas[0]
    plain = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=100).lr_lambdas[0]
    clock[0] = 5.0
    assert f(1) == pytest.approx(plain(1))  # warmup follows steps alone
    assert f(10) == pytest.approx(plain(50)) and plain(50) < 0.55 < 0.95 < plain(10)  # half the minutes: step 50
    clock[0] = 10.0
    assert f(11) == pytest.approx(0.0, abs=1e-12)  # the limit: annealed
    clock[0] = 1.0
    assert f(60) == pytest.approx(plain(60))  # ahead of the clock: the step schedule, unchanged


def test_a_new_training_method_needs_only_its_config(tmp_path):
    """A fine-tuning method defined anywhere (here: in this test) is offered by `mpokit finetune`, with its own
    flag, and runs through load -> prepare -> fit -> finish -> evaluate -> save: no other file changes."""
    from dataclasses import dataclass
    from typing import ClassVar

    from mpokit.cli.main import main
    from mpokit.methods.base import METHODS, option
    from mpokit.methods.finetune import FinetuneConfig, Prepared
    from mpokit.surgery.params import train_only_

    finished = []

    @dataclass
    class HeadOnlyConfig(FinetuneConfig):
        method: ClassVar[str] = "head-only-test"
        scale: float = option(1.0, "scale of the head at the end", type=float)

        def prepare(self, model, ctx):
            train_only_(model, ctx.head)
            return Prepared(model, info={"head_tensors": len(ctx.head)})

        def finish(self, model):
            finished.append(self.scale)
            return model

    try:
        model_dir = _tiny_folder(tmp_path, "bert")
        out_json = tmp_path / "r.json"
        rc = main(["finetune", str(model_dir), "--method", "head-only-test", "--scale", "0.5", "--task", "sst2",
                   "--data", str(shared_data_dir() / "sst2"), "--max-steps", "1", "--batch-size", "4", "--seq-len",
                   "24", "--train-limit", "8", "--eval-limit", "8", "--out", str(tmp_path / "out"),
                   "--json", str(out_json)])
        r = json.loads(out_json.read_text())
        assert rc == 0 and finished == [0.5] and r["method"] == "head-only-test" and r["head_tensors"] == 2
        assert 0 < r["trainable_params"] < 0.01 * r["params"]  # the classifier head only
    finally:
        METHODS.pop("head-only-test", None)
