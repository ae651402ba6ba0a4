"""Ingest writes: persons upserts and event appends, for one call or a group of calls in one transaction.

Input comes validated (:mod:`healthcode.store.validate`).  The tables have no unique index (schema 3), so an event
is stored once by construction: the distinct events of the input are appended, except those already stored.  An
event belongs to one person, so only events the store might hold need a check, and the caller may say which ones
it knows about (``seen``, the server's in-memory view: exact inside its window); the rest are checked with an
anti-join against the table (``NOT EXISTS``), which DuckDB prunes by the tables' zone maps when the events are
recent.  A group (:func:`ingest_group`, the service's group commit) counts per call as if the calls ran one after
another, and a call whose rows name an unknown person fails alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from healthcode.errors import StoreError
from healthcode.rules import sets
from healthcode.rules.flat import filled, first_of_runs, valid_mask
from healthcode.store.connection import Connection, one
from healthcode.store.validate import CLEANERS, INGEST_KINDS, row_error

#: What a ``seen`` callback answers per event: stored already (a replay), surely not stored, or not known (the
#: store checks it against its table).
STORED, NEW, UNKNOWN = 1, 0, -1


@dataclass(frozen=True)
class IngestCounts:
    """What one ingest call did: rows newly stored, rows already there (``updated``: persons whose values changed)."""

    inserted: int
    already_present: int
    updated: int = 0


#: The columns that make an event of each table (an event is stored once).
EVENT_KEYS = {
    "nat_results": ("person_id", "sample_time", "report_time"),
    "entries": ("person_id", "t"),
    "visits": ("person_id", "region", "day"),
}


def _event_insert(kind: str, view: str, check: bool, returning: bool, distinct: bool = True) -> str:
    """The statement appending the distinct events of ``view`` (columns ``EVENT_KEYS[kind]``) to ``kind``: all of
    them, or (``check``) those not stored yet (a NAT result's null sample time matches a null one).  ``distinct``
    False: the caller knows ``view`` holds no event twice."""
    keys = EVENT_KEYS[kind]
    cols = ", ".join(keys)
    sql = f"INSERT INTO {kind} SELECT {'DISTINCT ' if distinct else ''}{cols} FROM {view} i"
    if check:
        match = " AND ".join(
            f"s.{k} IS NOT DISTINCT FROM i.{k}" if k == "sample_time" else f"s.{k} = i.{k}" for k in keys
        )
        sql += f" WHERE NOT EXISTS (SELECT 1 FROM {kind} s WHERE {match})"
    return sql + (f" RETURNING {cols}" if returning else "")


#: Up to this many rows are appended as one ``INSERT ... VALUES`` statement: registering an Arrow table with
#: DuckDB costs more than the statement itself for the few rows of a typical group of single-event calls.
SMALL_INSERT_ROWS = 256


def _values(table: pa.Table) -> str:
    """A ``VALUES`` list of the rows of an all-integer-or-date table (nulls as NULL): numbers only, no text from
    the input reaches the SQL."""
    columns: list[list[str]] = []
    for col in table.columns:
        if pa.types.is_date(col.type):
            days = col.cast(pa.int32()).to_pylist()
            columns.append(["NULL" if d is None else f"DATE '{np.datetime64(int(d), 'D')}'" for d in days])
        else:
            if not pa.types.is_integer(col.type):
                raise TypeError(f"column {col.type} cannot go into a VALUES list")
            columns.append(["NULL" if v is None else str(int(v)) for v in col.to_pylist()])
    return ", ".join(f"({', '.join(row)})" for row in zip(*columns, strict=True))


def insert_events(
    db: Connection,
    kind: str,
    events: pa.Table,
    check: bool = True,
    returning: bool = False,
    distinct: bool = True,
) -> pa.Table | int:
    """Append the distinct events of ``events`` (inside the open transaction): those not stored yet (``check``,
    an anti-join against the table), or all of them (the caller knows none is stored).  Returns the rows appended
    (``returning``) or their number.  ``distinct`` False: the caller knows ``events`` holds no event twice (no
    ``DISTINCT`` then)."""
    keys = list(EVENT_KEYS[kind])
    if events.num_rows == 0:
        return events.select(keys) if returning else 0
    if not check and not returning and not distinct and events.num_rows <= SMALL_INSERT_ROWS:
        return db.count(f"INSERT INTO {kind} VALUES {_values(events.select(keys))}")
    view = db.register(events.select(keys))
    try:
        sql = _event_insert(kind, view, check, returning, distinct)
        return db.con.sql(sql).to_arrow_table() if returning else db.count(sql)
    finally:
        db.unregister(view)


def _first_unknown(tagged: pa.Table, stored: np.ndarray) -> list[tuple[int, int, int]]:
    """(item, first row, its person id) of each item (``_sub``) with a row whose person is not ``stored``."""
    pids = tagged.column("person_id").to_numpy()
    bad = np.flatnonzero(~stored)
    if not len(bad):
        return []
    subs = tagged.column("_sub").to_numpy()[bad]
    rows = tagged.column("_row").to_numpy()[bad]
    order = np.lexsort((rows, subs))
    first = order[np.r_[True, subs[order][1:] != subs[order][:-1]]]
    return list(zip(subs[first].tolist(), rows[first].tolist(), pids[bad][first].tolist(), strict=True))


def _first_of_each(events: pa.Table, keys: tuple[str, ...]) -> np.ndarray:
    """True at the first row of each distinct event (by ``keys``; a null equals a null), in row order."""
    n = events.num_rows
    if n < 2:
        return np.ones(n, dtype=bool)
    cols: list[np.ndarray] = []
    for k in keys:
        col = events.column(k)
        if pa.types.is_date(col.type):
            col = col.cast(pa.int32())
        if col.null_count:
            cols.append(valid_mask(col))
        cols.append(filled(col, col.type.to_pandas_dtype()))
    order = np.lexsort(cols[::-1])  # stable: equal events keep their row order
    first = first_of_runs(*(c[order] for c in cols))
    out = np.zeros(n, dtype=bool)
    out[order[first]] = True
    return out


def _credit(tagged: pa.Table, new: pa.Table, keys: tuple[str, ...]) -> dict[int, int]:
    """How many of the newly stored rows ``new`` each item (``_sub``) gets: a row goes to its first occurrence in
    ``tagged`` (ordered by item, then row).  Null key values match each other (an extra is-null key column)."""

    def keyed(t: pa.Table) -> tuple[pa.Table, list[str]]:
        names = []
        for k in keys:
            col = t.column(k)
            if col.null_count:
                t = t.set_column(t.column_names.index(k), k, pc.fill_null(col, pa.scalar(0, col.type)))
                t = t.append_column(f"{k}__null", pc.is_null(col))
                names.append(f"{k}__null")
            names.append(k)
        return t, names

    firsts = tagged.select([*keys, "_sub"]).group_by(list(keys), use_threads=False).aggregate([("_sub", "first")])
    firsts, names = keyed(firsts)
    new, new_names = keyed(new.select(list(keys)))
    for name in set(names) - set(new_names):
        new = new.append_column(name, pa.array(np.zeros(new.num_rows, dtype=bool)))
    for name in set(new_names) - set(names):
        firsts = firsts.append_column(name, pa.array(np.zeros(firsts.num_rows, dtype=bool)))
    names = sorted(set(names) | set(new_names))
    joined = new.join(firsts, names, join_type="inner", use_threads=False)
    per = joined.group_by("_sub_first", use_threads=False).aggregate([("_sub_first", "count")])
    return dict(zip(per.column(0).to_pylist(), per.column(1).to_pylist(), strict=True))


def _check_known(db: Connection, view: str) -> None:
    row = one(db.con.execute(
        f"SELECT i._row, i.person_id FROM {view} i ANTI JOIN persons p ON i.person_id = p.person_id "
        "ORDER BY i._row LIMIT 1"
    ))  # fmt: skip
    if row is not None:
        raise row_error(int(row[0]), "person_id", f"person {row[1]} is not in the store (upsert_persons first)")


def upsert(db: Connection, view: str, n: int) -> tuple[int, int, int]:
    """Upsert from a view with unique person ids: (inserted, already present, updated)."""
    updated = db.count(
        f"UPDATE persons SET home_region = i.home_region, registered_commuter = i.registered_commuter, "
        f"base_color = i.base_color, updated_at = current_timestamp FROM {view} i "
        "WHERE persons.person_id = i.person_id AND (persons.home_region <> i.home_region "
        "OR persons.registered_commuter <> i.registered_commuter OR persons.base_color <> i.base_color)"
    )
    inserted = db.count(
        "INSERT INTO persons SELECT i.person_id, i.home_region, i.registered_commuter, i.base_color, "
        f"current_timestamp FROM {view} i ANTI JOIN persons p ON i.person_id = p.person_id"
    )
    return inserted, n - inserted, updated


def upsert_persons(db: Connection, clean: pa.Table) -> IngestCounts:
    """Upsert validated persons in one transaction."""

    def work() -> IngestCounts:
        view = db.register(clean)
        try:
            return IngestCounts(*upsert(db, view, len(clean)))
        finally:
            db.unregister(view)

    return db.transaction(work)  # type: ignore[no-any-return]


def append(db: Connection, clean: pa.Table, kind: str) -> IngestCounts:
    """Append validated events of ``kind`` in one transaction (every person must be stored)."""

    def work() -> IngestCounts:
        view = db.register(clean)
        try:
            _check_known(db, view)
        finally:
            db.unregister(view)
        inserted = int(insert_events(db, kind, clean))  # type: ignore[arg-type]
        return IngestCounts(inserted, len(clean) - inserted)

    return db.transaction(work)  # type: ignore[no-any-return]


def prepare(kind: str, data: pa.Table | pa.RecordBatch) -> pa.Table:
    """The validation of one ingest call of ``kind`` (see :meth:`Store.prepare_ingest`)."""
    if kind not in CLEANERS:
        raise StoreError(f"unknown ingest kind {kind!r}; the kinds are {', '.join(INGEST_KINDS)}")
    return CLEANERS[kind](data)


def ingest_group(
    db: Connection,
    items: list[tuple[str, pa.Table | pa.RecordBatch]],
    prepared: bool,
    known: Callable[[np.ndarray], np.ndarray | None] | None,
    seen: Callable[[str, pa.Table], np.ndarray | None] | None,
) -> list[IngestCounts | StoreError]:
    """Several ingest calls in one transaction, counted per call (see :meth:`Store.ingest_group`)."""
    results: list[IngestCounts | StoreError | None] = [None] * len(items)
    cleaned: dict[int, pa.Table] = {}
    for i, (kind, data) in enumerate(items):
        if prepared and kind in CLEANERS and isinstance(data, pa.Table):
            cleaned[i] = data
            continue
        try:
            cleaned[i] = prepare(kind, data)
        except StoreError as exc:
            results[i] = exc
    if cleaned:

        def work() -> dict[int, IngestCounts | StoreError]:
            out: dict[int, IngestCounts | StoreError] = {}
            for i, clean in cleaned.items():
                if items[i][0] == "persons":
                    view = db.register(clean)
                    try:
                        out[i] = IngestCounts(*upsert(db, view, len(clean)))
                    finally:
                        db.unregister(view)
            upserted = [
                cleaned[i].column("person_id").to_numpy() for i, res in out.items()
                if items[i][0] == "persons" and isinstance(res, IngestCounts)
            ]  # fmt: skip
            group_ids = sets.unique(np.concatenate(upserted)) if upserted else np.zeros(0, dtype=np.uint64)

            def stored(pids: np.ndarray) -> np.ndarray | None:
                answer = None if known is None else known(pids)
                return None if answer is None else np.asarray(answer, dtype=bool) | sets.isin(pids, group_ids)

            for kind in EVENT_KEYS:
                subs = [i for i in cleaned if items[i][0] == kind]
                if subs:
                    out.update(_group_events(db, kind, [(i, cleaned[i]) for i in subs], stored, seen))
            return out

        for i, res in db.transaction(work).items():
            results[i] = res
    return [r if r is not None else StoreError("internal: item not processed") for r in results]


def _group_events(
    db: Connection,
    kind: str,
    subs: list[tuple[int, pa.Table]],
    stored: Callable[[np.ndarray], np.ndarray | None] | None = None,
    seen: Callable[[str, pa.Table], np.ndarray | None] | None = None,
) -> dict[int, IngestCounts | StoreError]:
    """Append the event items of one kind together (inside the open transaction); counts per item."""
    out: dict[int, IngestCounts | StoreError] = {}
    tagged = pa.concat_tables([t for _, t in subs])
    sub_of_row = np.repeat(np.array([i for i, _ in subs], dtype=np.int64), [t.num_rows for _, t in subs])
    tagged = tagged.append_column("_sub", pa.array(sub_of_row))
    mask = None if stored is None else stored(tagged.column("person_id").to_numpy())
    if mask is None:
        view = db.register(tagged)
        try:
            unknown = db.con.execute(
                f"SELECT i._sub, min(i._row), arg_min(i.person_id, i._row) FROM {view} i "
                "ANTI JOIN persons p ON i.person_id = p.person_id GROUP BY i._sub"
            ).fetchall()
        finally:
            db.unregister(view)
    else:
        unknown = _first_unknown(tagged, mask)
    if unknown:
        for sub, row, pid in unknown:
            out[int(sub)] = row_error(int(row), "person_id", f"person {pid} is not in the store (upsert_persons first)")
        bad = pa.array(np.array([int(u[0]) for u in unknown], dtype=np.int64))
        tagged = tagged.filter(pc.invert(pc.is_in(tagged.column("_sub"), value_set=bad)))
    keys = EVENT_KEYS[kind]
    answer = None if seen is None else seen(kind, tagged)
    credited: dict[int, int] = {}
    rest = tagged
    if answer is not None:
        # Surely new: the first row of each event (in queue order) is appended as it is and credited to its item.
        fresh = tagged.filter(pa.array(answer == NEW))
        if fresh.num_rows:
            fresh = fresh.filter(pa.array(_first_of_each(fresh, keys)))
            insert_events(db, kind, fresh, check=False, distinct=False)
            per = np.bincount(fresh.column("_sub").to_numpy())
            credited = {int(i): int(k) for i, k in enumerate(per) if k}
        rest = tagged.filter(pa.array(answer == UNKNOWN))
    if rest.num_rows:  # checked against the table; the rows appended come back to be credited
        new = insert_events(db, kind, rest, returning=True)
        assert isinstance(new, pa.Table)
        for i, k in (_credit(rest, new, keys) if new.num_rows else {}).items():
            credited[i] = credited.get(i, 0) + k
    for i, t in subs:
        if i not in out:
            inserted = int(credited.get(i, 0))
            out[i] = IngestCounts(inserted, len(t) - inserted)
    return out
