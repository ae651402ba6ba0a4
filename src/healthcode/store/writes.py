"""Ingest writes: persons upserts and event appends, for one call or a group of calls in one transaction.

Input comes validated (:mod:`healthcode.store.validate`).  Events go in with plain INSERTs first, which the unique
indexes check quickly; a replayed event makes one fail and the transaction runs again with INSERT OR IGNORE
(:meth:`Connection.fast_then_safe`).  A group (:func:`ingest_group`, the service's group commit) counts per call
as if the calls ran one after another, and a call whose rows name an unknown person fails alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from healthcode.errors import StoreError
from healthcode.store.connection import Connection, Replay, one
from healthcode.store.validate import CLEANERS, INGEST_KINDS, row_error


@dataclass(frozen=True)
class IngestCounts:
    """What one ingest call did: rows newly stored, rows already there (``updated``: persons whose values changed)."""

    inserted: int
    already_present: int
    updated: int = 0


#: The key columns of each event table (its unique index).
EVENT_KEYS = {
    "nat_results": ("person_id", "sample_time", "report_time"),
    "entries": ("person_id", "t"),
    "visits": ("person_id", "region", "day"),
}


def _event_inserts(kind: str, view: str, fast: bool, returning: bool = False) -> list[str]:
    """The statements appending the distinct events of ``view`` (columns ``EVENT_KEYS[kind]``) to ``kind``.

    ``fast``: plain INSERTs, which raise a key conflict on a replayed event (see :meth:`Connection.fast_then_safe`);
    otherwise INSERT OR IGNORE.  NAT results whose sample time is null never conflict in the unique index (NULLs
    are distinct), so those are always matched with ``IS NOT DISTINCT FROM``."""
    cols = ", ".join(EVENT_KEYS[kind])
    back = f" RETURNING {cols}" if returning else ""
    verb = "INSERT INTO" if fast else "INSERT OR IGNORE INTO"
    if kind != "nat_results":
        return [f"{verb} {kind} SELECT DISTINCT {cols} FROM {view}{back}"]
    return [
        f"{verb} nat_results SELECT DISTINCT person_id, sample_time, report_time FROM {view} "
        f"WHERE sample_time IS NOT NULL{back}",
        f"INSERT INTO nat_results SELECT DISTINCT i.person_id, i.sample_time, i.report_time FROM {view} i "
        "WHERE i.sample_time IS NULL AND NOT EXISTS (SELECT 1 FROM nat_results n WHERE n.person_id = i.person_id "
        f"AND n.report_time = i.report_time AND n.sample_time IS NULL){back}",
    ]


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


def insert_events(db: Connection, kind: str, view: str, fast: bool) -> int:
    """Append the distinct events of ``view`` not stored yet; how many were new."""
    try:
        return sum(db.count(sql) for sql in _event_inserts(kind, view, fast))
    except duckdb.ConstraintException:
        raise Replay() from None


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

    def work(fast: bool) -> IngestCounts:
        view = db.register(clean)
        try:
            _check_known(db, view)
            inserted = insert_events(db, kind, view, fast)
        finally:
            db.unregister(view)
        return IngestCounts(inserted, len(clean) - inserted)

    return db.fast_then_safe(work)  # type: ignore[no-any-return]


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

        def work(fast: bool) -> dict[int, IngestCounts | StoreError]:
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
            group_ids = np.unique(np.concatenate(upserted)) if upserted else np.zeros(0, dtype=np.uint64)

            def stored(pids: np.ndarray) -> np.ndarray | None:
                answer = None if known is None else known(pids)
                return None if answer is None else np.asarray(answer, dtype=bool) | np.isin(pids, group_ids)

            for kind in EVENT_KEYS:
                subs = [i for i in cleaned if items[i][0] == kind]
                if subs:
                    out.update(_group_events(db, kind, [(i, cleaned[i]) for i in subs], stored, fast, seen))
            return out

        for i, res in db.fast_then_safe(work).items():
            results[i] = res
    return [r if r is not None else StoreError("internal: item not processed") for r in results]


def _group_events(
    db: Connection,
    kind: str,
    subs: list[tuple[int, pa.Table]],
    stored: Callable[[np.ndarray], np.ndarray | None] | None = None,
    fast: bool = False,
    seen: Callable[[str, pa.Table], np.ndarray | None] | None = None,
) -> dict[int, IngestCounts | StoreError]:
    """Append the event items of one kind together (inside the open transaction); counts per item."""
    out: dict[int, IngestCounts | StoreError] = {}
    tagged = pa.concat_tables([t.append_column("_sub", pa.array(np.full(len(t), i, dtype=np.int64))) for i, t in subs])
    view = db.register(tagged)
    try:
        mask = None if stored is None else stored(tagged.column("person_id").to_numpy())
        if mask is None:
            unknown = db.con.execute(
                f"SELECT i._sub, min(i._row), arg_min(i.person_id, i._row) FROM {view} i "
                "ANTI JOIN persons p ON i.person_id = p.person_id GROUP BY i._sub"
            ).fetchall()
        else:
            unknown = _first_unknown(tagged, mask)
        if unknown:
            for sub, row, pid in unknown:
                out[int(sub)] = row_error(
                    int(row), "person_id", f"person {pid} is not in the store (upsert_persons first)"
                )
            db.unregister(view)
            bad = pa.array(np.array([int(u[0]) for u in unknown], dtype=np.int64))
            tagged = tagged.filter(pc.invert(pc.is_in(tagged.column("_sub"), value_set=bad)))
            view = db.register(tagged)
        keys = EVENT_KEYS[kind]
        seen_mask = None if seen is None else seen(kind, tagged)
        if seen_mask is not None and seen_mask.any():
            # Replays the caller knows are stored: left out, so the plain INSERT does not conflict on them.
            db.unregister(view)
            view = db.register(tagged.filter(pa.array(~seen_mask)))
        try:  # INSERT ... RETURNING runs once, here
            parts = [db.con.sql(sql).to_arrow_table() for sql in _event_inserts(kind, view, fast, True)]
        except duckdb.ConstraintException:
            raise Replay() from None
        new = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    finally:
        db.unregister(view)
    credited = _credit(tagged, new, keys) if new.num_rows else {}
    for i, t in subs:
        if i not in out:
            inserted = int(credited.get(i, 0))
            out[i] = IngestCounts(inserted, len(t) - inserted)
    return out
