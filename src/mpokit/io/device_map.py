"""Models larger than one device: accelerate's big-model machinery (device_map, max_memory, disk offload).

Nothing here places weights by hand. A Hugging Face folder gets device_map / max_memory / offload_folder
through from_pretrained (io/models.py); an mpokit checkpoint, rebuilt on CPU by load_compressed, gets
the same strategies through accelerate's own pieces, as transformers combines them
(transformers.integrations.accelerate._get_device_map): get_balanced_memory (auto, balanced) or
get_max_memory (sequential), infer_auto_device_map with the model's decoder blocks kept whole
(model._no_split_modules), then dispatch_model, whose hooks move each block's weights to its
execution device around its forward and back.
"""
from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

__all__ = ["STRATEGIES", "parse_max_memory", "dispatch_", "device_map_summary", "offload_workspace",
           "check_offload_parent"]

STRATEGIES = ("auto", "balanced", "sequential")  # accelerate's names; auto and balanced compute the same map
_KEY = re.compile(r"cpu|mps|\d+|cuda:\d+")


def _size(text: str) -> int:
    from accelerate.utils import convert_file_size_to_int

    if text.isdigit():
        return int(text)
    try:
        return convert_file_size_to_int(text)
    except ValueError:
        raise ValueError(f"expected a size like 2GiB, 500MB or a number of bytes, got {text!r}") from None


def parse_max_memory(text: str) -> dict[int | str, int]:
    """'cpu=2GiB,0=20GiB' -> {'cpu': 2147483648, 0: 20000000000}: accelerate's max_memory (GPU by index)."""
    out: dict[int | str, int] = {}
    for part in text.split(","):
        key, eq, value = (s.strip() for s in part.partition("="))
        key = key.lower()
        if not eq or not _KEY.fullmatch(key) or not value:
            raise ValueError(f"expected --max-memory as DEVICE=SIZE[,DEVICE=SIZE...] with DEVICE cpu, mps, N or "
                             f"cuda:N (e.g. cpu=2GiB,0=20GiB), got {part.strip()!r} in {text!r}")
        device: int | str = int(key.removeprefix("cuda:")) if key[0].isdigit() or key.startswith("cuda") else key
        if device in out:
            raise ValueError(f"expected each device once in --max-memory, got {key} twice in {text!r}")
        size = _size(value)
        if size <= 0:
            raise ValueError(f"expected a size above 0 for {key} in --max-memory, got {value!r}")
        out[device] = size
    gpus, count = [d for d in out if isinstance(d, int)], torch.cuda.device_count()
    if any(d >= count for d in gpus):
        raise ValueError(f"expected GPU indices in --max-memory below torch.cuda.device_count() ({count}), got "
                         f"{max(gpus)}")
    if "mps" in out and not torch.backends.mps.is_available():
        raise ValueError("expected an available device in --max-memory, got mps: torch.backends.mps.is_available() "
                         "is False")
    return out


def dispatch_(model: nn.Module, strategy: str, max_memory: dict | None = None,
              offload_folder: str | Path | None = None) -> nn.Module:
    """Spread an in-memory model (e.g. a loaded checkpoint) over GPUs, CPU and disk with accelerate; in place."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    from mpokit.layers import layer_modules

    if strategy not in STRATEGIES:
        raise ValueError(f"expected a device map strategy in {STRATEGIES}, got {strategy!r}")
    blocks = list(getattr(model, "_no_split_modules", None) or [])
    given = None if max_memory is None else dict(max_memory)  # accelerate converts the dict it is given in place
    budget = (get_max_memory(given) if strategy == "sequential"
              else get_balanced_memory(model, max_memory=given, no_split_module_classes=blocks))
    device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=blocks)
    if "disk" in device_map.values() and offload_folder is None:
        raise ValueError(f"expected an offload folder: the device map puts {_on(device_map, 'disk')} on disk "
                         f"(give --offload-dir, or a larger --max-memory)")
    for m in model.modules():  # cached dense weights are keyed by id(core), and the hooks make new cores per forward
        if callable(getattr(m, "clear_cache", None)):
            m.clear_cache()
    # accelerate's hooks load an offloaded module's own tensors around its forward; an mpokit layer keeps its
    # cores in a container that is never called (a ParameterList), so whole blocks and mpokit layers load
    # all their tensors at once (without this, measured: the cores stay on meta and the outputs are wrong).
    preload = sorted({*blocks, *(type(m).__name__ for _, m in layer_modules(model))})
    return dispatch_model(model, device_map, offload_dir=None if offload_folder is None else str(offload_folder),
                          skip_keys=getattr(model, "_skip_keys_device_placement", None),
                          preload_module_classes=preload)


def _on(device_map: dict, device) -> str:
    names = [n or "the whole model" for n, d in device_map.items() if d == device]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _device_name(device) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def device_map_summary(model: nn.Module) -> dict | None:
    """Where accelerate put each module (hf_device_map, modules of one device already grouped by accelerate)
    and the weight bytes per device (a tied weight counted once); None for weights spread without a map."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:  # from_pretrained sets none when everything fits on one device
        devices = {p.device for p in model.parameters()}
        if len(devices) != 1:
            return None
        device_map = {"": str(devices.pop())}
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(model)
    bytes_on: dict[str, int] = {}
    for name, device in device_map.items():
        bytes_on[_device_name(device)] = bytes_on.get(_device_name(device), 0) + int(sizes.get(name, 0))
    return {"modules": {name: _device_name(d) for name, d in device_map.items()}, "bytes": bytes_on}


def check_offload_parent(parent: str | Path) -> Path:
    """`parent` as a path, refused if it is an existing file (callers check before minutes of work)."""
    parent = Path(parent).expanduser()
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(f"expected --offload-dir to be a folder, got the file {parent}")
    return parent


@contextlib.contextmanager
def offload_workspace(parent: str | Path | None, prefix: str = "mpokit-offload-") -> Iterator[Path | None]:
    """A fresh folder (`prefix`*) inside `parent` (created if missing) for offloaded tensors, removed afterwards.

    Fresh, because dispatch_model reuses an offload folder that already holds an index.json: stale
    weights of another model would be read silently. Only this folder is removed, never `parent`."""
    if parent is None:
        yield None
        return
    parent = check_offload_parent(parent)
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
