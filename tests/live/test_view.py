"""The in-memory population view (issue 4): committed ingest merged in as deltas gives exactly the rows a full read
of the store gives, before and after compaction, and the status book keeps its published statuses across the
compaction's renumbering."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from healthcode.generate import generate_batches, generate_risk_csv
from healthcode.live import viewstate
from healthcode.live.statusbook import StatusBook
from healthcode.rules import engine, policy
from healthcode.rules.regions import parse_risk_csv, risk_list_from_rows
from healthcode.rules.timebase import DAY_SECONDS, day, day_to_date
from healthcode.store import NEW, STORED, UNKNOWN, Store

AS_OF = 1638244800  # 2021-11-30T12:00:00+08:00
TIMELINE = policy.default_policy()
LOOKBACK = TIMELINE.longest_lookback_days
REGIONS = [110101, 110105, 110108, 120104, 131082, 130102, 310101, 451481]
UTC = dt.timezone.utc

pytestmark = pytest.mark.skipif(engine._kernel is None, reason="the kernel is not built")


@pytest.fixture(scope="module")
def population() -> pa.Table:
    return pa.Table.from_batches(list(generate_batches(1500, seed=8, as_of=AS_OF)))


def _ts(seconds: np.ndarray) -> pa.Array:
    return pa.array(seconds.astype(np.int64), pa.int64()).cast(pa.timestamp("s", tz="UTC"))


def _random_items(rng: np.random.Generator, known: list[int], fresh: int) -> list[tuple[str, pa.Table]]:
    """One group of ingest calls: new and changed persons, NAT results (future, null sample, ties), entries and
    visits inside, before and after the window, and replays of earlier rows."""
    new_ids = [10**12 + fresh + k for k in range(int(rng.integers(0, 4)))]
    changed = [int(x) for x in rng.choice(known, size=int(rng.integers(0, 4)), replace=False)]
    ids = new_ids + changed
    items: list[tuple[str, pa.Table]] = []
    if ids:
        items.append(("persons", pa.table({
            "person_id": pa.array(ids, pa.uint64()),
            "home_region": pa.array(rng.choice(REGIONS, len(ids)).astype(np.int32)),
            "registered_commuter": pa.array(rng.random(len(ids)) < 0.5),
            "base_color": pa.array(rng.integers(0, 3, len(ids)).astype(np.int8)),
        })))  # fmt: skip
    pool = np.array(known + new_ids, dtype=np.uint64)

    def who(k: int) -> pa.Array:
        return pa.array(rng.choice(pool, k), pa.uint64())

    k = int(rng.integers(1, 12))
    report = AS_OF + rng.integers(-20, 3, k) * DAY_SECONDS // 2
    sample = report - rng.integers(0, 2, k) * 3600  # ties on report time with different samples
    items.append(("nat_results", pa.table({
        "person_id": who(k), "sample_time": pa.array(sample, mask=rng.random(k) < 0.2).cast(pa.timestamp("s", "UTC")),
        "report_time": _ts(report),
    })))  # fmt: skip
    k = int(rng.integers(1, 20))
    t = AS_OF + rng.integers(-(LOOKBACK + 3) * DAY_SECONDS, DAY_SECONDS, k)
    t[: k // 3] = AS_OF - 3600  # replays within the call and across calls
    items.append(("entries", pa.table({"person_id": who(k), "t": _ts(t)})))
    k = int(rng.integers(1, 20))
    days = day(AS_OF) + rng.integers(-(LOOKBACK + 3), 2, k)
    items.append(("visits", pa.table({
        "person_id": who(k), "region": pa.array(rng.choice(REGIONS, k).astype(np.int32)),
        "day": pa.array([day_to_date(int(d)) for d in days], pa.date32()),
    })))  # fmt: skip
    return items


def _commit(store: Store, book: StatusBook, items: list[tuple[str, pa.Table]]) -> None:
    prepared = [(kind, Store.prepare_ingest(kind, table)) for kind, table in items]
    results = store.ingest_group(prepared, prepared=True)
    assert not [r for r in results if isinstance(r, Exception)], results
    book.ingested(prepared, AS_OF)


def _published_by_id(book: StatusBook) -> dict[int, tuple[bool, bool, int]]:
    known = np.flatnonzero(book.known)
    rows = zip(book.badge[known].tolist(), book.entry[known].tolist(), book.reasons[known].tolist(), strict=True)
    return dict(zip(book.ids[known].tolist(), rows, strict=True))


def _assert_view_is_store(book: StatusBook, store: Store) -> None:
    got = book.view.state.table().sort_by("person_id")
    want = store.population(AS_OF, LOOKBACK, future=True)
    assert got.num_rows == want.num_rows
    for name in want.column_names:
        assert got.column(name).combine_chunks().equals(want.column(name).combine_chunks()), name


@pytest.mark.parametrize("seed, chunks", [(0, 32), (1, 32), (2, 2), (3, 1)])
def test_ingest_deltas_and_compaction_equal_a_full_read_of_the_store(tmp_path, population, seed, chunks, monkeypatch):
    """Ingest groups (replays and persons touched again included) appended to the overlay, its chunks combined
    every ``chunks`` appends, and compactions: the view always equals a fresh read of the store."""
    monkeypatch.setattr(viewstate, "MAX_OVERLAY_CHUNKS", chunks)
    store = Store(tmp_path / "s.duckdb")
    store.load_population(population)
    book = StatusBook(store, TIMELINE, AS_OF, kernel_threads=1, compact_rows=0)
    risk = parse_risk_csv(generate_risk_csv(seed, AS_OF)).with_version(1)
    book.reevaluate(risk, TIMELINE, AS_OF)
    rng = np.random.default_rng(seed)
    known = store.table("persons").column("person_id").to_pylist()
    fresh = 0
    previous: list[tuple[str, pa.Table]] = []
    for step in range(12):
        items = _random_items(rng, known, fresh)
        if step % 3 == 2:  # replay the previous group's events along with new ones
            items += [(kind, table) for kind, table in previous if kind != "persons"]
        previous = items
        added = items[0][1].column("person_id").to_pylist() if items[0][0] == "persons" else []
        known += [p for p in added if p >= 10**12]
        fresh += 10
        _commit(store, book, items)
        _assert_view_is_store(book, store)
        if step in (4, 9):
            before = _published_by_id(book)
            book.view.compact(AS_OF)
            assert len(book.view.state.overlay_slots) == 0
            assert _published_by_id(book) == before
            _assert_view_is_store(book, store)
    # Everyone re-evaluated from the merged view equals the engine on a fresh read of the store.
    book.reevaluate(risk, TIMELINE, AS_OF)
    want = engine.evaluate(store.population(AS_OF, LOOKBACK), risk, TIMELINE, AS_OF)
    slots = book.rows_of(want.column("person_id").to_numpy())
    np.testing.assert_array_equal(book.badge[slots], want.column("commuter_badge").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(book.reasons[slots], want.column("reasons").to_numpy())
    # A risk-list change finds the persons whose visits only the deltas hold.
    listed = risk_list_from_rows([*risk.rows(), (REGIONS[seed], "2021-11-20", "", "local_case")], version=2)
    book.reevaluate_risk_change(risk, listed, TIMELINE, AS_OF)
    want = engine.evaluate(store.population(AS_OF, LOOKBACK), listed, TIMELINE, AS_OF)
    np.testing.assert_array_equal(book.reasons[slots], want.column("reasons").to_numpy())


def test_ingest_during_a_compaction_is_kept(tmp_path, population):
    store = Store(tmp_path / "s.duckdb")
    store.load_population(population)
    book = StatusBook(store, TIMELINE, AS_OF, kernel_threads=1, compact_rows=0)
    rng = np.random.default_rng(99)
    known = store.table("persons").column("person_id").to_pylist()
    _commit(store, book, _random_items(rng, known, 0))
    # Compaction snapshots the state, merges outside the lock, and keeps rows written after its snapshot.
    snapshot_gen = book.view.state.generation
    real_merge = book.view.compact

    def compact_with_ingest_in_between(now: int):  # type: ignore[no-untyped-def]
        import healthcode.live.view as view_module

        original = view_module.make_state

        def make_state_then_ingest(base, *args, **kwargs):  # type: ignore[no-untyped-def]
            state = original(base, *args, **kwargs)
            view_module.make_state = original
            _commit(store, book, _random_items(rng, known, 50))
            return state

        view_module.make_state = make_state_then_ingest
        try:
            return real_merge(now)
        finally:
            view_module.make_state = original

    new = compact_with_ingest_in_between(AS_OF)
    assert new.generation == snapshot_gen + 1 and len(new.overlay_slots) > 0
    _assert_view_is_store(book, store)


def test_evaluating_selected_rows_in_place_equals_evaluating_a_copy_of_them(population):
    """The kernel's selection path (re-evaluation by region reads rows in place) on valid and invalid rows, in any
    order, repeated, on 1 and 2 threads."""
    risk = parse_risk_csv(generate_risk_csv(2, AS_OF))
    ctx = engine.make_context(risk, TIMELINE, AS_OF)
    batch = population.combine_chunks().to_batches()[0]
    prepared = engine.Prepared(batch)
    rows = np.random.default_rng(4).integers(0, batch.num_rows, 70_000)
    want = engine.evaluate(batch.take(pa.array(rows)), risk, TIMELINE, AS_OF)
    assert (want.column("reasons").to_numpy() & (1 << 15)).any()  # some rows are invalid (SPEC §4.1)
    for threads in (1, 2):
        badge, entry, reasons = engine.evaluate_selected(ctx, prepared, rows, threads)
        np.testing.assert_array_equal(badge, want.column("commuter_badge").to_numpy(zero_copy_only=False))
        np.testing.assert_array_equal(entry, want.column("entry_permitted").to_numpy(zero_copy_only=False))
        np.testing.assert_array_equal(reasons, want.column("reasons").to_numpy())
    with pytest.raises(IndexError, match="outside the batch"):
        engine.evaluate_selected(ctx, prepared, np.array([batch.num_rows]))


def test_the_view_knows_which_in_window_events_are_stored(tmp_path, population):
    """Events inside the window are known from memory: a replay as stored, any other as surely new (so the store
    appends them without a check); outside the window the answer is always 'unknown' (the store checks)."""
    store = Store(tmp_path / "s.duckdb")
    store.load_population(population)
    book = StatusBook(store, TIMELINE, AS_OF, kernel_threads=1, compact_rows=0)
    rng = np.random.default_rng(7)
    known = store.table("persons").column("person_id").to_pylist()
    first = _random_items(rng, known, 0)
    _commit(store, book, first)
    t_first = AS_OF - (AS_OF + 8 * 3600) % 86400 - (LOOKBACK - 1) * 86400  # local midnight, LOOKBACK days back
    stored_entries = {(r["person_id"], r["t"]) for r in store.table("entries").to_pylist()}
    stored_visits = {(r["person_id"], r["region"], r["day"]) for r in store.table("visits").to_pylist()}
    outcomes = set()
    for kind, table in _random_items(rng, known, 100) + [(k, t) for k, t in first if k in ("entries", "visits")]:
        if kind not in ("entries", "visits"):
            continue
        prepared = Store.prepare_ingest(kind, table)
        got = book.stored_events(kind, prepared, AS_OF)
        for row, flag in zip(prepared.to_pylist(), got.tolist(), strict=True):
            if kind == "entries":
                inside = t_first <= row["t"]  # future-dated ones too: the view keeps them
                truth = (row["person_id"], row["t"]) in stored_entries
            else:
                inside = day(t_first) <= (row["day"] - dt.date(1970, 1, 1)).days
                truth = (row["person_id"], row["region"], row["day"]) in stored_visits
            expected = (STORED if truth else NEW) if inside else UNKNOWN
            assert flag == expected, (kind, row, flag, truth, inside)
            outcomes.add((kind, flag, truth, inside))
    assert {(k, STORED, True, True) for k in ("entries", "visits")} <= outcomes  # replays recognised
    assert ("entries", NEW, False, True) in outcomes and ("entries", UNKNOWN, True, False) in outcomes
    # Replays counted as already present through the fast path, as without the view.
    prepared = [(k, Store.prepare_ingest(k, t)) for k, t in first if k in ("entries", "visits")]
    seen = lambda kind, events: book.stored_events(kind, events, AS_OF)  # noqa: E731
    counts = store.ingest_group(prepared, prepared=True, seen=seen)
    assert all(c.inserted == 0 and c.already_present == len(t) for c, (_, t) in zip(counts, prepared, strict=True))
