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
      group_size: input columns sharing one 16-bit scale (and zero point).
      fit_groups: when a layer's input size is not a multiple of group_size, use the largest
        multiple of 32 below group_size that divides it (optimum-quanto's rule: 96 for 576
        columns at 128); False keeps group_size with a shorter last group per row.
      symmetric: scale only (no offset), codes centred on 2^(bits-1).
      zero_point: asymmetric with an integer zero point, so 0 is exact (default; measured
        far better perplexity on SmolLM2 than a float group-minimum offset at equal SQNR);
        False = 16-bit float offset.
      clip_search: per group, pick the range shrink (1.0 ... 0.6) with the least squared
        weight error (data-free). Off by default: on SmolLM2 it lowers the weight error but
        raises perplexity (it clips the largest, most salient weights). False = min/max RTN.
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
    zero_point: bool = True
    fit_groups: bool = True
    clip_search: bool = False
    mpo_cores: str = "all"
    cache_weight: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"expected bits in {SUPPORTED_BITS}, got {self.bits}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"expected group_size >= 1, got {self.group_size}")
        if self.mpo_cores not in MPO_CORE_CHOICES:
            raise ValueError(f"expected mpo_cores in {MPO_CORE_CHOICES}, got {self.mpo_cores!r}")
