"""The hidden states calibration carries from one decoder block to the next: in memory, or on disk.

One set is tokens x hidden per block boundary: 19 MB for 8192 tokens of SmolLM2-135M, but 4 GB for
128 x 2048 tokens of a 7B model, and the sensitivity pass keeps one set per block for its backward
(30 sets, 570 MB, on the default model). Under `offload_activations(folder)` every set lives on disk,
one safetensors file per calibration batch, and is read back one batch at a time: memory then holds
a batch's states, not the set's.
"""
from __future__ import annotations

import itertools
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch

__all__ = ["Activations", "offload_activations", "offload_folder"]

_FOLDER: ContextVar[Path | None] = ContextVar("mpokit_activation_offload", default=None)
_NAMES = itertools.count()


def offload_folder() -> Path | None:
    """The private folder activations go to now (None: they stay in memory)."""
    return _FOLDER.get()


@contextmanager
def offload_activations(folder: str | Path):
    """Keep calibration activations on disk under `folder` (created if missing) while the block is open.

    They go to a fresh private subfolder (mpokit-activations-*, io.device_map.offload_workspace), removed on
    exit with everything in it; nothing else under `folder` is touched."""
    from mpokit.io.device_map import offload_workspace

    with offload_workspace(folder, prefix="mpokit-activations-") as private:
        token = _FOLDER.set(private)
        try:
            yield private
        finally:
            _FOLDER.reset(token)


class Activations:
    """A list of tensors (one per calibration batch), held in memory or, when created under
    offload_activations, written to disk on append and read back on indexing."""

    def __init__(self, tensors=()):
        self.folder = offload_folder()
        self._items: list = []
        for t in tensors:
            self.append(t)

    @property
    def on_disk(self) -> bool:
        return self.folder is not None

    def append(self, t: torch.Tensor) -> None:
        if self.folder is None:
            self._items.append(t)
            return
        from safetensors.torch import save_file

        path = self.folder / f"{next(_NAMES)}.safetensors"
        save_file({"h": t.detach().contiguous().cpu()}, str(path))
        self._items.append((path, t.device))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, k: int) -> torch.Tensor:
        if self.folder is None:
            return self._items[k]
        from safetensors.torch import load_file

        path, device = self._items[k]
        return load_file(str(path), device=str(device))["h"]

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    def release(self) -> None:
        """Drop the tensors (and their files): the set is not needed again."""
        if self.folder is not None:
            for path, _ in self._items:
                path.unlink(missing_ok=True)
        self._items = []
