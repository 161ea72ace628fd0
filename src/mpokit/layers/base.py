"""The layer protocol: what every mpokit layer does, so io and surgery need no list of layer types.

A layer that a checkpoint may hold subclasses MpokitLayer (before nn.Module) and implements
  spec() / from_spec(spec, device, dtype)   save and load: a JSON description, then an empty layer
                                            of that description for load_state_dict to fill
  to_dense()                                undo: the plain module it replaced (nn.Linear, a
                                            transformers Conv1D when orig_type == "Conv1D",
                                            nn.Embedding, or a routed FFN's dense form)
  storage_bytes()                           bytes of its tensors as a checkpoint stores them
and, when undoing means more than putting to_dense() in its place (a routed FFN that absorbed
several modules), overrides undo_(model, name). Defining the class registers it in LAYERS under
its class name, which is the "type" field of its spec: adding a layer type touches its own file.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["MpokitLayer", "LAYERS", "register_layer", "layer_modules", "replace_module", "as_replaced"]

LAYERS: dict[str, type] = {}  # class name (a spec's "type") -> layer class


class MpokitLayer:
    """Mixin of the layer protocol; `class X(MpokitLayer, nn.Module, register=False)` for abstract bases."""

    def __init_subclass__(cls, register: bool = True, **kwargs):
        super().__init_subclass__(**kwargs)
        if register:
            _register(cls)

    def spec(self) -> dict[str, Any]:
        """JSON-safe description with "type": the class name; from_spec(spec) rebuilds the layer empty."""
        raise NotImplementedError(f"{type(self).__name__} does not implement spec()")

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device=None, dtype=None) -> nn.Module:
        raise NotImplementedError(f"{cls.__name__} does not implement from_spec()")

    def to_dense(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} does not implement to_dense()")

    def undo_(self, model: nn.Module, name: str) -> None:
        """Put the dense form back where this layer stands (model.<name>)."""
        replace_module(model, name, self.to_dense())

    def storage_bytes(self) -> int:
        """Bytes of the state dict (packed codes at 1 byte per uint8, shared tensors once)."""
        seen, total = set(), 0
        for t in self.state_dict(keep_vars=True).values():
            key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return total


def _register(cls: type) -> None:
    """LAYERS[cls.__name__] = cls, unless another class (not a redefinition of cls) has that name:
    checkpoints name layer types by class name alone."""
    taken = LAYERS.get(cls.__name__)
    if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(f"expected a new layer type name, got {cls.__name__!r}, which names "
                        f"{taken.__module__}.{taken.__qualname__} in checkpoints; rename {cls.__qualname__}")
    LAYERS[cls.__name__] = cls


def register_layer(cls: type) -> type:
    """Register `cls` again (subclasses of MpokitLayer register themselves when defined)."""
    if not (isinstance(cls, type) and issubclass(cls, MpokitLayer)):
        raise TypeError(f"expected a subclass of mpokit.layers.base.MpokitLayer, got {cls!r}")
    _register(cls)
    return cls


def layer_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every mpokit layer in `model`, outermost first (parents before children)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MpokitLayer)]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """model.<name> = new; returns the old module. mpokit modules learn their name (for errors)."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError as e:
        raise ValueError(f"unknown module name {parent_name!r}") from e
    old = getattr(parent, child)
    setattr(parent, child, new)
    if type(new).__module__.startswith("mpokit."):
        new.mpokit_name = name
    return old


def as_replaced(lin: nn.Linear, orig_type: str | None) -> nn.Module:
    """`lin` as the module type a layer replaced: a transformers Conv1D (weight (in, out)) for
    orig_type "Conv1D" (GPT-2), else `lin` itself."""
    if orig_type != "Conv1D":
        return lin
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(lin.out_features, lin.in_features)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.t())
        if lin.bias is not None:
            conv.bias.copy_(lin.bias)
    return conv.to(device=lin.weight.device, dtype=lin.weight.dtype)
