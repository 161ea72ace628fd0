"""Checks of a checkpoint's description (mpokit.json) before and while a model is rebuilt from it.

Nothing in mpokit.json is trusted: its JSON types, the architecture and dtype (allowlists, never
an arbitrary attribute of transformers or torch), the aliases between stored tensors, the
`tied_to` links between layers, and every layer spec against the module it replaces.
"""
from __future__ import annotations

import copy

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CheckpointError", "check_meta_types", "architecture_class", "dtype_of", "DTYPES", "ARCHITECTURE_SUFFIXES",
           "check_aliases", "check_layer_fits", "check_tie", "tied_attr"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                                  "float64": torch.float64}
ARCHITECTURE_SUFFIXES = ("ForCausalLM", "ForSequenceClassification", "LMHeadModel")
_CLASS_NAME = re.compile(r"[A-Z][A-Za-z0-9_]*")


class CheckpointError(ValueError):
    """A checkpoint folder is missing, corrupt, truncated or for another model."""


def _expect(ok: bool, where: Path | str, what: str, got: Any) -> None:
    if not ok:
        shown = repr(got)
        raise CheckpointError(f"expected {what} in {where}, got {shown[:80] + '...' if len(shown) > 80 else shown}")


def check_meta_types(meta: Any, where: Path | str) -> None:
    """The JSON types of every field the loader reads (a newer format is refused before this)."""
    _expect(isinstance(meta, dict), where, "a JSON object", meta)
    for key in ("architecture", "dtype"):
        _expect(isinstance(meta.get(key), str), where, f"a string {key!r}", meta.get(key))
    layers = meta.get("layers")
    _expect(isinstance(layers, dict), where, "an object 'layers' (module name -> layer spec)", layers)
    for name, spec in layers.items():
        _expect(bool(name) and isinstance(spec, dict) and isinstance(spec.get("type"), str), where,
                f"a layer spec with a string 'type' for {name!r}", spec)
        for key in ("tied_to", "orig_type"):
            _expect(spec.get(key) is None or isinstance(spec[key], str), where, f"a string or null {key!r} for {name!r}",
                    spec.get(key))
    aliases = meta.get("aliases", {})
    _expect(isinstance(aliases, dict) and all(isinstance(v, str) for v in aliases.values()), where,
            "an object 'aliases' (tensor name -> stored tensor name)", aliases)
    _expect(isinstance(meta.get("methods", []), list), where, "a list 'methods'", meta.get("methods"))
    report = meta.get("report", {})
    _expect(isinstance(report, dict) and isinstance(report.get("layers", []), list)
            and all(isinstance(r, dict) for r in report.get("layers", [])), where, "an object 'report'", report)


def architecture_class(name: str, where: Path | str) -> type:
    """The transformers model class named `name`, if it is a causal-LM or sequence-classification class."""
    if not (_CLASS_NAME.fullmatch(name) and name.endswith(ARCHITECTURE_SUFFIXES)):
        raise CheckpointError(f"unknown architecture {name!r} in {where}: expected a transformers class whose name "
                              f"ends in {', '.join(ARCHITECTURE_SUFFIXES)}")
    import transformers
    from transformers import PreTrainedModel

    try:
        cls = getattr(transformers, name)
    except Exception:  # AttributeError, or the lazy module failing to import a missing backend
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel) and cls.__name__ == name):
        raise CheckpointError(f"unknown architecture {name!r} in {where} (no such model class in transformers "
                              f"{transformers.__version__})")
    return cls


def dtype_of(name: str, where: Path | str) -> torch.dtype:
    if name not in DTYPES:
        raise CheckpointError(f"expected dtype one of {', '.join(DTYPES)} in {where}, got {name!r}")
    return DTYPES[name]


