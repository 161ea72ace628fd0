from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

from mpokit.layers.mpo import FORWARD_MODES
from mpokit.methods.base import MethodConfig, option

__all__ = ["AwareConfig", "MPO3CoreConfig", "AwareGlobalConfig", "WhitenedSVDConfig", "ASVDConfig", "SVDConfig",
           "SCALINGS", "SENSITIVITIES", "ALLOCATIONS", "LAYOUTS"]

SCALINGS = ("whiten", "diag", "none")
SENSITIVITIES = ("fisher", "none")
ALLOCATIONS = ("global", "uniform")
LAYOUTS = ("lowrank", "mpo")


@dataclass
class AwareConfig(MethodConfig):
    """Activation-aware compression to a global parameter budget.

    scaling: how calibration inputs weight the error: "whiten" (full X^T X, SVD-LLM),
      "diag" (per-channel scale sqrt(E[x^2])**alpha, ASVD), "none" (plain SVD).
    sensitivity: "fisher" (default) also weights each layer's output rows by the second moments
      G of the loss gradient at its output (one backward pass over `fisher_tokens` calibration
      tokens), so errors are K-FAC estimates of the loss increase, comparable across layers;
      "none" weights inputs only (SVD-LLM).
    allocation: "global" (default) spends the budget where it removes the most weighted error
      (ranks differ per layer, some layers stay dense); "uniform" keeps `budget` of every layer.
      Measured on SmolLM2 at 0.8 (docs/benchmarks/compression.md): global allocation helps only with sensitivity="fisher";
      with input weighting alone it is worse than uniform.
    layouts: candidate layouts per layer; "lowrank" is the 2-core MPO (out,1)x(1,in); "mpo" adds
      a 3-core MPO refined on the weighted objective, used where it beats low rank at the
      allocated size (SmolLM2 @0.8: 6 of 210 layers chose it, perplexity 55.66 vs 55.55 without,
      at ~4x the compression time, hence not in the default).
    error_norm: "absolute" compares output error across layers as is; "relative" divides each
      layer's by its output energy first (global allocation only).
    correct: fit each layer to the original model's outputs (M X ~ W X_ref, X from the
      already-compressed layers below) to correct upstream error (whiten only). Off by default:
      unregularized it overfits the calibration set (SmolLM2 @0.8: perplexity 3235 vs 98).
    correct_ridge: ridge strength (x mean diagonal of X^T X) that shrinks the corrected target
      toward W.
    refine_steps: L-BFGS iterations for the MPO refinement.
    fisher_tokens: calibration tokens (from the start) used for the gradient pass.
    fisher_damp: damping added to G (x its mean diagonal), so no output gets zero weight.
    fisher_full_max: outputs up to this width keep the full G (K-FAC), wider ones its diagonal.
      Default 0 = diagonal everywhere: on SmolLM2 at 0.8 (open-loop ablation, 2048 test
      tokens) diagonal G gave perplexity 55 (55.0-56.1 for damping 0-1) against 63-74 for
      the full matrices (damping 0.001-1), at a fraction of the memory and time.
    mpo_min_in_ratio: try the MPO layout only on layers with in_features >= ratio * out_features
      (measured on SmolLM2: MPO beat low rank on the wide-input FFN down projection only).
    """

    method: ClassVar[str] = "mpo"  # the default: each layer a 2-core MPO (low rank) or dense
    budget: float = option(0.8, "fraction of targeted parameters to keep, in (0,1]", type=float)
    scaling: str = "whiten"
    sensitivity: str = "fisher"
    allocation: str = "global"
    layouts: tuple[str, ...] = ("lowrank",)
    alpha: float = 0.5
    damp: float = 1e-4
    error_norm: str = "absolute"
    correct: bool = False
    correct_ridge: float = 1.0
    refine_steps: int = 30
    mpo_min_in_ratio: float = 2.0
    fisher_tokens: int = 2048
    fisher_damp: float = 0.03
    fisher_full_max: int = 0
    calibration_tokens: int = option(8192, "calibration tokens", type=int)
    calibration_context: int = 512
    forward_mode: str = "auto"

    @property
    def needs_calibration(self) -> bool:
        return self.scaling != "none" or self.sensitivity != "none"

    def __post_init__(self) -> None:
        self.layouts = tuple(self.layouts)
        for name in ("refine_steps", "fisher_tokens", "fisher_full_max", "calibration_tokens", "calibration_context"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"expected an integer {name}, got {value!r}")
        for name in ("budget", "alpha", "damp", "correct_ridge", "mpo_min_in_ratio", "fisher_damp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"expected a finite number for {name}, got {value!r}")
        if min(self.alpha, self.damp, self.correct_ridge, self.mpo_min_in_ratio, self.refine_steps) < 0:
            raise ValueError(f"expected alpha, damp, correct_ridge, mpo_min_in_ratio, refine_steps >= 0, got "
                             f"{self.alpha}, {self.damp}, {self.correct_ridge}, {self.mpo_min_in_ratio}, "
                             f"{self.refine_steps}")
        if not (0 < self.budget <= 1):
            raise ValueError(f"expected budget in (0, 1], got {self.budget}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"expected scaling in {SCALINGS}, got {self.scaling!r}")
        if self.sensitivity not in SENSITIVITIES:
            raise ValueError(f"expected sensitivity in {SENSITIVITIES}, got {self.sensitivity!r}")
        if self.fisher_tokens < 2 or self.fisher_damp < 0 or self.fisher_full_max < 0:
            raise ValueError(f"expected fisher_tokens >= 2, fisher_damp >= 0, fisher_full_max >= 0, got "
                             f"{self.fisher_tokens}, {self.fisher_damp}, {self.fisher_full_max}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"expected allocation in {ALLOCATIONS}, got {self.allocation!r}")
        if not self.layouts or any(x not in LAYOUTS for x in self.layouts):
            raise ValueError(f"expected layouts drawn from {LAYOUTS}, got {self.layouts}")
        if self.error_norm not in ("absolute", "relative"):
            raise ValueError(f"expected error_norm 'absolute' or 'relative', got {self.error_norm!r}")
        if self.calibration_tokens < 2 or self.calibration_context < 2:
            raise ValueError(f"expected calibration_tokens and calibration_context >= 2, got "
                             f"{self.calibration_tokens} and {self.calibration_context}")
        if self.forward_mode not in FORWARD_MODES:
            raise ValueError(f"expected forward_mode in {FORWARD_MODES}, got {self.forward_mode!r}")


# Named presets of the aware method: the same handler, other defaults.
@dataclass
class MPO3CoreConfig(AwareConfig):
    """+ a refined 3-core MPO where it beats low rank (SmolLM2 @0.8: same perplexity, 4x the time)."""

    method: ClassVar[str] = "mpo-3core"
    layouts: tuple[str, ...] = ("lowrank", "mpo")


@dataclass
class AwareGlobalConfig(AwareConfig):
    """Ablation: input weighting only, global allocation by relative output error."""

    method: ClassVar[str] = "aware-global"
    sensitivity: str = "none"
    error_norm: str = "relative"


@dataclass
class WhitenedSVDConfig(AwareConfig):
    """Baseline SVD-LLM: whitened truncated SVD, the same fraction of every layer."""

    method: ClassVar[str] = "whitened-svd"
    sensitivity: str = "none"
    allocation: str = "uniform"


@dataclass
class ASVDConfig(AwareConfig):
    """Baseline ASVD: per-channel activation scaling, the same fraction of every layer."""

    method: ClassVar[str] = "asvd"
    scaling: str = "diag"
    sensitivity: str = "none"
    allocation: str = "uniform"


@dataclass
class SVDConfig(AwareConfig):
    """Baseline: plain truncated SVD of the weights, the same fraction of every layer."""

    method: ClassVar[str] = "svd"
    scaling: str = "none"
    sensitivity: str = "none"
    allocation: str = "uniform"
