from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

from mpokit.layers.moe import MOE_FORWARD_MODES
from mpokit.methods.base import MethodConfig

__all__ = ["MPOEConfig", "EXPERT_TYPES"]

EXPERT_TYPES = ("mpo", "dense")


@dataclass
class MPOEConfig(MethodConfig):
    """Upcycle each targeted FFN into a mixture of experts (MPOE, Gao et al. 2022).

    target_modules / exclude_modules select FFN sites by name (default: every FFN).
      num_experts, top_k: experts per layer and per token (top_k=1: Switch routing; 2: top-2).
      expert_type: "mpo" = experts are MPOs sharing each matrix's central core (MPOE);
        "dense" = E full copies of the FFN (the plain upcycled MoE baseline).
      num_cores, max_bond: MPO layout and truncation of the expert matrices (None = lossless).
      grad_mask: probability of zeroing each entry of the shared central cores' gradient at
        every backward (MPOE's gradient mask against over-updating the shared tensor; 0 = off).
      noise: relative std of noise added to each expert's auxiliary cores (or dense copy) at
        initialization, to break the symmetry of identical experts.
      balance_coef: weight of the load-balancing loss; training code adds
        balance_coef * moe_aux_loss(model) to the task loss.
      router_std: std of the router's initial weights.
    """

    method: ClassVar[str] = "mpoe"
    num_experts: int = 8
    top_k: int = 2
    expert_type: str = "mpo"
    num_cores: int = 3
    max_bond: int | None = None
    grad_mask: float = 0.5
    noise: float = 0.0
    balance_coef: float = 0.01
    router_std: float = 0.02
    forward_mode: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "num_cores", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"expected an integer {name}, got {value!r}")
        if self.max_bond is not None and (isinstance(self.max_bond, bool)
                                          or not isinstance(self.max_bond, numbers.Integral)):
            raise ValueError(f"expected an integer max_bond or None, got {self.max_bond!r}")
        for name in ("grad_mask", "noise", "balance_coef", "router_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"expected a finite number for {name}, got {value!r}")
        if self.num_experts < 1:
            raise ValueError(f"expected num_experts >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"expected 1 <= top_k <= num_experts={self.num_experts}, got {self.top_k}")
        if self.expert_type not in EXPERT_TYPES:
            raise ValueError(f"expected expert_type in {EXPERT_TYPES}, got {self.expert_type!r}")
        if self.num_cores < 2:
            raise ValueError(f"expected num_cores >= 2, got {self.num_cores}")
        if self.max_bond is not None and self.max_bond < 1:
            raise ValueError(f"expected max_bond >= 1, got {self.max_bond}")
        if not 0 <= self.grad_mask < 1:
            raise ValueError(f"expected grad_mask in [0, 1), got {self.grad_mask}")
        if self.noise < 0 or self.balance_coef < 0 or self.router_std < 0:
            raise ValueError(f"expected noise, balance_coef, router_std >= 0, got {self.noise}, {self.balance_coef}, "
                             f"{self.router_std}")
        if self.forward_mode not in MOE_FORWARD_MODES:
            raise ValueError(f"expected forward_mode in {MOE_FORWARD_MODES}, got {self.forward_mode!r}")
