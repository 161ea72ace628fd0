"""export_compressed_tensors: an mpokit model as a Hugging Face folder in the compressed-tensors format.

Plain transformers with the `compressed-tensors` package installed loads the folder without mpokit
(`AutoModelForCausalLM.from_pretrained(DIR)`). Every QuantLinear whose grid compressed-tensors holds
(integer zero points or symmetric, 2-8 bits; ct_grid.py derives the code mapping) becomes a
pack-quantized group scheme built by the package itself: its config classes describe the groups,
apply_quantization_config gives the layers their scale/zero-point parameters, which are set to
mpokit's, and its PackedQuantizationCompressor packs the codes (weight_packed, weight_scale,
weight_zero_point, weight_shape). The report says, per tensor, whether the package's own
decompressor gives back exactly the float32 weight mpokit computes with.

Not carried: float-offset grids (zero_point=False) and quantized GPT-2 Conv1D layers are written as
dense float weights (or refused, unsupported="error"); MPO and other structured layers are written
as their dense product. Embeddings and norms stay float.

Loading asymmetric schemes: transformers 5.24 with compressed-tensors 0.20.1 builds the compressed
layers with unpacked zero-point shapes and refuses the packed ones the packer writes; loading with
`dequantize=True` (older transformers: `run_compressed=False`) takes the path that decompresses
while loading, which reads them. The folder records `"dequantize": true` in its quantization_config
for such schemes, so a plain from_pretrained works; the weights end up dense on CPU either way.

The folder is written beside its target under a temporary name and renamed into place (io.atomic):
a failed export leaves nothing behind; an existing model folder is replaced only with overwrite.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpokit.export.ct_grid import CTGrid, compact_targets, ct_grid, layer_keys, scheme_args
from mpokit.export.tensors import check_folder_out, densified_copy, saved_tokenizer, source_meta, source_model
from mpokit.io.atomic import atomic_dir
from mpokit.layers.base import layer_modules
from mpokit.layers.quant import QuantLinear
from mpokit.surgery.replace import set_module

__all__ = ["CTOptions", "export_compressed_tensors", "UNSUPPORTED", "DENSE", "is_compressed_tensors_available"]

UNSUPPORTED = ("dense", "error")  # layers without a compressed-tensors grid: dense float weights, or refuse
DENSE = ("auto", "f32", "f16")  # unquantized tensors: float16 where that is exact, else as they are; or fixed
CONFIG = "config.json"
_QPARAMS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
_FLOATS = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def is_compressed_tensors_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("compressed_tensors") is not None


@dataclass
class CTOptions:
    """How tensors without a compressed-tensors grid of their own are written.

      dense: unquantized tensors (embeddings, norms, densified layers). "auto" (default) writes a
        float32 tensor as float16 when every value is a float16, else unchanged; "f32" or "f16" fix
        the type ("f16" rounds, and says by how much).
      unsupported: layers whose grid compressed-tensors cannot hold (float offsets, Conv1D): "dense"
        (default) writes their dequantized weight as a float tensor (exact with dense="f32" or
        "auto"), "error" refuses the export.
    """

    dense: str = "auto"
    unsupported: str = "dense"

    def __post_init__(self) -> None:
        for name, choices in (("dense", DENSE), ("unsupported", UNSUPPORTED)):
            if getattr(self, name) not in choices:
                raise ValueError(f"expected {name} in {choices}, got {getattr(self, name)!r}")


@dataclass
class _Plan:
    model: nn.Module  # float copy; QuantLinear -> nn.Linear (quantized ones compressed later)
    quant: dict[str, tuple[Any, CTGrid]] = field(default_factory=dict)  # name -> (QuantizedTensor, grid)
    dense_how: dict[str, str] = field(default_factory=dict)  # module name -> why it is dense
    notes: list[str] = field(default_factory=list)


def _float_linear(layer: QuantLinear) -> nn.Linear:
    """The layer's dequantized weight as an nn.Linear in float32, where (q - z) * s is exact."""
    w = layer.qweight.dequantize(torch.float32)
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=torch.float32)
    with torch.no_grad():
        lin.weight.copy_(w)
        if layer.bias is not None:
            lin.bias.copy_(layer.bias.float())
    return lin


def _unsupported_reason(layer: QuantLinear) -> str | None:
    if getattr(layer, "orig_type", None) == "Conv1D":
        return "a Conv1D layer (compressed-tensors quantizes nn.Linear only)"
    if not layer.symmetric and not layer.qweight.zero_point:
        return "float offsets (zero_point=False): compressed-tensors has integer zero points only"
    return None


