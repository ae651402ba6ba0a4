"""Bulk load of a SPEC §3 population into the store: rows checked for SPEC §4.1 validity, exploded, appended.

Each batch is exploded once (:func:`healthcode.rules.flat.explode`); the rows SPEC §4.1 calls invalid are skipped
and counted by reason, and the valid rows become the store's persons, NAT, entry and visit rows, written in one
transaction per batch.

Replays store nothing new without a unique index: an event belongs to one person, so the events of persons the store
did not hold before the batch are appended as they are (after the batch's own duplicates are dropped: none when the
batch's person ids are distinct and each list is strictly increasing, as checked here, else a ``DISTINCT``), and
only the events of persons already stored (a later load of the same file, a person in two batches) are checked
against the tables with an anti-join.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from healthcode.errors import StoreError
from healthcode.rules import columns, sets
from healthcode.rules.flat import distinct_entries, distinct_visits, explode
from healthcode.rules.regions import valid_codes
from healthcode.store.connection import Connection
from healthcode.store.writes import insert_events, upsert

#: Why a population row was skipped (SPEC §4.1), in the order the checks apply; each row counts once.
SKIP_REASONS = (
    "person_id is null",
    "home_region is null or not a valid code",
    "base_color is null or not 0/1/2",
    "a visit is null or has a null or invalid region or a null day",
    "an entry instant is null",
)


@dataclass
class LoadSummary:
    """What :meth:`Store.load_population` did.  Counts are rows newly stored (replays add nothing)."""

    rows: int = 0
    persons: int = 0
    persons_updated: int = 0
    nat_results: int = 0
    entries: int = 0
    visits: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


def _all(ok: np.ndarray | None, n: int) -> np.ndarray:
    return np.ones(n, dtype=bool) if ok is None else ok


def population_rows(batch: pa.RecordBatch) -> tuple[dict[str, pa.Table], list[int], bool]:
    """The store rows of the valid population rows, how many rows each skip reason took, and whether the events
    are distinct already: when the batch's person ids are distinct, each row's repeated list elements are dropped
    here (by a packed (row, event) key), so no event appears twice; otherwise the writer drops them."""
    f = explode(batch)
    n = len(f)
    bad_visit = ~_all(f.v_ok, len(f.v_row)) | ~valid_codes(f.v_region)
    checks = [
        ~_all(f.ids_ok, n),
        ~_all(f.home_ok, n) | ~valid_codes(f.home),
        ~_all(f.color_ok, n) | (f.color < 0) | (f.color > 2),
        np.bincount(f.v_row[bad_visit], minlength=n)[:n] > 0,
        np.bincount(f.e_row[~_all(f.e_ok, len(f.e_row))], minlength=n)[:n] > 0,
    ]
    invalid = np.zeros(n, dtype=bool)
    skipped = []
    for bad in checks:
        skipped.append(int(np.count_nonzero(bad & ~invalid)))
        invalid |= bad
    ok = ~invalid

    persons = pa.table(
        {
            "_row": pa.array(np.arange(n, dtype=np.int64)),
            "person_id": pa.array(f.ids, type=pa.uint64()),
            "home_region": pa.array(f.home, type=pa.int32()),
            "registered_commuter": pa.array(f.registered, type=pa.bool_()),
            "base_color": pa.array(f.color, type=pa.int8()),
        }
    ).filter(pa.array(ok))
    nat_keep = ok & f.nat_report_ok
    nat = pa.table(
        {
            "person_id": pa.array(f.ids[nat_keep], type=pa.uint64()),
            "sample_time": pa.array(f.nat_sample[nat_keep], type=pa.int64(), mask=~f.nat_sample_ok[nat_keep]),
            "report_time": pa.array(f.nat_report[nat_keep], type=pa.int64()),
        }
    )
    e_keep = ok[f.e_row]
    v_keep = ok[f.v_row]
    e_row, e_t = f.e_row[e_keep], f.e_t[e_keep]
    v_row, v_region, v_day = f.v_row[v_keep], f.v_region[v_keep], f.v_day[v_keep]
    distinct = pc.count_distinct(persons.column("person_id")).as_py() == persons.num_rows
    if distinct:
        got_e = distinct_entries(e_row, e_t)
        got_v = distinct_visits(v_row, v_region, v_day)
        distinct = got_e is not None and got_v is not None
        if got_e is not None and got_v is not None:
            (e_row, e_t), (v_row, v_region, v_day) = got_e, got_v
    entries = pa.table({"person_id": pa.array(f.ids[e_row], type=pa.uint64()), "t": pa.array(e_t, type=pa.int64())})
    visits = pa.table(
        {
            "person_id": pa.array(f.ids[v_row], type=pa.uint64()),
            "region": pa.array(v_region, type=pa.int32()),
            "day": pa.array(v_day, type=pa.int32()).cast(pa.date32()),
        }
    )
    return {"persons": persons, "nat": nat, "entries": entries, "visits": visits}, skipped, distinct


def _population_batches(data: Any) -> Iterator[pa.RecordBatch]:
    if isinstance(data, pa.RecordBatch):
        yield data
    elif isinstance(data, pa.Table):
        yield from data.to_batches()
    elif isinstance(data, pa.RecordBatchReader):
        yield from data
    elif isinstance(data, Iterable):
        for batch in data:
            if not isinstance(batch, pa.RecordBatch):
                raise StoreError(f"population batches must be pyarrow RecordBatches, not {type(batch).__name__}")
            yield batch
    else:
        raise StoreError(
            "population must be a pyarrow Table, RecordBatch or an iterable of RecordBatches, "
            f"not {type(data).__name__}"
        )


def _last_per_person(persons: pa.Table) -> pa.Table:
    """One row per person id, the last of the batch (as two upserts in a row would leave it)."""
    ids = persons.column("person_id").to_numpy()
    order = np.argsort(ids, kind="stable")
    last = np.ones(len(order), dtype=bool)
    last[:-1] = ids[order][1:] != ids[order][:-1]
    return persons.take(pa.array(np.sort(order[last]), pa.int64()))


def _write_batch(
    db: Connection, parts: dict[str, pa.Table], distinct: bool, maybe_stored: bool, held: np.ndarray | None = None
) -> tuple[int, ...]:
    """One batch's rows in the open transaction: (persons inserted, updated, NAT results, entries, visits stored).
    ``distinct``: the batch's persons and events are distinct already (:func:`population_rows`).  ``held``: the
    batch's persons the store holds already, when the caller knows (else asked of the store if ``maybe_stored``)."""
    persons = parts["persons"].drop_columns(["_row"])
    if not distinct:
        persons = _last_per_person(persons)
    if held is None:
        held = np.zeros(0, dtype=np.uint64)
        if maybe_stored and persons.num_rows:
            view = db.register(persons.select(["person_id"]))
            try:
                held = db.con.sql(f"SELECT person_id FROM {view} SEMI JOIN persons USING (person_id)").fetchnumpy()[
                    "person_id"
                ]
            finally:
                db.unregister(view)
    view = db.register(persons)
    try:
        if len(held):
            inserted, _, updated = upsert(db, view, persons.num_rows)
        else:
            inserted = db.count(
                "INSERT INTO persons SELECT person_id, home_region, registered_commuter, base_color, "
                f"current_timestamp FROM {view}"
            )
            updated = 0
    finally:
        db.unregister(view)
    held_ids = np.asarray(held, dtype=np.uint64)
    counts = []
    for kind, name in (("nat_results", "nat"), ("entries", "entries"), ("visits", "visits")):
        events = parts[name]
        # Events of persons stored before this batch are checked against the table; the others are all new.
        of_held = sets.isin(events.column("person_id").to_numpy(), held_ids)
        n = int(insert_events(db, kind, events.filter(pa.array(~of_held)), check=False, distinct=not distinct))
        if of_held.any():
            n += int(insert_events(db, kind, events.filter(pa.array(of_held)), distinct=not distinct))
        counts.append(n)
    return (inserted, updated, *counts)


