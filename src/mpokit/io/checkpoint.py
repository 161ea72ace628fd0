"""Save and load compressed models: safetensors weights + JSON description.

A checkpoint folder holds:
  config.json        the Hugging Face model config (architecture, sizes), model_type "mpokit" so
                     that plain transformers refuses the folder (io/hf_guard.py)
  mpokit_loader.py   what transformers runs with trust_remote_code=True: mpokit.load_compressed
  mpokit.json        mpokit version, applied methods, the spec of every replaced layer, aliases
                     of shared tensors, and a manifest: the sha256 of every other file of the
                     folder and of mpokit.json's own content (io/manifest.py)
  model.safetensors  every tensor once (tied/shared tensors stored under one name); above max_shard_size
                     (2GB) shards model-0000k-of-0000n.safetensors + model.safetensors.index.json,
                     as transformers writes them (huggingface_hub's save_torch_state_dict)
  tokenizer files    when a tokenizer is given
Loading checks the description (io/validate.py) and, unless verify=False, the manifest; then
it rebuilds the architecture from config.json, swaps in empty mpokit layers from their specs
(each checked against the module it replaces), and loads the weights strictly.
Saving is atomic (io/atomic.py) and replaces only an mpokit checkpoint, with overwrite=True.

A plain torch network (no transformers class: a CNN, an LSTM language model) is saved the same way
without config.json, its architecture recorded as "torch:<module>.<class>"; nothing in a file can
say how to build such a class safely, so load_compressed(path, model=Net()) takes a freshly built
instance of it and swaps the stored layers and weights into that.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from mpokit.io.atomic import atomic_dir, check_target, recover
from mpokit.io.hf_guard import read_model_config, write_guarded_config
from mpokit.io.manifest import build_manifest, file_sha256, verify_manifest
from mpokit.io.aligned_read import read_tensors
from mpokit.io.validate import (DTYPES, CheckpointError, architecture_class, check_aliases, check_layer_fits,
                                check_meta_types, check_tie, dtype_of, tied_attr)
from mpokit.layers import LAYERS, layer_modules, register_layer
from mpokit.surgery.offload import materialize_all_
from mpokit.surgery.replace import get_module, set_module
from mpokit.version import __version__

__all__ = ["save_compressed", "load_compressed", "CheckpointError", "is_checkpoint", "META_FILE", "WEIGHTS_FILE",
           "INDEX_FILE", "LAYER_TYPES", "register_layer", "read_meta", "check_save_path", "FORMAT_VERSION",
           "shard_size", "weight_files"]

# Format 2: a manifest over every file replaces format 1's sha256 of the weights file alone.
# Format 3: config.json is guarded against plain transformers (io/hf_guard.py); format 2 folders still load.
META_FILE, WEIGHTS_FILE, FORMAT_VERSION = "mpokit.json", "model.safetensors", 3
INDEX_FILE = "model.safetensors.index.json"
TORCH_PREFIX = "torch:"  # the architecture of a plain nn.Module network
# Layer classes a checkpoint may contain, by spec "type": the layer protocol's registry (layers/base.py).
LAYER_TYPES = LAYERS
_RESERVED = {"mpokit_version", "format_version", "architecture", "dtype", "methods", "layers", "aliases", "manifest"}


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


_sha256 = file_sha256  # the name older callers used


def _layer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {name: {**m.spec(), "orig_type": getattr(m, "orig_type", None), "tied_to": getattr(m, "tied_to", None)}
            for name, m in layer_modules(model)}


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


def check_save_path(path: str | Path, overwrite: bool = False, protect: Iterable[str | Path | None] = ()) -> None:
    """Raise (an OutputPathError, a ValueError) unless save_compressed(model, path, overwrite=overwrite,
    protect=protect) may write `path`; lets a command refuse before it spends time compressing."""
    check_target(path, overwrite=overwrite, marker=META_FILE, protect=protect, what="an mpokit checkpoint")


def shard_size(value: int | str) -> int:
    """Bytes from an int or a size like "2GB" / "500MB" (huggingface_hub's rule); ValueError otherwise."""
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        size = value if isinstance(value, int) else parse_size_to_int(value)
        if isinstance(size, bool) or size <= 0:
            raise ValueError
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"expected max_shard_size as bytes > 0 or a size like '2GB', got {value!r}") from None
    return size


