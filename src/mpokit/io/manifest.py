"""A manifest of a checkpoint folder: the sha256 and size of every file, plus a hash of the metadata.

Written into mpokit.json at save (which is itself the one file it cannot list) and checked at
load, so a changed config.json, tokenizer file or weights file, a file added or removed, and
a hand-edited mpokit.json are all detected before any weight is read.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from mpokit.io.validate import CheckpointError

__all__ = ["ManifestError", "file_sha256", "build_manifest", "verify_manifest", "meta_digest", "ALGORITHM"]

ALGORITHM = "sha256"
# Files a person (or a hub upload) may add beside a checkpoint without changing the model:
# no loader reads them. Hidden entries (.gitattributes, .DS_Store) are skipped as well.
_DOC_FILES = re.compile(r"(README|LICEN[CS]E|NOTICE)(\.[A-Za-z0-9]+)?", re.IGNORECASE)
_HEX = re.compile(r"[0-9a-f]{64}")


class ManifestError(CheckpointError):
    """A folder does not match its manifest (corrupt, truncated, edited or incomplete)."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path, exclude: set[str]) -> dict[str, Path]:
    """Every regular file under `folder` by its relative posix name, `exclude`d names and hidden entries left out."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if rel in exclude or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        if p.is_file() and not p.is_symlink():
            out[rel] = p
    return out


def meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of the metadata without its manifest, in a canonical JSON form."""
    body = {k: v for k, v in meta.items() if k != "manifest"}
    canonical = json.dumps(json.loads(json.dumps(body)), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def build_manifest(folder: Path, meta: dict[str, Any], exclude: set[str]) -> dict[str, Any]:
    """The manifest of `folder` (every file but `exclude`) and of `meta`."""
    files = {rel: {"sha256": file_sha256(p), "size": p.stat().st_size} for rel, p in _files(folder, exclude).items()}
    return {"algorithm": ALGORITHM, "files": files, "meta_sha256": meta_digest(meta)}


def _check_shape(manifest: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(manifest, dict) or manifest.get("algorithm") != ALGORITHM:
        raise ManifestError(f"expected a {ALGORITHM} manifest in {where}, got {str(manifest)[:80]!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ManifestError(f"expected the manifest in {where} to list the checkpoint's files, got {str(files)[:80]!r}")
    for rel, entry in files.items():
        if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not _HEX.fullmatch(entry["sha256"])
                or not isinstance(entry.get("size"), int)):
            raise ManifestError(f"expected a sha256 and a size for {rel!r} in the manifest of {where}, got {entry!r}")
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise ManifestError(f"expected file names inside the checkpoint in the manifest of {where}, got {rel!r}")
    if not isinstance(manifest.get("meta_sha256"), str):
        raise ManifestError(f"expected meta_sha256 in the manifest of {where}")
    return files


def verify_manifest(folder: Path, meta: dict[str, Any], exclude: set[str], where: str) -> None:
    """Raise ManifestError unless every file of `folder` and `meta` itself match meta["manifest"]."""
    files = _check_shape(meta.get("manifest"), where)
    present = _files(folder, exclude)
    for rel, entry in files.items():
        p = present.get(rel)
        if p is None:
            raise ManifestError(f"incomplete checkpoint: {folder / rel} is listed in {where} but missing")
        size = p.stat().st_size
        if size != entry["size"] or file_sha256(p) != entry["sha256"]:
            sizes = f" ({size} bytes, saved with {entry['size']})" if size != entry["size"] else ""
            raise ManifestError(f"corrupt or truncated checkpoint: sha256 of {folder / rel} does not match "
                                f"{where}{sizes}")
    extra = [rel for rel in present if rel not in files and not _DOC_FILES.fullmatch(Path(rel).name)]
    if extra:
        raise ManifestError(f"unexpected files in the checkpoint {folder}, not in its manifest: {', '.join(extra)} "
                            "(they could change what is loaded; remove them, or load with verify=False)")
    if meta_digest(meta) != meta["manifest"]["meta_sha256"]:
        raise ManifestError(f"{where} was edited after saving (its hash does not match); save the model again, "
                            "or load with verify=False")
