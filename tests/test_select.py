"""Stable-rank calibration of PEFT: stable rank math, where (selection) and when (the time-aware start)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mpokit.methods.lora import LoRAConfig
from mpokit.methods.mpop import MPOPConfig
from mpokit.methods.selection import (StartGate, effective_weight, fisher_scores, select_count,
                                      stable_rank_start_callback)
from mpokit.ops.stable_rank import relative_change, settled, stable_rank


def test_stable_rank_of_known_matrices():
    assert stable_rank(torch.eye(7)) == pytest.approx(7, rel=1e-6)
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    assert stable_rank(q) == pytest.approx(16, rel=1e-6)  # orthogonal: every singular value 1
    assert stable_rank(torch.outer(torch.randn(9), torch.randn(5))) == pytest.approx(1, rel=1e-6)
    assert stable_rank(torch.diag(torch.tensor([2.0, 1.0, 1.0]))) == pytest.approx(1.5, rel=1e-6)  # (4+1+1)/4
    assert stable_rank(torch.zeros(3, 4)) == 0.0
    w = torch.randn(12, 8)
    assert 1 <= stable_rank(w) <= 8 and stable_rank(w) != pytest.approx(8, rel=1e-3)  # not trivially the rank
    with pytest.raises(ValueError, match="2-D"):
        stable_rank(torch.ones(3))


def test_relative_change_and_settled():
    assert relative_change([1.0, 2.0], 2) == float("inf")  # not enough points yet
    assert relative_change([4.0, 2.0, 2.2, 2.1], 2) == pytest.approx(0.1)  # from 2.0: max |2.2 - 2| / 2
    assert settled([5.0, 5.01, 5.02], 0.01, 2) and not settled([5.0, 5.1, 5.2], 0.01, 2)


def _model_of_known_ranks() -> nn.Module:
    """Four 8x8 Linear layers of stable rank 8, 1, 2, 4 (in that order)."""
    model = nn.ModuleDict({k: nn.Linear(8, 8) for k in ("a", "b", "c", "d")})
    with torch.no_grad():
        model["a"].weight.copy_(torch.eye(8))
        model["b"].weight.copy_(torch.outer(torch.randn(8), torch.randn(8)))
        model["c"].weight.copy_(torch.diag(torch.tensor([3.0, 3.0, 0, 0, 0, 0, 0, 0])))
        model["d"].weight.copy_(torch.diag(torch.tensor([1.0] * 4 + [0.0] * 4)))
    return model


def test_stable_rank_selection_picks_the_expected_modules():
    model, names = _model_of_known_ranks(), ["a", "b", "c", "d"]
    high, rec = LoRAConfig(select="stable-rank", select_fraction=0.5).choose(model, names, None)
    assert high == ["a", "d"] and rec["order"] == "high" and rec["scores"]["a"] == pytest.approx(8)  # the default
    low, _ = LoRAConfig(select="stable-rank", select_fraction=0.5, select_order="low").choose(model, names, None)
    assert low == ["b", "c"]
    assert LoRAConfig(select="stable-rank", select_fraction=0.25, select_order="low").choose(
        model, names, None)[0] == ["b"]
    assert LoRAConfig().choose(model, names, None)[0] == names  # "all": every candidate
    assert MPOPConfig(select="stable-rank", select_fraction=0.75).choose(model, names, None)[0] == ["a", "c", "d"]


def test_fractions():
    assert [select_count(f, 24) for f in (0.25, 0.5, 1.0, 0.01)] == [6, 12, 24, 1]
    assert select_count(0.3, 5) == 2 and select_count(0.9, 1) == 1
    for bad in (0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="select_fraction"):
            select_count(bad, 10)
    with pytest.raises(ValueError, match="select_fraction"):
        LoRAConfig(select="random", select_fraction=0.0)


def test_random_selection_is_seeded():
    model, names = nn.ModuleDict({f"l{k}": nn.Linear(4, 4) for k in range(12)}), [f"l{k}" for k in range(12)]

    def draw(seed):
        return LoRAConfig(select="random", select_fraction=0.25, select_seed=seed).choose(model, names, None)[0]

    assert draw(3) == draw(3) and len(draw(3)) == 3
    assert draw(3) == [n for n in names if n in draw(3)]  # model order
    assert len({tuple(draw(s)) for s in range(5)}) > 1  # negative control: the seed matters


class _Dead(nn.Module):
    """Two live layers and one whose output is multiplied by zero (zero gradient, not None)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.dead = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, y):
        h = self.b(torch.relu(self.a(x))) + 0.0 * self.dead(x)
        return SimpleNamespace(loss=((h - y) ** 2).mean())