def save_compressed(model: nn.Module, path: str | Path, tokenizer=None, extra: dict[str, Any] | None = None, *,
                    overwrite: bool = False, protect: Iterable[str | Path | None] = (),
                    max_shard_size: int | str = "2GB") -> Path:
    """Write model (compressed or not) to folder `path` atomically; returns the path.

    An existing `path` is replaced only if it is an mpokit checkpoint and overwrite=True (an empty
    folder may be used); never a `protect`ed path (the input model) or a folder holding one.
    Weights above max_shard_size go into shards with an index, as transformers writes them.
    """
    from huggingface_hub import save_torch_state_dict

    materialize_all_(model)  # a block-streamed model: what is still in its source file is read now
    size = shard_size(max_shard_size)
    path = Path(path)
    plain = _is_plain(model)
    if not plain:
        architecture_class(type(model).__name__, "the model to save")  # what load_compressed would refuse
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise CheckpointError(f"expected a model in one of {', '.join(DTYPES)}, got {dtype}")
    clash = _RESERVED & set(extra or {})
    if clash:
        raise ValueError(f"expected extra metadata without the reserved keys {sorted(clash)}")
    tensors, aliases = _dedup_state(model)
    meta = {
        "mpokit_version": __version__, "format_version": FORMAT_VERSION,
        "architecture": _plain_name(type(model)) if plain else type(model).__name__,
        "dtype": dtype, "methods": getattr(model, "_mpokit_methods", []), "layers": _layer_specs(model), "aliases": aliases,
        **(extra or {}),
    }
    with atomic_dir(path, overwrite=overwrite, marker=META_FILE, protect=protect, what="an mpokit checkpoint") as tmp:
        if not plain:
            write_guarded_config(model.config, tmp)
        save_torch_state_dict(tensors, tmp, max_shard_size=size, metadata={"format": "pt", "mpokit": __version__})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta["manifest"] = build_manifest(tmp, meta, exclude={META_FILE})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def _is_plain(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return not isinstance(model, PreTrainedModel)


def _plain_name(cls: type) -> str:
    return f"{TORCH_PREFIX}{cls.__module__}.{cls.__qualname__}"


def read_meta(path: Path) -> dict[str, Any]:
    """The checked description of the checkpoint at `path` (an interrupted save of it is repaired first)."""
    path = Path(path)
    with contextlib.suppress(OSError):
        recover(path)
    if not path.exists():
        raise CheckpointError(f"missing checkpoint folder: {path}")
    if not path.is_dir():
        raise CheckpointError(f"expected an mpokit checkpoint folder at {path}, got a file")
    if not (path / META_FILE).is_file():
        raise CheckpointError(f"expected an mpokit checkpoint at {path}, got a folder without {META_FILE}")
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt {path / META_FILE}: {e}") from e
    where = path / META_FILE
    if not isinstance(meta, dict):
        raise CheckpointError(f"corrupt {where}: expected a JSON object, got {type(meta).__name__}")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"corrupt {where}: expected an integer format_version >= 1, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"expected checkpoint format <= {FORMAT_VERSION}, got {version} "
                              f"(written by mpokit {meta.get('mpokit_version')}); upgrade mpokit")
    check_meta_types(meta, where)
    return meta


