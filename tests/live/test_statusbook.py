"""Mass re-evaluation (issue 4): incremental re-evaluation by region equals a full re-evaluation, statuses and the
change log are committed together, and a replay changes nothing."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from healthcode.generate import generate_batches, generate_risk_csv
from healthcode.live.statusbook import StatusBook, changed_regions
from healthcode.rules import engine, policy
from healthcode.rules.regions import RiskList, parse_risk_csv, risk_list_from_rows
from healthcode.rules.timebase import day, day_to_date
from healthcode.store import Store

AS_OF = 1638244800  # 2021-11-30T12:00:00+08:00
TIMELINE = policy.default_policy()

pytestmark = pytest.mark.skipif(engine._kernel is None, reason="the kernel is not built")


@pytest.fixture(scope="module")
def population() -> pa.Table:
    return pa.Table.from_batches(list(generate_batches(4000, seed=21, as_of=AS_OF)))


@pytest.fixture
def book(tmp_path, population) -> StatusBook:
    store = Store(tmp_path / "s.duckdb")
    store.load_population(population)
    return StatusBook(store, TIMELINE, AS_OF, kernel_threads=1)


def _versioned(risk: RiskList, version: int) -> RiskList:
    return risk.with_version(version)


def _random_edit(rng: np.random.Generator, rows: list[tuple[int, str, str, str]]) -> list[tuple[int, str, str, str]]:
    """Add, lift, extend or shorten entries, at county, prefecture and province level, around AS_OF."""
    today = day(AS_OF)
    out = list(rows)
    for _ in range(int(rng.integers(1, 6))):
        action = rng.choice(["add", "lift", "extend", "prefecture", "province"])
        if action == "lift" and out:
            out.pop(int(rng.integers(len(out))))
        elif action == "extend" and out:
            k = int(rng.integers(len(out)))
            region, start, _end, kind = out[k]
            end = day_to_date(today - int(rng.integers(0, 10))).isoformat()
            out[k] = (region, start, max(end, start) if start else end, kind)
        else:
            county = int(rng.choice([110101, 110105, 120104, 131082, 130102, 131002, 310101, 451481]))
            region = {"prefecture": county // 100 * 100, "province": county // 10000 * 10000}.get(action, county)
            start = day_to_date(today - int(rng.integers(0, 20))).isoformat()
            end = "" if rng.random() < 0.5 else day_to_date(today - int(rng.integers(-3, 12))).isoformat()
            if end and end < start:
                start, end = end, start
            out.append((region, start, end, "local_case"))
    return out


def _published(book: StatusBook) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return book.badge.copy(), book.entry.copy(), book.reasons.copy()


def _full(book: StatusBook, risk: RiskList) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    result = engine.evaluate(book.view.state.table(), risk, TIMELINE, AS_OF)
    return (
        result["commuter_badge"].to_numpy(zero_copy_only=False),
        result["entry_permitted"].to_numpy(zero_copy_only=False),
        result["reasons"].to_numpy(),
    )


@pytest.mark.parametrize("seed", range(6))
def test_incremental_equals_full_on_random_edits(book, seed):
    rng = np.random.default_rng(seed)
    rows = [tuple(r) for r in parse_risk_csv(generate_risk_csv(seed, AS_OF)).rows()]
    current = _versioned(risk_list_from_rows(rows), 1)
    first = book.reevaluate(current, TIMELINE, AS_OF)
    assert first.changed == first.evaluated == len(book.ids)  # nothing was published before
    for version in range(2, 6):
        rows = _random_edit(rng, rows)
        new = _versioned(risk_list_from_rows(rows), version)
        summary = book.reevaluate_risk_change(current, new, TIMELINE, AS_OF)
        assert summary.evaluated <= len(book.ids)
        for got, want in zip(_published(book), _full(book, new), strict=True):
            np.testing.assert_array_equal(got, want, err_msg=f"seed {seed} version {version} rows {rows}")
        current = new
    # The store holds exactly what is published in memory (before and after a checkpoint), one change-log row per
    # change, and a book opened afterwards on the same store starts from the same published statuses.
    for checkpoint in (False, True):
        if checkpoint:
            assert book.checkpoint() == book.high_water_mark
        _check_store_matches(book)
    again = StatusBook(book.store, TIMELINE, AS_OF, kernel_threads=1)
    for got, want in zip(_published(again), _published(book), strict=True):
        np.testing.assert_array_equal(got, want)
    assert again.high_water_mark == book.high_water_mark == again.checkpoint_seq


def _check_store_matches(book: StatusBook) -> None:
    stored = book.store.published()
    rows_ = book.rows_of(stored["person_id"].to_numpy())
    assert (rows_ >= 0).all() and len(rows_) == len(book.ids)
    np.testing.assert_array_equal(stored["commuter_badge"].to_numpy(zero_copy_only=False), book.badge[rows_])
    np.testing.assert_array_equal(stored["reasons"].to_numpy(), book.reasons[rows_])
    assert book.store.high_water_mark() == book.high_water_mark


def test_only_affected_persons_are_evaluated_and_a_replay_changes_nothing(book):
    base = _versioned(parse_risk_csv(generate_risk_csv(3, AS_OF)), 1)
    book.reevaluate(base, TIMELINE, AS_OF)
    mark = book.high_water_mark
    same = book.reevaluate_risk_change(base, _versioned(base, 2), TIMELINE, AS_OF)
    assert (same.evaluated, same.changed, same.regions_changed) == (0, 0, 0)
    assert book.reevaluate(base, TIMELINE, AS_OF).changed == 0  # a full replay: nothing moves
    assert book.high_water_mark == mark
    # Listing one Beijing district reaches exactly the persons with an in-window visit overlapping it.
    listed = risk_list_from_rows([*base.rows(), (110108, "2021-11-25", "", "local_case")], version=3)
    summary = book.reevaluate_risk_change(base, listed, TIMELINE, AS_OF)
    regions = changed_regions(
        engine.make_context(base, TIMELINE, AS_OF).risk_table, engine.make_context(listed, TIMELINE, AS_OF).risk_table
    )
    # The county itself, and its prefecture and province unless another listed county already covers them.
    assert 110108 in regions and set(regions.tolist()) <= {110108, 110100, 110000}
    assert summary.evaluated == len(book.rows_visiting(regions)) < len(book.ids)
    assert summary.changed > 0 and summary.badges_lost + summary.entries_lost > 0
    changes = book.store.changes(mark)
    assert changes.num_rows == summary.changed and summary.high_water_mark == mark + summary.changed
    assert set(changes["risk_list_version"].to_pylist()) == {3}
    assert (changes["new_reasons"].to_numpy() & 32).all()  # every change here is a new RISK_TRAVEL



def test_group_by_code_is_a_stable_counting_sort():
    codes = np.random.default_rng(5).integers(0, 300, 50_001).astype(np.int32)
    offsets, order = engine.group_by_code(codes, 300)
    np.testing.assert_array_equal(order, np.argsort(codes, kind="stable"))
    np.testing.assert_array_equal(np.diff(offsets), np.bincount(codes, minlength=300))
    with pytest.raises(ValueError, match="outside"):
        engine.group_by_code(np.array([0, 300], dtype=np.int32), 300)


def _wait(done, seconds: float = 30) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_the_snapshot_is_written_in_the_background_once_publishes_pause_and_at_close(book):
    import os

    book.checkpoint_changes, book.checkpoint_quiet_seconds = 1, 0.2
    risk = parse_risk_csv(generate_risk_csv(4, AS_OF)).with_version(1)
    summary = book.reevaluate(risk, TIMELINE, AS_OF)
    assert summary.changed > 0 and book.snapshot_seq == 0
    _wait(lambda: book.snapshot_seq > 0)
    assert book.snapshot_seq == book.high_water_mark and os.path.isfile(book.snapshot_path)
    assert book.store.checkpoint_seq() == 0  # the store's checkpoint is not rewritten in the background
    # A snapshot still waiting for a quiet moment is given up at close, which writes one itself, and the store's
    # status checkpoint too (the change log past it is longer than checkpoint_changes).
    book.checkpoint_quiet_seconds = 3600
    book.reevaluate(risk.with_version(2), TIMELINE, AS_OF + 86400)
    assert book.snapshot_seq < book.high_water_mark
    book.close()
    assert book.snapshot_seq == book.high_water_mark == book.store.checkpoint_seq()


def test_an_in_memory_store_checkpoints_its_statuses_in_the_background(population):
    store = Store(":memory:")
    store.load_population(population)
    book = StatusBook(store, TIMELINE, AS_OF, kernel_threads=1)
    assert book.snapshot_path is None
    book.checkpoint_changes, book.checkpoint_quiet_seconds = 1, 0.2
    book.reevaluate(parse_risk_csv(generate_risk_csv(4, AS_OF)).with_version(1), TIMELINE, AS_OF)
    _wait(lambda: book.checkpoint_seq > 0)
    assert book.checkpoint_seq == book.high_water_mark == store.checkpoint_seq()
    book.close()
