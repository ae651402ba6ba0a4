"""The server's snapshot (issue 13): a restart from it gives the same view and statuses as a read of the store, a
stale, damaged or other-version snapshot is not used for the view, and events that were in the future when it
was written are picked up once they are due."""

from __future__ import annotations

import glob
import json
import logging
import os

import numpy as np
import pyarrow as pa
import pytest

from healthcode.generate import generate_batches, generate_risk_csv
from healthcode.live import snapshot
from healthcode.live.statusbook import StatusBook
from healthcode.live.viewstate import region_index_of
from healthcode.rules import engine, policy
from healthcode.rules.regions import N_CODES, parse_risk_csv
from healthcode.store import Store

AS_OF = 1638244800  # 2021-11-30T12:00:00+08:00
TIMELINE = policy.default_policy()
LOOKBACK = TIMELINE.longest_lookback_days
RISK = parse_risk_csv(generate_risk_csv(6, AS_OF)).with_version(1)

pytestmark = pytest.mark.skipif(engine._kernel is None, reason="the kernel is not built")


@pytest.fixture(scope="module")
def population() -> pa.Table:
    return pa.Table.from_batches(list(generate_batches(3000, seed=5, as_of=AS_OF)))


@pytest.fixture
def store(tmp_path, population) -> Store:
    store = Store(tmp_path / "s.duckdb")
    store.load_population(population)
    return store


def _book(store: Store, as_of: int = AS_OF) -> StatusBook:
    return StatusBook(store, TIMELINE, as_of, kernel_threads=1, compact_rows=0)


def _commit(store: Store, book: StatusBook, items: list[tuple[str, pa.Table]], now: int = AS_OF) -> None:
    prepared = [(kind, Store.prepare_ingest(kind, table)) for kind, table in items]
    results = store.ingest_group(prepared, prepared=True)
    assert not [r for r in results if isinstance(r, Exception)], results
    book.ingested(prepared, now)


def _entries(person: int, *instants: int) -> tuple[str, pa.Table]:
    n = len(instants)
    return "entries", pa.table(
        {"person_id": pa.array([person] * n, pa.uint64()), "t": pa.array(instants, pa.timestamp("s", "UTC"))}
    )


def _published(book: StatusBook) -> dict[int, tuple[bool, bool, int]]:
    known = np.flatnonzero(book.known)
    rows = zip(book.badge[known].tolist(), book.entry[known].tolist(), book.reasons[known].tolist(), strict=True)
    return dict(zip(book.ids[known].tolist(), rows, strict=True))


def _assert_view_is_store(book: StatusBook, store: Store, as_of: int = AS_OF) -> None:
    got = book.view.state.table().sort_by("person_id")
    want = store.population(as_of, LOOKBACK, future=True)  # the view keeps future-dated entries and visits
    assert got.num_rows == want.num_rows
    for name in want.column_names:
        assert got.column(name).combine_chunks().equals(want.column(name).combine_chunks()), name


def _region(book: StatusBook) -> tuple[np.ndarray, np.ndarray]:
    return book.view.state.region_offsets, book.view.state.region_rows


def _statuses(book: StatusBook, as_of: int = AS_OF) -> pa.Table:
    """Every stored person's status as the gateway's lookup gives it (by person id), as evaluate's columns."""
    ids = np.sort(book.ids)
    _, flags, reasons, until = book.statuses(ids, engine.make_context(RISK, TIMELINE, as_of))
    return pa.table({
        "person_id": ids, "badge": flags & 1 != 0, "entry": flags & 2 != 0, "reasons": reasons,
        "badge_until": np.where(flags & 1 != 0, until[0], 0), "entry_until": np.where(flags & 2 != 0, until[1], 0),
    })  # fmt: skip


def _as_status(result: pa.Table) -> pa.Table:
    """The lookup's columns of an evaluation's result."""
    names = (("badge", "commuter_badge"), ("entry", "entry_permitted"))
    flags = {k: result.column(c).to_numpy(zero_copy_only=False) for k, c in names}
    return pa.table({
        "person_id": result.column("person_id"), "badge": flags["badge"], "entry": flags["entry"],
        "reasons": result.column("reasons").cast(pa.uint16()),
        "badge_until": result.column("badge_valid_until").cast(pa.int64()).fill_null(0),
        "entry_until": result.column("entry_valid_until").cast(pa.int64()).fill_null(0),
    })  # fmt: skip


