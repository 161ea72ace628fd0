"""The budget planner: one candidate per layer, least total error, total cost under a cap.

A budgeted method states, for every layer, what it could build there and at what price:
a Candidate(cost, error, choice). cost adds up across layers in one unit (parameters, or
bytes once quantized and factorized layers compete: a rank-64 layer with 4-bit factors
next to an 8-bit dense one); error adds up too (a squared output error, a loss estimate)
and is only compared, never interpreted; choice is what the caller builds (a rank, a
bond list, ("dense", 8)). Nothing here knows about layers or models.

`plan` (many layers, one cap):
1. per layer, the lower convex hull of its candidates: cheapest first, a candidate that
   costs more without removing error is dropped, and so is one above the hull;
2. every layer starts at its cheapest hull point; the steps between hull points are taken
   across layers in order of error removed per unit cost until the next one does not fit.
Stopping at the first step that does not fit makes the result exactly optimal for the cost
it spends (it minimises error + lam * cost for lam the slope of the step left out, so no
choice of candidates at that cost or less has less error), and it leaves less than one step
of the cap unspent.

A layer may also have a keep-dense candidate (`dense`): a layer whose planned candidate
costs at least as much as keeping it dense is kept dense (exact, and no dearer), and what
that frees is planned again over the other layers. The dense candidate ends the ladder
rather than joining the hull: this is the rule the default method (methods/aware) was
measured with.

`best_within` (one layer, its own cap) is exact: the least error among the candidates that fit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["Candidate", "hull", "plan", "best_within"]


@dataclass(frozen=True)
class Candidate:
    """One way to store a layer: its cost, its estimated error, and what to build."""

    cost: float
    error: float
    choice: Any = None


def _check(candidates: Sequence[Candidate], what: str) -> None:
    if not candidates:
        raise ValueError(f"expected at least one candidate for {what}, got none")
    bad = [c for c in candidates if not (math.isfinite(c.cost) and math.isfinite(c.error)) or c.cost < 0]
    if bad:
        raise ValueError(f"expected finite candidates with cost >= 0 for {what}, got {bad[0]}")


def _above(a: Candidate, b: Candidate, c: Candidate) -> bool:
    """b lies above the segment a-c: a->b removes less error per unit cost than b->c."""
    return (a.error - b.error) * (c.cost - b.cost) < (b.error - c.error) * (b.cost - a.cost)


def hull(candidates: Sequence[Candidate]) -> list[int]:
    """Indices of the lower convex hull, cheapest first: cost rises, error falls, and the error
    removed per unit cost never rises from one step to the next (collinear points are kept)."""
    order = sorted(range(len(candidates)), key=lambda i: (candidates[i].cost, candidates[i].error))
    out: list[int] = []
    for i in order:
        c = candidates[i]
        if out and c.error >= candidates[out[-1]].error:
            continue  # costs at least as much and removes nothing more
        while len(out) >= 2 and _above(candidates[out[-2]], candidates[out[-1]], c):
            out.pop()
        out.append(i)
    return out


def _greedy(hulls: list[list[Candidate]], cap: float) -> list[Candidate]:
    """Every layer at its cheapest hull point, then hull steps by error removed per unit cost
    (ties: layer order, then step order) until the next step does not fit."""
    steps = []
    for j, h in enumerate(hulls):
        slope = math.inf
        for k in range(1, len(h)):
            dc = h[k].cost - h[k - 1].cost
            slope = min(slope, (h[k - 1].error - h[k].error) / dc)  # min: rounding cannot reorder a layer
            steps.append((-slope, j, k, dc))
    steps.sort(key=lambda s: s[0])  # stable
    spent = sum(h[0].cost for h in hulls)
    level = [0] * len(hulls)
    for _, j, k, dc in steps:
        if spent + dc > cap:
            break
        spent += dc
        level[j] = k
    return [h[k] for h, k in zip(hulls, level)]


def plan(layers: Sequence[Sequence[Candidate]], cap: float,
         dense: Sequence[Candidate | None] | None = None) -> list[Candidate]:
    """The chosen candidate of every layer (see the module docstring), total cost <= cap.

    layers[j]: layer j's candidates, in any order. dense[j]: its keep-dense candidate, or None
    where the layer must not stay dense. Raises ValueError when even the cheapest choice of
    every layer costs more than cap.
    """
    dense = list(dense) if dense is not None else [None] * len(layers)
    if len(dense) != len(layers):
        raise ValueError(f"expected one dense candidate (or None) per layer, got {len(dense)} for {len(layers)}")
    for j, layer in enumerate(layers):
        _check(layer, f"layer {j}")
    hulls = [[layer[i] for i in hull(layer)] for layer in layers]
    floor = sum(h[0].cost if d is None else min(h[0].cost, d.cost) for h, d in zip(hulls, dense))
    if floor > cap:
        raise ValueError(f"expected a cap >= {floor} (every layer at its cheapest candidate), got {cap}")
    kept: dict[int, Candidate] = {}  # layers kept dense
    while True:
        active = [j for j in range(len(layers)) if j not in kept]
        picks = dict(zip(active, _greedy([hulls[j] for j in active], cap - sum(d.cost for d in kept.values()))))
        newly = [j for j, p in picks.items() if dense[j] is not None and p.cost >= dense[j].cost]
        if not newly:
            return [kept[j] if j in kept else picks[j] for j in range(len(layers))]
        kept.update({j: dense[j] for j in newly})


def best_within(candidates: Sequence[Candidate], cap: float) -> Candidate:
    """The least-error candidate costing <= cap (ties: the costlier, which keeps more)."""
    _check(candidates, "the layer")
    fits = [c for c in candidates if c.cost <= cap]
    if not fits:
        raise ValueError(f"expected a cap >= {min(c.cost for c in candidates)} (the cheapest candidate), got {cap}")
    return min(fits, key=lambda c: (c.error, -c.cost))

