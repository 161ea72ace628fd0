"""ops.budget (the planner) against brute force; keep-dense; mixed candidates in bytes; ops.tt ladders and tt_truncate."""
from __future__ import annotations

import bisect
import itertools
import math
import random

import pytest
import torch

from mpokit.ops.budget import Candidate, best_within, hull, plan
from mpokit.ops.tt import bond_ladder, bond_raises, count_params, full_bonds, tt_svd, tt_to_matrix, tt_truncate


def brute(layers, cap=None):
    """Least total error over every choice of one candidate per layer costing <= cap in total;
    without cap, that function of the cap (every choice is enumerated once)."""
    combos = sorted((sum(c.cost for c in combo), sum(c.error for c in combo)) for combo in itertools.product(*layers))
    costs = [c for c, _ in combos]
    best = list(itertools.accumulate((e for _, e in combos), min))

    def optimum(cap):
        k = bisect.bisect_right(costs, cap)
        return best[k - 1] if k else None

    return optimum if cap is None else optimum(cap)


def random_layers(seed: int, n_layers: int = 3, n_candidates: int = 5) -> list[list[Candidate]]:
    """Decreasing errors at rising costs, not convex, plus a dominated candidate, shuffled."""
    rng = random.Random(seed)
    layers = []
    for j in range(n_layers):
        costs = sorted(rng.sample(range(1, 80), n_candidates))
        errors = sorted((rng.uniform(0, 10) for _ in range(n_candidates)), reverse=True)
        layer = [Candidate(c, e, (j, i)) for i, (c, e) in enumerate(zip(costs, errors))]
        layer.append(Candidate(costs[-1] + 3, errors[-1] + 1, (j, "dominated")))
        rng.shuffle(layer)
        layers.append(layer)
    return layers


def hull_steps(layer):
    h = [layer[i] for i in hull(layer)]
    return [b.cost - a.cost for a, b in zip(h, h[1:])]


def test_hull_drops_dominated_and_non_convex_candidates():
    layer = [Candidate(10, 5.0, "a"), Candidate(4, 9.0, "b"), Candidate(6, 8.5, "above"), Candidate(12, 6.0, "dominated"),
             Candidate(20, 1.0, "c"), Candidate(4, 9.5, "same cost, worse")]
    assert [layer[i].choice for i in hull(layer)] == ["b", "a", "c"]
    collinear = [Candidate(c, 10.0 - c, c) for c in (1, 2, 3)]  # equal slopes: every point kept
    assert hull(collinear) == [0, 1, 2]


@pytest.mark.parametrize("seed", range(60))
def test_plan_is_optimal_for_the_cost_it_spends(seed):
    layers = random_layers(seed, n_layers=2 + seed % 3)
    floor = sum(min(c.cost for c in layer) for layer in layers)
    top = sum(max(c.cost for c in layer) for layer in layers)
    step = max(max(hull_steps(layer), default=0) for layer in layers)
    optimum = brute(layers)
    for cap in range(floor, top + 2):
        chosen = plan(layers, cap)
        spent, error = sum(c.cost for c in chosen), sum(c.error for c in chosen)
        assert spent <= cap  # the cap holds
        assert error == pytest.approx(optimum(spent), abs=1e-12)  # exact optimum at the cost it spends
        assert optimum(cap) <= error + 1e-12
        assert error <= optimum(max(cap - step, floor)) + 1e-12  # less than one hull step is left unspent


def test_plan_meets_brute_force_at_every_breakpoint():
    """Where the cap is a cost the planner can stop at, its plan is the brute-force optimum of that cap."""
    for seed in range(30):
        layers = random_layers(100 + seed, n_layers=3)
        optimum = brute(layers)
        floor = sum(min(c.cost for c in layer) for layer in layers)
        top = sum(max(c.cost for c in layer) for layer in layers)
        breakpoints = {sum(c.cost for c in plan(layers, cap)) for cap in range(floor, top + 1)}
        assert len(breakpoints) > 3
        for cap in breakpoints:
            chosen = plan(layers, cap)
            assert sum(c.cost for c in chosen) == cap
            assert sum(c.error for c in chosen) == pytest.approx(optimum(cap), abs=1e-12)


