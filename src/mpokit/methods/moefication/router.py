"""Calibration for MoEfication: FFN inputs from hooks, expert targets, router training."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mpokit.layers.moe import MoEFFN
from mpokit.surgery.ffn import FFNSite
from mpokit.surgery.offload import input_device
from mpokit.surgery.replace import get_module

__all__ = ["collect_ffn_inputs", "expert_targets", "fit_router", "routing_quality", "train_scorer"]


@torch.no_grad()
def collect_ffn_inputs(model: nn.Module, sites: list[FFNSite], batches: list[torch.Tensor],
                       progress: bool = True, desc: str = "moefication: calibration") -> dict[str, torch.Tensor]:
    """Input activations (T, d) of every FFN site over the calibration batches, kept as float32.

    Memory is T * d * 4 bytes per site (8192 tokens x 576 x 30 sites = 0.57 GB for SmolLM2).
    """
    store: dict[str, list[torch.Tensor]] = {s.module_name: [] for s in sites}
    hooks = []
    for site in sites:
        def hook(module, args, name=site.module_name):
            x = args[0]
            store[name].append(x.detach().reshape(-1, x.shape[-1]).float().cpu())
        hooks.append(get_module(model, site.module_name).register_forward_pre_hook(hook))
    device = input_device(model)
    try:
        for ids in tqdm(batches, desc=desc, disable=not progress):
            model(input_ids=ids.to(device))
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat(parts) for name, parts in store.items()}


@torch.no_grad()
def expert_targets(moe: MoEFFN, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(T, E - shared) norm of each routed expert's contribution to the FFN output: what the router should rank."""
    w = next(moe.parameters())
    return torch.cat([moe.routing_targets(x[i:i + chunk].to(w.dtype)).float()
                      for i in range(0, x.shape[0], chunk)])


@torch.no_grad()
def routing_quality(scores: torch.Tensor, targets: torch.Tensor, k: int) -> dict[str, float]:
    """How well scores (T, E) pick the experts with the largest targets (T, E) at top-k.

    recall: mean share of the oracle's top-k experts that the router picks;
    mass: the router's picked target mass over the oracle's picked mass.
    """
    picked = scores.topk(k, dim=-1).indices
    oracle = targets.topk(k, dim=-1)
    hit = torch.zeros_like(targets, dtype=torch.bool).scatter_(1, oracle.indices, True).gather(1, picked)
    mass = targets.gather(1, picked).sum() / oracle.values.sum().clamp_min(1e-12)
    return {"recall": float(hit.float().mean()), "mass": float(mass)}


def train_scorer(net: nn.Module, x: torch.Tensor, loss_fn, steps: int, lr: float, batch: int, device,
                 seed: int = 0, holdout: float = 0.1) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Fit a small scoring network (a router, a neuron predictor) on the rows of x (T, d): Adam with a cosine
    schedule on random batches, loss_fn(scores, row_indices) the batch loss, in float32 and cast back after.
    A `holdout` share of the rows is never trained on; returns (last loss, those rows, their scores)."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=gen)
    n_val = max(1, int(holdout * x.shape[0])) if x.shape[0] > 10 else 0
    val, train = perm[:n_val], perm[n_val:]
    dtype = next(net.parameters()).dtype
    net.float().train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    loss_value = float("nan")
    with torch.enable_grad():
        for _ in range(steps):
            idx = train[torch.randint(train.numel(), (min(batch, train.numel()),), generator=gen)]
            loss = loss_fn(net(x[idx].to(device)), idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_value = float(loss.detach())
    net.eval().to(dtype)
    eval_idx = val if n_val else train
    with torch.no_grad():
        scores = net(x[eval_idx].to(device, dtype)).float().cpu()
    return loss_value, eval_idx, scores


def fit_router(moe: MoEFFN, x: torch.Tensor, steps: int, lr: float, batch: int, seed: int = 0,
               holdout: float = 0.1) -> dict[str, float]:
    """Train moe.router so softmax(scores) matches each token's share of expert output norms.

    Soft-target cross-entropy ranks experts by predicted share; trained in float32 and cast
    back. Returns routing_quality on held-out tokens (tokens unseen in training).
    """
    x = x.to(moe.w_in.device, torch.float32)
    targets = expert_targets(moe, x)  # (T, E - shared)
    x, targets = x.cpu(), targets.cpu()  # index on CPU, move each batch
    share = targets / targets.sum(-1, keepdim=True).clamp_min(1e-12)  # (T, E - shared)

    def loss(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return -(share[idx] * F.log_softmax(logits.cpu(), dim=-1)).sum(-1).mean()

    loss_value, eval_idx, scores = train_scorer(moe.router, x, loss, steps, lr, batch, moe.w_in.device, seed, holdout)
    return {"loss": loss_value, **routing_quality(scores, targets[eval_idx], moe.top_k)}
