from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mpokit.layers.mpo import FORWARD_MODES
from mpokit.methods.base import MethodConfig, option
from mpokit.methods.checks import check_choice, check_ints, check_number

__all__ = ["MPOConfig"]


@dataclass
class MPOConfig(MethodConfig):
    """Data-free MPO decomposition (TT-SVD) of the targeted weights: Linear, Conv1D and Embedding
    matrices, Conv2d kernels read as (out, in*kh*kw) matrices, and every LSTM/GRU gate matrix.

    Truncation (at most one of budget / max_bond / cutoff; none = lossless):
      budget: fraction of the targeted layers' parameters to keep in total, in (0, 1]. Each
        layer first gets that fraction of its own parameters, then the leftover is spread over
        all layers (cheapest bond first), so one layer may end above its own share, but
        never above its dense size. 1.0 means no loss: each layer is its exact full-bond
        MPO where that is no larger than the layer, else it stays dense (it always is
        larger for a generic matrix, so 1.0 leaves the layers as they are).
      max_bond: cap on every bond dimension.
      cutoff: relative Frobenius error target per layer.
    Layout:
      num_cores: cores per matrix (local dims chosen balanced, zero-padded when needed).
      lowrank: 2-core (out,1)x(1,in) layout, i.e. truncated SVD W = U @ V.
      local_dims: per-matrix override {name_or_suffix: [out_dims, in_dims]}; an RNN's matrices are
        named "<module>.weight_ih_l0", "<module>.weight_hh_l0", ...
    """

    method: ClassVar[str] = "mpo-datafree"
    # weights read block by block: a budget is planned in two passes (spectra, then decompose; see transform.py)
    streamable: ClassVar[bool] = True
    budget: float | None = None
    max_bond: int | None = option(None, "cap on every bond dimension", type=int)
    cutoff: float | None = option(None, "relative error target per layer", type=float)
    num_cores: int = option(3, "cores per matrix", type=int)
    lowrank: bool = False
    local_dims: dict[str, list[list[int]]] | None = None
    forward_mode: str = "auto"

    def __post_init__(self) -> None:
        check_ints(self, 1, ["max_bond"], optional=True)
        check_ints(self, 1 if self.lowrank else 2, ["num_cores"])
        set_ = [k for k in ("budget", "max_bond", "cutoff") if getattr(self, k) is not None]
        if len(set_) > 1:
            raise ValueError(f"expected at most one of budget/max_bond/cutoff, got {set_}")
        if self.budget is not None:
            check_number("budget", self.budget, 0, 1, low_open=True)
        if self.cutoff is not None:
            check_number("cutoff", self.cutoff)
            if not 0 <= self.cutoff < 1:
                raise ValueError(f"expected cutoff in [0, 1), got {self.cutoff}")
        check_choice("forward_mode", self.forward_mode, FORWARD_MODES)
