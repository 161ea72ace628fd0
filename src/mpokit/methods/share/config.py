from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

from mpokit.layers.mpo import FORWARD_MODES
from mpokit.methods.base import MethodConfig, option

__all__ = ["ShareConfig"]


@dataclass
class ShareConfig(MethodConfig):
    """Cross-layer sharing of MPO central cores (MPOBERT, Gao et al. 2023), as a compression method.

    Every targeted weight becomes a 3-core MPO; weights of the same type (e.g. every layer's
    q_proj) in a group of consecutive layers share one central core and keep their own
    auxiliary cores. target_modules default to the architecture's linear layers and must
    sit inside numbered layers.
      groups: layers per sharing group (CLI --groups G; 1 = no sharing, 0 = all layers).
      max_bond: cap on both bonds; budget: fraction of the targeted parameters to keep
        (per weight type, central cores counted once). At most one; none = full bonds.
      init: "mean" = central fitted to the whole group (ALS, `sweeps` sweeps); "first" =
        the first layer's central core, the others fit only their auxiliary cores.
    """

    method: ClassVar[str] = "share"
    groups: int = option(0, "layers per group sharing a central core (1 = none, 0 = all)", type=int)
    max_bond: int | None = None
    budget: float | None = None
    init: str = "mean"
    sweeps: int = 8
    forward_mode: str = "auto"

    def __post_init__(self) -> None:
        for name in ("groups", "sweeps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"expected an integer {name}, got {value!r}")
        if self.max_bond is not None and (isinstance(self.max_bond, bool)
                                          or not isinstance(self.max_bond, numbers.Integral)):
            raise ValueError(f"expected an integer max_bond or None, got {self.max_bond!r}")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, numbers.Real)
                                        or not math.isfinite(self.budget)):
            raise ValueError(f"expected a finite number or None for budget, got {self.budget!r}")
        if self.groups < 0:
            raise ValueError(f"expected groups >= 0 (0 = all layers), got {self.groups}")
        if self.max_bond is not None and self.budget is not None:
            raise ValueError(f"expected at most one of max_bond/budget, got max_bond={self.max_bond}, "
                             f"budget={self.budget}")
        if self.max_bond is not None and self.max_bond < 1:
            raise ValueError(f"expected max_bond >= 1, got {self.max_bond}")
        if self.budget is not None and not 0 < self.budget <= 1:
            raise ValueError(f"expected budget in (0, 1], got {self.budget}")
        if self.init not in ("mean", "first"):
            raise ValueError(f"expected init 'mean' or 'first', got {self.init!r}")
        if self.sweeps < 0:
            raise ValueError(f"expected sweeps >= 0, got {self.sweeps}")
        if self.forward_mode not in FORWARD_MODES:
            raise ValueError(f"expected forward_mode in {FORWARD_MODES}, got {self.forward_mode!r}")
