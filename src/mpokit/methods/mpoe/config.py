from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mpokit.layers.moe import MOE_FORWARD_MODES
from mpokit.methods.base import MethodConfig
from mpokit.methods.checks import check_choice, check_ints, check_number

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
    streamable: ClassVar[bool] = True  # one FFN read, upcycled and installed at a time
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
        check_ints(self, 1, ["num_experts", "top_k"])
        check_ints(self, 2, ["num_cores"])
        check_ints(self, 0, ["seed"])
        check_ints(self, 1, ["max_bond"], optional=True)
        if self.top_k > self.num_experts:
            raise ValueError(f"expected 1 <= top_k <= num_experts={self.num_experts}, got {self.top_k}")
        check_choice("expert_type", self.expert_type, EXPERT_TYPES)
        check_number("grad_mask", self.grad_mask, 0)
        if self.grad_mask >= 1:
            raise ValueError(f"expected grad_mask in [0, 1), got {self.grad_mask}")
        for name in ("noise", "balance_coef", "router_std"):
            check_number(name, getattr(self, name), 0)
        check_choice("forward_mode", self.forward_mode, MOE_FORWARD_MODES)
