"""Split a dimension into local dims for an MPO layout.

A good MPO layout has balanced local dims (4096 -> 8,8,8,8, not 4,4,16,16): the
bond dimensions, and so the parameter count of the central core, depend on
products of local dims on each side of a bond. Dimensions that factor badly
(primes, 2*prime) are padded with zeros up to a nearby number that factors well.
"""
from __future__ import annotations

import math

__all__ = ["prime_factors", "balanced_factors", "choose_local_dims", "mountain_order"]


def prime_factors(n: int) -> list[int]:
    """Prime factors of n in ascending order (with multiplicity)."""
    if n < 1:
        raise ValueError(f"expected a positive integer, got {n}")
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def balanced_factors(n: int, num_factors: int) -> list[int]:
    """Factor n into exactly num_factors integers (product n) with the smallest max/min ratio.

    Exact search over divisors in non-decreasing order; returns ascending factors.
    Factors of 1 appear only when n has fewer prime factors than num_factors.
    """
    if num_factors < 1:
        raise ValueError(f"expected num_factors >= 1, got {num_factors}")
    if n < 1:
        raise ValueError(f"expected a positive integer, got {n}")
    best: list[int] | None = None

    def search(rest: int, k: int, lo: int, acc: list[int]) -> None:
        nonlocal best
        if k == 1:
            if rest >= lo:
                cand = acc + [rest]
                if best is None or cand[-1] * best[0] < best[-1] * cand[0]:
                    best = cand
            return
        for d in _divisors(rest):
            if d < lo:
                continue
            if d ** k > rest:  # d is the smallest of k factors, so d^k <= rest
                break
            search(rest // d, k - 1, d, acc + [d])

    search(n, num_factors, 1, [])
    return best  # type: ignore[return-value]


def _imbalance(factors: list[int]) -> float:
    """max/min ratio of the factors: 1.0 is perfectly balanced."""
    return max(factors) / min(factors)


def choose_local_dims(n: int, num_factors: int, max_pad: float = 0.05) -> list[int]:
    """Balanced local dims for a dimension of size n, padding n up if it factors badly.

    n itself is used when its factors are within 2x of each other; otherwise every m
    in [n, n*(1+max_pad)] is scored by imbalance (max/min) plus 50x the padded
    fraction, and the best m's factors are returned in mountain order.
    The product of the result is >= n; the caller zero-pads the difference.
    """
    if n < 1:
        raise ValueError(f"expected a positive dimension, got {n}")
    if num_factors == 1:
        return [n]
    exact = balanced_factors(n, num_factors)
    if _imbalance(exact) <= 2.0:
        return mountain_order(exact)
    best, best_score = None, math.inf
    for m in range(n, int(n * (1 + max_pad)) + 1):
        f = balanced_factors(m, num_factors)
        score = _imbalance(f) + 50.0 * (m - n) / n
        if score < best_score:
            best, best_score = f, score
    return mountain_order(best)


def mountain_order(factors: list[int]) -> list[int]:
    """Order factors small-large-small so the largest local dims sit in the middle.

    TT-SVD bonds peak in the middle of the chain, so putting the large local dims
    there concentrates parameters in one central core (the MPO 'central tensor').
    """
    s = sorted(factors)
    left, right = [], []
    for k, f in enumerate(s):
        (left if k % 2 == 0 else right).append(f)
    return left + right[::-1]