def test_plan_refuses_a_cap_below_every_layer_at_its_cheapest():
    layers = [[Candidate(5, 1.0), Candidate(9, 0.0)], [Candidate(7, 2.0)]]
    assert [c.cost for c in plan(layers, 12)] == [5, 7]
    with pytest.raises(ValueError, match=r"expected a cap >= 12"):
        plan(layers, 11)
    with pytest.raises(ValueError, match="at least one candidate"):
        plan([[]], 10)
    with pytest.raises(ValueError, match="finite"):
        plan([[Candidate(1, float("nan"))]], 10)


def test_keep_dense_frees_budget_for_the_other_layers():
    # layer A reaches rank 4 (cost 40) but dense costs 35 and is exact; what it frees goes to B
    a = [Candidate(10 * r, e, r) for r, e in zip(range(1, 5), (100.0, 50.0, 20.0, 5.0))]
    b = [Candidate(10 * r, e, r) for r, e in zip(range(1, 6), (10.0, 6.0, 3.0, 1.0, 0.0))]
    without = plan([a, b], 75)
    assert [c.choice for c in without] == [4, 3] and sum(c.cost for c in without) == 70
    chosen = plan([a, b], 75, dense=[Candidate(35, 0.0, "dense"), None])
    assert [c.choice for c in chosen] == ["dense", 4]
    assert sum(c.cost for c in chosen) == 75 and sum(c.error for c in chosen) < sum(c.error for c in without)
    # dense is also the way in when the ladder's cheapest rung already costs more than dense
    assert plan([[Candidate(8, 1.0, 1)]], 5, dense=[Candidate(5, 0.0, "dense")])[0].choice == "dense"


def test_best_within_is_brute_force_for_one_layer():
    for seed in range(20):
        layer = random_layers(seed, n_layers=1, n_candidates=8)[0]
        for cap in range(0, 90):
            fits = [c for c in layer if c.cost <= cap]
            if not fits:
                with pytest.raises(ValueError, match="cheapest candidate"):
                    best_within(layer, cap)
                continue
            assert best_within(layer, cap).error == min(c.error for c in fits)
    tie = [Candidate(3, 0.0, "small"), Candidate(5, 0.0, "full")]
    assert best_within(tie, 5).choice == "full"  # equal error: the one that keeps more


def quant_and_lowrank(sigma: torch.Tensor, rows: int, cols: int) -> list[Candidate]:
    """Bytes and squared errors of the storage kinds a mixed plan weighs for one (rows, cols) layer:
    fp16 / int8 / int4 dense (one fp16 scale per row), and rank-r factors in int4 (scales per factor row)."""
    energy = float((sigma ** 2).sum())
    tail = torch.flip(torch.cumsum(torch.flip(sigma ** 2, [0]), 0), [0]).tolist() + [0.0]
    noise = {8: 1e-4, 4: 5e-3}  # relative squared quantization error per bit width
    out = [Candidate(2 * rows * cols, 0.0, ("dense", 16))]
    out += [Candidate(rows * cols * bits / 8 + 2 * rows, noise[bits] * energy, ("dense", bits)) for bits in (8, 4)]
    out += [Candidate(r * (rows + cols) / 2 + 2 * (rows + r), tail[r] + noise[4] * (energy - tail[r]), ("lowrank", r, 4))
            for r in (8, 16, 32, 64, 128)]
    return out


def test_mixed_candidates_priced_in_bytes():
    """A fast-decaying layer goes low rank with 4-bit factors, a flat one stays dense in 8 bits, under one byte cap."""
    rows = cols = 256
    steep = 10 * 0.8 ** torch.arange(256, dtype=torch.float64)  # attention-like: a few directions
    flat = torch.ones(256, dtype=torch.float64)  # FFN-like: energy everywhere
    layers = [quant_and_lowrank(steep, rows, cols), quant_and_lowrank(flat, rows, cols)]
    cap = 80_000  # bytes: both layers in int8 (132 kB) do not fit
    chosen = plan(layers, cap)
    assert [c.choice for c in chosen] == [("lowrank", 32, 4), ("dense", 8)]
    assert sum(c.cost for c in chosen) <= cap
    assert sum(c.error for c in chosen) == pytest.approx(brute(layers, cap))  # the optimum at this cap
    cheapest = plan(layers, sum(min(c.cost for c in layer) for layer in layers))
    assert sum(c.error for c in cheapest) > 100 * sum(c.error for c in chosen)  # negative control