def _plan(model: nn.Module, unsupported: str) -> _Plan:
    structured = [n for n, m in layer_modules(model) if not isinstance(m, QuantLinear)]
    dense, notes = densified_copy(model)
    plan = _Plan(dense if dense is not model else copy.deepcopy(model), notes=notes)
    plan.dense_how.update({n: "dense product of an mpokit layer (its structure is not carried)" for n in structured})
    refused, kept = {}, {}
    for name, layer in layer_modules(plan.model):
        if not isinstance(layer, QuantLinear):
            continue
        reason = _unsupported_reason(layer)
        if reason is None:
            kept[name] = layer
            continue
        refused[name] = reason
        plan.dense_how[name] = f"dequantized: {reason}"
        set_module(plan.model, name, layer.to_dense())
    keys = layer_keys({name: layer.qweight for name, layer in kept.items()})
    for name, layer in kept.items():
        plan.quant[name] = (layer.qweight, ct_grid(layer.qweight, keys[name]))
        set_module(plan.model, name, _float_linear(layer))
    if refused:
        first = next(iter(refused))
        if unsupported == "error":
            raise ValueError(f"expected layers compressed-tensors can hold, got {len(refused)} that it cannot, e.g. "
                             f"{first}: {refused[first]}; pass unsupported='dense' (--unsupported dense) to write "
                             "them as dense float weights")
        plan.notes.append(f"{len(refused)} quantized layers written as dense float weights, e.g. {first}: "
                          f"{refused[first]}")
    return plan


def _compress_(plan: _Plan) -> dict[str, dict]:
    """Attach one group scheme per grid, set mpokit's scales/zero points, pack with the library."""
    from compressed_tensors.compressors import compress_module
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config

    keys = sorted({grid.key for _, grid in plan.quant.values()})
    names = {k: [n for n, (_, grid) in plan.quant.items() if grid.key == k] for k in keys}
    groups = {f"group_{i}": QuantizationScheme(targets=compact_targets(names[k], plan.model), weights=scheme_args(k))
              for i, k in enumerate(keys)}
    config = QuantizationConfig(config_groups=groups, quantization_status="frozen")
    apply_quantization_config(plan.model, config, show_progress=False)
    for name, (_, grid) in plan.quant.items():
        module = plan.model.get_submodule(name)
        if getattr(module, "quantization_scheme", None) is None:
            raise RuntimeError(f"compressed-tensors did not match {name} with its targets")
        with torch.no_grad():
            module.weight_scale.copy_(grid.scale)
            if grid.zero_point is not None:
                module.weight_zero_point.copy_(grid.zero_point)
        compress_module(module, "pack-quantized")  # ModelCompressor.compress_model's loop, without its progress bar
    return {g: {"targets": s.targets, "bits": k[0], "group_size": k[1], "symmetric": k[2], "layers": len(names[k])}
            for (g, s), k in zip(groups.items(), keys)}


def _quant_rows(plan: _Plan) -> list[dict[str, Any]]:
    """Per quantized layer: decode what was packed with the library's decompressor, compare with mpokit."""
    from compressed_tensors.compressors import PackedQuantizationCompressor

    rows = []
    for name, (qt, grid) in plan.quant.items():
        module = plan.model.get_submodule(name)
        state = {k: getattr(module, k) for k in _QPARAMS if hasattr(module, k)}
        back = PackedQuantizationCompressor.decompress(dict(state), module.quantization_scheme)["weight"]
        diff = (back.float() - qt.dequantize(torch.float32)).abs()
        rows.append({"name": f"{name}.weight", "shape": [qt.rows, qt.cols],
                     "type": f"int{grid.bits} g{grid.group_size} {'sym' if grid.symmetric else 'asym'}",
                     "exact": bool(diff.max() == 0), "how": grid.how,
                     "bytes": sum(t.numel() * t.element_size() for t in state.values()),
                     "max_abs_diff": float(diff.max()), "inexact_values": int((diff > 0).sum())})
    return rows


def _dense_dtype(t: torch.Tensor, mode: str) -> torch.dtype:
    if mode == "f32":
        return torch.float32
    if mode == "f16":
        return torch.float16
    if t.dtype == torch.float32 and torch.equal(t.half().float(), t):
        return torch.float16
    return t.dtype


