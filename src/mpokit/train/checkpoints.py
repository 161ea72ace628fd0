"""Trainer checkpoints that can be trusted at resume: a hash manifest per save, verification, fallback.

Hugging Face Trainer writes checkpoint-N folders in place and resumes from the newest one
without checking it, so a corrupt byte is trained on silently and a half-written folder (a
kill during a save) crashes the resume. Here:

- after each save, `ManifestCallback` fsyncs the folder's files and writes MANIFEST (size and
  sha256 of every file, the global step) atomically: a folder with a matching manifest is
  complete and unchanged;
- `verify_checkpoint` checks a folder against its manifest, or, for a folder without one (an
  older mpokit, or a kill between the Trainer's save and the manifest), loads every weights,
  optimizer, scheduler and RNG file in full, as the Trainer would;
- `pick_resume` returns the newest folder that verifies, moving the invalid newer ones aside
  (to invalid-checkpoint-N, which Trainer ignores) and saying so on stderr; with none valid,
  training starts afresh (and says so). A checkpoint named by the user must verify.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

__all__ = ["MANIFEST", "ResumeError", "trainer_checkpoints", "write_manifest", "verify_checkpoint", "pick_resume",
           "manifest_callback"]

MANIFEST = "mpokit-checkpoint.json"
FORMAT = 1
STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json",
            "adapter_model.safetensors", "adapter_model.bin")
_NOT_LOADED = {"training_args.bin", MANIFEST}  # a pickled TrainingArguments: Trainer never loads it on resume


class ResumeError(ValueError):
    """A checkpoint given to resume from is missing, corrupt or incomplete."""


def _say(message: str) -> None:
    print(f"mpokit: warning: {message}", file=sys.stderr, flush=True)


def _is_main_process() -> bool:
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) in ("0", "")


def trainer_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """checkpoint-N folders of a Trainer output folder, newest (largest N) first."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _CHECKPOINT.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and p.name != MANIFEST
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _sha256(path: Path) -> str:
    from mpokit.io.manifest import file_sha256

    return file_sha256(path)


def _global_step(folder: Path) -> int:
    state = json.loads((folder / STATE).read_text(encoding="utf-8"))
    step = state.get("global_step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"expected an integer global_step in {STATE}, got {step!r}")
    return step


def write_manifest(folder: str | os.PathLike) -> Path:
    """Fsync every file of a finished checkpoint folder, then write its manifest atomically."""
    from mpokit.io.atomic import write_json

    folder = Path(folder)
    files = {}
    for p in _files(folder):
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    manifest = {"format": FORMAT, "algorithm": "sha256", "global_step": _global_step(folder), "files": files}
    write_json(folder / MANIFEST, manifest)
    return folder / MANIFEST


def _check_manifest(folder: Path) -> str | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"unreadable {MANIFEST} ({e})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != FORMAT or STATE not in files:
        return f"{MANIFEST} is not a manifest this version of mpokit writes"
    for rel, entry in files.items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        if not isinstance(entry, dict) or p.stat().st_size != entry.get("size"):
            return f"{rel} has {p.stat().st_size} bytes, the manifest says {entry.get('size')}"
        if _sha256(p) != entry.get("sha256"):
            return f"{rel} does not match its sha256 in the manifest (corrupt)"
    step = _global_step(folder)
    if step != manifest.get("global_step"):
        return f"{STATE} says step {step}, the manifest {manifest.get('global_step')}"
    return None


def _finite(tensors: dict) -> bool:
    import torch

    return all(not t.is_floating_point() or bool(torch.isfinite(t).all()) for t in tensors.values())


def _full_load(folder: Path) -> str | None:
    """Load every file the Trainer reads at resume; the reason it fails, or None."""
    import torch
    from safetensors.torch import load_file
    from transformers.trainer_pt_utils import safe_globals

    if not any((folder / w).is_file() for w in _WEIGHTS):
        return "no model weights file"
    if not (folder / "optimizer.pt").is_file():
        return "no optimizer.pt (the save did not finish)"
    for p in _files(folder):
        rel = p.relative_to(folder).as_posix()
        if p.name in _NOT_LOADED:
            continue
        if p.suffix == ".safetensors":
            tensors = load_file(p, device="cpu")
            if not _finite(tensors):
                return f"{rel} holds non-finite weights"
        elif p.suffix in (".pt", ".pth", ".bin"):
            with safe_globals():
                torch.load(p, map_location="cpu", weights_only=True)
        elif p.suffix == ".json":
            json.loads(p.read_text(encoding="utf-8"))
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            shards = set(json.loads((folder / index).read_text(encoding="utf-8")).get("weight_map", {}).values())
            missing = sorted(s for s in shards if not (folder / s).is_file())
            if missing:
                return f"missing weight shards {missing}"
    return None


def verify_checkpoint(folder: str | os.PathLike) -> str | None:
    """Why `folder` cannot be resumed from (missing, incomplete, corrupt), or None when it can."""
    folder = Path(folder)
    if not folder.is_dir():
        return "no such folder"
    if not (folder / STATE).is_file():
        return f"no {STATE} (the save did not finish)"
    try:
        _global_step(folder)
        if (folder / MANIFEST).is_file():
            return _check_manifest(folder)
        return _full_load(folder)
    except Exception as e:  # noqa: BLE001: any failure to read a file means the folder cannot be trusted
        return f"cannot be loaded ({type(e).__name__}: {' '.join(str(e).split())[:200]})"


def _move_aside(folder: Path) -> Path:
    target = folder.with_name(f"invalid-{folder.name}")
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)  # an older invalid copy of the same step
    os.replace(folder, target)
    return target


def pick_resume(out_dir: str | os.PathLike, resume: bool | str | os.PathLike | None) -> str | None:
    """The checkpoint to resume from: a verified path, or None to start afresh (said on stderr)."""
    if resume is None or resume is False:
        return None
    if resume is not True:
        path = Path(resume)
        if not path.exists():
            raise FileNotFoundError(f"missing checkpoint to resume from: {path}")
        reason = verify_checkpoint(path)
        if reason is not None:
            raise ResumeError(f"cannot resume from {path}: {reason}")
        return str(path)
    skipped = []
    for folder in trainer_checkpoints(out_dir):
        reason = verify_checkpoint(folder)
        if reason is None:
            if skipped:
                _say(f"resuming from {folder}, the newest valid checkpoint")
            return str(folder)
        where = folder
        if _is_main_process():
            where = _move_aside(folder)
        skipped.append(folder)
        _say(f"skipping checkpoint {folder}: {reason}; moved aside to {where}")
    if skipped:
        _say(f"no valid checkpoint in {out_dir} to resume from; training starts from step 0")
    else:
        _say(f"no checkpoint in {out_dir} to resume from; training starts from step 0")
    return None


def manifest_callback():
    """A TrainerCallback writing MANIFEST into each checkpoint right after the Trainer saved it."""
    from transformers import TrainerCallback

    class ManifestCallback(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    write_manifest(folder)
            return control

    return ManifestCallback()

