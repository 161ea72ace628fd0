"""Undo transforms: turn every mpokit layer back into the plain layer it replaced (the layer protocol)."""
from __future__ import annotations

from torch import nn

from mpokit.layers.base import MpokitLayer, layer_modules
from mpokit.surgery.replace import get_module

__all__ = ["to_dense_module", "unload_"]


def to_dense_module(layer: MpokitLayer) -> nn.Module:
    """nn.Linear, transformers Conv1D or nn.Embedding with the layer's current weight (layer.to_dense())."""
    return layer.to_dense()


def _still_there(model: nn.Module, name: str, layer: nn.Module) -> bool:
    """Whether model.<name> is still `layer` (undoing an outer layer may have removed or replaced it)."""
    try:
        return model.get_submodule(name) is layer
    except AttributeError:
        return False


def unload_(model: nn.Module) -> nn.Module:
    """Undo every mpokit layer, in place, outermost first (routed FFNs hold MPO experts and absorb
    Passthroughs); tied layers stay tied. Upcycled MoE layers keep their (dense) experts."""
    undone = []
    for name, layer in layer_modules(model):
        if _still_there(model, name, layer):
            layer.undo_(model, name)
            undone.append((name, layer))
    for name, layer in undone:
        source = getattr(layer, "tied_to", None)
        if source:
            get_module(model, name).weight = get_module(model, source).weight
    model._mpokit_methods = []
    return model
