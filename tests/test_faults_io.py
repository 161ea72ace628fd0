"""Issue 15, io side: output folders are never lost, saves survive SIGKILL, checkpoints are verified
before they are trusted, and bad model arguments fail at once with one clear line.

Items: 1 (refuse to replace what is not ours), 2 (atomic replace, recovery, fsync), 3 (weights that
do not cover the model), 5 (manifest, aliases, ties, specs, allowlists), 10 (io errors in the CLI)
and 11 (local-looking paths, hub ids offline). Run: pytest tests/test_faults_io.py
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from mpokit import MPOConfig, compress_, load_compressed, save_compressed
from mpokit.cli.main import main
from mpokit.io import atomic
from mpokit.io.atomic import OutputPathError, atomic_dir, recover
from mpokit.io.checkpoint import FORMAT_VERSION, META_FILE, WEIGHTS_FILE, CheckpointError, read_meta
from mpokit.io.manifest import file_sha256
from mpokit.io.models import MissingModelError, _looks_like_hub_id, load_model

TIED = ["embed_tokens", "lm_head", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def compressed(**kw):
    model = tiny_llama(**kw)
    compress_(model, MPOConfig(budget=0.5, target_modules=TIED), progress=False)
    return model


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, **{f"w{k}": k + 2 for k in range(100)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def first_weight(model) -> torch.Tensor:
    return next(iter(model.state_dict().values()))


def edit_meta(path: Path, change) -> None:
    meta = json.loads((path / META_FILE).read_text())
    change(meta)
    (path / META_FILE).write_text(json.dumps(meta))


def fail_line(capsys, argv) -> str:
    """Run the CLI expecting a user error: exit code 2, one error line, no traceback.

    (Transformers may log its own load report before it; mpokit adds exactly one line.)
    """
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    ours = [line for line in err if line.startswith("mpokit: error:")]
    assert len(ours) == 1 and err[-1] == ours[0] and not any("Traceback" in line for line in err), err
    return ours[0]


def intercept_renames(monkeypatch, folder: Path, fail_from: int, exc: BaseException) -> list[tuple[str, str]]:
    """Make the `fail_from`-th and later os.replace calls inside `folder` raise `exc` (others pass)."""
    real, calls = os.replace, []

    def replace(src, dst):
        if Path(dst).parent != folder:
            return real(src, dst)
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) >= fail_from:
            raise exc
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    return calls


@pytest.fixture
def ckpt(tmp_path):
    model = compressed()
    return model, save_compressed(model, tmp_path / "ckpt", tiny_tokenizer())


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    tiny_llama().save_pretrained(root / "hf")
    tiny_tokenizer().save_pretrained(root / "hf")
    return root / "hf"


# ---- 1. never replace what is not an mpokit checkpoint ------------------------------------------
def test_save_refuses_a_folder_with_other_files(tmp_path, llama):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(OutputPathError, match=f"refusing to replace {out}: .*not an mpokit checkpoint"):
            save_compressed(llama, out, overwrite=overwrite)
    assert (out / "notes.txt").read_text() == "mine" and os.listdir(out) == ["notes.txt"]
    assert siblings(out) == ["results"]  # nothing left beside it either


def test_save_refuses_a_file_and_a_symlink(tmp_path, llama):
    (tmp_path / "f").write_text("data")
    with pytest.raises(OutputPathError, match="it is a file"):
        save_compressed(llama, tmp_path / "f", overwrite=True)
    assert (tmp_path / "f").read_text() == "data"
    real = save_compressed(llama, tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(OutputPathError, match="symbolic link"):
        save_compressed(llama, tmp_path / "link", overwrite=True)


def test_atomic_dir_alone_never_replaces_a_non_empty_folder_unasked(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(OutputPathError, match=f"{target} exists; pass --overwrite"):
        with atomic_dir(target) as tmp:
            (tmp / "new").write_text("y")
    with pytest.raises(OutputPathError, match="no mpokit.json"):
        with atomic_dir(target, overwrite=True, marker="mpokit.json"):
            pass
    assert os.listdir(target) == ["keep"] and siblings(target) == ["d"]


def test_empty_folder_is_used_and_checkpoint_needs_overwrite(tmp_path, llama):
    out = tmp_path / "empty"
    out.mkdir()
    save_compressed(llama, out)
    assert (out / META_FILE).is_file()
    with pytest.raises(ValueError, match=f"{out} exists; pass --overwrite"):
        save_compressed(tiny_llama(), out)
    other = tiny_llama(layers=1)
    save_compressed(other, out, overwrite=True)
    assert load_compressed(out).config.num_hidden_layers == 1


def test_never_the_input_model_nor_the_current_folder(tmp_path, monkeypatch, llama):
    src = save_compressed(llama, tmp_path / "models" / "src")
    before = file_sha256(src / WEIGHTS_FILE)
    with pytest.raises(OutputPathError, match="input model"):
        save_compressed(llama, src, overwrite=True, protect=[src])
    with pytest.raises(OutputPathError, match="input model"):
        save_compressed(llama, tmp_path / "models", overwrite=True, protect=[src])  # a folder holding it
    monkeypatch.chdir(src)
    with pytest.raises(OutputPathError, match="current folder"):
        save_compressed(llama, ".", overwrite=True)
    with pytest.raises(OutputPathError, match="current folder or a folder above it"):
        save_compressed(llama, "..", overwrite=True)
    assert file_sha256(src / WEIGHTS_FILE) == before


def test_cli_out_with_user_files_exits_2_and_keeps_them(tmp_path, capsys, hf_folder):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    base = ["compress", "--model", str(hf_folder), "--method", "mpo-datafree", "--budget", "0.5"]
    for extra in ([], ["--overwrite"]):
        line = fail_line(capsys, base + ["--out", str(out)] + extra)
        assert str(out) in line and "not an mpokit checkpoint" in line
    assert (out / "thesis.tex").read_text() == "years of work" and os.listdir(out) == ["thesis.tex"]


def test_cli_out_equal_to_source_or_cwd_exits_2(tmp_path, capsys, monkeypatch, hf_folder):
    before = {p.name: p.read_bytes() for p in hf_folder.iterdir()}
    base = ["compress", "--model", str(hf_folder), "--method", "mpo-datafree", "--budget", "0.5", "--overwrite"]
    assert "input model" in fail_line(capsys, base + ["--out", str(hf_folder)])
    assert "input model" in fail_line(capsys, base + ["--out", str(hf_folder.parent)])
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.csv").write_text("1,2")
    monkeypatch.chdir(work)
    assert "current folder" in fail_line(capsys, base + ["--out", "."])
    assert {p.name: p.read_bytes() for p in hf_folder.iterdir()} == before
    assert os.listdir(work) == ["data.csv"]


def test_cli_overwrite_replaces_only_a_checkpoint(tmp_path, capsys, hf_folder):
    out = tmp_path / "ck"
    base = ["compress", "--model", str(hf_folder), "--method", "mpo-datafree", "--budget", "0.5", "--out", str(out)]
    assert main(base) == 0
    assert "pass --overwrite" in fail_line(capsys, base)
    bonds = load_compressed(out).model.layers[0].mlp.up_proj.bonds
    assert main(base + ["--overwrite", "--budget", "0.2"]) == 0
    assert load_compressed(out).model.layers[0].mlp.up_proj.bonds != bonds
    assert siblings(out) == ["ck"]


# ---- 2. atomic replace: old or new at every instant, leftovers cleaned, fsync ------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_error_between_the_two_renames_keeps_the_old_checkpoint(tmp_path, monkeypatch, llama):
    path = save_compressed(llama, tmp_path / "ckpt")
    real, calls = os.replace, []

    def replace(src, dst):
        if Path(dst).parent == tmp_path:
            calls.append((Path(src).name, Path(dst).name))
            if len(calls) == 2:  # "tmp -> path", right after "path -> .path.old"
                raise OSError("injected")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="injected"):
        save_compressed(tiny_llama(layers=1), path, overwrite=True)
    assert calls[0] == ("ckpt", ".ckpt.old") and calls[1][1] == "ckpt" and calls[2] == (".ckpt.old", "ckpt")
    monkeypatch.undo()
    assert siblings(path) == ["ckpt"]
    assert torch.equal(first_weight(load_compressed(path)), first_weight(llama))


def test_kill_between_the_renames_is_recovered_at_next_load_and_save(tmp_path, monkeypatch, llama):
    path = save_compressed(llama, tmp_path / "ckpt", tiny_tokenizer())
    intercept_renames(monkeypatch, tmp_path, 2, KeyboardInterrupt())  # "dies" after the first rename
    with pytest.raises(KeyboardInterrupt):
        save_compressed(tiny_llama(layers=1), path, overwrite=True)
    monkeypatch.undo()
    assert not path.exists() and (tmp_path / ".ckpt.old" / META_FILE).is_file()
    stale = tmp_path / f".ckpt.{_dead_pid()}.abcd1234.tmp"  # a kill during writing leaves this
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert torch.equal(first_weight(load_compressed(path)), first_weight(llama))  # the old one, recovered
    assert siblings(path) == ["ckpt"]
    # the same through a save: the old checkpoint is back first, and is still only replaced with overwrite=True
    os.replace(path, tmp_path / ".ckpt.old")
    with pytest.raises(ValueError, match="pass --overwrite"):
        save_compressed(tiny_llama(layers=1), path)
    assert siblings(path) == ["ckpt"]
    # an empty folder made where the checkpoint belongs (mkdir -p) does not cost the old copy
    os.replace(path, tmp_path / ".ckpt.old")
    path.mkdir()
    assert torch.equal(first_weight(load_model(str(path)).model), first_weight(llama))
    assert siblings(path) == ["ckpt"]


def test_live_writers_temporary_folders_are_left_alone(tmp_path, llama):
    path = save_compressed(llama, tmp_path / "ckpt")
    busy = tmp_path / ".ckpt.1.abcd1234.tmp"  # pid 1 runs: another process is writing it
    busy.mkdir()
    neighbour = tmp_path / ".ckpt.v2.old"  # the .old of a sibling named ckpt.v2, not ours
    neighbour.mkdir()
    recover(path)
    save_compressed(llama, path, overwrite=True)
    assert busy.is_dir() and neighbour.is_dir()


def test_files_and_folder_are_fsynced_before_the_rename(tmp_path, monkeypatch, llama):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name fsynced descriptors")
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    path = save_compressed(llama, tmp_path / "ckpt", tiny_tokenizer())
    commit = next(i for i, e in enumerate(events) if e[0] == "replace" and Path(e[2]) == path)
    tmp = events[commit][1]
    synced_before = {Path(e[1]).name for e in events[:commit] if e[0] == "fsync" and e[1].startswith(tmp)}
    assert {p.name for p in path.iterdir()} <= synced_before and Path(tmp).name in synced_before
    assert ("fsync", os.path.realpath(tmp_path)) in events[commit:]  # the rename itself made durable


def _save_forever(path: Path, models) -> None:
    """Child process: replace `path` with the two models in turn until killed."""
    try:
        torch.set_num_threads(1)
        k = 0
        while True:
            save_compressed(models[k % 2], path, overwrite=True)
            k += 1
    finally:
        os._exit(0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_at_random_points_of_a_save_leaves_a_loadable_checkpoint(tmp_path):
    torch.manual_seed(1)
    models = [tiny_llama(layers=1), tiny_llama(layers=1)]
    marks = [first_weight(m) for m in models]
    path = save_compressed(models[0], tmp_path / "ckpt")
    rng, start, seen = random.Random(15), time.perf_counter(), set()
    for _ in range(20):
        pid = os.fork()
        if pid == 0:
            _save_forever(path, models)
        time.sleep(rng.uniform(0.0, 0.12))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        seen.add(tuple(siblings(path)))
        loaded = load_compressed(path)  # recovers an interrupted replace first
        assert any(torch.equal(first_weight(loaded), m) for m in marks)
        assert siblings(path) == ["ckpt"]  # no .old or .tmp left after the load
    assert time.perf_counter() - start < 30
    assert any(len(s) > 1 for s in seen)  # some kills did land inside a save


# ---- 3. weights that do not cover the model are an error, never random init -----------------
def test_checkpoint_without_mpokit_json_is_refused(ckpt, capsys):
    _, path = ckpt
    (path / META_FILE).unlink()
    with pytest.raises(CheckpointError, match="is an mpokit checkpoint .*whose mpokit.json is missing"):
        load_model(str(path))
    line = fail_line(capsys, ["compress", "--model", str(path), "--method", "mpo-datafree", "--out",
                              str(path.parent / "x")])
    assert "Refusing to fill them randomly" in line and not (path.parent / "x").exists()


def test_hf_folder_with_some_weights_missing(tmp_path, hf_folder):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    folder.mkdir()
    for p in hf_folder.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    state = load_file(str(folder / "model.safetensors"))
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="1 missing \\(model.layers.1.mlp.down_proj.weight\\)"):
        load_model(str(folder))
    assert isinstance(load_model(str(hf_folder)).model, torch.nn.Module)  # the complete folder loads


def test_only_config_text_file_and_empty_folder(tmp_path, capsys, hf_folder):
    only = tmp_path / "only"
    only.mkdir()
    (only / "config.json").write_text((hf_folder / "config.json").read_text())
    with pytest.raises(MissingModelError, match=f"no weights in {only}"):
        load_model(str(only))
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(CheckpointError, match="got the file"):
        load_model(str(tmp_path / "notes.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingModelError, match="no config.json in"):
        load_model(str(tmp_path / "empty"))
    for model in (only, tmp_path / "notes.txt"):
        fail_line(capsys, ["compress", "--model", str(model), "--method", "mpo-datafree", "--out", str(tmp_path / "o")])


# ---- 5. the manifest covers every file; metadata is checked, not trusted ----------------------
def test_manifest_lists_every_file(ckpt):
    _, path = ckpt
    meta = read_meta(path)
    files = set(meta["manifest"]["files"])
    assert meta["format_version"] == FORMAT_VERSION == 3
    assert files == {p.name for p in path.iterdir()} - {META_FILE}
    assert {"config.json", "mpokit_loader.py", WEIGHTS_FILE, "tokenizer.json", "tokenizer_config.json"} <= files


@pytest.mark.parametrize("change", ["config", "tokenizer", "added", "removed", "meta"])
def test_any_changed_file_is_detected(ckpt, change):
    model, path = ckpt
    if change == "config":  # same shapes, other rope: a silently different model without the manifest
        edit = json.loads((path / "config.json").read_text())
        edit["rope_theta"] = 1.0
        (path / "config.json").write_text(json.dumps(edit))
        match = "sha256 of .*config.json does not match"
    elif change == "tokenizer":
        (path / "tokenizer.json").write_text((path / "tokenizer.json").read_text().replace('"w1"', '"w9x"'))
        match = "sha256 of .*tokenizer.json"
    elif change == "added":
        (path / "chat_template.jinja").write_text("{{ messages }}")
        match = "unexpected files .*chat_template.jinja"
    elif change == "removed":
        (path / "tokenizer_config.json").unlink()
        match = "incomplete checkpoint: .*tokenizer_config.json"
    else:
        edit_meta(path, lambda m: m["methods"][0].update(budget=0.9))
        match = "edited after saving"
    with pytest.raises(CheckpointError, match=match):
        load_compressed(path)
    if change != "removed":
        load_compressed(path, verify=False)  # the explicit opt-out still loads


def test_docs_beside_a_checkpoint_are_fine(ckpt):
    model, path = ckpt
    (path / "README.md").write_text("# my model")
    (path / ".gitattributes").write_text("*.safetensors filter=lfs")
    assert torch.equal(first_weight(load_compressed(path)), first_weight(model))


def test_missing_manifest_and_format_1(ckpt):
    model, path = ckpt
    edit_meta(path, lambda m: m.pop("manifest"))
    with pytest.raises(CheckpointError, match="no manifest hash"):
        load_compressed(path)
    assert torch.equal(first_weight(load_compressed(path, verify=False)), first_weight(model))

    def as_format_1(m):
        m["format_version"], m["sha256"] = 1, file_sha256(path / WEIGHTS_FILE)

    edit_meta(path, as_format_1)
    with pytest.raises(CheckpointError, match="format-1 checkpoint .*re-save it"):
        load_compressed(path)
    old = load_compressed(path, verify=False)
    save_compressed(old, path, tiny_tokenizer(), overwrite=True)  # the re-save the message asks for
    assert torch.equal(first_weight(load_compressed(path)), first_weight(model))


@pytest.mark.parametrize("meta", [[], "x", 3, None, {"format_version": 2, "architecture": "LlamaForCausalLM",
                                                    "dtype": "float32", "layers": []}])
def test_metadata_of_the_wrong_type(ckpt, capsys, meta):
    _, path = ckpt
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="corrupt|expected"):
        load_compressed(path)
    for argv in (["inspect", str(path)],
                 ["compress", "--model", str(path), "--method", "mpo-datafree", "--out", str(path.parent / "o")]):
        assert str(path / META_FILE) in fail_line(capsys, argv)


@pytest.mark.parametrize("field,value", [
    ("layers", {"lm_head": "MPOLinear"}), ("aliases", ["a"]), ("aliases", {"a": 1}), ("methods", {}),
    ("report", []), ("format_version", "2"), ("format_version", True), ("dtype", 32)])
def test_fields_of_the_wrong_type(ckpt, field, value):
    _, path = ckpt
    edit_meta(path, lambda m: m.update({field: value}))
    with pytest.raises(CheckpointError, match="expected"):
        load_compressed(path, verify=False)


@pytest.mark.parametrize("name", ["pipeline", "AutoModelForCausalLM", "LlamaModel", "os.system", "Trainer",
                                  "NoSuchForCausalLM", "GPT2LMHeadModel"])
def test_architecture_allowlist(ckpt, name):
    _, path = ckpt
    edit_meta(path, lambda m: m.update(architecture=name))
    with pytest.raises(CheckpointError, match="unknown architecture|describes a LlamaConfig"):
        load_compressed(path, verify=False)


@pytest.mark.parametrize("name", ["int8", "Tensor", "float", "cuda", "float32 "])
def test_dtype_allowlist(ckpt, name):
    _, path = ckpt
    edit_meta(path, lambda m: m.update(dtype=name))
    with pytest.raises(CheckpointError, match="expected dtype one of float32, float16, bfloat16, float64"):
        load_compressed(path, verify=False)


def test_save_refuses_what_load_would_refuse(tmp_path, llama):
    with pytest.raises(CheckpointError, match="unknown architecture 'LlamaModel'"):
        save_compressed(llama.model, tmp_path / "base")
    with pytest.raises(ValueError, match="reserved keys"):
        save_compressed(llama, tmp_path / "x", extra={"aliases": {}})
    assert not (tmp_path / "base").exists() and not (tmp_path / "x").exists()


def test_aliases_may_not_repoint_stored_tensors(ckpt):
    _, path = ckpt
    q, o = "model.layers.0.self_attn.q_proj.cores.1", "model.layers.0.self_attn.o_proj.cores.1"
    edit_meta(path, lambda m: m["aliases"].update({q: o}))
    with pytest.raises(CheckpointError, match="would replace the tensor stored under"):
        load_compressed(path, verify=False)
    with pytest.raises(CheckpointError):
        load_compressed(path)

    def dangling(meta):
        del meta["aliases"][q]
        meta["aliases"]["lm_head.cores.0"] = "no.such.tensor"

    edit_meta(path, dangling)
    with pytest.raises(CheckpointError, match="'no.such.tensor', which the weights file does not hold"):
        load_compressed(path, verify=False)


def test_tied_to_is_validated(tmp_path):
    model = tiny_llama(tie=False)
    compress_(model, MPOConfig(max_bond=4, target_modules=["q_proj", "o_proj", "up_proj"]), progress=False)
    path = save_compressed(model, tmp_path / "c")
    q, o, up = (f"model.layers.0.{n}" for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj"))
    assert model.get_submodule(q).bonds == model.get_submodule(o).bonds  # same core shapes

    def tie(name, target):
        def change(meta):
            for spec in meta["layers"].values():
                spec["tied_to"] = None
            meta["layers"][name]["tied_to"] = target
        edit_meta(path, change)

    for name, target, match in [(o, q, "stores .* separately"), (o, up, "other shapes"), (o, "model.nothing", "not another"),
                                (o, o, "not another"), (o, 7, "string or null 'tied_to'")]:
        tie(name, target)
        with pytest.raises(CheckpointError, match=match):
            load_compressed(path, verify=False)
    tie(o, None)
    load_compressed(path, verify=False)


def test_tied_embeddings_still_round_trip(ckpt):
    model, path = ckpt
    loaded = load_compressed(path)
    assert loaded.lm_head.cores is loaded.model.embed_tokens.cores and loaded.lm_head.tied_to == "model.embed_tokens"


@pytest.mark.parametrize("key,value,match", [
    ("in_features", 63, "expected in_features=64"), ("out_features", 65, "expected out_features=64"),
    ("in_dims", [4, 4, 2], "does not match|does not fit|bad spec"), ("type", "MPOEmbedding", "bad spec|cannot stand"),
    ("orig_type", "Embedding", "it replaced a Embedding"), ("bonds", "x", "bad spec|does not fit")])
def test_layer_specs_are_checked_against_the_model_at_load(ckpt, key, value, match):
    _, path = ckpt
    name = "model.layers.0.self_attn.o_proj"
    edit_meta(path, lambda m: m["layers"][name].update({key: value}))
    with pytest.raises(CheckpointError, match=match):
        load_compressed(path, verify=False)  # at load, not at the first forward


def test_layer_on_a_missing_module(ckpt):
    _, path = ckpt
    edit_meta(path, lambda m: m["layers"].update({"model.layers.7.mlp": m["layers"]["model.layers.0.mlp.up_proj"]}))
    with pytest.raises(CheckpointError, match="'model.layers.7.mlp' .* is not a module of LlamaForCausalLM"):
        load_compressed(path, verify=False)


# ---- 11. local-looking paths fail at once; hub ids respect offline mode ------------------------
def test_hub_id_shapes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    for spec in ["out/ckpt", "./m/x", "/abs/x", "~/x/y", "a/b/c", "org/model.safetensors", "x.json/y", "m/", "a\\b/c",
                 "../up/x", "org/.."]:
        assert not _looks_like_hub_id(spec), spec
    for spec in ["Qwen/Qwen2.5-0.5B", "HuggingFaceTB/SmolLM2-135M", "gpt2-org/my_model"]:
        assert _looks_like_hub_id(spec), spec


def test_missing_local_paths_fail_fast(tmp_path, monkeypatch):
    import huggingface_hub
    from transformers import AutoModelForCausalLM  # noqa: F401  (imports are not what is timed)

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "ckpt1").mkdir(parents=True)
    asked = []
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda *a, **k: asked.append(a))
    for spec in ["out/ckpt", "./out/ckpt", str(tmp_path / "out" / "ckpt"), "out/ckpt/final", "results/run1/ckpt"]:
        start = time.perf_counter()
        with pytest.raises(MissingModelError, match=f"no such model folder: {spec}"):
            load_model(spec)
        assert time.perf_counter() - start < 2
    assert not asked  # never a hub look-up


def test_hub_id_offline_fails_fast_without_network(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from transformers import AutoModelForCausalLM  # noqa: F401

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda *a, **k: pytest.fail("asked the hub"))
    start = time.perf_counter()
    with pytest.raises(MissingModelError, match="not in the local cache, and HF_HUB_OFFLINE is set"):
        load_model("mpokit-no-such-org/no-such-model")
    assert time.perf_counter() - start < 2
    assert "HF_HUB_OFFLINE" in fail_line(capsys, ["compress", "--model", "mpokit-no-such-org/no-such-model", "--method",
                                                  "mpo-datafree", "--out", str(tmp_path / "o")])


def test_hub_unreachable_fails_fast_with_one_request(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_ETAG_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    calls = []

    def unreachable(url, timeout=None, **kw):
        calls.append(timeout)
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    start = time.perf_counter()
    with pytest.raises(MissingModelError, match="could not be fetched .*HF_HUB_OFFLINE=1"):
        load_model("mpokit-no-such-org/no-such-model")
    assert time.perf_counter() - start < 2 and calls == [5.0]  # one request, short timeout, no retries


def test_a_reinstalled_gguf_leaves_one_cache_copy_not_one_per_install(tmp_path):
    from mpokit.io.models import prune_stale_entries

    def entry(name):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        return tmp_path / name

    old, new = entry("SmolLM2.Q4_1-98362432-1700000000"), entry("SmolLM2.Q4_1-98362432-1800000000")
    other_size, other_file = entry("SmolLM2.Q4_1-12345-1700000000"), entry("Other.Q4_1-98362432-1700000000")
    (tmp_path / "SmolLM2.Q4_1-98362432-notes").mkdir()  # not one of ours: left alone
    assert prune_stale_entries(new) == [old]
    assert not old.exists() and new.exists() and other_size.exists() and other_file.exists()
    assert (tmp_path / "SmolLM2.Q4_1-98362432-notes").exists()
