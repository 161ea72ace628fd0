"""Swap submodules by dotted name, and find weights tied to each other."""
from __future__ import annotations

from torch import nn

from mpokit.layers.base import replace_module

__all__ = ["get_module", "set_module", "tied_groups", "shared_outside"]


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(f"unknown module name {name!r}") from e


def set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace model.<name> with new; returns the old module (mpokit modules learn their name, for errors)."""
    return replace_module(model, name, new)


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Groups of module names whose `.weight` is the same Parameter (e.g. embed_tokens and lm_head)."""
    by_id: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        w = getattr(module, "weight", None)
        if isinstance(w, nn.Parameter) and name:
            by_id.setdefault(id(w), []).append(name)
    return [sorted(set(v)) for v in by_id.values() if len(set(v)) > 1]


# Storage containers inside a layer; sharing is reported for the layer that holds them.
_CONTAINERS = (nn.ParameterList, nn.ParameterDict, nn.ModuleList, nn.ModuleDict)
_CONTAINER_NAMES = ("QuantizedTensor",)


def _inside(name: str, root: str) -> bool:
    return name == root or name.startswith(root + ".")


def _layer_of(model: nn.Module, name: str) -> str:
    """'lm_head.cores' -> 'lm_head', 'x.qcores.0' -> 'x': the nearest enclosing non-container module."""
    while name:
        m = model.get_submodule(name)
        if not (isinstance(m, _CONTAINERS) or type(m).__name__ in _CONTAINER_NAMES):
            return name
        name = name.rpartition(".")[0]
    return name


def shared_outside(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """name -> layers outside `name`'s subtree that hold one of its tensors (parameters or buffers).

    A target listed here shares storage with another layer (tied embeddings, MPO layers with
    `tied_to`, central cores shared across layers): replacing it by a module with storage of its
    own would silently untie them and store the weight twice. Names without sharing are left out.
    """
    holders: dict[int, set[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for t in (*module._parameters.values(), *module._buffers.values()):
            if t is not None:
                holders.setdefault(id(t), set()).add(mod_name)
    out = {}
    for name in names:
        root = get_module(model, name)
        ids = {id(t) for t in (*root.parameters(), *root.buffers())}
        others = {h for i in ids for h in holders.get(i, ()) if not _inside(h, name)}
        if others:
            out[name] = sorted({_layer_of(model, h) for h in others})
    return out
