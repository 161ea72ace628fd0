"""Undo transforms: turn every mpokit layer back into the plain layer it replaced."""
from __future__ import annotations

import torch
from torch import nn

from mpokit.layers.mpo import MPOEmbedding, MPOModule
from mpokit.layers.quant import QuantLinear
from mpokit.layers.quant_mpo import QuantMPOLinear
from mpokit.surgery.ffn import unload_routed_ffns_
from mpokit.surgery.replace import get_module, set_module

__all__ = ["to_dense_module", "unload_"]


def to_dense_module(layer: MPOModule | QuantLinear | QuantMPOLinear) -> nn.Module:
    """nn.Linear, transformers Conv1D or nn.Embedding with the layer's current weight."""
    if isinstance(layer, MPOEmbedding):
        return layer.to_embedding()
    lin = layer.to_linear()
    if getattr(layer, "orig_type", "Linear") == "Conv1D":
        from transformers.pytorch_utils import Conv1D

        conv = Conv1D(layer.out_features, layer.in_features)
        with torch.no_grad():
            conv.weight.copy_(lin.weight.t())
            if lin.bias is not None:
                conv.bias.copy_(lin.bias)
        return conv.to(lin.weight.dtype)
    return lin


def unload_(model: nn.Module) -> nn.Module:
    """Replace every MPO or quantized layer by its dense equivalent, in place; tied layers stay tied."""
    unload_routed_ffns_(model)  # MoE FFNs first: their MPO experts become dense
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (MPOModule, QuantLinear, QuantMPOLinear))]
    for name, layer in layers:
        set_module(model, name, to_dense_module(layer))
    for name, layer in layers:
        source = getattr(layer, "tied_to", None)
        if source:
            get_module(model, name).weight = get_module(model, source).weight
    model._mpokit_methods = []
    return model
