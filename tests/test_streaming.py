"""Block streaming (io/lazy.py, surgery/offload.py): a model whose blocks stay in their safetensors file
until a pass reaches them compresses to exactly what the in-memory model compresses to."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import mpokit
from mpokit.calibration import fisher_blocks
from mpokit.calibration.blocks import capture_block_inputs
from mpokit.calibration.fisher import collect_output_fisher
from mpokit.io.lazy import load_streamed
from mpokit.methods.presets import needs_calibration
from mpokit.surgery.offload import detach_offload, offload_of, resident


def _tiny(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def saved(request, tmp_path):
    model = _tiny(request.param)
    model.save_pretrained(tmp_path)
    return model, tmp_path


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 96, (2, 24), generator=g), torch.randint(0, 96, (2, 24), generator=g)]


def _blocks_on_meta(model) -> bool:
    return all(p.is_meta for p in model.model.layers.parameters())


def test_streamed_model_holds_no_block_and_computes_the_same_logits(saved):
    model, path = saved
    streamed = load_streamed(path, AutoModelForCausalLM)
    assert _blocks_on_meta(streamed) and not streamed.model.embed_tokens.weight.is_meta
    x = _batches()[0]
    with torch.no_grad():
        assert torch.equal(streamed(x).logits, model(x).logits)
    assert _blocks_on_meta(streamed)  # each block was dropped again after its forward
    with resident(streamed, streamed.model.layers[1]):
        assert not any(p.is_meta for p in streamed.model.layers[1].parameters())
    assert _blocks_on_meta(streamed)


def test_a_parameter_edited_in_place_is_kept(saved):
    _, path = saved
    streamed = load_streamed(path, AutoModelForCausalLM)
    norm = streamed.model.layers[0].input_layernorm
    with resident(streamed, streamed.model.layers[0]):
        with torch.no_grad():
            norm.weight.mul_(2)
    assert not norm.weight.is_meta  # differs from the checkpoint: part of the output, never dropped
    assert not offload_of(streamed).pinned


def test_blockwise_fisher_equals_the_whole_model_backward(saved, monkeypatch):
    model, path = saved
    monkeypatch.setattr(fisher_blocks, "LOGITS_BYTES", 4 * 2 * 96 * 5)  # 5 positions per head pass
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    whole = collect_output_fisher(model, names, _batches(), full_max=40, progress=False)
    streamed = load_streamed(path, AutoModelForCausalLM)
    blocks = collect_output_fisher(streamed, names, _batches(), full_max=40, progress=False)
    for n in names:
        torch.testing.assert_close(blocks[n], whole[n], rtol=1e-4, atol=1e-6 * whole[n].abs().max().item())
    assert _blocks_on_meta(streamed)


CONFIGS = {
    "mpo": lambda: mpokit.AwareConfig(budget=0.6, calibration_tokens=96, fisher_tokens=96),
    "mpo-no-fisher-uniform": lambda: mpokit.AwareConfig(budget=0.6, sensitivity="none", allocation="uniform"),
    "svd": lambda: mpokit.SVDConfig(budget=0.6),
    "gptq": lambda: mpokit.GPTQConfig(bits=4, group_size=16),
    "rtn": lambda: mpokit.QuantConfig(bits=4, group_size=16),
    "mixed": lambda: mpokit.MixedConfig(bits_per_weight=4.0, group_size=16, fisher_tokens=96),
    "moefication-refit": lambda: mpokit.MoEficationRefitConfig(num_experts=4, top_k=1, shared_experts=1, router_steps=5),
    "mpoe": lambda: mpokit.MPOEConfig(num_experts=2, top_k=1, max_bond=4, noise=0.01),
    "share": lambda: mpokit.ShareConfig(groups=2, max_bond=4),
    "share-all-budget": lambda: mpokit.ShareConfig(budget=0.5, sweeps=2),
    "mpoe-dense-experts": lambda: mpokit.MPOEConfig(num_experts=2, top_k=1, expert_type="dense", noise=0.01),
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_streamed_compression_is_identical_to_in_memory(saved, method, monkeypatch):
    model, path = saved
    calibrated = needs_calibration(CONFIGS[method]())
    kwargs = {"batches": _batches(), "progress": False} if calibrated else {"progress": False}
    report = mpokit.compress_(model, CONFIGS[method](), **kwargs)
    streamed = load_streamed(path, AutoModelForCausalLM)
    calls = []
    monkeypatch.setattr(fisher_blocks, "capture_block_inputs",
                        lambda *a: calls.append(1) or capture_block_inputs(*a))
    streamed_report = mpokit.compress_(streamed, CONFIGS[method](), **kwargs)
    assert bool(calls) == (method in ("mpo", "mixed"))  # the loss-gradient pass ran block by block
    assert [(r.name, r.kind, r.params_after) for r in streamed_report.layers] == \
           [(r.name, r.kind, r.params_after) for r in report.layers]
    detach_offload(streamed)
    expected, got = model.state_dict(), streamed.state_dict()
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("method", ["mpo", "gptq"])
def test_activations_offloaded_to_disk_give_the_same_model_and_leave_the_folder_as_it_was(saved, method, tmp_path,
                                                                                          monkeypatch):
    """--offload-dir: the carried hidden states (and the sensitivity pass's per-block states) go through files in
    a private subfolder; the result is bit-identical, the files existed while it ran, and only they are removed."""
    from safetensors.torch import save_file

    from mpokit.calibration import activations

    model, path = saved
    kwargs = {"batches": _batches(), "progress": False}
    mpokit.compress_(model, CONFIGS[method](), **kwargs)
    streamed = load_streamed(path, AutoModelForCausalLM)
    folder = tmp_path / "offload"
    folder.mkdir()
    (folder / "mine.txt").write_text("the user's file", encoding="utf-8")
    written = []
    real = save_file
    monkeypatch.setattr("safetensors.torch.save_file", lambda d, f, *a, **k: written.append(f) or real(d, f, *a, **k))
    with mpokit.offload_activations(folder) as private:
        assert activations.offload_folder() == private and private.parent == folder
        mpokit.compress_(streamed, CONFIGS[method](), **kwargs)
    assert activations.offload_folder() is None
    assert written and all(str(private) in f for f in written)  # every carried set went to disk
    assert sorted(p.name for p in folder.iterdir()) == ["mine.txt"]  # its own subfolder gone, the user's file kept
    detach_offload(streamed)
    expected, got = model.state_dict(), streamed.state_dict()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_offload_dir_that_is_a_file_is_refused_in_one_line(tmp_path, capsys):
    from mpokit.cli.main import main

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x", encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        main(["compress", "--method", "quant", "--offload-dir", str(not_a_folder), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--offload-dir" in err[0] and not (tmp_path / "o").exists()


class _WholeModelOnly(mpokit.MPOConfig):
    """A method that declares it reads the whole model (MPOConfig's handler, not streamable)."""

    streamable = False


def test_a_method_that_reads_the_whole_model_is_refused(saved):
    _, path = saved
    streamed = load_streamed(path, AutoModelForCausalLM)
    with pytest.raises(ValueError, match="block-streamed"):
        mpokit.compress_(streamed, _WholeModelOnly())
    assert mpokit.compress_(streamed, mpokit.MPOConfig(budget=0.5)).layers  # negative control: streamable runs


def test_a_tied_config_with_differing_head_in_the_file_is_untied_as_transformers_does(tmp_path):
    model = _tiny(False)
    model.config.tie_word_embeddings = True  # the config claims a tie the weights do not have
    model.save_pretrained(tmp_path)
    streamed = load_streamed(tmp_path, AutoModelForCausalLM)
    whole = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert streamed.lm_head.weight is not streamed.model.embed_tokens.weight
    x = _batches()[0]
    with torch.no_grad():
        assert torch.equal(streamed(x).logits, whole(x).logits)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cli_compress_streams_by_default_and_gives_the_whole_load_result(tmp_path, dtype):
    from test_cli import save_model_and_text

    from mpokit.cli.main import main
    from mpokit.io.checkpoint import load_compressed

    save_model_and_text(tmp_path, 800)
    common = ["compress", "--model", str(tmp_path / "hf"), "--method", "gptq", "--bits", "4",
              "--calibration", str(tmp_path / "text.txt"), "--calibration-tokens", "512", "--dtype", dtype]
    for mode, extra in (("stream", []), ("whole", ["--no-stream"])):
        assert main([*common, *extra, "--out", str(tmp_path / mode), "--json", str(tmp_path / f"{mode}.json")]) == 0
    reports = {m: json.loads((tmp_path / f"{m}.json").read_text()) for m in ("stream", "whole")}
    assert reports["stream"]["streamed"] and not reports["whole"]["streamed"]
    assert reports["stream"]["model_mb"] == reports["whole"]["model_mb"]
    a, b = (load_compressed(tmp_path / m).state_dict() for m in ("stream", "whole"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_sharded_folder_streams_and_survives_its_files_being_replaced(tmp_path):
    model = _tiny(False)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    streamed = load_streamed(tmp_path, AutoModelForCausalLM)
    for f in shards:  # the source holds its files open: a reinstall or cache cleanup meanwhile changes nothing
        f.unlink()
    x = _batches()[0]
    with torch.no_grad():
        assert torch.equal(streamed(x).logits, model(x).logits)
