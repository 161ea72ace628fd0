from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mpokit.layers.mpo import FORWARD_MODES
from mpokit.methods.base import MethodConfig, option
from mpokit.methods.checks import check_choice, check_ints, check_number

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
    streamable: ClassVar[bool] = True  # a streamed model loads one group of layers of one weight type at a time
    groups: int = option(0, "layers per group sharing a central core (1 = none, 0 = all)", type=int)
    max_bond: int | None = None
    budget: float | None = None
    init: str = "mean"
    sweeps: int = 8
    forward_mode: str = "auto"

    def __post_init__(self) -> None:
        check_ints(self, 0, ["groups", "sweeps"])
        check_ints(self, 1, ["max_bond"], optional=True)
        if self.max_bond is not None and self.budget is not None:
            raise ValueError(f"expected at most one of max_bond/budget, got max_bond={self.max_bond}, "
                             f"budget={self.budget}")
        if self.budget is not None:
            check_number("budget", self.budget, 0, 1, low_open=True)
        check_choice("init", self.init, ("mean", "first"))
        check_choice("forward_mode", self.forward_mode, FORWARD_MODES)
