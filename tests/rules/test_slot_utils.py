"""The status book's two slot utilities (engine.union_slots, engine.diff_published): the kernel's one-pass forms
equal the numpy forms they replace, on random data and at the edges."""

from __future__ import annotations

import numpy as np
import pytest

from healthcode.rules import engine

needs_kernel = pytest.mark.skipif(engine._kernel is None, reason="the Cython kernel is not built")


def _both(monkeypatch, fn, *args):
    got = fn(*args)
    with monkeypatch.context() as m:
        m.setattr(engine, "_kernel", None)
        want = fn(*args)
    return got, want


@needs_kernel
@pytest.mark.parametrize("seed", range(5))
def test_union_slots_is_the_sorted_distinct_union(monkeypatch, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5000))
    parts = [np.sort(rng.integers(0, n, int(rng.integers(0, 3000)))) for _ in range(int(rng.integers(0, 6)))]
    got, want = _both(monkeypatch, engine.union_slots, parts, n)
    assert got.dtype == np.int64
    assert np.array_equal(got, want)
    assert np.array_equal(got, np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64))


@needs_kernel
def test_union_slots_edges():
    assert engine.union_slots([], 0).tolist() == []
    assert engine.union_slots([np.array([63, 64, 0, 127, 64])], 128).tolist() == [0, 63, 64, 127]
    with pytest.raises(ValueError, match=r"slot 10 is outside 0\.\.9"):
        engine.union_slots([np.array([1, 10])], 10)


@needs_kernel
@pytest.mark.parametrize("seed", range(5))
def test_diff_published_equals_the_numpy_diff(monkeypatch, seed):
    rng = np.random.default_rng(seed)
    n = 4000
    known = rng.random(n) < 0.8
    old_badge, old_entry = rng.random(n) < 0.5, rng.random(n) < 0.5
    old_reasons = rng.choice(np.array([0, 4, 16, 48, 4112], dtype=np.uint16), n)
    slots = np.sort(rng.choice(n, 1500, replace=False)).astype(np.int64)
    badge, entry = old_badge[slots].copy(), old_entry[slots].copy()
    reasons = old_reasons[slots].copy()
    flip = rng.random(len(slots))
    badge[flip < 0.1] ^= True
    entry[(flip > 0.1) & (flip < 0.2)] ^= True
    reasons[flip > 0.9] |= 32
    got, want = _both(monkeypatch, engine.diff_published, slots, badge, entry, reasons, known, old_badge,
                      old_entry, old_reasons)  # fmt: skip
    for g, w in zip(got[:4], want[:4], strict=True):
        assert np.array_equal(g, w)
    assert got[4] == want[4]
    pick, old_state, new_state, was, counts = got
    old_low = old_badge[slots][pick].astype(np.int32) | (old_entry[slots][pick].astype(np.int32) << 1)
    assert np.array_equal(old_state & 3, old_low)  # null in the change log where never published
    changed = (badge != old_badge[slots]) | (entry != old_entry[slots]) | (reasons != old_reasons[slots])
    assert np.array_equal(pick, np.flatnonzero(changed | ~known[slots]))
    assert np.array_equal(new_state >> 2, reasons[pick].astype(np.int32))
    assert np.array_equal(was, known[slots][pick])
    had = old_badge[slots][pick] & was
    assert counts[0] == int(np.count_nonzero(had & ~badge[pick]))
    assert counts[1] == int(np.count_nonzero(badge[pick] & ~had))


@needs_kernel
def test_diff_published_rejects_a_slot_outside_the_published_arrays():
    z = np.zeros(3, dtype=bool)
    r = np.zeros(3, dtype=np.uint16)
    with pytest.raises(IndexError, match="slot 3 is outside"):
        engine.diff_published(np.array([3]), z[:1], z[:1], r[:1], z, z, z, r)