def _verify(path: Path, meta: dict[str, Any]) -> None:
    where = path / META_FILE
    if meta["format_version"] < 2:
        raise CheckpointError(
            f"{path} is a format-{meta['format_version']} checkpoint (mpokit {meta.get('mpokit_version')}) whose "
            f"hash covers only {WEIGHTS_FILE}, not config.json or the tokenizer; re-save it to add a hash over every "
            f"file: save_compressed(load_compressed(path, verify=False), path, tokenizer, overwrite=True)")
    if "manifest" not in meta:
        raise CheckpointError(f"no manifest hash in {where}: the checkpoint cannot be verified; save it again, "
                              "or load with verify=False")
    verify_manifest(path, meta, exclude={META_FILE}, where=str(where))


def _build_model(path: Path, meta: dict[str, Any], cls: type, dtype: torch.dtype,
                 aliases: dict[str, str]) -> nn.Module:
    import transformers

    where = path / META_FILE
    try:
        config = read_model_config(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"bad config.json in {path}: {e}") from e
    want = getattr(cls, "config_class", None)
    if isinstance(want, type) and want is not transformers.PretrainedConfig and not isinstance(config, want):
        raise CheckpointError(f"{path / 'config.json'} describes a {type(config).__name__}, but {where} says "
                              f"{cls.__name__}")
    return _swap_layers(cls(config).to(dtype), meta, config, dtype, where, path, aliases)


def _swap_layers(model: nn.Module, meta: dict[str, Any], config, dtype: torch.dtype, where: Path, path: Path,
                 aliases: dict[str, str]) -> nn.Module:
    """Put an empty layer built from each stored spec where the module it replaced stands."""
    cls = type(model)
    layers = meta["layers"]
    probed = set()  # layers with the same spec run alike: probe each kind once (each probe allocates a layer)
    for name, spec in layers.items():
        layer_cls = LAYER_TYPES[spec["type"]]
        try:
            orig = get_module(model, name)
        except ValueError:
            raise CheckpointError(f"layer {name!r} in {where} is not a module of {cls.__name__}") from None
        try:
            layer = layer_cls.from_spec(spec, dtype=dtype)
        except Exception as e:  # a spec read from a file can fail in any way
            raise CheckpointError(f"bad spec for layer {name!r} in {where}: {type(e).__name__}: {e}") from e
        kind = json.dumps({k: v for k, v in spec.items() if k != "tied_to"}, sort_keys=True, default=str)
        check_layer_fits(name, spec, layer, orig, config, dtype, where, run=kind not in probed)
        probed.add(kind)
        layer.orig_type = spec.get("orig_type")
        set_module(model, name, layer)
    for name, spec in layers.items():
        if spec.get("tied_to"):
            target = check_tie(name, spec["tied_to"], layers, model, aliases, where)
            get_module(model, name).tied_to = spec["tied_to"]
            _share_storage(get_module(model, name), target)
    return model


def _share_storage(layer: nn.Module, target: nn.Module) -> None:
    """Make a tied layer hold its target's storage (MPO cores, or a quantized table): one module, not a copy."""
    attr = tied_attr(target)
    setattr(layer, attr, getattr(target, attr))


def _reshare_parameters(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make parameters that were one Parameter at save time (e.g. MPO central cores shared
    across layers) one Parameter again; load_state_dict filled them as separate copies."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, kept in aliases.items():
        if alias in params and kept in params and params[alias] is not params[kept]:
            owner, _, attr = alias.rpartition(".")
            setattr(get_module(model, owner) if owner else model, attr, params[kept])


def _check_dtypes(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    for key, t in state.items():
        if key in expected and expected[key].dtype != t.dtype:
            raise CheckpointError(f"checkpoint {path} does not match its model description: {key} is {t.dtype} in "
                                  f"{WEIGHTS_FILE}, {expected[key].dtype} in the model {META_FILE} describes")


def weight_files(path: Path) -> dict[Path, set[str] | None]:
    """The weights file, or each shard the index lists with the tensor names it must hold."""
    if (path / WEIGHTS_FILE).is_file():
        return {path / WEIGHTS_FILE: None}
    index = path / INDEX_FILE
    if not index.is_file():
        raise CheckpointError(f"missing weights file {path / WEIGHTS_FILE} (and no shard index {INDEX_FILE})")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files: dict[Path, set[str]] = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or Path(file).name != file:
                raise ValueError(f"bad shard name {file!r}")
            files.setdefault(path / file, set()).add(name)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"corrupt shard index {index}: {e}") from e
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"missing weight shards {missing[:3]} listed in {index}")
    return dict(files)


