from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mpokit.layers.mpo import FORWARD_MODES
from mpokit.methods.base import MethodConfig, option
from mpokit.methods.checks import check_choice, check_ints, check_number

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
    streamable: ClassVar[bool] = True  # weights read block by block (and layer by layer without calibration)
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
        check_ints(self, 0, ["refine_steps", "fisher_full_max"])
        check_ints(self, 2, ["fisher_tokens", "calibration_tokens", "calibration_context"])
        check_number("budget", self.budget, 0, 1, low_open=True)
        for name in ("alpha", "damp", "correct_ridge", "mpo_min_in_ratio", "fisher_damp"):
            check_number(name, getattr(self, name), 0)
        check_choice("scaling", self.scaling, SCALINGS)
        check_choice("sensitivity", self.sensitivity, SENSITIVITIES)
        check_choice("allocation", self.allocation, ALLOCATIONS)
        if not self.layouts or any(x not in LAYOUTS for x in self.layouts):
            raise ValueError(f"expected layouts drawn from {LAYOUTS}, got {self.layouts}")
        check_choice("error_norm", self.error_norm, ("absolute", "relative"))
        check_choice("forward_mode", self.forward_mode, FORWARD_MODES)

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
