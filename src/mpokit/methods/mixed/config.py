from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mpokit.methods.base import MethodConfig, option
from mpokit.methods.checks import check_choice, check_ints, check_number
from mpokit.methods.quant.config import EMBEDDING_BITS
from mpokit.ops.quant import SUPPORTED_BITS

__all__ = ["MixedConfig", "FACTOR_BITS"]

FACTOR_BITS = (4, 8)


@dataclass
class MixedConfig(MethodConfig):
    """One byte budget over mixed layouts: every decoder linear layer gets the layout that removes
    the most estimated loss per byte, under a cap on the bytes of all of them.

    Candidates per layer (priced in real bytes: packed codes, 16-bit scales, zero points):
      ("gptq", b): the dense weight, GPTQ-quantized at b bits (b in `bits_choices`);
      ("lowrank", r, b): a rank-r factorization W ~ A B (the loss-weighted whitened SVD of the
        default method), B GPTQ-quantized on the layer's input Gram H, A refit by least squares to
        the quantized B and GPTQ-quantized on B's output Gram B H B^T (the same calibration
        stream), b in `factor_bits`; ranks are multiples of the layer's group size below
        `max_rank_fraction` of full rank.
    Low-rank candidates are measured without GPTQ by default (exact_candidates=False): factors rounded
    to nearest, the error that rounding adds scaled by GPTQ's gain over rounding on the same layer's
    dense weight at the same bits (candidates.estimated_lowrank_error); the chosen ones are built
    with GPTQ. exact_candidates=True runs GPTQ on the factors of every candidate (about 3x the time).
    Errors are K-FAC estimates of the loss increase, tr(G (W - W_hat) H (W - W_hat)^T) with G the
    diagonal of the output-gradient second moments (the default method's sensitivity), so layers
    compare; ops/budget.plan takes the cheapest candidate of every layer and then upgrades in
    order of estimated loss removed per byte. Candidates are measured on the dense model's
    inputs; the chosen ones are then built block by block on the inputs the already-compressed
    blocks produce (as GPTQ alone does), so a plan of all ("gptq", 4) is exactly GPTQ int4.

      bits_per_weight: the cap, in bits per weight of the targeted layers (scales included);
      target_bytes: the cap in bytes of the targeted layers instead (overrides bits_per_weight).
      embeddings: bits of the input embedding and lm_head (round to nearest, outside the cap;
        8 by default: a float32 vocabulary table is most of a small model's bytes); None (or 0)
        keeps them float.
    """

    method: ClassVar[str] = "mixed"
    streamable: ClassVar[bool] = True  # candidates and build stream blocks; the gradient pass runs block by block
    bits_per_weight: float = option(4.0, "byte budget of the decoder linear layers, in bits per weight",
                                    type=float)
    target_bytes: int | None = option(None, "byte budget of the decoder linear layers (instead of "
                                      "--bits-per-weight)", type=int)
    bits_choices: tuple[int, ...] = (2, 3, 4, 8)
    factor_bits: tuple[int, ...] = FACTOR_BITS
    max_rank_fraction: float = 0.5
    max_ranks: int = 4
    exact_candidates: bool = False
    group_size: int = option(128, "columns per quantization group", type=int)
    embeddings: int | None = option(8, "bits of the input embedding and lm_head (8 or 4; default: float)",
                                    type=int)
    embedding_group_size: int | None = None
    damp: float = 0.01
    act_order: bool = True
    clip_search: bool = True
    calibration_tokens: int = option(8192, "calibration tokens", type=int)
    calibration_context: int = 128
    fisher_tokens: int = 2048
    fisher_damp: float = 0.03

    needs_calibration: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.bits_choices, self.factor_bits = tuple(self.bits_choices), tuple(self.factor_bits)
        check_number("bits_per_weight", self.bits_per_weight, 0, low_open=True)
        check_ints(self, 1, ["target_bytes"], optional=True)
        check_ints(self, 1, ["group_size"])
        check_ints(self, 0, ["max_ranks"])
        check_ints(self, 2, ["calibration_tokens", "calibration_context", "fisher_tokens"])
        check_number("max_rank_fraction", self.max_rank_fraction, 0, 1)
        check_number("damp", self.damp, 0, low_open=True)
        check_number("fisher_damp", self.fisher_damp, 0)
        if not self.bits_choices or any(b not in SUPPORTED_BITS for b in self.bits_choices):
            raise ValueError(f"expected bits_choices drawn from {SUPPORTED_BITS}, got {self.bits_choices}")
        if any(b not in FACTOR_BITS for b in self.factor_bits):
            raise ValueError(f"expected factor_bits drawn from {FACTOR_BITS}, got {self.factor_bits}")
        if self.embeddings == 0:  # the CLI's way to say "keep them float"
            self.embeddings = None
        if self.embeddings is not None:
            check_choice("embeddings", self.embeddings, EMBEDDING_BITS)
        check_ints(self, 1, ["embedding_group_size"], optional=True)
