"""The sort-based set operations equal numpy's (rules/sets.py), on sizes that take each of their paths."""

from __future__ import annotations

import numpy as np
import pytest

from healthcode.rules import sets


@pytest.mark.parametrize("n, m", [(0, 0), (0, 5), (5, 0), (50, 10), (2000, 70_000), (100_000, 300)])
def test_sets_equal_numpy(n: int, m: int) -> None:
    rng = np.random.default_rng(n + m)
    values = rng.integers(0, 3 * max(n, m, 1), n).astype(np.uint64)
    among = rng.integers(0, 3 * max(n, m, 1), m).astype(np.uint64)
    assert np.array_equal(sets.unique(values), np.unique(values))
    assert np.array_equal(sets.isin(values, among), np.isin(values, among))
    haystack = np.unique(among)
    assert np.array_equal(sets.search(haystack, values), np.searchsorted(haystack, values))
    assert np.array_equal(sets.search(haystack, values, "right"), np.searchsorted(haystack, values, "right"))
    pos = sets.positions(haystack, values)
    assert np.array_equal(pos >= 0, np.isin(values, haystack))
    assert np.array_equal(haystack[pos[pos >= 0]], values[pos >= 0])
