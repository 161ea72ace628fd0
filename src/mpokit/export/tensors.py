"""The tensors of a llama model under their GGUF names, each encoded (encode.py) and row-permuted.

Quantized layers (QuantLinear, and QuantEmbedding when the caller keeps it: GGUF does) keep their
codes; every other mpokit layer (MPO, low-rank, quantized-MPO, routed FFN) is undone on a copy of
the model first, through the layer protocol (to_dense), and written as the dense weight it
computes, so the file does not carry its structure. A lm_head tied to a kept QuantEmbedding is
left out of the file, as a tied dense one is: llama.cpp reuses token_embd. llama.cpp stores q_proj/k_proj
with the rows of each head reordered for its rotary kernel (convert_hf_to_gguf's `permute`;
transformers' GGUF loader reverses it): the same row permutation is applied here, to encoded
rows, so the column groups inside each row stay intact.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mpokit.export.encode import Encoded, encode_dense, encode_quantized
from mpokit.layers.base import layer_modules
from mpokit.layers.quant import QuantizedTensor, QuantLinear
from mpokit.layers.quant_embedding import QuantEmbedding
from mpokit.surgery.replace import get_module

__all__ = ["ExportTensor", "source_meta", "source_model", "check_folder_out", "saved_tokenizer", "densified_copy",
           "collect_tensors", "rope_permutation", "GGUF_CODES"]

GGUF_CODES = (QuantLinear, QuantEmbedding)  # layers collect_tensors writes from their codes


def source_meta(model_or_dir) -> tuple[Path | None, dict]:
    """(checkpoint folder, its mpokit.json) of what an exporter was given; (None, {}) for a model in memory.

    Read before the output is checked and before anything slow: a folder that is not a checkpoint
    fails here with "expected an mpokit checkpoint at X, got ...".
    """
    from mpokit.io.checkpoint import read_meta

    if isinstance(model_or_dir, nn.Module):
        return None, {}
    return Path(model_or_dir), read_meta(Path(model_or_dir))


def check_folder_out(out: Path, overwrite: bool, ckpt: Path | None, marker: str, what: str) -> None:
    """Refuse an output folder inside the input checkpoint, or one that is not a folder this export wrote
    (recognised by `marker`), before anything slow happens."""
    from mpokit.io.atomic import OutputPathError, check_target

    if ckpt is not None and ckpt.expanduser().resolve() in out.expanduser().resolve().parents:
        raise OutputPathError(f"refusing to write to {out}: it would sit inside the input {ckpt}; "
                              "choose another output folder")
    check_target(out, overwrite=overwrite, marker=marker, protect=[ckpt], what=what)


def saved_tokenizer(ckpt: Path | None):
    """The tokenizer saved with a checkpoint, or None when it has none (or there is no checkpoint)."""
    if ckpt is None or not any((ckpt / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from mpokit.io.models import checkpoint_tokenizer

    return checkpoint_tokenizer(ckpt)  # not through the folder's guarded config.json


def source_model(model_or_dir, ckpt) -> nn.Module:
    """The model to export: the one given, or the checkpoint loaded; a transformers model either way."""
    from mpokit.io.checkpoint import load_compressed

    model = model_or_dir if ckpt is None else load_compressed(ckpt)
    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise ValueError(f"expected a transformers model, got {type(model).__name__}")
    return model


@dataclass
class ExportTensor:
    name: str  # GGUF name, e.g. blk.0.attn_q.weight
    hf_name: str
    shape: tuple[int, ...]  # as in the model: (out, in) for weights
    encoded: Encoded


def densified_copy(model: nn.Module, keep: tuple[type, ...] = (QuantLinear,)) -> tuple[nn.Module, list[str]]:
    """`model` itself when its only mpokit layers are of the `keep` types; else a copy with every other
    mpokit layer undone (outermost first, ties restored, as surgery.unload_ does), and one note per
    layer. A kept layer tied to an undone one (a QuantLinear lm_head sharing a QuantEmbedding's table)
    is undone too, and tied to the dense result."""
    layers = layer_modules(model)
    undo = {n for n, m in layers if not isinstance(m, keep)}
    undo |= {n for n, m in layers if getattr(m, "tied_to", None) in undo}
    if not undo:
        return model, []
    model = copy.deepcopy(model)
    notes, undone = [], []
    for name, layer in layer_modules(model):
        if name not in undo or not _still_there(model, name, layer):
            continue
        layer.undo_(model, name)
        undone.append((name, layer))
        notes.append(f"{name}: {type(layer).__name__} written as its dense weight (its structure is not carried)")
    for name, layer in undone:
        source = getattr(layer, "tied_to", None)
        if source:
            get_module(model, name).weight = get_module(model, source).weight
    return model, notes


def _still_there(model: nn.Module, name: str, layer: nn.Module) -> bool:
    try:
        return model.get_submodule(name) is layer
    except AttributeError:
        return False


def rope_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order of llama.cpp's q/k layout: new[k] = old[perm[k]]. In each head of `rows // n_head`
    rows, the first and second halves (the rotary pairs as transformers splits them) are interleaved."""
    if rows % (2 * n_head):
        raise ValueError(f"expected q/k rows divisible by 2 x {n_head} heads, got {rows}")
    half = rows // n_head // 2
    return torch.arange(rows).reshape(n_head, 2, half).transpose(1, 2).reshape(-1)  # (rows,)


def _sources(model: nn.Module) -> list[tuple[str, object]]:
    """(HF tensor name, QuantizedTensor or tensor) for every tensor to write, tied lm_head left out."""
    quant = {n: m for n, m in model.named_modules() if isinstance(m, GGUF_CODES)}
    out = []
    for key, t in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner.endswith(".qweight") and owner[: -len(".qweight")] in quant:
            if key.endswith(".packed"):  # scale and offset travel with the codes
                out.append((owner[: -len(".qweight")] + ".weight", quant[owner[: -len(".qweight")]].qweight))
            continue
        out.append((key, t))
    found = dict(out)
    embed, head = found.get("model.embed_tokens.weight"), found.get("lm_head.weight")
    if getattr(model.config, "tie_word_embeddings", False) and embed is not None and head is not None \
            and _same_storage(embed, head):
        out = [(k, v) for k, v in out if k != "lm_head.weight"]  # llama.cpp reuses token_embd when output is absent
    return out


def _same_storage(a, b) -> bool:
    if isinstance(a, QuantizedTensor) or isinstance(b, QuantizedTensor):
        return a is b
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape


def collect_tensors(model: nn.Module, int4_zero_point: str = "q4_1", convert: str = "f16",
                    dense: str = "auto") -> list[ExportTensor]:
    """Every tensor of a (densified) llama model, named, encoded and permuted for GGUF."""
    from gguf import MODEL_ARCH, get_tensor_name_map

    config = model.config
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    out = []
    for hf_name, src in _sources(model):
        base, _, suffix = hf_name.rpartition(".")
        gguf_base = names.get_name(base)
        if gguf_base is None or suffix not in ("weight", "bias"):
            raise ValueError(f"expected only llama tensors in the model, got {hf_name!r}, which GGUF's llama layout "
                             "has no name for")
        if isinstance(src, torch.Tensor):
            enc = encode_dense(src, dense, "unquantized")
            shape = tuple(src.shape)
        else:
            enc = encode_quantized(src, int4_zero_point, convert)
            shape = (src.rows, src.cols)
        if gguf_base.endswith((".attn_q", ".attn_k")):
            perm = rope_permutation(shape[0], heads if gguf_base.endswith(".attn_q") else kv_heads).numpy()
            enc.data = enc.data[perm]  # rows only: each row's blocks (and groups) move whole
        out.append(ExportTensor(f"{gguf_base}.{suffix}", hf_name, shape, enc))
    return out