def check_aliases(aliases: dict[str, str], stored: set[str], where: Path | str) -> None:
    """An alias names a tensor stored once under another name; it may not hide a stored tensor."""
    for alias, kept in aliases.items():
        if alias in stored:
            raise CheckpointError(f"alias {alias!r} -> {kept!r} in {where} would replace the tensor stored under "
                                  f"{alias!r}")
        if kept not in stored:
            raise CheckpointError(f"alias {alias!r} in {where} points to {kept!r}, which the weights file does not hold")


_SAME_SHAPE = ("kernel_size", "stride", "dilation", "num_layers", "bidirectional", "batch_first")


def _drop_in_dims(orig: nn.Module) -> dict[str, int]:
    """The sizes a drop-in replacement of `orig` must keep."""
    if isinstance(orig, nn.Embedding):
        return {"num_embeddings": orig.num_embeddings, "embedding_dim": orig.embedding_dim}
    if isinstance(orig, nn.Linear):
        return {"in_features": orig.in_features, "out_features": orig.out_features}
    if isinstance(orig, nn.Conv2d):
        return {"in_channels": orig.in_channels, "out_channels": orig.out_channels}
    if isinstance(orig, nn.RNNBase):
        return {"input_size": orig.input_size, "hidden_size": orig.hidden_size}
    w = getattr(orig, "weight", None)
    if type(orig).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2:  # GPT-2: weight (in, out)
        return {"in_features": w.shape[0], "out_features": w.shape[1]}
    return {}


def _probe_input(layer: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, int | None] | None:
    ints = lambda *names: all(isinstance(getattr(layer, n, None), int) for n in names)  # noqa: E731
    if ints("num_embeddings", "embedding_dim"):
        return torch.zeros(1, 2, dtype=torch.long), layer.embedding_dim
    if ints("in_features", "out_features"):
        return torch.zeros(1, 2, layer.in_features, dtype=dtype), layer.out_features
    if ints("input_size", "hidden_size"):  # a recurrent layer: (1, 2, input) is a sequence either way
        return torch.zeros(1, 2, layer.input_size, dtype=dtype), None
    if ints("hidden_size"):
        out = getattr(layer, "out_features", None)
        return torch.zeros(1, 2, layer.hidden_size, dtype=dtype), out if isinstance(out, int) else None
    return None


