"""Writes that never leave a half-written file or folder behind, and never replace what they must not.

A folder `P` is written by `atomic_dir` as:
  1. a temporary folder `.P.<pid>.<random>.tmp` beside `P` is filled by the caller,
     then every file in it and the folder itself are fsynced;
  2. an existing `P` is renamed to `.P.old`, the temporary folder to `P`, the parent is
     fsynced and `.P.old` removed.
A process killed between the two renames of step 2 leaves `.P.old` and no `P`: the next
`recover(P)` (run by every save and load of `P`) renames it back, so at every instant `P`
holds the old or the new folder, or the old one waits in `.P.old`. `recover` also removes a
`.P.old` once `P` is back, and the `.tmp` folders of processes that are gone.

An existing `P` is replaced only when that is safe (`check_target`): never a file or a
symbolic link, never the current folder or a folder above it, never a `protect`ed path (the
input model) or a folder holding one, a non-empty folder only with `overwrite=True` and, when
`marker` is given, only when it holds that file (an mpokit checkpoint holds mpokit.json).
An empty folder may always be used.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

__all__ = ["atomic_dir", "write_json", "write_text", "check_target", "recover", "OutputPathError"]


class OutputPathError(FileExistsError, ValueError):
    """An output path mpokit refuses to write (it would replace something that is not its own)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_mode(path: Path, base: int) -> None:
    """mkstemp/mkdtemp create owner-only (0600/0700) entries; give them the usual umask-based mode."""
    os.chmod(path, base & ~_umask())


