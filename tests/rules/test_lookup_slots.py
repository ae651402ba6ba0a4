"""engine.lookup_slots (the gateway lookup's search of a view): the kernel's binary searches give what the numpy
form gives, on random views with later persons and overlay rows, unknown ids and repeats."""

from __future__ import annotations

import numpy as np
import pytest

from healthcode.rules import engine

pytestmark = pytest.mark.skipif(engine._kernel is None, reason="the kernel is not built")


def test_the_kernel_and_the_numpy_form_agree(monkeypatch):
    rng = np.random.default_rng(3)
    kernel = engine._kernel
    for trial in range(300):
        base = np.unique(rng.integers(0, 1000, rng.integers(0, 50))).astype(np.uint64)
        extra_ids = rng.permutation(np.arange(1000, 1100, dtype=np.uint64))[: rng.integers(0, 10)]
        order = np.argsort(extra_ids, kind="stable")
        n_slots = len(base) + len(extra_ids)
        ov_slots = np.unique(rng.integers(0, max(n_slots, 1), rng.integers(0, 10) if n_slots else 0)).astype(np.int64)
        ov_rows = rng.integers(0, 100, len(ov_slots)).astype(np.int64)
        ids = rng.integers(0, 1150, rng.integers(0, 20)).astype(np.uint64)
        args = (ids, base, extra_ids[order], order.astype(np.int64), ov_slots, ov_rows)
        got = engine.lookup_slots(*args)
        monkeypatch.setattr(engine, "_kernel", None)
        want = engine.lookup_slots(*args)
        monkeypatch.setattr(engine, "_kernel", kernel)
        for name, g, w in zip(("slots", "rows", "in_overlay"), got, want, strict=True):
            np.testing.assert_array_equal(g, w, err_msg=f"trial {trial}: {name}")
        slots = got[0]
        assert ((slots >= 0) == np.isin(ids, np.concatenate([base, extra_ids]))).all()


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 65, 1000, 200_000])
def test_the_batched_search_finds_every_id_of_a_large_base(n):
    """The base's search advances up to 64 needles a level at a time: every position of every size is right."""
    rng = np.random.default_rng(n)
    base = np.unique(rng.integers(0, 2**63, n, dtype=np.uint64))
    ids = np.concatenate([
        rng.choice(base, 150), rng.integers(0, 2**63, 150, dtype=np.uint64), base[:1], base[-1:],
        np.array([0, 2**64 - 1], np.uint64),
    ])  # fmt: skip
    empty_u, empty_i = np.zeros(0, np.uint64), np.zeros(0, np.int64)
    slots, rows, in_overlay = engine.lookup_slots(ids, base, empty_u, empty_i, empty_i, empty_i)
    pos = np.minimum(np.searchsorted(base, ids), len(base) - 1)
    np.testing.assert_array_equal(slots, np.where(base[pos] == ids, pos, -1))
    np.testing.assert_array_equal(rows, slots[slots >= 0])
    assert not in_overlay.any()
