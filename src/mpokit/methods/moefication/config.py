from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mpokit.layers.moe import MOE_FORWARD_MODES
from mpokit.methods.base import MethodConfig

__all__ = ["MoEficationConfig", "CLUSTER_FEATURES", "CLUSTER_BACKENDS"]

CLUSTER_FEATURES = ("weights", "activations")
CLUSTER_BACKENDS = ("auto", "kmeans-constrained", "lsa")


@dataclass
class MoEficationConfig(MethodConfig):
    """Split each FFN into experts of equal size and route every token to the top-k of them.

    target_modules / exclude_modules select FFN sites by name (e.g. "layers.3.mlp" or a regex);
    default: every FFN (gated MLP, GPT-2 MLP, BERT layer).
    Experts:
      num_experts: E; the FFN's intermediate size must be divisible by it.
      top_k: experts computed per token (default E // 4, i.e. 25% of the FFN).
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
    Calibration (compress_(model, config, tokenizer=tok, calibration_text=text); default text:
    the offline pydoc corpus): calibration_tokens tokens in windows of calibration_context.
    """

    method: ClassVar[str] = "moefication"
    num_experts: int = 32
    top_k: int | None = None
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
        if self.num_experts < 1:
            raise ValueError(f"expected num_experts >= 1, got {self.num_experts}")
        if self.top_k is None:
            self.top_k = max(1, self.num_experts // 4)
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"expected 1 <= top_k <= num_experts={self.num_experts}, got {self.top_k}")
        if self.cluster_features not in CLUSTER_FEATURES:
            raise ValueError(f"expected cluster_features in {CLUSTER_FEATURES}, got {self.cluster_features!r}")
        if self.cluster_backend not in CLUSTER_BACKENDS:
            raise ValueError(f"expected cluster_backend in {CLUSTER_BACKENDS}, got {self.cluster_backend!r}")
        if self.router_hidden < 0 or self.router_steps < 0 or self.router_batch < 1 or self.router_lr <= 0:
            raise ValueError(f"expected router_hidden >= 0, router_steps >= 0, router_batch >= 1, router_lr > 0, got "
                             f"{self.router_hidden}, {self.router_steps}, {self.router_batch}, {self.router_lr}")
        if self.calibration_tokens < 2 or self.calibration_context < 2:
            raise ValueError(f"expected calibration_tokens >= 2 and calibration_context >= 2, got "
                             f"{self.calibration_tokens} and {self.calibration_context}")
        if self.forward_mode not in MOE_FORWARD_MODES:
            raise ValueError(f"expected forward_mode in {MOE_FORWARD_MODES}, got {self.forward_mode!r}")