def test_fisher_ranks_a_zero_gradient_module_last():
    model = _Dead()
    model.requires_grad_(False)
    batches = [{"x": torch.randn(8, 4), "y": torch.randn(8, 4)} for _ in range(2)]
    scores = fisher_scores(model, ["dead", "a", "b"], batches)
    assert scores["dead"] == 0.0 and scores["a"] > 0 and scores["b"] > 0
    assert not any(p.requires_grad for p in model.parameters())  # flags restored
    assert all(p.grad is None for p in model.parameters())
    cfg = LoRAConfig(select="fisher", select_fraction=2 / 3)
    ctx = SimpleNamespace(train=[{"x": b["x"][k], "y": b["y"][k]} for b in batches for k in range(8)],
                          collator=None, batch_size=8)
    chosen, rec = cfg.choose(model, ["dead", "a", "b"], ctx)
    assert chosen == ["a", "b"] and rec["scores"]["dead"] == 0.0


def test_start_gate_waits_for_the_trajectory_to_settle():
    gate = StartGate(threshold=0.01, window=3, lr_scale=0.1)
    trajectory = [10.0, 8.0, 6.5, 5.6, 5.3, 5.25, 5.24, 5.24, 5.24, 5.24]
    opened = [gate.observe(v, step) for step, v in enumerate(trajectory, start=1)]
    # within 1% over 3 steps first at step 9 (from 5.25: 5.24, 5.24, 5.24); step 8 moved 1.1% (from 5.3)
    assert opened.index(True) == 8 and gate.start_step == 10 and len(gate.trajectory) == 9
    drifting = StartGate(threshold=0.01, window=3, lr_scale=0.1)  # negative control: 5% a step never settles
    assert not any(drifting.observe(10 * 0.95 ** k, k) for k in range(1, 40)) and drifting.start_step is None
    for bad in ({"threshold": 0}, {"window": 0}, {"lr_scale": 0}, {"lr_scale": 1.5}):
        with pytest.raises(ValueError):
            StartGate(**{"threshold": 0.01, "window": 3, "lr_scale": 0.1, **bad})


def test_start_callback_scales_lr_until_settled():
    layer = nn.Linear(6, 6)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    gate = StartGate(threshold=1e-3, window=2, lr_scale=0.1)
    cb = stable_rank_start_callback(gate, [layer])
    seen = []
    for step in range(1, 6):  # a constant weight: settled once window + 1 values are in (after step 3)
        cb.on_pre_optimizer_step(None, None, None, optimizer=opt)
        seen.append(opt.param_groups[0]["lr"])
        cb.on_optimizer_step(None, None, None, optimizer=opt)
        assert opt.param_groups[0]["lr"] == 0.5  # the schedule's LR is given back after each step
        cb.on_step_end(None, SimpleNamespace(global_step=step), None)
    assert seen == pytest.approx([0.05, 0.05, 0.05, 0.5, 0.5]) and gate.start_step == 4
    assert gate.trajectory == pytest.approx([stable_rank(layer.weight)] * 3)


