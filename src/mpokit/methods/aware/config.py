from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mpokit.layers.mpo import FORWARD_MODES
from mpokit.methods.base import MethodConfig

__all__ = ["AwareConfig", "SCALINGS", "ALLOCATIONS", "LAYOUTS"]

SCALINGS = ("whiten", "diag", "none")
ALLOCATIONS = ("global", "uniform")
LAYOUTS = ("lowrank", "mpo")


@dataclass
class AwareConfig(MethodConfig):
    """Activation-aware compression to a global parameter budget.

    scaling: how calibration inputs weight the error: "whiten" (full X^T X, SVD-LLM),
      "diag" (per-channel scale sqrt(E[x^2])**alpha, ASVD), "none" (plain SVD).
    allocation: "uniform" (default) keeps `budget` of every layer; "global" spends the budget
      where it removes the most output error (ranks differ per layer, some layers stay dense).
      On SmolLM2 at 0.8, global allocation did not beat uniform (see README), hence the default.
    layouts: candidate layouts per layer; "mpo" adds a 3-core MPO refined on the weighted
      objective, used where it beats low rank at the allocated size.
    error_norm: "absolute" compares output error across layers as is; "relative" divides each
      layer's by its output energy first (global allocation only).
    correct: fit each layer to the original model's outputs (M X ~ W X_ref, X from the
      already-compressed layers below) to correct upstream error (whiten only). Off by default:
      unregularized it overfits the calibration set (SmolLM2 @0.8: perplexity 3235 vs 98).
    correct_ridge: ridge strength (x mean diagonal of X^T X) that shrinks the corrected target
      toward W.
    refine_steps: L-BFGS iterations for the MPO refinement.
    mpo_min_in_ratio: try the MPO layout only on layers with in_features >= ratio * out_features
      (measured on SmolLM2: MPO beat low rank on the wide-input FFN down projection only).
    """

    method: ClassVar[str] = "mpo-aware"
    budget: float = 0.8
    scaling: str = "whiten"
    allocation: str = "uniform"
    layouts: tuple[str, ...] = ("lowrank",)
    alpha: float = 0.5
    damp: float = 1e-4
    error_norm: str = "absolute"
    correct: bool = False
    correct_ridge: float = 1.0
    refine_steps: int = 30
    mpo_min_in_ratio: float = 2.0
    calibration_tokens: int = 8192
    calibration_context: int = 512
    forward_mode: str = "auto"

    @property
    def needs_calibration(self) -> bool:
        return self.scaling != "none"

    def __post_init__(self) -> None:
        self.layouts = tuple(self.layouts)
        if not (0 < self.budget <= 1):
            raise ValueError(f"expected budget in (0, 1], got {self.budget}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"expected scaling in {SCALINGS}, got {self.scaling!r}")
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
