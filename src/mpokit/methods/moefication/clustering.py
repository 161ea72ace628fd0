"""Balanced k-means: split N neurons into E groups of exactly N / E.

Two backends: k-means-constrained (min-cost-flow assignment, a maintained library,
optional dependency) and a small k-means whose assignment step is a balanced linear
assignment solved exactly by scipy (each centroid replicated N / E times).
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

__all__ = ["balanced_kmeans", "is_kmeans_constrained_available", "neuron_features", "cluster_inertia"]


def is_kmeans_constrained_available() -> bool:
    return importlib.util.find_spec("k_means_constrained") is not None


def neuron_features(up: torch.Tensor, gate: torch.Tensor | None, hidden: torch.Tensor | None, kind: str) -> torch.Tensor:
    """(N, f) unit-norm features per neuron.

    kind "weights": first-layer rows (gate rows when gated: the gate decides when a neuron fires);
    kind "activations": |activation| of each neuron over calibration tokens, hidden (T, N).
    """
    if kind == "weights":
        feats = (gate if gate is not None else up).detach().float()
    elif kind == "activations":
        if hidden is None:
            raise ValueError("expected calibration activations for cluster_features='activations', got none")
        feats = hidden.detach().abs().float().t()  # (N, T)
    else:
        raise ValueError(f"expected feature kind 'weights' or 'activations', got {kind!r}")
    return F.normalize(feats, dim=1)


def balanced_kmeans(x: torch.Tensor, num_clusters: int, backend: str = "auto", seed: int = 0,
                    max_iter: int = 30) -> torch.Tensor:
    """Labels (N,) in [0, E) with exactly N / E points per cluster."""
    n = x.shape[0]
    if num_clusters < 1 or n % num_clusters:
        raise ValueError(f"expected the number of neurons ({n}) to be divisible by num_experts, got {num_clusters}")
    if num_clusters == 1:
        return torch.zeros(n, dtype=torch.long)
    if backend == "auto":
        backend = "kmeans-constrained" if is_kmeans_constrained_available() else "lsa"
    if backend == "kmeans-constrained":
        return _kmeans_constrained(x, num_clusters, seed, max_iter)
    if backend == "lsa":
        return _kmeans_lsa(x, num_clusters, seed, max_iter)
    raise ValueError(f"expected backend auto/kmeans-constrained/lsa, got {backend!r}")


def _kmeans_constrained(x: torch.Tensor, k: int, seed: int, max_iter: int) -> torch.Tensor:
    try:
        from k_means_constrained import KMeansConstrained
    except ImportError:
        raise ImportError("cluster_backend='kmeans-constrained' needs: pip install k-means-constrained "
                          "(or use cluster_backend='lsa')") from None
    size = x.shape[0] // k
    km = KMeansConstrained(n_clusters=k, size_min=size, size_max=size, n_init=1, max_iter=max_iter,
                           random_state=seed)
    return torch.as_tensor(km.fit_predict(x.double().cpu().numpy())).long()


def _kmeans_lsa(x: torch.Tensor, k: int, seed: int, max_iter: int) -> torch.Tensor:
    from scipy.optimize import linear_sum_assignment

    x = x.double().cpu()
    n = x.shape[0]
    size = n // k
    gen = torch.Generator().manual_seed(seed)
    centers = x[torch.randperm(n, generator=gen)[:k]]  # (k, f)
    labels = None
    for _ in range(max_iter):
        cost = torch.cdist(x, centers).pow(2)  # (n, k)
        slots = cost.repeat_interleave(size, dim=1)  # (n, n): slot j belongs to cluster j // size
        rows, cols = linear_sum_assignment(slots.numpy())
        new = torch.empty(n, dtype=torch.long)
        new[torch.as_tensor(rows)] = torch.as_tensor(cols) // size
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centers = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, labels, x) / size
    return labels


def cluster_inertia(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Sum of squared distances to cluster means (lower = tighter clusters)."""
    x = x.double()
    k = int(labels.max()) + 1
    counts = torch.bincount(labels, minlength=k).clamp_min(1).unsqueeze(1)
    centers = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, labels, x) / counts
    return float((x - centers[labels]).pow(2).sum())
