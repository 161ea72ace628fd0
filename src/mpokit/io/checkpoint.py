"""Save and load compressed models: safetensors weights + JSON description.

A checkpoint folder holds:
  config.json        the Hugging Face model config (architecture, sizes)
  mpokit.json        mpokit version, applied methods, the spec of every replaced layer,
                     the weight file's sha256 and aliases of shared tensors
  model.safetensors  every tensor once (tied/shared tensors stored under one name)
  tokenizer files    when a tokenizer is given
Loading rebuilds the architecture from config.json, swaps in empty mpokit layers
from their specs, then loads the weights strictly.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpokit.io.atomic import atomic_dir
from mpokit.layers.ffn import Passthrough
from mpokit.layers.moe import MoEFFN
from mpokit.layers.mpoe import MPOEFFN, UpcycledMoE
from mpokit.layers.mpo import MPOEmbedding, MPOLinear
from mpokit.layers.quant import QuantLinear
from mpokit.layers.quant_mpo import QuantMPOLinear
from mpokit.methods.base import applied_methods
from mpokit.surgery.replace import get_module, set_module
from mpokit.version import __version__

__all__ = ["save_compressed", "load_compressed", "CheckpointError", "is_checkpoint", "META_FILE", "WEIGHTS_FILE",
           "LAYER_TYPES", "register_layer", "read_meta"]

META_FILE, WEIGHTS_FILE, FORMAT_VERSION = "mpokit.json", "model.safetensors", 1
# Layer classes a checkpoint may contain; each has spec() and from_spec(spec, dtype=...).
LAYER_TYPES: dict[str, type] = {"MPOLinear": MPOLinear, "MPOEmbedding": MPOEmbedding, "QuantLinear": QuantLinear,
                                "QuantMPOLinear": QuantMPOLinear}

LAYER_TYPES.update({c.__name__: c for c in (MoEFFN, MPOEFFN, UpcycledMoE, Passthrough)})  # routed FFNs

def register_layer(cls: type) -> type:
    """Let checkpoints store layers of `cls` (other method packages call this)."""
    LAYER_TYPES[cls.__name__] = cls
    return cls


class CheckpointError(ValueError):
    """A checkpoint folder is missing, corrupt, truncated or for another model."""


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _layer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    specs = {}
    for name, m in model.named_modules():
        if type(m).__name__ in LAYER_TYPES:
            specs[name] = {**m.spec(), "orig_type": getattr(m, "orig_type", None), "tied_to": getattr(m, "tied_to", None)}
    return specs


def _dedup_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with each shared tensor stored once; aliases map dropped names to kept ones."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.data_ptr(), t.shape, t.stride(), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach().contiguous()
    return tensors, aliases


def save_compressed(model: nn.Module, path: str | Path, tokenizer=None, extra: dict[str, Any] | None = None) -> Path:
    """Write model (compressed or not) to folder `path` atomically; returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors, aliases = _dedup_state(model)
    meta = {
        "mpokit_version": __version__, "format_version": FORMAT_VERSION,
        "architecture": type(model).__name__, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "methods": applied_methods(model), "layers": _layer_specs(model), "aliases": aliases, **(extra or {}),
    }
    with atomic_dir(path) as tmp:
        model.config.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "mpokit": __version__})
        meta["sha256"] = _sha256(tmp / WEIGHTS_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


def read_meta(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"missing checkpoint folder: {path}")
    if not (path / META_FILE).is_file():
        raise CheckpointError(f"expected an mpokit checkpoint at {path}, got a folder without {META_FILE}")
    try:
        meta = json.loads((path / META_FILE).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"corrupt {path / META_FILE}: {e}") from e
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"expected checkpoint format <= {FORMAT_VERSION}, got {meta.get('format_version')} "
                              f"(written by mpokit {meta.get('mpokit_version')}); upgrade mpokit")
    return meta


def _build_model(path: Path, meta: dict[str, Any]) -> nn.Module:
    import transformers

    cls = getattr(transformers, meta["architecture"], None)
    if cls is None:
        raise CheckpointError(f"unknown architecture {meta['architecture']!r} in {path / META_FILE}")
    config = transformers.AutoConfig.from_pretrained(path)
    dtype = getattr(torch, meta.get("dtype", "float32"))
    model = cls(config).to(dtype)
    for name, spec in meta["layers"].items():
        layer_cls = LAYER_TYPES.get(spec["type"])
        if layer_cls is None:
            raise CheckpointError(f"unknown layer type {spec['type']!r} for {name}")
        layer = layer_cls.from_spec(spec, dtype=dtype)
        layer.orig_type = spec.get("orig_type")
        set_module(model, name, layer)
    for name, spec in meta["layers"].items():
        if spec.get("tied_to"):
            layer = get_module(model, name)
            layer.tied_to, layer.cores = spec["tied_to"], get_module(model, spec["tied_to"]).cores
    return model


def _reshare_parameters(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make parameters that were one Parameter at save time (e.g. MPO central cores shared
    across layers) one Parameter again; load_state_dict filled them as separate copies."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, kept in aliases.items():
        if alias in params and kept in params and params[alias] is not params[kept]:
            owner, _, attr = alias.rpartition(".")
            setattr(get_module(model, owner) if owner else model, attr, params[kept])


def load_compressed(path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """Rebuild a model saved by save_compressed. Raises CheckpointError on any mismatch."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_meta(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"missing weights file {weights}")
    if verify and meta.get("sha256") and _sha256(weights) != meta["sha256"]:
        raise CheckpointError(f"corrupt or truncated checkpoint: sha256 of {weights} does not match {META_FILE}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"corrupt or truncated weights file {weights}: {e}") from e
    for alias, kept in meta.get("aliases", {}).items():
        state[alias] = state[kept]
    model = _build_model(path, meta)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not match its model description: {e}") from e
    for name, spec in meta["layers"].items():  # re-share cores that load_state_dict copied into separately
        if spec.get("tied_to"):
            get_module(model, name).cores = get_module(model, spec["tied_to"]).cores
    _reshare_parameters(model, meta.get("aliases", {}))
    model._mpokit_methods = meta.get("methods", [])
    return model.to(device).eval()