# ---- durability ----------------------------------------------------------------
def _fsync_path(path: Path, directory: bool = False) -> None:
    if directory and not hasattr(os, "O_DIRECTORY"):  # Windows cannot open folders; nothing to do
        return
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some filesystems refuse to open folders; the rename is still atomic
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every folder, deepest first."""
    for folder, dirs, files in os.walk(root, topdown=False):
        for name in files:
            p = Path(folder) / name
            if not p.is_symlink():
                _fsync_path(p)
        _fsync_path(Path(folder), directory=True)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An advisory lock on `folder` (flock on the folder itself: no lock file is left behind).

    Held only around the short recover/rename steps, so two processes saving the same path
    cannot interleave their renames. Best effort: where flock is missing it does nothing.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# ---- leftovers -----------------------------------------------------------------
def _old_path(path: Path) -> Path:
    return path.parent / f".{path.name}.old"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


_RAND = r"[a-z0-9_]{8}"  # tempfile's random part


def _leftovers(path: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """Entries beside `path` left by interrupted writes of `path` (and only of `path`):
    (our `.old` copy, old copies from the earlier pid-less naming, temporary entries whose
    writer no longer runs)."""
    name = re.escape(path.name)
    ours, tmp = re.compile(rf"\.{name}\.old"), re.compile(rf"\.{name}\.(\d+)\.{_RAND}\.tmp")
    legacy_old, legacy_tmp = re.compile(rf"\.{name}\.{_RAND}\.old"), re.compile(rf"\.{name}\.{_RAND}\.tmp")
    olds, legacy, stale = [], [], []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return [], [], []
    for entry in entries:
        if ours.fullmatch(entry.name):
            olds.append(entry)
        elif (m := tmp.fullmatch(entry.name)) and not _pid_alive(int(m.group(1))):
            stale.append(entry)
        elif legacy_tmp.fullmatch(entry.name):
            stale.append(entry)
        elif legacy_old.fullmatch(entry.name) and not os.path.lexists(path.parent / entry.name[1:-4]):
            legacy.append(entry)  # not the `.old` of a sibling named like `path.xxxxxxxx`
    legacy.sort(key=lambda p: -_mtime(p))
    return olds, legacy, stale


def _mtime(p: Path) -> float:
    try:
        return p.lstat().st_mtime
    except OSError:
        return 0.0


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _is_empty_dir(path: Path) -> bool:
    try:
        return path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    except OSError:
        return False


def _recover_locked(path: Path, keep: Path | None = None) -> None:
    olds, legacy, stale = _leftovers(path)
    if (olds or legacy) and _is_empty_dir(path):  # something made an empty folder where the old one belongs
        os.rmdir(path)
    if not os.path.lexists(path) and (olds or legacy):  # killed between "path -> .old" and "tmp -> path"
        os.replace((olds or legacy)[0], path)
        olds = olds[1:]
        _fsync_path(path.parent, directory=True)
    for p in olds + [s for s in stale if s != keep]:  # older-scheme copies are only ever restored, never removed
        _remove(p)


def recover(path: str | os.PathLike) -> None:
    """Finish or undo an interrupted atomic_dir(path): restore `.path.old` if `path` is missing,
    then remove old copies and the temporary folders of processes that no longer run."""
    path = Path(path)
    if path.name in ("", ".", "..") or not path.parent.is_dir():
        return
    with _locked(path.parent):
        _recover_locked(path)


# ---- what may be replaced ------------------------------------------------------
def _resolved(p: str | os.PathLike) -> Path:
    return Path(os.path.abspath(Path(p).expanduser())).resolve()


def check_target(path: str | os.PathLike, *, overwrite: bool = False, marker: str | None = None,
                 protect: Iterable[str | os.PathLike | None] = (), what: str | None = None) -> None:
    """Raise OutputPathError unless atomic_dir(path, ...) may write `path` (see the module doc)."""
    path = Path(path)
    what = what or (f"a folder holding {marker}" if marker else "a folder")
    target = _resolved(path)
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current folder was removed: nothing there to protect
        cwd = None
    if cwd is not None and (target == cwd or target in cwd.parents):
        raise OutputPathError(f"refusing to write to {path}: it is the current folder"
                              f"{'' if target == cwd else ' or a folder above it'}; choose a new output folder")
    for p in protect:
        if p is None or not os.path.lexists(Path(p).expanduser()):  # an alias or hub id: nothing here to replace
            continue
        source = _resolved(p)
        if target == source or target in source.parents:
            raise OutputPathError(f"refusing to write to {path}: it would replace the input model {p}"
                                  f"{'' if target == source else ' (it holds it)'}; choose another output folder")
    if not os.path.lexists(path):
        return
    if path.is_symlink():
        raise OutputPathError(f"refusing to replace {path}: it is a symbolic link; pass the folder it points to")
    if not path.is_dir():
        raise OutputPathError(f"refusing to replace {path}: it is a file, not a folder; choose another output folder")
    if not any(path.iterdir()):
        return  # an empty folder may be used
    if marker is not None and not (path / marker).is_file():
        raise OutputPathError(f"refusing to replace {path}: it exists and is not {what} (no {marker}); "
                              "choose another output folder")
    if not overwrite:
        raise OutputPathError(f"{path} exists; pass --overwrite to replace it (overwrite=True in Python)")


# ---- writers -------------------------------------------------------------------
def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"cannot create the folder {path.parent} for {path}: {e.strerror or e}") from e


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write to a temporary file beside `path`, fsync it, then rename it into place."""
    path = Path(path)
    _make_parent(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _default_mode(Path(tmp), 0o666)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_path(path.parent, directory=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False, marker: str | None = None,
               protect: Iterable[str | os.PathLike | None] = (), what: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `path` whole, on error it is removed.

    An existing `path` is kept until the new folder is complete, so a failed save loses
    nothing; it is replaced only as check_target allows (checked before the caller writes
    anything and again before the rename). Interrupted saves are repaired by recover().
    """
    path = Path(path)
    protect = list(protect)
    _make_parent(path)
    recover(path)
    check_target(path, overwrite=overwrite, marker=marker, protect=protect, what=what)
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"))
    except OSError as e:
        raise OutputPathError(f"cannot write to {path.parent}: {e.strerror or e}") from e
    try:
        _default_mode(tmp, 0o777)
        yield tmp
        _fsync_tree(tmp)
        with _locked(path.parent):
            _recover_locked(path, keep=tmp)
            check_target(path, overwrite=overwrite, marker=marker, protect=protect, what=what)
            _commit(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`, keeping the old `path` as `.path.old` until the new one is in place."""
    old = _old_path(path)
    had_old = os.path.lexists(path)
    if had_old:
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if had_old and not os.path.lexists(path):
            os.replace(old, path)  # put the old folder back at once (a kill here is undone by recover)
        raise
    _fsync_path(path.parent, directory=True)
    if had_old:
        _remove(old)
