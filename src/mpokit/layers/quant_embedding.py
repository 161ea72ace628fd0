"""QuantEmbedding: an nn.Embedding whose table is a QuantizedTensor (packed codes + 16-bit group scales).

The table (num_embeddings, embedding_dim) is quantized row by row, in groups along the embedding
dim; one group per row (group_size = embedding_dim) is the default, so a tied lm_head QuantLinear
sharing the same QuantizedTensor runs on the int8 kernel at 8 bits. A lookup gathers only the
requested rows' codes and scales and dequantizes those (never the whole table): each row's codes
fill whole bytes (embedding_dim * bits is a multiple of 8), so row r is a slice of the packed bytes.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mpokit.layers.base import MpokitLayer
from mpokit.layers.cast import cast_dtype, check_cast, narrower
from mpokit.layers.quant import QuantizedTensor, QuantizedWeight, QuantLinear

__all__ = ["QuantEmbedding"]


class QuantEmbedding(QuantizedWeight, MpokitLayer, nn.Module):
    """Drop-in for nn.Embedding with a group-wise quantized table (2/3/4/8 bits; 8 by default)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 8, group_size: int | None = None,
                 symmetric: bool = False, zero_point: bool = True, padding_idx: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        if embedding_dim * bits % 8:
            raise ValueError(f"expected embedding_dim * bits divisible by 8 (rows of whole bytes), got "
                             f"{embedding_dim} * {bits}")
        if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(f"expected padding_idx in [{-num_embeddings}, {num_embeddings}), got {padding_idx}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx % num_embeddings if padding_idx is not None else None  # as nn.Embedding
        self.qweight = QuantizedTensor(num_embeddings, embedding_dim, bits, group_size or embedding_dim, symmetric,
                                       zero_point, device=device)
        self.compute_dtype = dtype or torch.get_default_dtype()

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, *, bits: int = 8, group_size: int | None = None,
                       symmetric: bool = False, zero_point: bool = True,
                       clip_ratios: tuple[float, ...] | None = None) -> "QuantEmbedding":
        w = emb.weight
        layer = cls(emb.num_embeddings, emb.embedding_dim, bits, group_size, symmetric, zero_point, emb.padding_idx,
                    device=w.device, dtype=w.dtype)
        layer.qweight.set_from(w.detach(), clip_ratios)
        return layer

    def tied_head(self, like: nn.Module) -> QuantLinear:
        """A QuantLinear standing in for `like` (an lm_head tied to this table) that holds the same
        QuantizedTensor: one copy of the codes, used by the lookup and by the output projection."""
        bias = getattr(like, "bias", None)
        head = QuantLinear(self.embedding_dim, self.num_embeddings, self.bits, self.group_size, self.symmetric,
                           bias=bias is not None, zero_point=self.qweight.zero_point, device="meta",
                           dtype=self.compute_dtype)  # meta: its own table is dropped for ours
        head.qweight = self.qweight
        if bias is not None:
            head.bias = nn.Parameter(bias.detach().clone())
        head.orig_type = type(like).__name__
        return head

    @property
    def weight(self) -> torch.Tensor:
        """The whole dequantized table, for code that reads `.weight` (the lookup never builds it)."""
        return self.qweight.dequantize(self.compute_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"expected integer token ids, got {ids.dtype}")
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"expected token ids in [0, {self.num_embeddings}), got range "
                             f"[{int(flat.min())}, {int(flat.max())}]")
        q = self.qweight
        if not flat.numel():
            return torch.zeros(*ids.shape, q.cols, dtype=self.compute_dtype, device=ids.device)
        return q.dequantize_rows(flat, self.compute_dtype).reshape(*ids.shape, q.cols)  # the requested rows only

    def to_embedding(self) -> nn.Embedding:
        """A plain nn.Embedding holding the dequantized table (the quantization error stays)."""
        w = self.qweight.dequantize(self.compute_dtype)
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx, device=w.device,
                           dtype=w.dtype)
        with torch.no_grad():
            emb.weight.copy_(w)
        return emb

    def to_dense(self) -> nn.Embedding:
        return self.to_embedding()

    def storage_bytes(self) -> int:
        return self.qweight.storage_bytes()

    def _apply(self, fn, recurse=True):
        source = self.compute_dtype
        out = super()._apply(fn, recurse)
        self.compute_dtype = cast_dtype(fn, self.compute_dtype)  # follow .to(dtype)/.half() through a probe
        if narrower(self.compute_dtype, source):  # rows are now dequantized into a narrower dtype
            name = getattr(self, "mpokit_name", None)
            label = f"layer {name!r} (QuantEmbedding)" if name else f"QuantEmbedding {self.num_embeddings}x" \
                                                                    f"{self.embedding_dim}"
            check_cast(label, self.compute_dtype, [], lambda: self.qweight.dequantize(self.compute_dtype),
                       self.qweight.abs_bound())
        return out

    def spec(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric, "zero_point": self.qweight.zero_point, "padding_idx": self.padding_idx}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device=None, dtype=None) -> "QuantEmbedding":
        return cls(spec["num_embeddings"], spec["embedding_dim"], spec["bits"], spec["group_size"], spec["symmetric"],
                   zero_point=spec.get("zero_point", True), padding_idx=spec.get("padding_idx"), device=device,
                   dtype=dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}, padding_idx={self.padding_idx}")
