"""Build a Hugging Face model whose decoder blocks stay in their safetensors files until used.

The skeleton is made on the meta device (accelerate's init_empty_weights; buffers such as rotary
frequencies are computed for real), the parameters outside the repeated blocks (embeddings, final
norm, head) are read at once, and each block is read when a compression pass reaches it
(surgery/offload.py). Tensors are read one by one into their own memory (io/aligned_read.py), not
through a memory map, so pages of the file never count as resident memory.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mpokit.io.aligned_read import SafetensorsFile
from mpokit.surgery.offload import Offload
from mpokit.surgery.targets import find_blocks

__all__ = ["SafetensorsSource", "can_stream", "load_streamed"]

_SINGLE, _INDEX = "model.safetensors", "model.safetensors.index.json"


class SafetensorsSource:
    """The tensors of a Hugging Face folder's model.safetensors or its shards, read on demand (files held open)."""

    def __init__(self, folder: str | Path):
        from mpokit.io.checkpoint import weight_files

        self.folder = Path(folder)
        self.files = [SafetensorsFile(f) for f in weight_files(self.folder)]
        self.file_of = {name: f for f in self.files for name in f.header}

    def keys(self) -> set[str]:
        return set(self.file_of)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[SafetensorsFile, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.file_of[k], []).append(k)
        return {name: t for f, names in by_file.items() for name, t in f.read(names).items()}


def can_stream(path: str | Path) -> bool:
    """A local folder with config.json and safetensors weights (single file or index)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and ((p / _SINGLE).is_file() or (p / _INDEX).is_file())


def load_streamed(path: str | Path, auto_class, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> nn.Module:
    """The model of `path` with only its non-block parameters in memory; blocks load when used."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = auto_class.from_config(config, dtype=dtype)
    model.tie_weights()  # not always done on the meta device; lm_head is absent from a tied checkpoint
    model.eval()
    source = SafetensorsSource(path)
    _untie_differing(model, source)
    _check_keys(model, source, path)
    _, blocks = find_blocks(model)
    offload = Offload(model, source, blocks, dtype, device)
    in_blocks = {id(p) for p in blocks.parameters()}
    outside = nn.ParameterList([p for p in model.parameters() if id(p) not in in_blocks])
    offload.materialize(outside)
    _load_buffers(model, source, device)
    return model


def _names_by_parameter(model: nn.Module) -> list[list[str]]:
    """Every name of each parameter (a tied one has several; a file holds one of them)."""
    names_of: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(n)
    return list(names_of.values())


def _untie_differing(model: nn.Module, source: SafetensorsSource) -> None:
    """A config that ties lm_head to the embedding, with a file holding both, different: untie them, as
    transformers' from_pretrained does (else the head would silently be the embedding)."""
    held = source.keys()
    for names in _names_by_parameter(model):
        stored = [n for n in names if n in held]
        if len(stored) < 2:
            continue
        values = source.read(stored)
        for name in stored[1:]:
            if not torch.equal(values[name], values[stored[0]]):
                module_name, _, attr = name.rpartition(".")
                module = model.get_submodule(module_name)
                module._parameters[attr] = nn.Parameter(torch.empty_like(module._parameters[attr], device="meta"))
                model.config.tie_word_embeddings = False


def _check_keys(model: nn.Module, source: SafetensorsSource, path) -> None:
    """As load_model does for a whole load: every parameter from the file, nothing left over."""
    from mpokit.io.validate import CheckpointError

    groups, held = _names_by_parameter(model), source.keys()
    missing = sorted(v[0] for v in groups if not held.intersection(v))
    unexpected = sorted(held - {n for v in groups for n in v} - {n for n, _ in model.named_buffers()})
    if missing or unexpected:
        what = "; ".join(f"{len(v)} {w} ({', '.join(v[:3])})" for w, v in (("missing", missing),
                                                                          ("unexpected", unexpected)) if v)
        raise CheckpointError(f"the weights in {path} do not match {type(model).__name__}: {what} weights. "
                              "Refusing to fill them randomly")


def _load_buffers(model: nn.Module, source: SafetensorsSource, device) -> None:
    """Buffers onto `device`: computed ones (rotary tables) as built, persistent ones the checkpoint holds from it."""
    stored = source.read([n for n, _ in model.named_buffers() if n in source.file_of])
    for module_name, module in model.named_modules():
        for attr, value in module._buffers.items():
            if value is not None:
                name = f"{module_name}.{attr}" if module_name else attr
                module._buffers[attr] = stored.get(name, value).to(device, value.dtype)
