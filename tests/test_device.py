"""--device (compress, eval, export, finetune) and --dtype (export): flags, refusals, CPU end to end.

An unavailable device is one line and exit code 2 before anything is loaded or written. The `gpu`
test compresses and evaluates on CUDA and compares with the CPU run; it is skipped without CUDA.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from mpokit.cli.common import resolve_device
from mpokit.cli.main import build_parser, main
from test_cli import save_model_and_text

NO_CUDA = "expected an available device, got cuda: torch.cuda.is_available() is False"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.is_available() is False")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny llama as a Hugging Face folder, a text for calibration and perplexity, one CPU checkpoint."""
    root = tmp_path_factory.mktemp("device")
    save_model_and_text(root, 800)
    assert main(["compress", "--model", str(root / "hf"), "--method", "gptq", "--group-size", "32",
                 "--calibration", str(root / "text.txt"), "--calibration-tokens", "512", "--device", "cpu",
                 "--out", str(root / "ckpt"), "--json", str(root / "compress.json")]) == 0
    return root


def commands(root, device: str | None) -> dict[str, list[str]]:
    """One invocation per command, with --device `device` (None: without); outputs under root/never."""
    never = root / "never"
    base = {
        "compress": ["compress", "--model", str(root / "hf"), "--method", "mpo-datafree", "--out", str(never)],
        "eval": ["eval", str(root / "hf"), "--text", str(root / "text.txt"), "--tokens", "64", "--context", "32",
                 "--json", str(never / "e.json")],
        "export": ["export", str(root / "ckpt"), "--format", "hf", "--out", str(never)],
        "finetune": ["finetune", str(root / "hf"), "--method", "full", "--task", "lm", "--data", str(root / "text.txt"),
                     "--max-steps", "1", "--out", str(never)],
    }
    return base if device is None else {k: v + ["--device", device] for k, v in base.items()}


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


@pytest.mark.parametrize("text, parsed", [("auto", "auto"), ("cpu", "cpu"), ("CUDA", "cuda"), ("cuda:1", "cuda:1"),
                                          ("mps", "mps")])
@pytest.mark.parametrize("command", ["compress", "eval", "export", "finetune"])
def test_device_flag_parses(root, command, text, parsed):
    argv = commands(root, text)[command]
    assert build_parser().parse_args(argv).device == parsed
    assert build_parser().parse_args(commands(root, None)[command]).device == "auto"  # the default


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "cpu:0"])
def test_a_malformed_device_is_a_usage_error(root, capsys, bad):
    with pytest.raises(SystemExit) as e:
        main(commands(root, bad)["eval"])
    assert e.value.code == 2
    assert f"expected a device: auto, cpu, cuda, cuda:N or mps, got '{bad}'" in error_line(capsys)


