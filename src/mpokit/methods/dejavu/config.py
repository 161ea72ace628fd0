from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mpokit.layers.sparse_ffn import SELECTORS
from mpokit.methods.base import MethodConfig, option
from mpokit.methods.checks import check_choice, check_ints, check_number

__all__ = ["DejaVuConfig"]


@dataclass
class DejaVuConfig(MethodConfig):
    """Per-token neuron sparsity in every FFN: each token computes only the neurons a selector picks.

    target_modules / exclude_modules select FFN sites by name; default: every FFN.
      keep_fraction: share of the FFN's neurons each token computes (0.25: a quarter).
      selector: "lowrank" (default; training-free: every neuron's activation estimated from the
        input's top-`predictor_rank` principal directions on calibration), "gate-lowrank" (the exact
        gate times that estimate of up: the best quality measured, but it reads the whole gate;
        gated FFNs only), "predictor" (a rank-`predictor_rank` network trained on calibration to
        predict each token's top neurons from the FFN input, as in Deja Vu), "gate" (rank by
        |act(gate x)|, exact: the gate projection runs densely, then only the kept neurons' up and
        down; CATS; gated FFNs only), "static" (the neurons with the highest mean |activation| on
        calibration, the same for every token) or "oracle" (the true top neurons by |activation|,
        computed densely: analysis only, it saves nothing).
      predictor_steps, predictor_lr, predictor_batch: Adam steps, learning rate and tokens per step
        of the predictor's training (binary cross-entropy against each calibration token's top
        `keep_fraction` neurons by |activation|).
      refit: refit each FFN's down projection and an output bias by ridge least squares
        (refit_ridge, relative to the mean diagonal) so that the sparse FFN, with its selector's
        choice, best reproduces the dense FFN's outputs on calibration tokens (a closed-form
        distillation against the dense outputs; ops/ridge.py). Undoing returns the refit FFN.
      gather_tokens: inputs of at most this many tokens (decoding) gather the kept neurons' rows;
        longer ones (prefill) run the dense FFN and zero the dropped neurons (same output).
    Calibration: calibration_tokens tokens in windows of calibration_context.
    """

    method: ClassVar[str] = "dejavu"
    streamable: ClassVar[bool] = True  # FFN inputs from (streamed) forwards, then one FFN resident at a time
    keep_fraction: float = option(0.25, "share of each FFN's neurons computed per token", type=float)
    # lowrank by default: training-free, works on any FFN, and beat the trained predictor in recall, perplexity and
    # fit time on the default model (docs/benchmarks/experts.md)
    selector: str = option("lowrank", "how each token's neurons are chosen", choices=SELECTORS)
    predictor_rank: int = option(128, "rank of the neuron predictor or low-rank estimator", type=int)
    predictor_steps: int = 600
    predictor_lr: float = 3e-3
    predictor_batch: int = 1024
    refit: bool = option(False, "refit the down projections to the routed selection (least squares)")
    refit_ridge: float = 0.01
    gather_tokens: int = 4
    calibration_tokens: int = 8192
    calibration_context: int = 512
    seed: int = 0

    @property
    def needs_calibration(self) -> bool:
        return True

    def __post_init__(self) -> None:
        check_number("keep_fraction", self.keep_fraction, 0, 1, low_open=True)
        check_choice("selector", self.selector, SELECTORS)
        check_ints(self, 1, ["predictor_rank", "predictor_batch", "gather_tokens"])
        check_ints(self, 0, ["predictor_steps", "seed"])
        check_ints(self, 2, ["calibration_tokens", "calibration_context"])
        check_number("predictor_lr", self.predictor_lr, 0, low_open=True)
        check_number("refit_ridge", self.refit_ridge, 0)
