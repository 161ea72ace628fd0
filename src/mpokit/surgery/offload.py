"""Parameters that stay in their checkpoint until a block needs them (block-streamed compression).

A model built on the meta device gets an `Offload`: its original parameters are read from a
`WeightSource` (a memory-mapped safetensors checkpoint, io/lazy.py) when a module becomes
resident and dropped back to meta when it is released, so only the blocks in use occupy memory.

Loading swaps the real tensor into the *same* Parameter object (torch.utils.swap_tensors), so
ties (embed_tokens/lm_head share one Parameter), `id`-based sharing checks and any reference a
caller holds stay valid. A parameter goes back to meta only if it still equals the checkpoint:
one a method edited in place is part of the output and is kept. Modules a method swaps in
(compressed layers) own new tensors and are never touched. Every block also gets forward hooks,
so a whole-model forward (evaluation, statistics of layers outside the blocks) works too, one
block at a time, at the cost of reading each block again.

accelerate's offload hooks (AlignDevicesHook) move weights only around forward calls; compression
reads and replaces weights between forwards, which is why this small layer exists.
"""
from __future__ import annotations

import contextlib
import ctypes
import sys
import weakref
from typing import Iterator, Protocol

import torch
from torch import nn

__all__ = ["WeightSource", "Offload", "offload_of", "resident", "materialize_all_", "detach_offload", "input_device"]


class WeightSource(Protocol):
    def keys(self) -> set[str]: ...

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]: ...


_OFFLOADS: "weakref.WeakKeyDictionary[nn.Module, Offload]" = weakref.WeakKeyDictionary()


def _swap(p: nn.Parameter, value: torch.Tensor) -> None:
    with torch.no_grad():
        torch.utils.swap_tensors(p, nn.Parameter(value, requires_grad=p.requires_grad))


class Offload:
    """The parameters of `model` that `source` holds, loaded on demand as `dtype` on `device`."""

    def __init__(self, model: nn.Module, source: WeightSource, blocks: nn.ModuleList, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        # weak: the registry maps model -> Offload, and a strong reference back would keep both alive forever
        self._model = weakref.ref(model)
        self.source, self.blocks = source, blocks
        self.dtype, self.device = dtype, torch.device(device)
        available = source.keys()
        self.key_of: dict[int, str] = {}  # id(param) -> its checkpoint key (first tied name found there)
        for name, p in model.named_parameters(remove_duplicate=False):
            if name in available and id(p) not in self.key_of:
                self.key_of[id(p)] = name
        missing = sorted({n for n, p in model.named_parameters() if id(p) not in self.key_of})
        if missing:
            raise ValueError(f"expected the checkpoint to hold every parameter of the model, got "
                             f"{len(missing)} missing ({', '.join(missing[:3])})")
        self.pinned: dict[int, int] = {}
        self.hooks = [h for b in blocks for h in (b.register_forward_pre_hook(self._before),
                                                  b.register_forward_hook(self._after))]
        self.reads = 0  # tensors read from the source, for tests and reports
        _OFFLOADS[model] = self

    def _tracked(self, module: nn.Module) -> list[nn.Parameter]:
        return [p for p in module.parameters() if id(p) in self.key_of]

    def materialize(self, module: nn.Module) -> None:
        """Load the module's parameters that are still on the meta device."""
        todo = [p for p in self._tracked(module) if p.is_meta]
        if not todo:
            return
        values = self.source.read([self.key_of[id(p)] for p in todo])
        for p in todo:
            _swap(p, values[self.key_of[id(p)]].to(self.device, self.dtype))
        self.reads += len(todo)

    def release(self, module: nn.Module) -> None:
        """Drop the module's parameters back to meta where they still equal the checkpoint."""
        if self.pinned.get(id(module)):
            return
        loaded = [p for p in self._tracked(module) if not p.is_meta]
        if not loaded:
            return
        values = self.source.read([self.key_of[id(p)] for p in loaded])
        for p in loaded:
            original = values[self.key_of[id(p)]].to(self.device, self.dtype)
            if p.shape == original.shape and torch.equal(p.detach(), original):
                _swap(p, torch.empty_like(p, device="meta"))
        del values
        _return_freed_memory()

    def materialize_all(self) -> None:
        self.materialize(self._model())

    def detach(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        _OFFLOADS.pop(self._model(), None)

    def _before(self, module, args):
        self.materialize(module)

    def _after(self, module, args, out):
        if not torch.is_grad_enabled():  # a live autograd graph still holds the weights
            self.release(module)


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to do
        return None


_LIBC = _libc() if sys.platform.startswith("linux") else None


def _return_freed_memory() -> None:
    """Hand memory freed by the released block back to the system. glibc keeps freed chunks of up to
    32 MB in its heap, where the next block's differently sized tensors cannot reuse them: measured
    on the default job, resident memory then grew by ~600 MB over the passes (malloc_trim(0) returns
    free pages anywhere in the heap, not only at its top)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def offload_of(model: nn.Module) -> Offload | None:
    return _OFFLOADS.get(model)


@contextlib.contextmanager
def resident(model: nn.Module, module: nn.Module) -> Iterator[None]:
    """Keep `module` (a block, a layer) loaded inside the block; released after. No-op for a normal model."""
    off = offload_of(model)
    if off is None:
        yield
        return
    off.materialize(module)
    off.pinned[id(module)] = off.pinned.get(id(module), 0) + 1
    try:
        yield
    finally:
        off.pinned[id(module)] -= 1
        if not off.pinned[id(module)]:
            del off.pinned[id(module)]
            off.release(module)


def materialize_all_(model: nn.Module) -> None:
    """Load every parameter still in the checkpoint (before saving or handing the model on)."""
    off = offload_of(model)
    if off is not None:
        off.materialize_all()


def detach_offload(model: nn.Module) -> None:
    """Load everything and turn the model into an ordinary one (hooks removed)."""
    off = offload_of(model)
    if off is not None:
        off.materialize_all()
        off.detach()


def input_device(model: nn.Module) -> torch.device:
    """Where token ids go: a streamed model's device (its first parameter may still be on meta); for a model
    accelerate dispatched with its first weights on disk (meta here), the execution device of the accelerate
    hook that loads them; else the device of its first parameter."""
    off = offload_of(model)
    if off is not None:
        return off.device
    name, first = next(model.named_parameters())
    if first.device.type == "meta":
        hooked = _hook_execution_device(model, name)
        if hooked is not None:
            return hooked
    return first.device


def _hook_execution_device(model: nn.Module, param_name: str) -> torch.device | None:
    """The execution_device of the nearest accelerate hook (AlignDevicesHook, or one inside a SequentialHook)
    on the module holding `param_name` or one of its parents; None where there is none."""
    parts = param_name.split(".")[:-1]
    for depth in range(len(parts), -1, -1):
        hook = getattr(model.get_submodule(".".join(parts[:depth])), "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            device = getattr(h, "execution_device", None)
            if device is not None:
                return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    return None