def _dense_state(plan: _Plan, mode: str) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The state dict to save (unquantized float tensors cast as `mode` says) and their rows."""
    state, rows, cast = plan.model.state_dict(), [], {}
    for key, t in state.items():
        owner, _, leaf = key.rpartition(".")
        if (owner in plan.quant and leaf in _QPARAMS) or not t.is_floating_point():
            continue
        ptr = t.data_ptr()
        if ptr in cast:  # a tied tensor (lm_head): the same cast tensor, written once
            state[key] = cast[ptr]
            continue
        new = t.detach().to(_dense_dtype(t, mode))
        cast[ptr] = state[key] = new
        diff = (new.to(t.dtype) - t).abs()
        how = next((h for n, h in plan.dense_how.items() if key.startswith(n + ".")), "unquantized")
        rows.append({"name": key, "shape": list(t.shape), "type": _FLOATS.get(new.dtype, str(new.dtype)),
                     "exact": bool(diff.max() == 0) if t.numel() else True, "how": how,
                     "bytes": new.numel() * new.element_size(),
                     "max_abs_diff": float(diff.max()) if t.numel() else 0.0, "inexact_values": int((diff > 0).sum())})
    return state, rows


def _write(tmp: Path, plan: _Plan, state, tokenizer, dequantize: bool) -> dict | None:
    from compressed_tensors.compressors import ModelCompressor
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # the export prints its own summary
    try:
        plan.model.save_pretrained(tmp, state_dict=state)
    finally:
        if shown:
            logging.enable_progress_bar()
    if not plan.quant:
        written = None
    else:
        compressor = ModelCompressor.from_pretrained_model(plan.model, quantization_format="pack-quantized")
        compressor.update_config(tmp)  # quantization_config as the package writes it
        config = json.loads((tmp / CONFIG).read_text())
        if dequantize:  # see the module docstring: the path of transformers that reads packed zero points
            config["quantization_config"]["dequantize"] = True
            (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        written = config["quantization_config"]
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    return written


def export_compressed_tensors(model_or_dir, out_path, options: CTOptions | None = None, *, tokenizer=None,
                              overwrite: bool = False) -> dict[str, Any]:
    """Write `model_or_dir` (an mpokit checkpoint folder, or a model in memory) as the compressed-tensors
    Hugging Face folder `out_path`. tokenizer: saved with it (a checkpoint folder's own by default).

    Returns the report: per tensor its type (int{b} g{G} sym/asym, or F32/F16), bytes, whether the
    written tensor decodes to exactly what mpokit computes with and, if not, the largest difference;
    a summary by type; the config groups; notes on what the format does not carry.
    """
    if not is_compressed_tensors_available():
        raise ImportError("expected the compressed-tensors package for --format compressed-tensors, got none: "
                          "pip install 'mpokit[export]' (or compressed-tensors)")
    options = options or CTOptions()
    out = Path(out_path)
    ckpt, meta = source_meta(model_or_dir)
    check_folder_out(out, overwrite, ckpt, CONFIG, "a Hugging Face model folder")
    model = source_model(model_or_dir, ckpt)
    tokenizer = tokenizer if tokenizer is not None else saved_tokenizer(ckpt)
    plan = _plan(model, options.unsupported)
    groups = _compress_(plan) if plan.quant else {}
    rows = _quant_rows(plan)
    state, dense_rows = _dense_state(plan, options.dense)
    asymmetric = any(not g["symmetric"] for g in groups.values())
    notes = plan.notes + _notes(groups, asymmetric, tokenizer)
    with atomic_dir(out, overwrite=overwrite, marker=CONFIG, protect=[ckpt], what="a Hugging Face model folder") as tmp:
        written = _write(tmp, plan, state, tokenizer, asymmetric)
    rows += dense_rows
    import compressed_tensors

    return {"format": "compressed-tensors", "path": str(out), "bytes": _folder_bytes(out),
            "source": meta.get("source"), "options": asdict(options), "compressed_tensors": compressed_tensors.__version__,
            "config_groups": groups, "quantization_config": written, "notes": notes, "tensors": rows,
            "summary": summarize(rows)}


def _notes(groups: dict[str, dict], asymmetric: bool, tokenizer) -> list[str]:
    notes = []
    if not groups:
        notes.append("no quantized layers: a plain float model folder (no quantization_config)")
    if asymmetric:
        notes.append('asymmetric: one scheme for every layer, and config.json sets quantization_config "dequantize": '
                     "true (transformers' compressed path refuses packed zero points; its dequantize-while-loading "
                     "path decodes every layer with the first config group's scheme)")
    odd = sorted({g["bits"] for g in groups.values()} - {4, 8})
    if odd:
        notes.append(f"{'/'.join(map(str, odd))}-bit codes: packed densely as this compressed-tensors version does; "
                     "vLLM's kernels serve 4 and 8 bits")
    if any(g["group_size"] not in (32, 64, 128) for g in groups.values()):
        notes.append("group sizes other than 32/64/128 load in transformers; vLLM's kernels may not take them "
                     "(not checked here)")
    if tokenizer is None:
        notes.append("no tokenizer written (none given, none in the checkpoint)")
    return notes


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (type, how): tensor count, exact count, bytes, largest weight change."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        g = groups.setdefault((r["type"], r["how"]), {"type": r["type"], "how": r["how"], "tensors": 0, "exact": 0,
                                                      "bytes": 0, "max_abs_diff": 0.0})
        g["tensors"] += 1
        g["exact"] += int(r["exact"])
        g["bytes"] += r["bytes"]
        g["max_abs_diff"] = max(g["max_abs_diff"], r["max_abs_diff"])
    return sorted(groups.values(), key=lambda g: -g["bytes"])
