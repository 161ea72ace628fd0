"""GGUF key-values for a llama model: hyperparameters from its config, tokenizer from a source GGUF or HF.

Keys follow llama.cpp's names (gguf.Keys). When the model came from a GGUF file (the default
SmolLM2 did), its general.* and tokenizer.* keys are copied from that file after checking that
its llama.* hyperparameters describe the model being exported; otherwise the tokenizer is built
from a Hugging Face byte-level BPE tokenizer (llama.cpp's "gpt2" tokenizer model), the only kind
handled here: a sentencepiece tokenizer needs scores this code does not reconstruct.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mpokit.version import __version__

__all__ = ["KV", "check_architecture", "llama_kv", "read_source_kv", "check_source", "tokenizer_kv", "general_kv",
           "provenance_kv", "write_kv"]

KV = dict[str, tuple[Any, Any, Any]]  # key -> (value, GGUFValueType, array item type or None)
# Keys the writer sets itself or that describe this file, not the source one.
_NOT_COPIED = {"general.architecture", "general.file_type", "general.quantization_version"}


def _types():
    from gguf import GGUFValueType

    return GGUFValueType


def _rope(config) -> dict:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(rope)


def check_architecture(config) -> None:
    """Refuse, with one message, any model llama.cpp's llama architecture would not describe."""
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        raise ValueError(f"expected a llama-architecture model (config model_type 'llama') for GGUF export, got "
                         f"{model_type!r}")
    rope_type = _rope(config).get("rope_type", _rope(config).get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ValueError(f"expected default or linear rotary embeddings for GGUF export, got rope_type {rope_type!r}")


def llama_kv(config) -> KV:
    """llama.* hyperparameters, as llama.cpp's convert_hf_to_gguf writes them."""
    T = _types()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = _rope(config)
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kv: KV = {
        "llama.context_length": (config.max_position_embeddings, T.UINT32, None),
        "llama.embedding_length": (config.hidden_size, T.UINT32, None),
        "llama.feed_forward_length": (config.intermediate_size, T.UINT32, None),
        "llama.block_count": (config.num_hidden_layers, T.UINT32, None),
        "llama.attention.head_count": (heads, T.UINT32, None),
        "llama.attention.head_count_kv": (kv_heads, T.UINT32, None),
        "llama.rope.freq_base": (float(theta), T.FLOAT32, None),
        "llama.attention.layer_norm_rms_epsilon": (float(config.rms_norm_eps), T.FLOAT32, None),
        "llama.vocab_size": (config.vocab_size, T.UINT32, None),
        "llama.rope.dimension_count": (head_dim, T.UINT32, None),
    }
    if head_dim != config.hidden_size // heads:  # llama.cpp derives it from the embedding width otherwise
        kv["llama.attention.key_length"] = (head_dim, T.UINT32, None)
        kv["llama.attention.value_length"] = (head_dim, T.UINT32, None)
    if rope.get("rope_type", rope.get("type")) == "linear":
        kv["llama.rope.scaling.type"] = ("linear", T.STRING, None)
        kv["llama.rope.scaling.factor"] = (float(rope["factor"]), T.FLOAT32, None)
    return kv


def read_source_kv(path: Path) -> KV:
    """Every key-value of a GGUF file except the file's own bookkeeping (GGUF.*, file type)."""
    from gguf import GGUFReader

    T = _types()
    fields = GGUFReader(path).fields
    arch = fields.get("general.architecture")
    if arch is None or arch.contents() != "llama":
        raise ValueError(f"expected a llama GGUF file to copy metadata from, got {path} with architecture "
                         f"{arch.contents() if arch is not None else None!r}")
    out: KV = {}
    for key, field in fields.items():
        if key.startswith("GGUF.") or key in _NOT_COPIED or not field.types:
            continue
        vtype = field.types[0]
        if vtype == T.ARRAY and len(field.types) != 2:  # nested arrays: none in llama files, not handled
            continue
        out[key] = (field.contents(), vtype, field.types[-1] if vtype == T.ARRAY else None)
    return out


def check_source(source: KV, built: KV, where: Path) -> None:
    """The source file must describe this model: same hyperparameters, one token per embedding row."""
    wrong = []
    for key, (value, _, _) in built.items():
        if key not in source:
            continue
        theirs = source[key][0]
        same = math.isclose(float(theirs), float(value), rel_tol=1e-6) if isinstance(value, float) else theirs == value
        if not same:
            wrong.append(f"{key}={value} (the file has {theirs})")
    tokens = source.get("tokenizer.ggml.tokens", (None,))[0]
    vocab = built["llama.vocab_size"][0]
    if tokens is not None and len(tokens) != vocab:
        wrong.append(f"{vocab} tokens (the file has {len(tokens)})")
    if wrong:
        raise ValueError(f"expected {where} to describe the exported model, got a mismatch: {'; '.join(wrong)}")


def _byte_level(spec: dict) -> tuple[bool, str]:
    """(whether the tokenizer is byte-level BPE, llama.cpp's pre-tokenizer name for it)."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    byte_level = any(p.get("type") == "ByteLevel" for p in parts)
    # a lone ByteLevel with its regex is GPT-2's split; any other split is unknown here: llama.cpp's default
    gpt2 = len(parts) == 1 and byte_level and parts[0].get("use_regex", True)
    return byte_level, "gpt-2" if gpt2 else "default"


def _token_table(spec: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    from gguf import TokenType

    id_to_token = {i: t for t, i in spec["model"]["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    id_to_token.update({i: a["content"] for i, a in added.items()})
    if id_to_token and max(id_to_token) >= vocab_size:
        raise ValueError(f"expected a tokenizer of at most {vocab_size} tokens (the model's vocab_size), got token id "
                         f"{max(id_to_token)}")
    tokens, types = [], []
    for i in range(vocab_size):  # ids the tokenizer never produces become unused padding, as llama.cpp writes them
        if i not in id_to_token:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        tokens.append(id_to_token[i])
        special = i in added and added[i].get("special", False)
        types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED if i in added else TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def tokenizer_kv(tokenizer, vocab_size: int) -> KV:
    """tokenizer.* keys of a Hugging Face byte-level BPE tokenizer (llama.cpp's "gpt2" model)."""
    T = _types()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"expected a fast (tokenizers) tokenizer to write GGUF metadata, got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    byte_level, pre = _byte_level(spec)
    kind = spec["model"].get("type")
    if kind != "BPE" or not byte_level:
        raise ValueError(f"expected a byte-level BPE tokenizer (GGUF tokenizer model 'gpt2'), got a {kind} tokenizer"
                         f"{'' if byte_level else ' without byte-level pre-tokenization'}; pass a GGUF file of the "
                         "same model to copy the tokenizer from (metadata_from=, --metadata-from)")
    tokens, types = _token_table(spec, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    kv: KV = {"tokenizer.ggml.model": ("gpt2", T.STRING, None), "tokenizer.ggml.pre": (pre, T.STRING, None),
              "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
              "tokenizer.ggml.token_type": (types, T.ARRAY, T.INT32)}
    if merges:
        kv["tokenizer.ggml.merges"] = (merges, T.ARRAY, T.STRING)
    for attr, key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("unk_token_id", "unknown"),
                      ("pad_token_id", "padding")):
        token_id = getattr(tokenizer, attr, None)
        if isinstance(token_id, int) and 0 <= token_id < vocab_size:
            kv[f"tokenizer.ggml.{key}_token_id"] = (token_id, T.UINT32, None)
    ids = tokenizer("a")["input_ids"]  # what the tokenizer adds around text, observed rather than read from flags
    for attr, key, pos in (("bos_token_id", "add_bos_token", 0), ("eos_token_id", "add_eos_token", -1)):
        token_id = getattr(tokenizer, attr, None)
        kv[f"tokenizer.ggml.{key}"] = (token_id is not None and len(ids) > 1 and ids[pos] == token_id, T.BOOL, None)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        kv["tokenizer.chat_template"] = (template, T.STRING, None)
    return kv


def general_kv(name: str) -> KV:
    T = _types()
    return {"general.type": ("model", T.STRING, None), "general.name": (name, T.STRING, None)}


def provenance_kv(methods: list) -> KV:
    """Who wrote the file and what was applied (llama.cpp and transformers ignore the mpokit.* keys)."""
    T = _types()
    return {"general.quantized_by": (f"mpokit {__version__}", T.STRING, None),
            "mpokit.version": (__version__, T.STRING, None),
            "mpokit.methods": (json.dumps(methods, default=str), T.STRING, None)}


def write_kv(writer, kv: KV) -> None:
    for key, (value, vtype, sub) in kv.items():
        if isinstance(value, (list, str)) and not value:  # GGUF has no empty arrays; empty strings say nothing
            continue
        writer.add_key_value(key, value, vtype, sub)
