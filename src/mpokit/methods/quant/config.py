from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mpokit.methods.base import MethodConfig
from mpokit.ops.quant import SUPPORTED_BITS

__all__ = ["QuantConfig", "MPO_CORE_CHOICES"]

MPO_CORE_CHOICES = ("all", "central", "auxiliary")


@dataclass
class QuantConfig(MethodConfig):
    """Group-wise round-to-nearest weight quantization with packed storage.

      bits: 2, 3, 4 or 8.
      group_size: input columns sharing one 16-bit scale (and offset); a row whose length is
        not a multiple keeps a shorter last group.
      symmetric: scale only (no offset), codes centred on 2^(bits-1).
      clip_search: per group, pick the range shrink (1.0 ... 0.6) with the least squared
        weight error (data-free); False = plain min/max RTN.
      mpo_cores: for layers already turned into MPO layers, which cores to quantize:
        "all", "central" (the big middle core) or "auxiliary" (the small outer cores).
      cache_weight: keep the dequantized weight after the first forward (faster generation,
        dense memory); off by default so the forward dequantizes on the fly.
    Targets default to the architecture's linear layers (embeddings are not quantized).
    """

    method: ClassVar[str] = "quant"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    clip_search: bool = True
    mpo_cores: str = "all"
    cache_weight: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"expected bits in {SUPPORTED_BITS}, got {self.bits}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"expected group_size >= 1, got {self.group_size}")
        if self.mpo_cores not in MPO_CORE_CHOICES:
            raise ValueError(f"expected mpo_cores in {MPO_CORE_CHOICES}, got {self.mpo_cores!r}")
