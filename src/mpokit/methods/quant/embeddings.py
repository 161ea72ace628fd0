"""QuantConfig.embeddings: the vocabulary tables quantized round-to-nearest.

The input embedding becomes a QuantEmbedding; the lm_head a QuantLinear. A tied lm_head holds the
embedding's own QuantizedTensor (QuantEmbedding.tied_head) and records `tied_to`, as tied MPO layers
do, so the codes exist once in memory and once in the checkpoint. On SmolLM2 the float32 table is
113 MB of a 163 MB int4 checkpoint, and each decoded token reads all of it through the lm_head.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mpokit.layers.quant import QuantLinear
from mpokit.layers.quant_embedding import QuantEmbedding
from mpokit.methods.quant.config import QuantConfig
from mpokit.ops.quant import DEFAULT_CLIP_RATIOS
from mpokit.surgery.replace import get_module, set_module

__all__ = ["VocabTables", "vocab_tables", "embedding_group", "quantize_vocab_"]


@dataclass
class VocabTables:
    embedding: str  # module name of the input embedding
    head: str | None  # module name of a plain nn.Linear lm_head, else None (absent or not a Linear)
    tied: bool  # head reads the embedding's Parameter


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def vocab_tables(model: nn.Module) -> VocabTables:
    """Where the vocabulary tables are; raises unless the input embedding is a plain nn.Embedding."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if type(emb) is not nn.Embedding:
        raise ValueError(f"expected a model whose input embedding is an nn.Embedding for embeddings=, got "
                         f"{type(emb).__name__}; quantize embeddings before other methods replace them")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:  # absent, or already replaced by another method: left as it is
        return VocabTables(_name_of(model, emb), None, False)
    return VocabTables(_name_of(model, emb), _name_of(model, head), head.weight is emb.weight)


def embedding_group(dim: int, config: QuantConfig) -> int:
    """The group size of a vocabulary table with rows of `dim` values (default: one group per row)."""
    from mpokit.methods.quant.transform import fitted_group  # transform imports this module

    group = config.embedding_group_size or dim
    return fitted_group(dim, group) if config.fit_groups else group


def quantize_vocab_(model: nn.Module, config: QuantConfig, tables: VocabTables, recorder) -> None:
    """Replace the tables through `recorder` (one LayerRecord each; a tied head gets none, as its codes
    are the embedding's) and note ties in the report."""
    emb = get_module(model, tables.embedding)
    group = embedding_group(emb.embedding_dim, config)
    kw = {"bits": config.embeddings, "group_size": group, "symmetric": config.symmetric,
          "zero_point": config.zero_point, "clip_ratios": DEFAULT_CLIP_RATIOS if config.clip_search else None}
    recorder.replace(tables.embedding, lambda m: QuantEmbedding.from_embedding(m, **kw), bits=config.embeddings,
                     kind="quant-embedding")
    if tables.head is None:
        return
    if tables.tied:
        head = get_module(model, tables.embedding).tied_head(get_module(model, tables.head))
        head.tied_to = tables.embedding
        set_module(model, tables.head, head)
        recorder.report.extra.setdefault("tied", {})[tables.head] = tables.embedding
        return

    def make(m: nn.Linear) -> QuantLinear:
        new = QuantLinear.from_weight(m.weight, m.bias, cache_weight=config.cache_weight, **kw)
        new.orig_type = type(m).__name__
        return new

    recorder.replace(tables.head, make, bits=config.embeddings)