def load_population(db: Connection, data: Any, progress: Callable[[int], None] | None = None) -> LoadSummary:
    """Load a population, one transaction per batch (see :meth:`Store.load_population`).

    Two stages overlap: while one thread writes batch k (DuckDB, which releases the GIL), this one reads and
    prepares batch k + 1 (Parquet decoding, validation, explode: numpy and Arrow work).  Batches are written in
    order, one transaction each; the first failure stops the load (earlier batches stay stored)."""
    summary = LoadSummary()
    maybe_stored = db.count("SELECT count(*) FROM persons") > 0
    # Into an empty store, the persons held already are those of earlier batches of this load: kept here sorted
    # (a merge per batch) instead of a semi-join against the growing table per batch (quadratic at 22M).
    loaded: np.ndarray | None = None if maybe_stored else np.zeros(0, dtype=np.uint64)
    pending: tuple[Future[tuple[int, ...]], int] | None = None

    def finish(job: tuple[Future[tuple[int, ...]], int]) -> None:
        persons, updated, nat, entries, visits = job[0].result()
        summary.persons += persons
        summary.persons_updated += updated
        summary.nat_results += nat
        summary.entries += entries
        summary.visits += visits
        if progress is not None:
            progress(job[1])

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="healthcode-load") as writer:
        try:
            for batch in _population_batches(data):
                columns.check_schema(batch.schema)
                columns.validate(batch)
                parts, skipped, distinct = population_rows(batch)
                summary.rows += batch.num_rows
                for reason, k in zip(SKIP_REASONS, skipped, strict=True):
                    summary.skipped[reason] += k
                if pending is not None:
                    finish(pending)
                held = None
                if loaded is not None:
                    ids = sets.unique(parts["persons"].column("person_id").to_numpy())
                    seen = sets.positions(loaded, ids) >= 0  # `loaded` is ascending and distinct
                    held = ids[seen]
                    loaded = np.sort(np.concatenate([loaded, ids[~seen]]), kind="stable")  # two sorted runs: a merge
                write = functools.partial(_write_batch, db, parts, distinct, maybe_stored, held)
                pending = (writer.submit(db.transaction, write), batch.num_rows)
                maybe_stored = maybe_stored or parts["persons"].num_rows > 0
            if pending is not None:
                finish(pending)
                pending = None
        finally:
            if pending is not None:  # a later batch failed to read: the one being written still completes
                pending[0].exception()
    return summary
