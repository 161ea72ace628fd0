"""Output-side loss sensitivity of linear layers (the K-FAC "gradient" factor).

For a layer y = W x, a second-order estimate of the loss increase when W is replaced
by M is 1/2 sum_t (g_t^T (W - M) x_t)^2 with g_t = dL/dy_t. Kronecker-factoring its
expectation (K-FAC) gives 1/2 tr(G (W - M) C (W - M)^T) with C = X^T X (input Gram,
`calibration.stats`) and G = sum_t g_t g_t^T, collected here from one backward pass of
the causal-LM loss over the calibration text. Measured on SmolLM2 at budget 0.8, the
two-sided weighting turns layer errors into loss units, which is what lets a global
budget allocation work (see docs/benchmarks/compression.md).

Outputs wider than `full_max` keep only diag(G), a (out,) vector; the full matrix costs
out^2 floats per layer (~0.7 GB for SmolLM2's 210 layers) and measured no better (see
AwareConfig.fisher_full_max), so callers default to the diagonal.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from mpokit.calibration.fisher_blocks import blockwise_backward
from mpokit.ops.whiten import output_factor
from mpokit.surgery.offload import input_device, offload_of
from mpokit.surgery.replace import get_module

__all__ = ["collect_output_fisher", "loss_row_weights"]


def collect_output_fisher(model: nn.Module, names: list[str], batches: list[torch.Tensor], full_max: int = 0,
                          progress: bool = True, blockwise: bool | None = None) -> dict[str, torch.Tensor]:
    """name -> G (out, out) float32 if out <= full_max, else diag(G) (out,); summed over tokens.

    blockwise: back-propagate one block at a time (fisher_blocks.py); default: when the model is
    block-streamed (surgery/offload.py), whose weights are never all in memory."""
    blockwise = offload_of(model) is not None if blockwise is None else blockwise
    fisher: dict[str, torch.Tensor] = {}

    def on_output(name):
        def forward_hook(module, args, out):
            def grad_hook(g):
                g2 = g.detach().reshape(-1, g.shape[-1]).float()  # (tokens, out)
                part = g2.T @ g2 if g2.shape[1] <= full_max else (g2 ** 2).sum(0)
                fisher[name] = fisher[name] + part if name in fisher else part
            if out.requires_grad:
                out.register_hook(grad_hook)
        return forward_hook

    def needs_grad(module, args, out):
        return out.requires_grad_()  # parameters stay frozen; gradients flow from the embeddings on

    flags = {p: p.requires_grad for p in model.parameters()}
    hooks = [get_module(model, n).register_forward_hook(on_output(n)) for n in names]
    if not blockwise:
        hooks.append(model.get_input_embeddings().register_forward_hook(needs_grad))
    device = input_device(model)
    was_training = model.training
    try:
        model.eval()
        for p in flags:
            p.requires_grad_(False)
        if blockwise:
            blockwise_backward(model, batches, progress)
        else:
            with torch.enable_grad():
                for batch in tqdm(batches, desc="sensitivity", disable=not progress):
                    batch = batch.to(device)
                    out = model(input_ids=batch, labels=batch, use_cache=False)
                    (out.loss * batch.numel()).backward()  # summed, like the input Grams
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    missing = [n for n in names if n not in fisher]
    if missing:
        raise ValueError(f"expected every layer to receive a loss gradient, got none for {missing[:3]}")
    return fisher


def loss_row_weights(model: nn.Module, names: list[str], batches: list[torch.Tensor], tokens: int, damp: float,
                     full_max: int = 0, progress: bool = True) -> dict[str, torch.Tensor]:
    """name -> R (ops.whiten.output_factor of G, float32) from the first `tokens` calibration tokens: the
    output-side weighting that turns a layer's output error into a K-FAC estimate of the loss increase."""
    used, count = [], 0
    for b in batches:
        if count >= tokens:
            break
        used.append(b)
        count += b.numel()
    fisher = collect_output_fisher(model, names, used, full_max=full_max, progress=progress)
    return {n: output_factor(fisher.pop(n), damp).float() for n in names}
