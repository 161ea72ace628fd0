from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mpokit.layers.moe import MOE_FORWARD_MODES
from mpokit.methods.base import MethodConfig, option
from mpokit.methods.checks import check_choice, check_ints, check_number

__all__ = ["MoEficationConfig", "MoEficationRefitConfig", "CLUSTER_FEATURES", "CLUSTER_BACKENDS"]

CLUSTER_FEATURES = ("weights", "activations")
CLUSTER_BACKENDS = ("auto", "kmeans-constrained", "lsa")


@dataclass
class MoEficationConfig(MethodConfig):
    """Split each FFN into experts of equal size and route every token to the top-k of them.

    target_modules / exclude_modules select FFN sites by name (e.g. "layers.3.mlp" or a regex);
    default: every FFN (gated MLP, GPT-2 MLP, BERT layer).
    Experts:
      num_experts: E; the FFN's intermediate size must be divisible by it.
      top_k: routed experts computed per token (default E // 4 - shared_experts, i.e. 25% of
        the FFN counting the shared experts).
      shared_experts: s experts' worth of neurons (s * N / E), those with the highest mean
        |activation| on calibration, always computed (a shared expert, as in DeepSeek-MoE);
        the other neurons are clustered into E - s routed experts. Per token the layer
        computes (s + top_k) / E of the FFN.
      refit: after the router is trained, refit every expert's output projection and an
        output bias by ridge least squares (refit_ridge, relative to the mean diagonal) so the
        sparse layer, with the router's selection at top_k, best reproduces the dense FFN on the
        calibration tokens (methods/moefication/refit.py). The refit layer no longer equals the
        dense FFN with every expert selected; unload_ returns the refit dense FFN. Best at the
        top_k it was fit for; needs calibration_tokens well above the FFN width (N + 1
        unknowns per output; 8192 tokens were used for N = 1536).
      Measured on SmolLM2-135M (E=32, 25% of the FFN per token, WikiText-2 test 8192 tokens,
      bench/bench_moe.py): top-8 routed 67.8x dense perplexity; shared_experts=6, top_k=2:
      18.1x; + refit: 4.25x (FFN time 0.35x dense). Both off by default (backward compatible).
      cluster_features: "activations" (default) = normalized |activation| profiles over the
        calibration tokens, so neurons that fire together share an expert (the paper's
        co-activation split); "weights" = normalized first-layer rows (gate rows of gated
        FFNs; the paper's parameter split). On SmolLM2 (E=32, 1024 test tokens) co-activation
        gave perplexity 1470 vs 5243 at k=8 and 68 vs 79 at k=16 (dense 20.5).
      cluster_backend: balanced k-means with k-means-constrained ("kmeans-constrained"),
        or k-means whose assignment step is a balanced linear assignment solved by scipy
        ("lsa"); "auto" takes the first that is installed.
    Router (trained on calibration activations to predict each expert's share of the FFN output):
      router_hidden: hidden width of the router MLP (0 = a single linear layer).
      router_steps, router_lr, router_batch: Adam steps, learning rate, tokens per step.
    Calibration (compress_(model, config, tokenizer=tok, calibration=Calibration(text=text)); the
    older calibration_text=text still works; default text: data.corpus.default_calibration_corpus):
    calibration_tokens tokens in windows of calibration_context (a Calibration's own tokens/context win).
    """

    method: ClassVar[str] = "moefication"
    # FFN inputs come from whole-model forwards (a streamed model runs them a block at a time), then one
    # FFN is loaded at a time; the inputs of every FFN are held (T x d floats each), as in memory
    streamable: ClassVar[bool] = True
    num_experts: int = option(32, "experts per FFN", flag="--experts", type=int)
    top_k: int | None = option(None, "experts computed per token", type=int)
    shared_experts: int = option(0, "experts' worth of top neurons every token computes", type=int)
    refit: bool = option(False, "refit the down projections to the routed selection (least squares)")
    refit_ridge: float = 0.01
    cluster_features: str = "activations"
    cluster_backend: str = "auto"
    router_hidden: int = 64
    router_steps: int = 400
    router_lr: float = 3e-3
    router_batch: int = 1024
    calibration_tokens: int = 8192
    calibration_context: int = 512
    forward_mode: str = "auto"
    seed: int = 0

    @property
    def needs_calibration(self) -> bool:
        return True

    def __post_init__(self) -> None:
        check_ints(self, 1, ["num_experts", "router_batch"])
        check_ints(self, 0, ["shared_experts", "router_hidden", "router_steps", "seed"])
        check_ints(self, 2, ["calibration_tokens", "calibration_context"])
        check_ints(self, 1, ["top_k"], optional=True)
        check_number("refit_ridge", self.refit_ridge, 0)
        check_number("router_lr", self.router_lr, 0, low_open=True)
        if self.shared_experts >= self.num_experts:
            raise ValueError(f"expected 0 <= shared_experts < num_experts={self.num_experts}, "
                             f"got {self.shared_experts}")
        routed = self.num_experts - self.shared_experts
        if self.top_k is None:
            self.top_k = max(1, self.num_experts // 4 - self.shared_experts)
        if not 1 <= self.top_k <= routed:
            raise ValueError(f"expected 1 <= top_k <= num_experts - shared_experts={routed}, got {self.top_k}")
        check_choice("cluster_features", self.cluster_features, CLUSTER_FEATURES)
        check_choice("cluster_backend", self.cluster_backend, CLUSTER_BACKENDS)
        check_choice("forward_mode", self.forward_mode, MOE_FORWARD_MODES)

@dataclass
class MoEficationRefitConfig(MoEficationConfig):
    """+ 6 always-on experts and a least-squares refit of the down projections (best measured at 25%)."""

    method: ClassVar[str] = "moefication-refit"
    shared_experts: int = 6
    refit: bool = True