def test_auto_is_cuda_only_where_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("command", ["compress", "eval", "export", "finetune"])
def test_unavailable_cuda_is_one_line_exit_2(root, monkeypatch, capsys, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        main(commands(root, "cuda")[command])
    assert e.value.code == 2 and error_line(capsys) == f"mpokit: error: {NO_CUDA}"
    assert not (root / "never").exists()


def test_a_cuda_index_past_the_devices_and_finetune_on_one_gpu_are_refused(root, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SystemExit) as e:
        main(commands(root, "cuda:2")["eval"])
    assert e.value.code == 2 and "got cuda:2: torch.cuda.device_count() is 2" in error_line(capsys)
    with pytest.raises(SystemExit) as e:
        main(commands(root, "cuda:1")["finetune"])
    assert e.value.code == 2 and "CUDA_VISIBLE_DEVICES=1" in error_line(capsys)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        main(commands(root, "mps")["compress"])
    assert e.value.code == 2 and "got mps: torch.backends.mps.is_available() is False" in error_line(capsys)
    assert not (root / "never").exists()


def test_cpu_compress_and_eval_end_to_end(root):
    report = json.loads((root / "compress.json").read_text())
    assert report["device"] == "cpu" and report["calibration"] and len(report["layers"]) == 14
    out = root / "eval-cpu.json"
    assert main(["eval", str(root / "ckpt"), "--text", str(root / "text.txt"), "--tokens", "128", "--context", "64",
                 "--device", "cpu", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and math.isfinite(res["perplexity"]) and res["perplexity"] > 1


def test_export_hf_dtype_casts_float_tensors_and_keeps_codes(root, capsys):
    from safetensors.torch import load_file

    from mpokit.export.hf_template import modeling_mpokit_export as template
    from mpokit.io.checkpoint import load_compressed

    out = root / "hf-bf16"
    assert main(["export", str(root / "ckpt"), "--format", "hf", "--dtype", "bfloat16", "--device", "cpu",
                 "--out", str(out), "--json", str(root / "export.json")]) == 0
    report = json.loads((root / "export.json").read_text())
    assert report["dtype"] == "bfloat16" and report["device"] == "cpu" and report["source"]
    assert any("cast to bfloat16" in n for n in report["notes"])
    tensors = load_file(out / "model.safetensors")
    codes = {k: t.dtype for k, t in tensors.items() if ".qweight." in k}
    assert {t.dtype for k, t in tensors.items() if k not in codes} == {torch.bfloat16}  # embeddings, norms
    assert set(codes.values()) == {torch.uint8, torch.float16}  # packed codes, offsets and scales as stored
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    exported = getattr(template, config["architectures"][0]).from_pretrained(out).eval()
    reference = load_compressed(root / "ckpt").to(torch.bfloat16).eval()
    from mpokit.layers.quant import set_kernel_

    set_kernel_(reference, "reference")  # the exported files dequantize and matmul, as this path does
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        a, b = exported(x).logits.float(), reference(x).logits.float()
        dense = load_compressed(root / "ckpt")(x).logits  # float32: what the cast changes
    assert (a - b).abs().max() <= 1e-2 * b.abs().max()
    assert (a - dense).abs().max() > 0  # the export is really bfloat16, not the float32 checkpoint


@pytest.mark.parametrize("fmt, out", [("gguf", "x.gguf"), ("compressed-tensors", "ct")])
def test_other_formats_refuse_dtype_with_the_reason(root, capsys, fmt, out):
    with pytest.raises(SystemExit) as e:
        main(["export", str(root / "ckpt"), "--format", fmt, "--out", str(root / out), "--dtype", "float16"])
    line = error_line(capsys)
    assert e.value.code == 2 and f"expected --dtype only with --format hf, got it with --format {fmt}" in line
    assert "--dense" in line and not (root / out).exists()


def test_finetune_on_cpu_tells_trainer_use_cpu(root, monkeypatch, tmp_path):
    import transformers

    seen = []

    class Spy(transformers.TrainingArguments):
        def __post_init__(self):
            seen.append(self.use_cpu)
            super().__post_init__()

    monkeypatch.setattr(transformers, "TrainingArguments", Spy)
    out = tmp_path / "ft.json"
    assert main(["finetune", str(root / "hf"), "--method", "full", "--task", "lm", "--data", str(root / "text.txt"),
                 "--max-steps", "1", "--batch-size", "2", "--seq-len", "16", "--tokens", "64", "--context", "32",
                 "--device", "cpu", "--out", str(tmp_path / "run"), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert seen == [True] and res["device"] == "cpu" and res["global_step"] == 1


@pytest.mark.gpu
@needs_cuda
def test_cuda_compress_and_eval_match_cpu(root, tmp_path):
    """Calibrated compression (GPTQ, whitened SVD) and evaluation on CUDA agree with the CPU run."""
    from mpokit.io.checkpoint import load_compressed

    x = torch.randint(0, 128, (2, 32))
    for method, extra in (("gptq", ["--group-size", "32"]), ("whitened-svd", ["--budget", "0.6"])):
        runs = {}
        for device in ("cpu", "cuda"):
            ckpt = tmp_path / f"{method}-{device}"
            assert main(["compress", "--model", str(root / "hf"), "--method", method, *extra, "--calibration",
                         str(root / "text.txt"), "--calibration-tokens", "512", "--device", device,
                         "--out", str(ckpt)]) == 0
            ev = tmp_path / f"{method}-{device}.json"
            assert main(["eval", str(ckpt), "--text", str(root / "text.txt"), "--tokens", "256", "--context", "64",
                         "--device", device, "--json", str(ev)]) == 0
            model = load_compressed(ckpt)
            assert next(model.parameters()).device.type == "cpu"  # checkpoints hold CPU tensors
            with torch.no_grad():
                runs[device] = (model(x).logits, model.to("cuda")(x.cuda()).logits.cpu(),
                                json.loads(ev.read_text()))
        (cpu_logits, cpu_on_cuda, cpu_eval), (cuda_logits, _, cuda_eval) = runs["cpu"], runs["cuda"]
        scale = cpu_logits.abs().max()
        assert (cpu_on_cuda - cpu_logits).abs().max() <= 1e-4 * scale  # the same checkpoint, run on both
        assert (cuda_logits - cpu_logits).abs().max() <= 1e-2 * scale, method  # compressed on CUDA vs on CPU
        assert cuda_eval["device"].startswith("cuda") and cpu_eval["device"] == "cpu"
        assert cuda_eval["perplexity"] == pytest.approx(cpu_eval["perplexity"], rel=1e-2)


def test_a_cpu_run_reports_no_device_memory(root):
    res = json.loads((root / "compress.json").read_text())
    assert res["device"] == "cpu" and res["peak_device_mb"] is None and res["peak_rss_mb"] > 0