def test_config_flags_are_checked():
    with pytest.raises(ValueError, match="--select-fraction"):
        LoRAConfig(select_fraction=0.5)  # --select all uses no fraction
    with pytest.raises(ValueError, match="--select-order"):
        LoRAConfig(select="random", select_order="low")
    with pytest.raises(ValueError, match="--start-window"):
        MPOPConfig(start_window=3)
    with pytest.raises(ValueError, match="squeeze"):
        MPOPConfig(select="random", squeeze_bond=2)
    cfg = LoRAConfig(select="stable-rank", select_fraction=0.5, start="stable-rank", start_window=3)
    assert LoRAConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_cli_flags_parse_and_a_bad_fraction_is_exit_2(tmp_path, capsys):
    from mpokit.cli.main import main

    base = ["finetune", "--method", "lora", "--task", "sst2", "--data", str(tmp_path), "--max-steps", "1",
            "--out", str(tmp_path / "o")]
    for bad in (["--select", "random", "--select-fraction", "0"], ["--select", "random", "--select-fraction", "2"],
                ["--select-fraction", "0.5"], ["--select", "best"]):
        with pytest.raises(SystemExit) as exc:
            main(base + bad)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and err.startswith("mpokit: error:") and "\n" not in err, (bad, err)
    assert not (tmp_path / "o").exists()


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("method", ["lora", "mpop"])
def test_finetune_trains_only_the_selected_modules(tmp_path, method):
    pytest.importorskip("peft")
    from test_train import _tiny_folder
    from transformers import AutoModelForSequenceClassification

    from mpokit.cli.main import main
    from mpokit.io.checkpoint import load_compressed
    from mpokit.layers.mpo import MPOLinear
    from mpokit.train.data import shared_data_dir

    folder = _tiny_folder(tmp_path, "bert")
    before = _weights(AutoModelForSequenceClassification.from_pretrained(folder))
    from mpokit.surgery.targets import DEFAULT_TARGETS

    # LoRA: the four attention matrices; MPOP: its default targets (every encoder Linear, six in one layer)
    targets = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"]
    flags = ["--lora-targets", ",".join(targets)] if method == "lora" else []
    targets = targets if method == "lora" else DEFAULT_TARGETS["bert"]
    start = ["--start", "stable-rank", "--start-window", "2", "--start-threshold", "0.5"] if method == "lora" else []
    rc = main(["finetune", str(folder), "--method", method, "--task", "sst2", "--data", str(shared_data_dir() / "sst2"),
               "--max-steps", "4", "--batch-size", "4", "--seq-len", "24", "--train-limit", "16", "--eval-limit", "8",
               "--lr", "0.01", "--select", "stable-rank", "--select-fraction", "0.5", *flags, *start,
               "--out", str(tmp_path / "out"), "--json", str(tmp_path / "r.json")])
    assert rc == 0
    r = json.loads((tmp_path / "r.json").read_text())
    selected = r["selected"]
    assert len(selected) == len(targets) // 2 and r["selection"]["candidates"] == len(targets)
    scores = r["selection"]["scores"]
    assert min(scores[n] for n in selected) >= max(v for n, v in scores.items() if n not in selected)  # "high"
    saved = load_compressed(r["saved"])
    after = {n: saved.get_submodule(n) for n in before}
    for name in (n for n in before if any(n.endswith(t) for t in targets)):
        module = after[name]
        weight = module.weight.detach()
        if name in selected:  # trained: LoRA merged into W, or MPO cores moved
            assert isinstance(module, MPOLinear) == (method == "mpop")
            assert not torch.allclose(weight, before[name], atol=1e-6), name
        else:  # negative control: the unselected candidates are untouched
            assert type(module) is nn.Linear and torch.equal(weight, before[name]), name
    if method == "lora":
        assert r["start"]["start_step"] is not None and len(r["start"]["trajectory"]) == r["start"]["start_step"] - 1
        assert r["trainable_params"] == 2 * 8 * (32 + 32) + 32 * 2 + 2  # two rank-8 adapters + classifier head


def test_lora_selection_sets_requires_grad_on_llama():
    pytest.importorskip("peft")
    from conftest import tiny_llama

    model = tiny_llama()
    ctx = SimpleNamespace(task="lm", train=[], collator=None, batch_size=2, head=[])
    cfg = LoRAConfig(select="stable-rank", select_fraction=0.5, rank=2,
                     targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    prepared = cfg.prepare(model, ctx)
    selected = prepared.info["selected"]
    assert len(selected) == 4 and prepared.info["selection"]["candidates"] == 8
    trainable = {n for n, p in prepared.model.named_parameters() if p.requires_grad}
    adapted = {n.split(".lora_")[0].removeprefix("base_model.model.") for n in trainable}
    assert adapted == set(selected) and all(".lora_" in n for n in trainable)
    w = effective_weight(prepared.model.get_submodule("base_model.model." + selected[0]))
    assert torch.equal(w, model.get_submodule(selected[0]).get_base_layer().weight)  # B = 0 at the start