def _plain_model(meta: dict[str, Any], model: nn.Module | None, where: Path) -> nn.Module:
    """The caller's fresh instance for a plain-network checkpoint, checked to be of the saved class."""
    name = meta["architecture"]
    if model is None:
        raise CheckpointError(f"{where} holds a plain torch network ({name.removeprefix(TORCH_PREFIX)}); pass a "
                              "freshly built instance to load it into: load_compressed(path, model=Net(...))")
    if not isinstance(model, nn.Module) or _plain_name(type(model)) != name:
        raise CheckpointError(f"expected model= an instance of {name.removeprefix(TORCH_PREFIX)} for {where}, got "
                              f"{type(model).__module__}.{type(model).__qualname__}")
    return model


def load_compressed(path: str | Path, device: str | torch.device = "cpu", verify: bool = True,
                    model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by save_compressed. Raises CheckpointError on any mismatch.

    verify=True (the default) checks the manifest: every file and mpokit.json itself must be as
    saved. verify=False skips the hashes (and accepts format-1 checkpoints) but keeps every
    structural check. model: for a plain torch network (architecture "torch:..."), a freshly built
    instance of its class, which is filled in place and returned; transformers checkpoints take none.
    """
    path = Path(path)
    meta = read_meta(path)
    where = path / META_FILE
    weights = weight_files(path)
    plain = meta["architecture"].startswith(TORCH_PREFIX)
    if plain:
        model = _plain_model(meta, model, where)
    elif model is not None:
        raise CheckpointError(f"{where} describes a transformers model; model= is only for plain torch networks")
    cls = None if plain else architecture_class(meta["architecture"], where)
    dtype = dtype_of(meta["dtype"], where)
    for name, spec in meta["layers"].items():
        if spec["type"] not in LAYER_TYPES:
            raise CheckpointError(f"unknown layer type {spec['type']!r} for {name}")
    if verify:
        _verify(path, meta)
    state: dict[str, torch.Tensor] = {}
    for file, names in weights.items():
        try:  # into fresh aligned tensors, without mapping the file: the peak holds the model once
            part = read_tensors(file)
        except (ValueError, KeyError, TypeError, OSError, RuntimeError) as e:
            raise CheckpointError(f"corrupt or truncated weights file {file}: {e}") from e
        if names is not None and set(part) != names:
            raise CheckpointError(f"{file} does not hold the tensors {path / INDEX_FILE} lists for it")
        state.update(part)
    aliases = meta.get("aliases", {})
    check_aliases(aliases, set(state), where)
    for alias, kept in aliases.items():
        state[alias] = state[kept]
    from accelerate import init_empty_weights

    # Load small: the skeleton's parameters live on the meta device (no dense float32 weights are
    # ever allocated); load_state_dict(assign=True) then puts the stored tensors in their place.
    # Buffers stay real: non-persistent ones (rotary frequencies) are computed, not stored.
    if plain:  # the caller's network: swap the stored layers in, then fill it
        _swap_layers(model.to(dtype), meta, None, dtype, where, path, aliases)
    else:
        with init_empty_weights(include_buffers=False):
            model = _build_model(path, meta, cls, dtype, aliases)
    _check_dtypes(model, state, path)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not match its model description: {e}") from e
    for name, spec in meta["layers"].items():  # re-share storage that load_state_dict copied into separately
        if spec.get("tied_to"):
            _share_storage(get_module(model, name), get_module(model, spec["tied_to"]))
    _reshare_parameters(model, aliases)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"checkpoint {path} does not fill {len(left)} tensors of its model ({left[:3]})")
    model._mpokit_methods = meta.get("methods", [])
    return model.to(device).eval()
