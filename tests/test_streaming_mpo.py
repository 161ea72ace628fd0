"""The data-free MPO method on a block-streamed model (io/lazy.py): two passes over the blocks (spectra,
plan, decompose), one block resident at a time, bit-identical to compressing the model in memory."""
from __future__ import annotations

import json
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM

import mpokit
from mpokit.io.lazy import load_streamed
from mpokit.methods.mpo import transform
from mpokit.surgery.offload import detach_offload, offload_of
from test_streaming import saved  # noqa: F401 (a fixture: the same tiny Llamas, tied and untied, as files)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sorted(sa) == sorted(sb) and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def _rows(report) -> list[tuple]:
    return [(r.name, r.kind, r.shape, r.params_after, r.rel_error, json.dumps(r.detail, sort_keys=True))
            for r in report.layers]


# the default Llama targets plus the layers outside the blocks (tied in the "tied" model: lm_head shares the cores)
WITH_EMBEDDINGS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens",
                   "lm_head"]

CONFIGS = {
    "budget": lambda: mpokit.MPOConfig(budget=0.5),
    "budget-with-embeddings": lambda: mpokit.MPOConfig(budget=0.5, target_modules=WITH_EMBEDDINGS),
    "budget-lowrank": lambda: mpokit.MPOConfig(budget=0.4, lowrank=True),
    "max-bond-with-embeddings": lambda: mpokit.MPOConfig(max_bond=4, target_modules=WITH_EMBEDDINGS),
    "cutoff": lambda: mpokit.MPOConfig(cutoff=0.3, num_cores=2),
    "lossless-keeps-dense": lambda: mpokit.MPOConfig(budget=1.0),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_streamed_mpo_is_bit_identical_to_in_memory(saved, name):
    model, path = saved
    report = mpokit.compress_(model, CONFIGS[name](), progress=False)
    streamed = load_streamed(path, AutoModelForCausalLM)
    streamed_report = mpokit.compress_(streamed, CONFIGS[name](), progress=False)
    off = offload_of(streamed)
    originals = [p for p in streamed.model.layers.parameters() if id(p) in off.key_of]
    assert all(p.is_meta for p in originals)  # the block weights left were dropped again after each pass
    assert _rows(streamed_report) == _rows(report)
    assert streamed_report.extra == report.extra
    detach_offload(streamed)
    assert _same_state(streamed, model)
    x = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(streamed(x).logits, model(x).logits)


def test_a_different_budget_gives_a_different_state(saved):
    """Negative control: the comparison above does fail when the compressions differ."""
    model, path = saved
    mpokit.compress_(model, mpokit.MPOConfig(budget=0.5), progress=False)
    streamed = load_streamed(path, AutoModelForCausalLM)
    mpokit.compress_(streamed, mpokit.MPOConfig(budget=0.45), progress=False)
    detach_offload(streamed)
    assert not _same_state(streamed, model)


def _watch_tt_svd(monkeypatch, blocks, off):
    """Patch transform.tt_svd to record, at each call, (blocks with original weights loaded,
    untruncated decompositions of earlier calls still alive)."""
    seen, live = [], weakref.WeakSet()
    real = transform.tt_svd

    def watched(*a, **kw):
        loaded = sum(any(id(p) in off.key_of and not p.is_meta for p in b.parameters()) for b in blocks) if off else 0
        seen.append((loaded, len(live)))
        cores, info = real(*a, **kw)
        live.add(cores[-1])  # one tensor per decomposition
        return cores, info

    monkeypatch.setattr(transform, "tt_svd", watched)
    return seen


def test_one_block_and_one_decomposition_in_memory_at_a_time(saved, monkeypatch):
    """Every TT-SVD (two per matrix: pass 1 for its spectra, pass 2 to truncate) runs with at most one
    block's original weights loaded, and with no earlier untruncated decomposition still alive."""
    _, path = saved
    streamed = load_streamed(path, AutoModelForCausalLM)
    seen = _watch_tt_svd(monkeypatch, list(streamed.model.layers), offload_of(streamed))
    report = mpokit.compress_(streamed, mpokit.MPOConfig(budget=0.5, target_modules=WITH_EMBEDDINGS), progress=False)
    matrices = len(report.layers)  # one matrix per Linear / Embedding (a tied head is no extra matrix)
    assert len(seen) == 2 * matrices
    assert max(b for b, _ in seen) == 1 and max(n for _, n in seen) == 0
    assert [b for b, _ in seen].count(0) > 0  # embeddings / head: outside the blocks, no block loaded for them


def test_whole_model_path_decomposes_once_and_holds_every_decomposition(saved, monkeypatch):
    """The in-memory path is unchanged: one TT-SVD per matrix, all held until the plan is made
    (also the negative control of the liveness check above)."""
    model, _ = saved
    seen = _watch_tt_svd(monkeypatch, [], None)
    report = mpokit.compress_(model, mpokit.MPOConfig(budget=0.5, target_modules=WITH_EMBEDDINGS), progress=False)
    assert len(seen) == len(report.layers)
    assert [n for _, n in seen] == list(range(len(seen)))


def test_cli_streams_mpo_datafree_by_default_and_matches_the_whole_load(tmp_path):
    from test_cli import save_model_and_text

    from mpokit.cli.main import main
    from mpokit.io.checkpoint import load_compressed

    save_model_and_text(tmp_path, 50)
    common = ["compress", "--model", str(tmp_path / "hf"), "--method", "mpo-datafree", "--budget", "0.5"]
    for mode, extra in (("stream", []), ("whole", ["--no-stream"])):
        assert main([*common, *extra, "--out", str(tmp_path / mode), "--json", str(tmp_path / f"{mode}.json")]) == 0
    reports = {m: json.loads((tmp_path / f"{m}.json").read_text()) for m in ("stream", "whole")}
    assert reports["stream"]["streamed"] and not reports["whole"]["streamed"]
    assert reports["stream"]["params_after"] == reports["whole"]["params_after"]
    assert _same_state(load_compressed(tmp_path / "stream"), load_compressed(tmp_path / "whole"))
