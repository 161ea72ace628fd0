from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mpokit.layers.mpo import FORWARD_MODES
from mpokit.methods.base import MethodConfig

__all__ = ["MPOConfig"]


@dataclass
class MPOConfig(MethodConfig):
    """Data-free MPO decomposition (TT-SVD) of the targeted weights.

    Truncation (at most one of budget / max_bond / cutoff; none = lossless):
      budget: fraction of the targeted layers' parameters to keep in total, in (0, 1]. Each
        layer first gets that fraction of its own parameters, then the leftover is spread over
        all layers (cheapest bond first), so one layer may end above its own share, but
        never above its dense size.
      max_bond: cap on every bond dimension.
      cutoff: relative Frobenius error target per layer.
    Layout:
      num_cores: cores per matrix (local dims chosen balanced, zero-padded when needed).
      lowrank: 2-core (out,1)x(1,in) layout, i.e. truncated SVD W = U @ V.
      local_dims: per-module override {name_or_suffix: [out_dims, in_dims]}.
    """

    method: ClassVar[str] = "mpo"
    budget: float | None = None
    max_bond: int | None = None
    cutoff: float | None = None
    num_cores: int = 3
    lowrank: bool = False
    local_dims: dict[str, list[list[int]]] | None = None
    forward_mode: str = "auto"

    def __post_init__(self) -> None:
        set_ = [k for k in ("budget", "max_bond", "cutoff") if getattr(self, k) is not None]
        if len(set_) > 1:
            raise ValueError(f"expected at most one of budget/max_bond/cutoff, got {set_}")
        if self.budget is not None and not (0 < self.budget <= 1):
            raise ValueError(f"expected budget in (0, 1], got {self.budget}")
        if self.max_bond is not None and self.max_bond < 1:
            raise ValueError(f"expected max_bond >= 1, got {self.max_bond}")
        if self.cutoff is not None and not (0 <= self.cutoff < 1):
            raise ValueError(f"expected cutoff in [0, 1), got {self.cutoff}")
        if self.num_cores < 2 and not self.lowrank:
            raise ValueError(f"expected num_cores >= 2, got {self.num_cores}")
        if self.forward_mode not in FORWARD_MODES:
            raise ValueError(f"expected forward_mode in {FORWARD_MODES}, got {self.forward_mode!r}")
