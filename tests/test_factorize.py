"""ops/factorize: balanced local dims, padding for dims that factor badly."""
from __future__ import annotations

import math

import pytest

from mpokit.ops.factorize import balanced_factors, choose_local_dims, mountain_order, prime_factors


@pytest.mark.parametrize("n", [1, 2, 12, 97, 576, 1536, 4096, 30522])
def test_prime_factors_multiply_back(n):
    f = prime_factors(n)
    assert math.prod(f) == n
    assert all(len(prime_factors(p)) == 1 for p in f)


def test_balanced_4096_is_8888_not_4_4_16_16():
    assert balanced_factors(4096, 4) == [8, 8, 8, 8]
    assert choose_local_dims(4096, 4) == [8, 8, 8, 8]


def test_balanced_576_is_8_8_9_in_some_order():
    dims = choose_local_dims(576, 3)
    assert sorted(dims) == [8, 8, 9]
    assert dims[1] == 9  # mountain order: the largest local dim sits in the middle


@pytest.mark.parametrize("n,k", [(1536, 3), (2304, 3), (49152, 3), (768, 4), (64, 3)])
def test_exact_factorization_when_balanced_enough(n, k):
    dims = choose_local_dims(n, k)
    assert len(dims) == k and math.prod(dims) == n
    assert max(dims) / min(dims) <= 2.0


@pytest.mark.parametrize("n", [97, 61, 30522, 1021])
def test_bad_dims_are_padded_a_little(n):
    dims = choose_local_dims(n, 3)
    padded = math.prod(dims)
    assert n < padded <= n * 1.05  # padded, but by at most 5%
    assert max(dims) / min(dims) < max(balanced_factors(n, 3)) / min(balanced_factors(n, 3))


def test_mountain_order_puts_largest_in_middle():
    assert mountain_order([2, 3, 5, 7, 11]) == [2, 5, 11, 7, 3]
    assert mountain_order([4, 16, 4, 16]) in ([4, 16, 16, 4],)


@pytest.mark.parametrize("bad", [0, -3])
def test_bad_sizes_raise(bad):
    with pytest.raises(ValueError, match="expected"):
        choose_local_dims(bad, 3)
    with pytest.raises(ValueError, match="expected"):
        prime_factors(bad)
    with pytest.raises(ValueError, match="expected num_factors"):
        balanced_factors(12, 0)