def _run_probe(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) without a trace: attributes set by forward (caches, routing statistics) are put back."""
    saved = [(m, dict(m.__dict__)) for m in layer.modules()]
    try:
        layer.eval()
        with torch.no_grad():
            y = layer(x)
    finally:
        for m, attrs in saved:
            for key in [k for k in m.__dict__ if k not in attrs]:
                del m.__dict__[key]
            m.__dict__.update(attrs)
    return y[0] if isinstance(y, (tuple, list)) else y


def check_layer_fits(name: str, spec: dict[str, Any], layer: nn.Module, orig: nn.Module, config: Any,
                     dtype: torch.dtype, where: Path | str, run: bool = True) -> None:
    """A layer built from its spec must stand where `orig` stood: same sizes, and (run=True) it must run."""
    bad = f"layer {name!r} in {where} does not fit the model"
    orig_type = spec.get("orig_type")
    dims = _drop_in_dims(orig)
    if dims and orig_type is not None and orig_type != type(orig).__name__:
        raise CheckpointError(f"{bad}: it replaced a {orig_type}, the model has a {type(orig).__name__} there")
    declared = next((set(family) for family in (("in_features", "out_features"), ("num_embeddings", "embedding_dim"),
                                                ("in_channels", "out_channels"), ("input_size", "hidden_size"))
                     if all(isinstance(getattr(layer, a, None), int) for a in family)), set())
    if dims and declared and declared != set(dims):  # e.g. an embedding where a Linear stood
        raise CheckpointError(f"{bad}: a {type(layer).__name__} cannot stand for the {type(orig).__name__} there")
    for attr, size in dims.items() if declared else ():  # routed FFNs absorb more than one module: no sizes to match
        got = getattr(layer, attr)
        if got != size:
            raise CheckpointError(f"{bad}: expected {attr}={size} (the {type(orig).__name__} it replaces), got {got}")
    for attr in _SAME_SHAPE if dims else ():  # a conv's kernel, an RNN's layers and directions
        if hasattr(orig, attr) and hasattr(layer, attr) and getattr(orig, attr) != getattr(layer, attr):
            raise CheckpointError(f"{bad}: expected {attr}={getattr(orig, attr)!r} (the {type(orig).__name__} it "
                                  f"replaces), got {getattr(layer, attr)!r}")
    hidden = getattr(config, "hidden_size", None)
    if not dims and isinstance(getattr(layer, "hidden_size", None), int) and isinstance(hidden, int) \
            and layer.hidden_size != hidden:
        raise CheckpointError(f"{bad}: expected hidden_size={hidden} (config.json), got {layer.hidden_size}")
    probe = _probe_input(layer, dtype) if run else None
    if probe is None:
        return
    x, width = probe
    if any(t.is_meta for t in [*layer.parameters(), *layer.buffers()]):  # loading small: probe a zero copy
        layer = copy.deepcopy(layer).to_empty(device="cpu")  # one layer's memory, freed after the probe
        with torch.no_grad():
            for t in [*layer.parameters(), *layer.buffers()]:
                t.zero_()
    try:
        y = _run_probe(layer, x)
    except Exception as e:
        raise CheckpointError(f"{bad}: its spec is inconsistent ({type(e).__name__}: {e})") from e
    if width is not None and (not isinstance(y, torch.Tensor) or y.shape[-1] != width):
        raise CheckpointError(f"{bad}: expected outputs of width {width}, got shape "
                              f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")


def tied_attr(layer: nn.Module) -> str | None:
    """The storage a tied layer shares with its target: "cores" (MPO layers), "qweight" (quantized
    layers: a QuantEmbedding and its lm_head QuantLinear), or None."""
    from mpokit.layers.quant import QuantizedTensor

    if isinstance(getattr(layer, "cores", None), nn.ParameterList):
        return "cores"
    if isinstance(getattr(layer, "qweight", None), QuantizedTensor):
        return "qweight"
    return None


def _layout(part: nn.Module) -> list:
    if isinstance(part, nn.ParameterList):
        return [tuple(c.shape) for c in part]
    return [part.rows, part.cols, part.bits, part.group_size, part.symmetric, part.zero_point]


def check_tie(name: str, target_name: str, layers: dict[str, dict], model: nn.Module, aliases: dict[str, str],
              where: Path | str) -> nn.Module:
    """`name` may share the cores (or quantized table) of `target_name` only if that is another stored layer
    with storage of the same layout, and the weights file stores it once (as aliases of the target's).
    Returns the target."""
    bad = f"layer {name!r} in {where} is tied to {target_name!r}"
    if target_name == name or target_name not in layers:
        raise CheckpointError(f"{bad}, which is not another layer of the checkpoint")
    if layers[target_name].get("tied_to"):
        raise CheckpointError(f"{bad}, which is itself tied to {layers[target_name]['tied_to']!r}")
    layer, target = model.get_submodule(name), model.get_submodule(target_name)  # both built from the specs
    attr = tied_attr(layer)
    if attr is None or tied_attr(target) != attr:
        raise CheckpointError(f"{bad}, but only MPO layers (cores) and quantized layers (a quantized table) can "
                              "share storage, with a layer of their own kind")
    mine, theirs = getattr(layer, attr), getattr(target, attr)
    if _layout(mine) != _layout(theirs):
        what = "cores have other shapes" if attr == "cores" else "quantized table has another layout"
        raise CheckpointError(f"{bad}, whose {what}: {_layout(theirs)} vs {_layout(mine)}")
    for key in theirs.state_dict():
        a, b = f"{name}.{attr}.{key}", f"{target_name}.{attr}.{key}"
        if aliases.get(a, a) != aliases.get(b, b):
            raise CheckpointError(f"{bad}, but the weights file stores {a} separately (not as an alias of {b})")
    return target
