"""export_hf: an mpokit model as a self-contained transformers folder that loads without mpokit.

`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` rebuilds the compressed model
from the folder alone: its modeling files (export/hf_template/, copied verbatim) hold plain
PyTorch versions of mpokit's layers and their math, and config.json holds the source model's own config under the
model type "mpokit_export_<type>" with
  auto_map                AutoConfig and the model's Auto classes -> MpokitExported<X> there,
                          i.e. the stock transformers.<X> with mpokit's layers put in place
  mpokit_layers           {module name: the layer's spec()}, as an mpokit checkpoint's mpokit.json has
  mpokit_tied_parameters  {parameter: the parameter it is stored as} (tied lm_head, shared MPO cores)
The weights are mpokit's own tensors under mpokit's names (cores, packed codes, scales, experts), each
stored once, in safetensors shards split by huggingface_hub as transformers writes them. Tied layers
(`tied_to`: an lm_head sharing the embedding's cores or packed table) share one module again when
loaded. Plain transformers without trust_remote_code refuses the folder (its model type is unknown
to it) rather than load random weights in place of the cores.

Layer types the modeling files do not rebuild (none of mpokit's own) are written as their dense
form (to_dense, via export/tensors.densified_copy) and reported. Before anything is written the
exported class is built on the meta device from the new config and its state-dict names, shapes and
dtypes are checked against the tensors to write, so a folder that would not load is never written.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpokit.export.hf_template import modeling_mpokit_export as template
from mpokit.export.hf_template.mpokit_export_layers import LAYERS as REBUILT
from mpokit.export.tensors import check_folder_out, densified_copy, saved_tokenizer, source_meta, source_model
from mpokit.io.atomic import atomic_dir
from mpokit.io.checkpoint import shard_size
from mpokit.layers.base import LAYERS, layer_modules
from mpokit.version import __version__

__all__ = ["HFOptions", "export_hf", "MODELING_FILE", "TEMPLATE", "template_files"]

MODELING_FILE = "modeling_mpokit_export.py"  # the marker of a folder export_hf wrote
TEMPLATE = Path(template.__file__).parent  # its .py files but __init__.py go into every folder
_MODULE = MODELING_FILE.removesuffix(".py")
_AUTO = (("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
         ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
         ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"), ("AutoModel", "MODEL_MAPPING_NAMES"))
_WHAT = "a folder written by mpokit export --format hf"


@dataclass
class HFOptions:
    """max_shard_size: largest safetensors file before the weights are split into shards with an index
    (huggingface_hub's split_torch_state_dict_into_shards: an int of bytes or "2GB", "500MB", ...)."""

    max_shard_size: int | str = "2GB"

    def __post_init__(self) -> None:
        shard_size(self.max_shard_size)


def template_files(folder: Path = TEMPLATE) -> list[Path]:
    return sorted(p for p in Path(folder).glob("*.py") if p.name != "__init__.py")


def _auto_map(model: nn.Module) -> dict[str, str]:
    """AutoConfig and every Auto class whose mapping holds the model's class -> the exported classes."""
    import transformers
    from transformers.models.auto import modeling_auto

    arch, config_cls = type(model).__name__, type(model.config)
    if getattr(transformers, arch, None) is not type(model) or getattr(transformers, config_cls.__name__, None) \
            is not config_cls:
        raise ValueError(f"expected a model of a transformers class (LlamaForCausalLM, ...), got {arch} with "
                         f"{config_cls.__name__}")
    classes = {auto for auto, mapping in _AUTO
               if any(arch == n or arch in (n if isinstance(n, tuple) else ())
                      for n in getattr(modeling_auto, mapping).values())}
    if not classes:
        raise ValueError(f"expected a model class an Auto class of transformers maps to, got {arch}")
    return {"AutoConfig": f"{_MODULE}.{template.PREFIX}{config_cls.__name__}",
            **{auto: f"{_MODULE}.{template.PREFIX}{arch}" for auto, _ in _AUTO if auto in classes}}


def _specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    specs = {name: {**m.spec(), "orig_type": getattr(m, "orig_type", None), "tied_to": getattr(m, "tied_to", None)}
             for name, m in layer_modules(model)}
    missing = sorted({s["type"] for s in specs.values()} - set(REBUILT))
    if missing:  # a subclass of a rebuilt type that densified_copy kept: its own type name is unknown there
        raise ValueError(f"expected layer types the modeling files rebuild, got {missing}")
    return specs


def _module_tied(model: nn.Module, specs: dict[str, dict]) -> list[str]:
    """State-dict prefixes of the storage tied layers take from their source (cores or packed table); a
    `tied_to` whose storage is not in fact the source's is dropped from the spec (the layer keeps its own)."""
    out = []
    for name, spec in specs.items():
        if spec["tied_to"]:
            layer, source = model.get_submodule(name), model.get_submodule(spec["tied_to"])
            attr = "cores" if isinstance(getattr(layer, "cores", None), nn.ParameterList) else "qweight"
            if getattr(layer, attr, None) is not getattr(source, attr, False):
                spec["tied_to"] = None
                continue
            out.append(f"{name}.{attr}.")
    return out


def _tensors(model: nn.Module, tied_prefixes: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor once: module-tied storage under its source's names only, a parameter stored under
    several names kept under its first (returned as {alias: kept}); a shared buffer gets its own copy."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    tensors, aliases, seen = {}, {}, {}
    for key, t in model.state_dict(keep_vars=True).items():
        if any(key.startswith(p) for p in tied_prefixes):
            continue
        ident = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype) if t.numel() else None
        if ident is not None and ident in seen and key in params and seen[ident] in params:
            aliases[key] = seen[ident]
            continue
        t = t.detach()
        tensors[key] = t.clone() if ident is not None and ident in seen else t
        if ident is not None:
            seen.setdefault(ident, key)
    return tensors, aliases


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _check_loads(config: dict, auto_map: dict, tensors: dict, aliases: dict, prefixes: list[str], dtype) -> None:
    """Build the exported class on the meta device and compare its state dict with what is written."""
    config_cls = getattr(template, auto_map["AutoConfig"].rpartition(".")[2])
    model_cls = getattr(template, next(v for k, v in auto_map.items() if k != "AutoConfig").rpartition(".")[2])
    with torch.device("meta"), _default_dtype(dtype):
        expected = model_cls(config_cls.from_dict(config)).state_dict()
    covered = set(tensors) | set(aliases) | {k for k in expected if any(k.startswith(p) for p in prefixes)}
    wrong = [k for k, t in tensors.items() if k in expected and (expected[k].shape, expected[k].dtype) !=
             (t.shape, t.dtype)]
    missing, unexpected = sorted(set(expected) - covered), sorted(set(tensors) - set(expected))
    if missing or unexpected or wrong:
        raise RuntimeError(f"the exported modeling files do not rebuild this model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}, other shape or dtype {wrong[:3]}")


def _config(model: nn.Module, auto_map: dict, specs: dict, aliases: dict, dtype, meta: dict) -> dict[str, Any]:
    d = model.config.to_dict()
    d.pop("torch_dtype", None)
    arch = type(model).__name__
    d.update(model_type=f"mpokit_export_{model.config.model_type}", architectures=[f"{template.PREFIX}{arch}"],
             auto_map=auto_map, dtype=str(dtype).removeprefix("torch."), mpokit_layers=specs,
             mpokit_tied_parameters=aliases)
    methods = meta.get("methods", getattr(model, "_mpokit_methods", []))
    d["mpokit_export"] = {"mpokit_version": __version__, "base_model_type": model.config.model_type,
                          "base_architecture": arch, "source": meta.get("source"),
                          "methods": [m.get("method") if isinstance(m, dict) else str(m) for m in methods]}
    return d


def _rows(tensors: dict[str, torch.Tensor], specs: dict[str, dict]) -> list[dict[str, Any]]:
    owners = sorted(specs, key=len, reverse=True)  # the innermost layer first
    rows = []
    for key, t in tensors.items():
        owner = next((n for n in owners if key.startswith(n + ".")), None)
        rows.append({"name": key, "shape": list(t.shape), "type": str(t.dtype).removeprefix("torch."),
                     "layer": specs[owner]["type"] if owner else "dense", "module": owner,
                     "bytes": t.numel() * t.element_size()})
    return rows


def summarize(rows: list[dict], specs: dict[str, dict], dense: list[str]) -> list[dict]:
    """One row per layer type (and "dense" for the model's own modules): modules, tensors, bytes."""
    modules = Counter(s["type"] for s in specs.values())
    groups: dict[str, dict] = {}
    for r in rows:
        g = groups.setdefault(r["layer"], {"layer": r["layer"], "modules": modules.get(r["layer"]), "tensors": 0,
                                           "bytes": 0, "how": "rebuilt by the modeling files"})
        g["tensors"] += 1
        g["bytes"] += r["bytes"]
    if "dense" in groups:
        groups["dense"]["how"] = "plain transformers modules" + (f" ({len(dense)} written dense)" if dense else "")
    return sorted(groups.values(), key=lambda g: -g["bytes"])


def export_hf(model_or_dir, out_path, options: HFOptions | None = None, *, tokenizer=None,
              overwrite: bool = False) -> dict[str, Any]:
    """Write `model_or_dir` (an mpokit checkpoint folder, or a model in memory) as a transformers folder
    `out_path` that loads without mpokit (trust_remote_code=True). tokenizer: saved with it (a checkpoint
    folder's own by default). Returns the report: every tensor written, a summary by layer type, notes."""
    from huggingface_hub import save_torch_state_dict

    options = options or HFOptions()
    out = Path(out_path)
    ckpt, meta = source_meta(model_or_dir)
    check_folder_out(out, overwrite, ckpt, MODELING_FILE, _WHAT)
    model = source_model(model_or_dir, ckpt)
    auto_map = _auto_map(model)
    tokenizer = tokenizer if tokenizer is not None else saved_tokenizer(ckpt)
    keep = tuple(cls for name, cls in LAYERS.items() if name in REBUILT)
    model, dense_notes = densified_copy(model, keep=keep)
    specs = _specs(model)
    prefixes = _module_tied(model, specs)
    tensors, aliases = _tensors(model, prefixes)
    dtype = next(model.parameters()).dtype
    config = _config(model, auto_map, specs, aliases, dtype, meta)
    _check_loads(config, auto_map, tensors, aliases, prefixes, dtype)
    with atomic_dir(out, overwrite=overwrite, marker=MODELING_FILE, protect=[ckpt], what=_WHAT) as tmp:
        save_torch_state_dict(tensors, tmp, max_shard_size=options.max_shard_size)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for path in template_files(TEMPLATE):
            shutil.copyfile(path, tmp / path.name)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    shards = sorted(p.name for p in out.glob("model*.safetensors"))
    rows = _rows(tensors, specs)
    notes = dense_notes + _notes(specs, aliases, prefixes, shards, tokenizer)
    return {"format": "hf", "path": str(out), "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
            "source": meta.get("source"), "options": asdict(options), "architecture": config["architectures"][0],
            "auto_map": auto_map, "shards": shards, "layers": dict(Counter(s["type"] for s in specs.values())),
            "dense": [n.partition(":")[0] for n in dense_notes], "notes": notes, "tensors": rows,
            "summary": summarize(rows, specs, dense_notes)}


def _notes(specs: dict, aliases: dict, prefixes: list[str], shards: list[str], tokenizer) -> list[str]:
    notes = [f"load with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) (or the model's Auto "
             f"class; AutoTokenizer too); {MODELING_FILE} and the files it imports need torch and transformers only"]
    if any(s["type"].startswith("Quant") for s in specs.values()):
        notes.append("quantized weights are dequantized on every forward (mpokit's reference path: float32 logits "
                     "agree; its packed int4/int8 CPU kernels for bfloat16 are not carried)")
    if prefixes or aliases:
        notes.append(f"{len(prefixes) + len(aliases)} tied or shared tensors stored once and tied again on loading")
    if len(shards) > 1:
        notes.append(f"weights in {len(shards)} shards with model.safetensors.index.json")
    if tokenizer is None:
        notes.append("no tokenizer written (none given, none in the checkpoint)")
    return notes
