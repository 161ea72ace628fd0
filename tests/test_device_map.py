"""mpokit eval --device-map / --max-memory / --offload-dir: accelerate's big-model placement, CPU end to end.

A tiny llama (a Hugging Face folder, and an SVD checkpoint of it) is evaluated whole and again with a CPU
budget too small for it, so that decoder blocks go to disk: the perplexity must not change, and the recorded
map must really hold "disk" (the negative control: with ample memory it does not). Refusals are one line,
exit code 2. The `gpu` test spreads the model over CUDA and CPU; it is skipped without CUDA.
"""
from __future__ import annotations

import json

import pytest
import torch

from mpokit.cli.main import main
from mpokit.io.device_map import parse_max_memory
from test_cli import save_model_and_text

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.is_available() is False")
# The tiny llama: embeddings 32 KiB (tied to lm_head), each decoder block 145 KiB (its SVD checkpoint: 72 KiB),
# 321 KiB in all (175 KiB). accelerate keeps room for the largest block free in the CPU budget, so with 200 KiB
# (150 KiB) only the embeddings stay in memory and the blocks go to disk.
SMALL = {"hf": "cpu=200KiB", "ckpt": "cpu=150KiB"}
AMPLE = "cpu=1GiB"
GPU_BUDGET = {"hf": "0=180KiB,cpu=1GiB", "ckpt": "0=107KiB,cpu=1GiB"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny llama as a Hugging Face folder, a text, and an SVD checkpoint of the folder made by the CLI."""
    root = tmp_path_factory.mktemp("device_map")
    save_model_and_text(root, 600)
    assert main(["compress", "--model", str(root / "hf"), "--method", "svd", "--budget", "0.5",
                 "--out", str(root / "ckpt")]) == 0
    return root


def evaluate(root, out, model: str, *extra: str) -> dict:
    assert main(["eval", str(root / model), "--text", str(root / "text.txt"), "--tokens", "256", "--context", "64",
                 "--batch-size", "2", *extra, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mpokit: error:")]
    assert len(lines) == 1 and err.count("mpokit:") == 1, err
    return lines[0]


@pytest.mark.parametrize("model, strategy", [("hf", "auto"), ("ckpt", "auto"), ("ckpt", "sequential")])
def test_blocks_offloaded_to_disk_give_the_same_perplexity(root, tmp_path, model, strategy):
    whole = evaluate(root, tmp_path / "whole.json", model)
    offload = tmp_path / "offload"
    placed = evaluate(root, tmp_path / "placed.json", model, "--device-map", strategy, "--max-memory", SMALL[model],
                      "--offload-dir", str(offload))
    record = placed["device_map"]
    assert record["strategy"] == strategy and record["max_memory"] == SMALL[model]
    assert record["modules"]["model.layers"] == "disk" and record["modules"]["model.embed_tokens"] == "cpu"
    assert record["bytes"]["disk"] > record["bytes"]["cpu"] > 0
    assert "device_map" not in whole and placed["device"] == "cpu"
    assert placed["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-6)
    assert placed["nll"] == pytest.approx(whole["nll"], rel=1e-6)
    assert (placed["params"], placed["bytes"]) == (whole["params"], whole["bytes"])
    assert offload.is_dir() and not any(offload.iterdir())  # the run's own folder inside it is gone, DIR stays


def test_negative_control_with_ample_memory_nothing_goes_to_disk(root, tmp_path):
    placed = evaluate(root, tmp_path / "placed.json", "ckpt", "--device-map", "auto", "--max-memory", AMPLE,
                      "--offload-dir", str(tmp_path / "offload"))
    assert placed["device_map"]["modules"] == {"": "cpu"}
    assert "disk" not in placed["device_map"]["modules"].values()


def test_checkpoint_dispatch_writes_offloaded_weights_and_matches_exactly(root, tmp_path):
    """Library level: the offload folder holds accelerate's index and .dat files; logits equal the CPU model's."""
    from mpokit.io.checkpoint import load_compressed
    from mpokit.io.models import load_model

    x = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    loaded = load_model(root / "ckpt", device_map="sequential", max_memory=parse_max_memory(SMALL["ckpt"]),
                        offload_folder=tmp_path)
    assert "disk" in loaded.model.hf_device_map.values()
    index = json.loads((tmp_path / "index.json").read_text())
    assert any(k.startswith("model.layers.1.mlp.down_proj.cores") for k in index)
    assert any(p.is_meta for p in loaded.model.model.layers.parameters())  # really not in memory
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=x).logits, load_compressed(root / "ckpt")(x).logits,
                                   rtol=0, atol=1e-6)


def test_max_memory_parses_to_accelerate_sizes(monkeypatch):
    assert parse_max_memory("cpu=2GiB") == {"cpu": 2 * 2**30}
    assert parse_max_memory(" CPU = 1500MB ") == {"cpu": 1_500_000_000}
    assert parse_max_memory("cpu=4096") == {"cpu": 4096}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_max_memory("0=20GiB,cuda:1=1GB,cpu=2GiB") == {0: 20 * 2**30, 1: 10**9, "cpu": 2 * 2**30}


@pytest.mark.parametrize("extra, message", [
    (["--device-map", "auto", "--max-memory", "cpu=lots"], "expected a size like 2GiB, 500MB or a number of bytes"),
    (["--device-map", "auto", "--max-memory", "cpu2GiB"], "expected --max-memory as DEVICE=SIZE"),
    (["--device-map", "auto", "--max-memory", "cpu=1GiB,cpu=2GiB"], "expected each device once"),
    (["--device-map", "auto", "--max-memory", "cpu=0"], "expected a size above 0 for cpu"),
    (["--device-map", "auto", "--max-memory", "99=1GiB"], "expected GPU indices in --max-memory below"),
    (["--device-map", "auto", "--device", "cpu"], "expected either --device-map or --device, got both"),
    (["--max-memory", "cpu=1GiB"], "expected --max-memory only with --device-map"),
    (["--offload-dir", "somewhere"], "expected --offload-dir only with --device-map"),
    (["--device-map", "everywhere"], "invalid choice: 'everywhere'"),
])
def test_bad_placement_flags_are_one_line_exit_2(root, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        evaluate(root, tmp_path / "never.json", "hf", *extra)
    assert e.value.code == 2 and message in error_line(capsys)
    assert not (tmp_path / "never.json").exists()


def test_offload_needed_but_impossible_is_one_line_exit_2(root, tmp_path, capsys):
    """No --offload-dir for a checkpoint that needs the disk; an --offload-dir that is a file."""
    cases = [("ckpt", ["--max-memory", SMALL["ckpt"]], "expected an offload folder: the device map puts"),
             ("ckpt", ["--max-memory", SMALL["ckpt"], "--offload-dir", str(root / "text.txt")],
              "expected --offload-dir to be a folder")]
    for model, extra, message in cases:
        with pytest.raises(SystemExit) as e:
            evaluate(root, tmp_path / "never.json", model, "--device-map", "auto", *extra)
        assert e.value.code == 2 and message in error_line(capsys), model
    assert not (tmp_path / "never.json").exists()


def test_embeddings_on_disk_too_give_the_same_perplexity(root, tmp_path):
    """A CPU budget below even the embeddings: accelerate offloads everything, and the token ids go to the
    execution device of the hook that loads them (their parameter itself is on meta)."""
    whole = evaluate(root, tmp_path / "whole.json", "hf")
    placed = evaluate(root, tmp_path / "placed.json", "hf", "--device-map", "auto", "--max-memory", "cpu=10KiB",
                      "--offload-dir", str(tmp_path / "off"))
    assert placed["device_map"]["modules"] == {"": "disk"} and placed["device"] == "cpu"  # the whole model
    assert placed["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-6)
    assert not any((tmp_path / "off").iterdir())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("model", ["hf", "ckpt"])
def test_cuda_and_cpu_split_matches_the_cpu_run(root, tmp_path, model):
    """GPU 0 gets the embeddings and one block's worth (plus 3 KiB), the rest runs from CPU memory, moved to GPU 0
    block by block by accelerate's hooks. Whether accelerate also keeps the largest block's room free on GPU 0
    (1.16 here) or not (1.15 on the H200 it ran on), both devices get modules. 400 KiB held the whole model."""
    whole = evaluate(root, tmp_path / "whole.json", model, "--device", "cpu")
    placed = evaluate(root, tmp_path / "placed.json", model, "--device-map", "sequential",
                      "--max-memory", GPU_BUDGET[model])
    devices = set(placed["device_map"]["modules"].values())
    assert "cuda:0" in devices and "cpu" in devices, placed["device_map"]
    assert placed["device"] == "cuda:0"
    assert placed["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-3)