# ---- ops.tt: the candidates of one MPO and the truncation that reuses one TT-SVD ----------------

LAYOUTS = [([4, 8], [6, 4]), ([4, 6, 4], [3, 4, 4]), ([2, 3, 4, 2], [2, 2, 3, 2]), ([8, 2, 3], [1, 5, 7]),
           ([24, 1], [1, 20])]


@pytest.mark.parametrize("out_dims,in_dims", LAYOUTS)
def test_tt_truncate_equals_a_second_tt_svd(out_dims, in_dims):
    w = torch.randn(math.prod(out_dims), math.prod(in_dims), dtype=torch.float64)
    cores, info = tt_svd(w, out_dims, in_dims)
    limits = full_bonds(out_dims, in_dims)
    rng = random.Random(0)
    for _ in range(6):
        bonds = [rng.randint(1, b) for b in limits]
        direct, dinfo = tt_svd(w, out_dims, in_dims, max_bond=bonds)
        cut, cinfo = tt_truncate(cores, info, bonds)
        assert cinfo.bonds == dinfo.bonds and [tuple(c.shape) for c in cut] == [tuple(c.shape) for c in direct]
        assert torch.allclose(tt_to_matrix(cut), tt_to_matrix(direct), atol=1e-10)
        assert cinfo.discarded == pytest.approx(dinfo.discarded, rel=1e-9, abs=1e-12)
        err = torch.linalg.matrix_norm(w - tt_to_matrix(cut)).item()
        assert err == pytest.approx(cinfo.error_bound, rel=1e-6)
        if bonds != limits:  # negative control: truncation changes the matrix
            assert err > 1e-3 * info.norm
    same, sinfo = tt_truncate(cores, info, limits)
    assert same == cores and sinfo is info
    with pytest.raises(ValueError, match="untruncated"):
        tt_truncate(*tt_svd(w, out_dims, in_dims, max_bond=1), limits)


@pytest.mark.parametrize("out_dims,in_dims", LAYOUTS)
def test_bond_ladder_rungs(out_dims, in_dims):
    w = torch.randn(math.prod(out_dims), math.prod(in_dims), dtype=torch.float64)
    _, info = tt_svd(w, out_dims, in_dims)
    ladder = bond_ladder(info.spectra, out_dims, in_dims)
    assert list(ladder[0].choice) == [1] * (len(out_dims) - 1)
    assert list(ladder[-1].choice) == full_bonds(out_dims, in_dims) and ladder[-1].error == 0.0
    assert all(a.cost < b.cost and a.error > b.error for a, b in zip(ladder, ladder[1:]))
    assert all(c.cost == count_params(out_dims, in_dims, list(c.choice)) for c in ladder)
    for c in ladder:  # the error estimate is the discarded energy of the full sweep's spectra ...
        _, cut = tt_svd(w, out_dims, in_dims, max_bond=list(c.choice))
        assert c.error >= cut.error_bound ** 2 * (1 - 1e-9)  # ... an upper bound on the truncated sweep's
        if len(out_dims) == 2:
            assert c.error == pytest.approx(cut.error_bound ** 2, rel=1e-9, abs=1e-12)


def test_bond_raises_cheapest_first_and_within_cap():
    od, idd = [4, 6, 4], [3, 4, 4]
    raises = bond_raises(od, idd, [1, 1], full_bonds(od, idd), 900)
    costs = [c.cost for c in raises]
    steps = [b - a for a, b in zip(costs, costs[1:])]
    assert costs[-1] <= 900 and steps == sorted(steps)  # each raise costs at least the one before
    assert all(c.cost == count_params(od, idd, list(c.choice)) for c in raises)
    assert [c.error for c in raises] == [-float(k) for k in range(len(raises))]
