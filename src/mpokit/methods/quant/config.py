from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mpokit.methods.base import MethodConfig, option
from mpokit.methods.checks import check_choice, check_ints, check_number
from mpokit.ops.quant import SUPPORTED_BITS

__all__ = ["QuantConfig", "GPTQConfig", "MPO_CORE_CHOICES", "ALGORITHMS", "EMBEDDING_BITS"]

MPO_CORE_CHOICES = ("all", "central", "auxiliary")
ALGORITHMS = ("rtn", "gptq")
EMBEDDING_BITS = (4, 8)


@dataclass
class QuantConfig(MethodConfig):
    """Group-wise weight quantization with packed storage: round-to-nearest or GPTQ.

      algorithm: "rtn" (data-free round-to-nearest, default) or "gptq" (activation-aware:
        column-by-column rounding with error feedback through the inverse Hessian of
        calibration inputs, block by block so each block sees the already-quantized ones;
        needs a tokenizer and calibration text, plain linear layers only).
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
        With algorithm="gptq" the search runs when GPTQ reaches each group, on the updated
        weights, with each column's error weighted by its input energy (diag X^T X).
      mpo_cores: for layers already turned into MPO layers, which cores to quantize:
        "all", "central" (the big middle core) or "auxiliary" (the small outer cores).
      cache_weight: keep the dequantized weight after the first forward (faster generation,
        dense memory); off by default so the forward dequantizes on the fly.
      damp: GPTQ's diagonal damping, a fraction of the mean of diag(X^T X) (paper: 0.01).
      act_order: GPTQ walks columns by decreasing input energy (groups stay contiguous, their
        ranges come from the unmodified weight). Off by default; the "gptq" preset turns it and
        clip_search on: SmolLM2 int4 g128, 2048 test tokens (dense 25.49, RTN 29.85): plain GPTQ
        29.17, + range search 28.32, + act_order 28.41, both 27.05.
      calibration_tokens, calibration_context: GPTQ calibration size and window length. Windows
        of 128 (not 512): the first token of each window is an attention sink that every later
        token reads; with few of them in the Hessian GPTQ pushes error into their direction.
        Measured on SmolLM2 int4 g128 (8192 tokens, 2048-token test): window 512 perplexity 30.35,
        128: 29.17, 32: 29.79 (RTN 29.85, dense 25.49).
      embeddings: bits (8 or 4) for the vocabulary tables: the input embedding becomes a
        QuantEmbedding and the output embedding (lm_head) a QuantLinear. A tied lm_head shares
        the embedding's QuantizedTensor (one copy in memory and on disk, `tied_to` in its spec),
        even when target_modules names it; an untied one is quantized on its own with the same
        bits and groups. None (default): both stay float. Always round-to-nearest (with the
        range search when clip_search is on), also with algorithm="gptq": an embedding lookup
        has no input Hessian; they are quantized before GPTQ calibrates the blocks.
      embedding_group_size: columns per group of those tables; None (default) is one group per
        row (the embedding dim), which puts an 8-bit lm_head on the int8 kernel.
    Targets default to the architecture's linear layers (embeddings only with `embeddings`).
    """

    method: ClassVar[str] = "quant"
    streamable: ClassVar[bool] = True  # GPTQ streams blocks; RTN loads one layer at a time
    bits: int = option(4, "weight bits: 2, 3, 4 or 8", type=int)
    group_size: int = option(128, "columns per quantization group", type=int)
    symmetric: bool = False
    zero_point: bool = True
    fit_groups: bool = True
    clip_search: bool = False
    mpo_cores: str = "all"
    cache_weight: bool = False
    algorithm: str = "rtn"
    damp: float = 0.01
    act_order: bool = False
    calibration_tokens: int = option(8192, "calibration tokens", type=int)
    calibration_context: int = 128
    embeddings: int | None = option(None, "bits of the input embedding and lm_head (8 or 4; default: float)",
                                    type=int)
    embedding_group_size: int | None = option(None, "columns per group of the embedding table (default: one "
                                              "group per row)", type=int)

    @property
    def needs_calibration(self) -> bool:
        return self.algorithm == "gptq"

    def __post_init__(self) -> None:
        check_ints(self, 1, ["bits", "group_size"])
        check_ints(self, 2, ["calibration_tokens", "calibration_context"])
        check_choice("algorithm", self.algorithm, ALGORITHMS)
        check_number("damp", self.damp, 0, low_open=True)
        check_choice("bits", self.bits, SUPPORTED_BITS)
        check_choice("mpo_cores", self.mpo_cores, MPO_CORE_CHOICES)
        if self.embeddings is not None:
            check_choice("embeddings", self.embeddings, EMBEDDING_BITS)
        check_ints(self, 1, ["embedding_group_size"], optional=True)

@dataclass
class GPTQConfig(QuantConfig):
    """GPTQ on calibration text, columns by input energy, searched group ranges (the measured best)."""

    method: ClassVar[str] = "gptq"
    algorithm: str = "gptq"
    act_order: bool = True
    clip_search: bool = True