def test_a_restart_from_the_snapshot_equals_a_read_of_the_store(store):
    book = _book(store)
    assert book.view_from == "store"
    book.reevaluate(RISK, TIMELINE, AS_OF)
    person = int(book.ids[7])
    _commit(store, book, [_entries(person, AS_OF - 600, AS_OF - 300)])  # the overlay is written apart
    book.reevaluate(RISK.with_version(2), TIMELINE, AS_OF)
    book.close()
    again = _book(store)
    assert again.view_from == "snapshot"
    _assert_view_is_store(again, store)
    for got, want in zip(region_index_of(again.view.state.base), _region(again), strict=True):
        np.testing.assert_array_equal(got, want)
    assert _published(again) == _published(book)
    assert again.high_water_mark == book.high_water_mark
    assert _statuses(again).equals(_statuses(book))
    # Changes published after the snapshot come from the change log.
    again.reevaluate(RISK.with_version(3), TIMELINE, AS_OF + 3 * 86400)
    changed = _published(again)
    again.snapshot_path = None  # a crash: no snapshot at close
    again.close()
    third = _book(store, AS_OF + 3 * 86400)  # three days on: events left the window, the index is rebuilt
    assert third.view_from == "snapshot" and _published(third) == changed
    _assert_view_is_store(third, store, AS_OF + 3 * 86400)
    for got, want in zip(region_index_of(third.view.state.base), _region(third), strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_snapshot_older_than_the_store_is_not_used_for_the_view(store, caplog):
    book = _book(store)
    book.reevaluate(RISK, TIMELINE, AS_OF)
    book.close()
    person = int(book.ids[3])
    store.record_entries(_entries(person, AS_OF - 120)[1])  # written without the server: the snapshot misses it
    again = _book(store)
    assert again.view_from == "store"
    _assert_view_is_store(again, store)
    assert _published(again) == _published(book)  # the statuses still come from the snapshot's arrays


@pytest.mark.parametrize("damage", ["truncated", "header", "footer", "index", "version", "empty"])
def test_a_damaged_snapshot_falls_back_to_the_store_with_one_warning(store, caplog, damage, monkeypatch):
    book = _book(store)
    book.reevaluate(RISK, TIMELINE, AS_OF)
    book.close()
    path = book.snapshot_path
    assert path is not None
    data = open(path, "rb").read()
    if damage == "truncated":
        open(path, "wb").write(data[: len(data) // 2])
    elif damage == "header":
        open(path, "wb").write(data[:64] + bytes(range(256)) * 8 + data[64 + 2048 :])
    elif damage == "footer":  # the Arrow file's footer
        open(path, "wb").write(data[:-400] + bytes(range(200)) * 2)
    elif damage == "index":  # the region index (in the base file) does not cover the visits
        [base] = _base_files(path)
        data = open(base, "rb").read()
        at = 4096 + 8 * N_CODES  # its last offset
        open(base, "wb").write(data[:at] + np.int64(7).tobytes() + data[at + 8 :])
    elif damage == "empty":
        open(path, "wb").close()
    else:
        monkeypatch.setattr(snapshot, "FORMAT_VERSION", snapshot.FORMAT_VERSION + 1)
    with caplog.at_level(logging.INFO, logger="healthcode.live.snapshot"):
        again = _book(store)
    assert again.view_from == "store"
    _assert_view_is_store(again, store)
    assert _published(again) == _published(book)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "snapshot_unused" in warnings[0], warnings
    assert str(int(book.ids[0])) not in warnings[0]
    again.close()  # the next checkpoint writes a usable pair again
    assert snapshot.read(path) is not None and len(_base_files(path)) == 1


def _base_files(path: str | None) -> list[str]:
    assert path is not None
    return sorted(p for p in glob.glob(glob.escape(path) + ".base-*") if ".tmp-" not in p)


def _written(caplog) -> dict:
    """The fields of the last snapshot_written event logged."""
    lines = [r.getMessage() for r in caplog.records if "snapshot_written" in r.getMessage()]
    assert lines, "no snapshot_written event"
    return dict(json.loads(lines[-1][lines[-1].index("{") :]))


def _fresh(store: Store, as_of: int = AS_OF) -> pa.Table:
    """Every stored person's status, evaluated from a read of the store (by person id)."""
    return engine.evaluate(store.population(as_of, LOOKBACK, future=True).sort_by("person_id"), RISK, TIMELINE,
                           as_of, 1)  # fmt: skip


def _restart_equals(book: StatusBook, store: Store) -> None:
    again = _book(store)
    assert again.view_from == "snapshot"
    _assert_view_is_store(again, store)
    assert _published(again) == _published(book)
    assert _statuses(again).equals(_as_status(_fresh(store)))
    again.snapshot_path = None  # leave the files on disk as they are
    again.close()


def test_a_checkpoint_writes_the_base_once_per_base_and_a_compaction_a_new_one(store, caplog):
    """A checkpoint after ingest of the same base writes only the small snapshot file (the base file is not touched);
    after a compaction it writes a new base file and deletes the old one; a restart after each gives the statuses
    of a fresh evaluation of the store."""
    caplog.set_level(logging.INFO, logger="healthcode.live.statusbook")
    book = _book(store)
    book.reevaluate(RISK, TIMELINE, AS_OF)
    assert book.write_snapshot()
    path = book.snapshot_path
    [base] = _base_files(path)
    first = _written(caplog)
    assert first["base_bytes"] == os.path.getsize(base) and first["bytes"] == first["base_bytes"] + os.path.getsize(
        path
    )  # fmt: skip
    before = os.stat(base)
    person = int(book.ids[5])
    _commit(store, book, [_entries(person, AS_OF - 900)])
    book.reevaluate(RISK.with_version(2), TIMELINE, AS_OF)
    assert book.write_snapshot()
    assert _base_files(path) == [base]
    after = os.stat(base)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    second = _written(caplog)
    assert second["base_bytes"] == 0 and second["bytes"] == os.path.getsize(path) < os.path.getsize(base) // 10
    _restart_equals(book, store)
    # A compaction makes a new base: the next checkpoint writes its file and deletes the old one.
    book.view.compact(AS_OF)
    _commit(store, book, [_entries(person, AS_OF - 800)])
    book.reevaluate(RISK.with_version(3), TIMELINE, AS_OF)
    assert book.write_snapshot()
    [new_base] = _base_files(path)
    assert new_base != base and _written(caplog)["base_bytes"] == os.path.getsize(new_base)
    _restart_equals(book, store)
    # A restart from the snapshot keeps its base: its first checkpoint writes no base file either.
    book.close()
    again = _book(store)
    _commit(store, again, [_entries(person, AS_OF - 700)])
    again.reevaluate(RISK.with_version(4), TIMELINE, AS_OF)
    assert again.write_snapshot()
    assert _base_files(path) == [new_base] and _written(caplog)["base_bytes"] == 0
    again.close()
    _restart_equals(again, store)


@pytest.mark.parametrize("pair", ["base missing", "another base", "orphan base beside"])
def test_a_snapshot_whose_base_file_is_not_its_own_is_ignored_with_a_warning(store, caplog, pair):
    """The small snapshot file names its base file; one missing or holding another base is never paired with it
    (a warning, the store read instead).  A base file written after the pair (a writer killed before the small
    file) leaves the pair in use, and the next checkpoint deletes it."""
    book = _book(store)
    book.reevaluate(RISK, TIMELINE, AS_OF)
    assert book.write_snapshot()
    path = book.snapshot_path
    assert path is not None
    [base] = _base_files(path)
    old_base = open(base, "rb").read()
    if pair == "base missing":
        os.unlink(base)
    elif pair == "another base":  # the pair of a later checkpoint after a compaction, with the old base's bytes
        book.view.compact(AS_OF)
        book.reevaluate(RISK.with_version(2), TIMELINE, AS_OF)
        assert book.write_snapshot()
        [base] = _base_files(path)
        open(base, "wb").write(old_base)
    else:
        snapshot.write_base(path, book.view.state.base, _region(book))
        assert len(_base_files(path)) == 2
    book.snapshot_path = None
    book.close()
    with caplog.at_level(logging.INFO, logger="healthcode.live.snapshot"):
        again = _book(store)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    _assert_view_is_store(again, store)
    assert _published(again) == _published(book)
    if pair == "orphan base beside":
        assert again.view_from == "snapshot" and not warnings
        _commit(store, again, [_entries(int(again.ids[2]), AS_OF - 500)])
        again.close()
        assert _base_files(path) == [base]  # the orphan deleted, the pair's base kept
        return
    assert again.view_from == "store"
    assert len(warnings) == 1 and "snapshot_unused" in warnings[0] and "base file" in warnings[0], warnings
    again.close()
    assert snapshot.read(path) is not None and len(_base_files(path)) == 1


def _nat(person: int, sample: int, report: int) -> tuple[str, pa.Table]:
    ts = pa.timestamp("s", "UTC")
    return "nat_results", pa.table({"person_id": pa.array([person], pa.uint64()), "sample_time": pa.array([sample], ts),
                                    "report_time": pa.array([report], ts)})  # fmt: skip


@pytest.mark.parametrize("when", ["stored before the view was built", "ingested while the view ran"])
def test_events_in_the_future_when_the_snapshot_was_written_are_picked_up_once_due(store, when):
    """A future-dated entry is in the view at once (evaluation ignores it until its time); a NAT result reported
    later than the view's clock is left out, so the snapshot claims completeness only up to just before it, and a
    restart from the snapshot once it is due reads it from the store."""
    start = AS_OF + 3 * 86400  # the generated population has no events after this
    assert store.first_nat_after(start) is None
    person, other = (int(p) for p in store.table("persons")["person_id"].to_numpy()[[11, 12]])
    due = start + 1800
    if when == "stored before the view was built":
        store.record_entries(_entries(person, due)[1])
        store.record_nat_results(_nat(person, due - 600, due)[1])
        book = _book(store, start)
    else:
        book = _book(store, start)
        _commit(store, book, [_entries(person, due), _nat(person, due - 600, due)], now=start)
    row = book.view.state.rows(book.rows_of(np.array([person], dtype=np.uint64)))
    assert due in [t.timestamp() for t in row.column("entry_times").to_pylist()[0]]  # kept already
    report = row.column("nat_report_time")[0].as_py()
    assert report is None or report.timestamp() < due  # not reported yet as of the view's clock: left out
    _commit(store, book, [_entries(other, start + 4000)], now=start + 5000)  # the view's clock moves on
    _, now, complete_to = book.view.current()
    assert now == start + 5000 and complete_to == due - 1
    book.close()
    later = start + 7200
    again = _book(store, later)
    assert again.view_from == "snapshot"
    _assert_view_is_store(again, store, later)
    row = again.view.state.rows(again.rows_of(np.array([person], dtype=np.uint64)))
    assert due in [t.timestamp() for t in row.column("entry_times").to_pylist()[0]]
    assert row.column("nat_report_time")[0].as_py().timestamp() == due


def test_a_snapshot_of_another_window_or_a_later_instant_is_not_used(store):
    import dataclasses

    book = _book(store, AS_OF + 86400)
    book.close()
    assert _book(store, AS_OF).view_from == "store"  # taken later than this start's clock
    book = _book(store)
    book.close()
    first = TIMELINE.policies[0]
    wider = dataclasses.replace(first, risk=dataclasses.replace(first.risk, lookback_days=LOOKBACK + 5))
    other = dataclasses.replace(TIMELINE, policies=(wider, *TIMELINE.policies[1:]))
    assert StatusBook(store, other, AS_OF, kernel_threads=1).view_from == "store"


def test_the_population_mark_changes_with_every_population_write(store):
    marks = [store.population_mark()]
    person = int(store.table("persons")["person_id"][0].as_py())
    row = store.table("persons").slice(0, 1).select(["person_id", "home_region", "registered_commuter", "base_color"])
    store.upsert_persons(row)  # the same values: nothing changes
    assert store.population_mark() == marks[-1]
    store.upsert_persons(row.set_column(3, "base_color", pa.array([(row["base_color"][0].as_py() + 1) % 3], pa.int8())))
    marks.append(store.population_mark())
    store.record_entries(_entries(person, AS_OF - 5)[1])
    marks.append(store.population_mark())
    store.record_visits(pa.table({
        "person_id": pa.array([person], pa.uint64()), "region": pa.array([110101], pa.int32()),
        "day": pa.array([18960], pa.date32()),
    }))  # fmt: skip
    marks.append(store.population_mark())
    store.record_nat_results(pa.table({
        "person_id": pa.array([person], pa.uint64()), "report_time": pa.array([AS_OF - 9], pa.timestamp("s", "UTC")),
        "sample_time": pa.array([None], pa.timestamp("s", "UTC")),
    }))  # fmt: skip
    marks.append(store.population_mark())
    assert len(set(marks)) == len(marks), marks


def test_the_population_mark_carried_forward_over_event_groups_equals_the_stores(store):
    """After a group of events the book carries the store's population mark forward from the group's counts
    instead of asking the store; it always equals what the store says (persons groups ask the store)."""
    book = _book(store)
    person = int(store.table("persons")["person_id"][0].as_py())
    for i in range(4):
        group = [_entries(person, AS_OF - 100 - i, AS_OF - 100 - i), _nat(person, AS_OF - 999, AS_OF - 500 - i)]
        items = [(kind, Store.prepare_ingest(kind, table)) for kind, table in group]
        counts = store.ingest_group(items, prepared=True, known=book.knows,
                                    seen=lambda k, e: book.stored_events(k, e, AS_OF))  # fmt: skip
        inserted: dict[str, int] = {}
        for (kind, _), c in zip(items, counts, strict=True):
            inserted[kind] = inserted.get(kind, 0) + c.inserted
        book.ingested(items, AS_OF, inserted)
        assert book._marked == (book.view.state.generation, store.population_mark())
    book.close()


def test_a_snapshot_keeps_the_overlay_and_new_persons_apart_from_the_base(store):
    """The checkpoint writes the view as it is (base, overlay, persons stored after the base): nothing merged at
    write time, and a restart from it gives the same rows, slots and statuses as the running view."""
    book = _book(store)
    book.reevaluate(RISK, TIMELINE, AS_OF)
    new_person = 10**15 + 7
    persons = pa.table({"person_id": pa.array([new_person], pa.uint64()), "home_region": pa.array([120104], pa.int32()),
                        "registered_commuter": pa.array([True]), "base_color": pa.array([0], pa.int8())})  # fmt: skip
    old_person = int(book.ids[3])
    _commit(store, book, [("persons", persons), _entries(new_person, AS_OF - 7200), _entries(old_person, AS_OF - 60)])
    book.reevaluate(RISK.with_version(2), TIMELINE, AS_OF)
    state = book.view.state
    assert len(state.overlay_slots) == 2 and len(state.extra_ids) == 1  # an overlay and a new person
    assert book.write_snapshot()
    snap = snapshot.read(book.snapshot_path)
    assert snap is not None and snap.rows.num_rows == state.n_base and snap.overlay.num_rows == 2
    assert list(snap.extra_ids) == [new_person]
    book.close()
    again = _book(store)
    assert again.view_from == "snapshot"
    _assert_view_is_store(again, store)
    assert _published(again) == _published(book)
    assert _statuses(again).equals(_statuses(book))
    np.testing.assert_array_equal(again.ids, book.ids)


def test_asking_for_the_checkpoint_now_writes_one_that_waits_for_a_quiet_moment(store, caplog):
    """Many publishes start a checkpoint that waits for a quiet moment; an operator's request (SIGUSR1) meanwhile
    makes it write now instead of being ignored."""
    caplog.set_level(logging.INFO, logger="healthcode.live.statusbook")
    book = StatusBook(store, TIMELINE, AS_OF, kernel_threads=1, compact_rows=0, checkpoint_changes=1)
    book.checkpoint_quiet_seconds = 3600.0
    book.reevaluate(RISK, TIMELINE, AS_OF)
    assert book._checkpointing is not None and book._checkpointing.is_alive()  # waiting for an hour of quiet
    book.checkpoint_now()
    book._checkpointing.join(30)
    assert not book._checkpointing.is_alive()
    assert _written(caplog)["high_water_mark"] == book.high_water_mark
    assert snapshot.read(book.snapshot_path) is not None
    book.close()


def test_a_base_file_deleted_under_a_running_server_is_written_again(store):
    book = _book(store)
    book.reevaluate(RISK, TIMELINE, AS_OF)
    assert book.write_snapshot()
    [base] = _base_files(book.snapshot_path)
    os.unlink(base)
    book.close()  # nothing changed since, but the pair on disk is not whole any more
    [again] = _base_files(book.snapshot_path)
    assert again != base
    _restart_equals(book, store)


def test_a_lookup_makes_the_overlays_kernel_batch_once_then_lookups_are_cheap(store):
    """With ingested rows in the overlay, the first lookup (in the pool) prepares the overlay for the kernel even
    when it asks for base persons only; from then on lookups of a few ids run where they are asked."""
    book = _book(store)
    person = int(book.ids[3])
    _commit(store, book, [_entries(person, AS_OF - 600)])
    assert not book.cheap_lookup(1)  # the overlay is not prepared yet
    base_only = np.array([int(book.ids[5])], dtype=np.uint64)
    book.statuses(base_only, engine.make_context(RISK, TIMELINE, AS_OF))
    assert book.cheap_lookup(1)
    assert not book.cheap_lookup(10_000)  # many ids: the pool's
