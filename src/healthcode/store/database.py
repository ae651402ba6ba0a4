"""The population in an embedded database: a DuckDB file behind a narrow interface.

Only this module knows the database is DuckDB; callers hand it Arrow tables and get Arrow tables back, so another
database could back the same methods later.  Layout (created on open when missing; ``schema_version`` records it):

* ``persons`` one row per person (``person_id`` primary key), the SPEC §3 scalars and ``updated_at``.
* ``nat_results`` append-only NAT history ``(person_id, sample_time, report_time)``; ``sample_time`` may be null.
* ``entries`` checkpoint scans ``(person_id, t)``; ``visits`` county-days ``(person_id, region, day)``.
* ``risk_lists``, ``policies`` every loaded version's text; ``admin_log`` who changed what (risk list, policy,
  re-evaluation) and when.
* ``change_log`` every published status change in ``seq`` order: **the record of the published statuses**; a
  status is stored packed as ``badge | entry << 1 | reasons << 2`` (``old_state`` null for a first publish).  A
  publish appends to it and nothing else (one transaction), so its cost is the number of changes, not the size of
  the population.  ``statuses`` is a checkpoint of the last published status per person as of change
  ``checkpoint.seq``; the current statuses are that checkpoint overridden by the later changes
  (:meth:`Store.published`), and :meth:`Store.write_checkpoint` rewrites it in the background.

**Instants are stored as BIGINT epoch seconds** (SPEC §2: sub-second input floored), never as TIMESTAMPTZ, so the
store's arithmetic is the SPEC's integer arithmetic; ``visits.day`` is a DATE (the local date, as Arrow date32).
Event tables are unique on all their columns, so replaying the same rows stores nothing new.

Every ingest method validates its whole input with vectorized Arrow/numpy code first (an error names the 0-based row
of the call and the column, and nothing of the call is stored), then writes in one transaction.  A :class:`Store`
holds one connection and serialises its calls with a lock; DuckDB allows one writing process per file.
"""

from __future__ import annotations

import datetime as _dt
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from healthcode.errors import StoreError, StoreUnavailable
from healthcode.rules import columns
from healthcode.rules.regions import CODE_MAX, CODE_MIN, PROVINCE_OK
from healthcode.rules.timebase import day, day_to_date, midnight, to_instant

SCHEMA_VERSION = 2
DEFAULT_PATH = os.path.join("data", "healthcode.duckdb")
#: Environment variable naming the store file when no path is given.
STORE_ENV = "HEALTHCODE_STORE"

_DDL = """
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
);
CREATE TABLE IF NOT EXISTS persons (
    person_id UBIGINT PRIMARY KEY,
    home_region INTEGER NOT NULL,
    registered_commuter BOOLEAN NOT NULL,
    base_color TINYINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS nat_results (
    person_id UBIGINT NOT NULL,
    sample_time BIGINT,
    report_time BIGINT NOT NULL,
    UNIQUE (person_id, sample_time, report_time)
);
CREATE TABLE IF NOT EXISTS entries (
    person_id UBIGINT NOT NULL,
    t BIGINT NOT NULL,
    UNIQUE (person_id, t)
);
CREATE TABLE IF NOT EXISTS visits (
    person_id UBIGINT NOT NULL,
    region INTEGER NOT NULL,
    day DATE NOT NULL,
    UNIQUE (person_id, region, day)
);
CREATE TABLE IF NOT EXISTS risk_lists (
    version BIGINT PRIMARY KEY,
    loaded_at TIMESTAMPTZ NOT NULL,
    csv VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS policies (
    version BIGINT PRIMARY KEY,
    loaded_at TIMESTAMPTZ NOT NULL,
    toml VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS statuses (
    person_id UBIGINT NOT NULL,
    commuter_badge BOOLEAN NOT NULL,
    entry_permitted BOOLEAN NOT NULL,
    reasons USMALLINT NOT NULL,
    risk_list_version BIGINT,
    as_of BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS change_log (
    seq BIGINT NOT NULL,
    person_id UBIGINT NOT NULL,
    old_state INTEGER,
    new_state INTEGER NOT NULL,
    risk_list_version BIGINT,
    as_of BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoint (
    seq BIGINT NOT NULL,
    written_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS admin_log (
    changed_at TIMESTAMPTZ NOT NULL,
    caller VARCHAR NOT NULL,
    action VARCHAR NOT NULL,
    version BIGINT,
    detail VARCHAR
);
"""
#: Schema 1 kept every published status in ``statuses`` (keyed) and numbered the change log by a key; schema 2
#: makes the change log the record and ``statuses`` a checkpoint (both unkeyed: appends cost no index upkeep), and
#: packs a status into one integer in the change log (:func:`pack_state`: a third of the bytes to write).
_MIGRATE_1_TO_2 = """
CREATE TABLE statuses_v2 AS
    SELECT person_id, commuter_badge, entry_permitted, reasons, risk_list_version, as_of FROM statuses;
DROP TABLE statuses;
ALTER TABLE statuses_v2 RENAME TO statuses;
CREATE TABLE change_log_v2 AS
    SELECT seq, person_id,
           CASE WHEN old_badge IS NULL THEN NULL
                ELSE old_badge::INTEGER | (old_entry::INTEGER << 1) | (old_reasons::INTEGER << 2) END AS old_state,
           new_badge::INTEGER | (new_entry::INTEGER << 1) | (new_reasons::INTEGER << 2) AS new_state,
           risk_list_version, as_of
    FROM change_log ORDER BY seq;
DROP TABLE change_log;
ALTER TABLE change_log_v2 RENAME TO change_log;
INSERT INTO checkpoint SELECT coalesce(max(seq), 0), now() FROM change_log;
INSERT INTO schema_version (version) VALUES (2);
"""
#: The published statuses: the checkpoint overridden by the later changes up to sequence number ``$upto``.
_PUBLISHED = """
WITH cp AS (SELECT coalesce(max(seq), 0) AS seq FROM checkpoint),
tail AS (
    SELECT person_id, (new_state & 1) = 1 AS commuter_badge, (new_state & 2) = 2 AS entry_permitted,
           (new_state >> 2)::USMALLINT AS reasons, risk_list_version, as_of
    FROM change_log WHERE seq > (SELECT seq FROM cp) AND seq <= $upto
    QUALIFY row_number() OVER (PARTITION BY person_id ORDER BY seq DESC) = 1
)
SELECT * FROM (SELECT s.* FROM statuses s ANTI JOIN tail t USING (person_id) UNION ALL SELECT * FROM tail)
"""
TABLES = (
    "persons", "nat_results", "entries", "visits", "risk_lists", "policies", "statuses", "change_log", "checkpoint",
    "admin_log",
)  # fmt: skip

#: Why a population row was skipped (SPEC §4.1), in the order the checks apply; each row counts once.
SKIP_REASONS = (
    "person_id is null",
    "home_region is null or not a valid code",
    "base_color is null or not 0/1/2",
    "a visit is null or has a null or invalid region or a null day",
    "an entry instant is null",
)


@dataclass(frozen=True)
class IngestCounts:
    """What one ingest call did: rows newly stored, rows already there (``updated``: persons whose values changed)."""

    inserted: int
    already_present: int
    updated: int = 0


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


# ---------------------------------------------------------------------------------------------------------------
# Vectorized validation of ingest input.  Errors name the 0-based row of the call and the column.


def _row_error(row: int, name: str, what: str) -> StoreError:
    return StoreError(f"row {row}, column {name!r}: {what}; nothing of this call was stored")


def _as_table(data: pa.Table | pa.RecordBatch, what: str) -> pa.Table:
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, pa.Table):
        return data
    raise StoreError(f"{what} must be a pyarrow Table or RecordBatch, not {type(data).__name__}")


def _column(table: pa.Table, name: str, what: str, needs: str) -> pa.Array:
    if name not in table.column_names:
        raise StoreError(f"column {name!r} is missing; {what} needs {needs}")
    if table.column_names.count(name) > 1:
        raise StoreError(f"column {name!r} appears more than once")
    chunked = table.column(name)
    return chunked.combine_chunks() if chunked.num_chunks != 1 else chunked.chunk(0)


def _valid_mask(arr: pa.Array) -> np.ndarray:
    if arr.null_count == 0:
        return np.ones(len(arr), dtype=bool)
    return np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=bool)


def _no_nulls(arr: pa.Array, name: str) -> None:
    if arr.null_count:
        raise _row_error(int(np.flatnonzero(~_valid_mask(arr))[0]), name, "is null")


def _first(bad: np.ndarray, name: str, what: str) -> None:
    if bad.any():
        raise _row_error(int(np.flatnonzero(bad)[0]), name, what)


def _integers(arr: pa.Array, name: str) -> np.ndarray:
    """The values of an integer column (nulls as 0), as int64 or uint64."""
    if not pa.types.is_integer(arr.type):
        raise StoreError(f"column {name!r} has type {arr.type}; expected an integer type")
    return np.asarray(arr.fill_null(0).to_numpy(zero_copy_only=False))


def _person_ids(table: pa.Table, what: str) -> pa.Array:
    arr = _column(table, "person_id", what, "person_id (uint64)")
    values = _integers(arr, "person_id")
    _no_nulls(arr, "person_id")
    _first(values < 0, "person_id", "is negative; person ids are uint64")
    return pa.array(values.astype(np.uint64), type=pa.uint64())


def _region_ok(values: np.ndarray) -> np.ndarray:
    """SPEC §3 code validity, vectorized: 100000..999999 with a province-level prefix."""
    in_range = (values >= CODE_MIN) & (values <= CODE_MAX)
    prefix = np.where(in_range, values // 10000, 0).astype(np.int64)
    return in_range & (PROVINCE_OK[prefix] == 1)


def _regions(arr: pa.Array, name: str) -> pa.Array:
    values = _integers(arr, name)
    _no_nulls(arr, name)
    _first(~_region_ok(values), name, "is not a valid region code (six digits with a province-level prefix)")
    return pa.array(values.astype(np.int32), type=pa.int32())


def _seconds(arr: pa.Array, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A tz-aware timestamp column as floored epoch seconds (nulls as 0) and its validity mask."""
    t = arr.type
    if not pa.types.is_timestamp(t):
        raise StoreError(f"column {name!r} has type {t}; expected a timestamp with a time zone")
    if t.tz is None:
        raise StoreError(
            f"column {name!r} has type {t} without a time zone (every row); instants must be tz-aware, "
            "e.g. timestamp[s, tz=UTC]"
        )
    raw = np.asarray(arr.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
    divisor = columns.UNIT_DIVISORS[columns.TIMESTAMP_UNITS[t.unit]]
    return raw // divisor, _valid_mask(arr)  # numpy floors toward minus infinity, as SPEC §2 wants


def _required_seconds(arr: pa.Array, name: str) -> pa.Array:
    values, _ = _seconds(arr, name)
    _no_nulls(arr, name)
    return pa.array(values, type=pa.int64())


def _days(arr: pa.Array, name: str) -> pa.Array:
    if not pa.types.is_date(arr.type):
        raise StoreError(f"column {name!r} has type {arr.type}; expected date32 (the local calendar date)")
    _no_nulls(arr, name)
    if pa.types.is_date64(arr.type):  # milliseconds: must be whole days to be a date
        ms = np.asarray(arr.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)
        _first(ms % 86_400_000 != 0, name, "is not a whole day (a date64 value with a time of day)")
    return arr.cast(pa.date32())


def _rows(n: int) -> pa.Array:
    return pa.array(np.arange(n, dtype=np.int64))


# ---------------------------------------------------------------------------------------------------------------
# Validation of each ingest kind, without the database (the person-known check runs in the transaction).


def _clean_persons(data: pa.Table | pa.RecordBatch) -> pa.Table:
    """Validated ``upsert_persons`` input: unique uint64 ids, int32 regions, bool, int8 colors."""
    table = _as_table(data, "persons")
    what, needs = "persons", "person_id, home_region, registered_commuter, base_color"
    pid = _person_ids(table, what)
    home = _regions(_column(table, "home_region", what, needs), "home_region")
    reg = _column(table, "registered_commuter", what, needs)
    if not pa.types.is_boolean(reg.type):
        raise StoreError(f"column 'registered_commuter' has type {reg.type}; expected bool")
    color_arr = _column(table, "base_color", what, needs)
    color = _integers(color_arr, "base_color")
    _no_nulls(color_arr, "base_color")
    _first((color < 0) | (color > 2), "base_color", "is not 0 (green), 1 (yellow) or 2 (red)")
    ids = pid.to_numpy()
    if len(ids) > 1:
        order = np.argsort(ids, kind="stable")
        dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
        if len(dup):
            second = int(np.min(order[dup + 1]))
            raise _row_error(second, "person_id", f"person {ids[second]} appears more than once in this call")
    clean = pa.table(
        {
            "person_id": pid,
            "home_region": home,
            "registered_commuter": reg.fill_null(False),
            "base_color": pa.array(color.astype(np.int8), type=pa.int8()),
        }
    )
    return clean


def _clean_nat_results(data: pa.Table | pa.RecordBatch) -> pa.Table:
    """Validated ``record_nat_results`` input: ``_row``, person_id, sample_time and report_time in seconds."""
    table = _as_table(data, "NAT results")
    what, needs = "NAT results", "person_id, sample_time, report_time"
    pid = _person_ids(table, what)
    sample_arr = _column(table, "sample_time", what, needs)
    sample, sample_ok = _seconds(sample_arr, "sample_time")
    report = _required_seconds(_column(table, "report_time", what, needs), "report_time")
    clean = pa.table(
        {
            "_row": _rows(len(pid)),
            "person_id": pid,
            "sample_time": pa.array(sample, type=pa.int64(), mask=~sample_ok),
            "report_time": report,
        }
    )
    return clean


def _clean_entries(data: pa.Table | pa.RecordBatch) -> pa.Table:
    """Validated ``record_entries`` input: ``_row``, person_id, t in seconds."""
    table = _as_table(data, "entries")
    pid = _person_ids(table, "entries")
    t = _required_seconds(_column(table, "t", "entries", "person_id, t"), "t")
    clean = pa.table({"_row": _rows(len(pid)), "person_id": pid, "t": t})
    return clean


def _clean_visits(data: pa.Table | pa.RecordBatch) -> pa.Table:
    """Validated ``record_visits`` input: ``_row``, person_id, region, day."""
    table = _as_table(data, "visits")
    what, needs = "visits", "person_id, region, day"
    pid = _person_ids(table, what)
    region = _regions(_column(table, "region", what, needs), "region")
    days = _days(_column(table, "day", what, needs), "day")
    clean = pa.table({"_row": _rows(len(pid)), "person_id": pid, "region": region, "day": days})
    return clean


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


#: The ingest kinds :meth:`Store.ingest_group` takes, with each kind's validation and (for events) its key columns.
INGEST_KINDS = ("persons", "nat_results", "entries", "visits")
_CLEANERS: dict[str, Callable[[Any], pa.Table]] = {
    "persons": _clean_persons,
    "nat_results": _clean_nat_results,
    "entries": _clean_entries,
    "visits": _clean_visits,
}
_EVENT_KEYS = {
    "nat_results": ("person_id", "sample_time", "report_time"),
    "entries": ("person_id", "t"),
    "visits": ("person_id", "region", "day"),
}


class _Replay(Exception):
    """A plain INSERT of events met a stored one (a replay): run the transaction again the safe way."""


def _event_inserts(kind: str, view: str, fast: bool, returning: bool = False) -> list[str]:
    """The statements appending the distinct events of ``view`` (columns ``_EVENT_KEYS[kind]``) to ``kind``.

    ``fast``: plain INSERTs, which raise a key conflict on a replayed event (see :meth:`Store._fast_then_safe`);
    otherwise INSERT OR IGNORE.  NAT results whose sample time is null never conflict in the unique index (NULLs
    are distinct), so those are always matched with ``IS NOT DISTINCT FROM``."""
    cols = ", ".join(_EVENT_KEYS[kind])
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


# ---------------------------------------------------------------------------------------------------------------
# Population rows (SPEC §3) -> store rows, with the SPEC §4.1 validity of each row.


def _list_elements(arr: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """The parent row of each element of a list column and the elements, skipping null lists.

    ``pc.list_parent_indices`` also counts the values a null list slot spans, which ``pc.list_flatten`` skips, so
    the raw child range is taken and the elements under null lists are dropped here with one mask.
    """
    lst = columns._as_list(arr)
    offsets = columns.offsets_view(lst)
    parents = np.asarray(pc.list_parent_indices(lst).to_numpy(zero_copy_only=False), dtype=np.int64)
    values = lst.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    if lst.null_count:
        keep = _valid_mask(lst)[parents]
        parents = parents[keep]
        values = values.filter(pa.array(keep))
    return parents, values


def _population_rows(batch: pa.RecordBatch) -> tuple[dict[str, pa.Table], list[int]]:
    """The store rows of the valid population rows, and how many rows each skip reason took."""
    n = batch.num_rows
    col = batch.column
    names = batch.schema.names
    pid = col(names.index("person_id"))
    home = col(names.index("home_region"))
    color = col(names.index("base_color"))
    home_v = np.asarray(home.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
    color_v = np.asarray(color.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)

    e_parent, e_values = _list_elements(col(names.index("entry_times")))
    v_parent, v_structs = _list_elements(col(names.index("visits")))
    v_region = v_structs.field("region")
    v_day = v_structs.field("day")
    region_v = np.asarray(v_region.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
    bad_visit = ~_valid_mask(v_structs) | ~_valid_mask(v_region) | ~_region_ok(region_v) | ~_valid_mask(v_day)
    bad_entry = ~_valid_mask(e_values)

    checks = [
        ~_valid_mask(pid),
        ~_valid_mask(home) | ~_region_ok(home_v),
        ~_valid_mask(color) | (color_v < 0) | (color_v > 2),
        np.bincount(v_parent[bad_visit], minlength=n)[:n] > 0,
        np.bincount(e_parent[bad_entry], minlength=n)[:n] > 0,
    ]
    invalid = np.zeros(n, dtype=bool)
    skipped = []
    for bad in checks:
        skipped.append(int(np.count_nonzero(bad & ~invalid)))
        invalid |= bad
    ok = ~invalid

    pid_v = np.asarray(pid.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.uint64)
    registered = col(names.index("registered_commuter")).fill_null(False)
    keep = pa.array(ok)
    persons = pa.table(
        {
            "_row": _rows(n),
            "person_id": pa.array(pid_v, type=pa.uint64()),
            "home_region": pa.array(home_v.astype(np.int32), type=pa.int32()),
            "registered_commuter": registered,
            "base_color": pa.array(color_v.astype(np.int8), type=pa.int8()),
        }
    ).filter(keep)
    sample, _ = _seconds(col(names.index("nat_sample_time")), "nat_sample_time")
    report, report_ok = _seconds(col(names.index("nat_report_time")), "nat_report_time")
    nat_keep = ok & report_ok
    nat = pa.table(
        {
            "person_id": pa.array(pid_v[nat_keep], type=pa.uint64()),
            "sample_time": pa.array(sample[nat_keep], type=pa.int64(), mask=~_valid_mask(
                col(names.index("nat_sample_time")))[nat_keep]),
            "report_time": pa.array(report[nat_keep], type=pa.int64()),
        }
    )
    e_keep = ok[e_parent]
    e_secs, _ = _seconds(e_values, "entry_times")
    entries = pa.table(
        {
            "person_id": pa.array(pid_v[e_parent[e_keep]], type=pa.uint64()),
            "t": pa.array(e_secs[e_keep], type=pa.int64()),
        }
    )
    v_keep = ok[v_parent]
    visits = pa.table(
        {
            "person_id": pa.array(pid_v[v_parent[v_keep]], type=pa.uint64()),
            "region": pa.array(region_v[v_keep].astype(np.int32), type=pa.int32()),
            "day": v_day.filter(pa.array(v_keep)),
        }
    )
    return {"persons": persons, "nat": nat, "entries": entries, "visits": visits}, skipped


def _list_offsets(ids: np.ndarray, owners: np.ndarray) -> pa.Array:
    """Offsets of the list column whose elements belong to ``owners`` (sorted person ids; all in ``ids``)."""
    offsets = np.searchsorted(owners, ids, side="left").astype(np.int64)
    return pa.array(np.append(offsets, len(owners)).astype(np.int32), pa.int32())


def _assemble_population(parts: dict[str, pa.Table]) -> pa.Table:
    """The SPEC §3 table from sorted flat reads: persons by id, the chosen NAT per person, entries by (person,
    instant) and visits by (person, day, region)."""
    persons = parts["persons"]
    ids = np.asarray(persons.column("person_id").to_numpy(), dtype=np.uint64)
    ts = pa.timestamp("s", tz="UTC")
    nat = parts["nat"]
    pos = np.searchsorted(ids, np.asarray(nat.column("person_id").to_numpy(), dtype=np.uint64))
    report = np.zeros(len(ids), dtype=np.int64)
    sample = np.zeros(len(ids), dtype=np.int64)
    has_nat = np.zeros(len(ids), dtype=bool)
    has_sample = np.zeros(len(ids), dtype=bool)
    report[pos] = nat.column("report_time").to_numpy()
    has_nat[pos] = True
    sample_col = nat.column("sample_time")
    sample[pos] = np.asarray(sample_col.fill_null(0).to_numpy(), dtype=np.int64)
    has_sample[pos] = np.asarray(sample_col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    entries, visits = parts["entries"], parts["visits"]
    e_owner = np.asarray(entries.column("person_id").to_numpy(), dtype=np.uint64)
    v_owner = np.asarray(visits.column("person_id").to_numpy(), dtype=np.uint64)
    entry_values = entries.column("t").combine_chunks().cast(ts)
    visit_values = pa.StructArray.from_arrays(
        [visits.column("region").combine_chunks().cast(pa.int32()), visits.column("day").combine_chunks()],
        fields=list(columns.VISIT_TYPE),
    )
    return pa.table(
        {
            "person_id": persons.column("person_id").cast(pa.uint64()),
            "home_region": persons.column("home_region").cast(pa.int32()),
            "registered_commuter": persons.column("registered_commuter"),
            "base_color": persons.column("base_color").cast(pa.int8()),
            "nat_sample_time": pa.array(sample, pa.int64(), mask=~has_sample).cast(ts),
            "nat_report_time": pa.array(report, pa.int64(), mask=~has_nat).cast(ts),
            "entry_times": pa.ListArray.from_arrays(_list_offsets(ids, e_owner), entry_values),
            "visits": pa.ListArray.from_arrays(_list_offsets(ids, v_owner), visit_values),
        },
        schema=columns.POPULATION_SCHEMA,
    )


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


# ---------------------------------------------------------------------------------------------------------------


def resolve_path(path: str | os.PathLike[str] | None) -> str:
    """The store file: ``path``, else ``$HEALTHCODE_STORE``, else ``./data/healthcode.duckdb``."""
    return os.fspath(path) if path is not None else os.environ.get(STORE_ENV) or DEFAULT_PATH


class Store:
    """The population store: a DuckDB file (``path``; default ``$HEALTHCODE_STORE`` or ``./data/healthcode.duckdb``).

    Opening creates the file, its folder and the tables when missing.  Use as a context manager or call
    :meth:`close`.  ``":memory:"`` gives a throwaway in-memory store.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = resolve_path(path)
        self._lock = threading.Lock()
        self._checkpoint_lock = threading.Lock()
        self._seq = 0
        self._hwm: int | None = None  # the change log's high-water mark, once read
        self._unregister_later: list[str] = []
        if self.path != ":memory:":
            folder = os.path.dirname(os.path.abspath(self.path))
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"{self.path}: cannot create folder {folder}: {exc.strerror or exc}") from None
            if os.path.isdir(self.path):
                raise StoreError(f"{self.path}: is a folder; give a database file path")
            _check_magic(self.path)
        try:
            self._con = duckdb.connect(self.path)
        except duckdb.Error as exc:
            raise StoreError(f"{self.path}: cannot open the store: {_first_line(exc)}") from None
        try:
            self._init_schema()
        except BaseException:
            self._con.close()
            raise

    def _init_schema(self) -> None:
        try:
            self._con.execute("BEGIN")
            self._con.execute(_DDL)
            row = _one(self._con.execute("SELECT max(version) FROM schema_version"))
            found = row[0] if row else None
            if found is None:
                self._con.execute("INSERT INTO schema_version (version) VALUES (?)", [SCHEMA_VERSION])
            elif found == 1:
                self._con.execute(_MIGRATE_1_TO_2)
            self._con.execute("COMMIT")
        except duckdb.Error as exc:
            self._con.execute("ROLLBACK")
            raise StoreError(f"{self.path}: cannot set up the store tables: {_first_line(exc)}") from None
        if found is not None and found > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: store schema version {found} is newer than this healthcode supports ({SCHEMA_VERSION})"
            )

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._checkpoint_lock, self._lock:
            self._con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        with self._lock:
            row = _one(self._con.execute("SELECT max(version) FROM schema_version"))
        return int(row[0]) if row and row[0] is not None else 0

    def counts(self) -> dict[str, int]:
        """Rows per table."""
        with self._lock:
            out = {}
            for name in TABLES:
                row = _one(self._con.execute(f"SELECT count(*) FROM {name}"))
                out[name] = int(row[0]) if row else 0
            return out

    def table(self, name: str) -> pa.Table:
        """A whole store table as Arrow (for inspection and tests; instants are epoch seconds)."""
        if name not in TABLES:
            raise StoreError(f"no store table {name!r}; the tables are {', '.join(TABLES)}")
        with self._lock:
            return self._con.sql(f"SELECT * FROM {name} ORDER BY ALL").to_arrow_table()

    # -- transactions and registered inputs ----------------------------------------------------------------------

    def _transaction(self, work: Callable[[], Any]) -> Any:
        with self._lock:
            self._con.execute("BEGIN")
            try:
                result = work()
                self._con.execute("COMMIT")
            except duckdb.Error as exc:
                self._rollback()
                raise StoreUnavailable(f"{self.path}: the store cannot write now: {_first_line(exc)}") from None
            except BaseException:
                self._rollback()
                raise
            return result

    def _rollback(self) -> None:
        _rollback(self._con)
        while self._unregister_later:
            name = self._unregister_later.pop()
            try:
                self._con.unregister(name)
            except duckdb.Error:
                pass

    def _unregister(self, name: str) -> None:
        """Drop a registered input; inside a transaction a failed statement aborted, DuckDB refuses, so it is
        dropped after the rollback (:meth:`_transaction`)."""
        try:
            self._con.unregister(name)
        except duckdb.Error:
            self._unregister_later.append(name)

    def _register(self, table: pa.Table) -> str:
        self._seq += 1
        name = f"_in_{self._seq}"
        self._con.register(name, table)
        return name

    def _count(self, sql: str, params: list[Any] | None = None) -> int:
        row = _one(self._con.execute(sql, params or []))
        return int(row[0]) if row and row[0] is not None else 0

    def _check_known(self, view: str) -> None:
        row = _one(self._con.execute(
            f"SELECT i._row, i.person_id FROM {view} i ANTI JOIN persons p ON i.person_id = p.person_id "
            "ORDER BY i._row LIMIT 1"
        ))
        if row is not None:
            raise _row_error(int(row[0]), "person_id", f"person {row[1]} is not in the store (upsert_persons first)")

    # -- ingest ------------------------------------------------------------------------------------------------

    def upsert_persons(self, data: pa.Table | pa.RecordBatch) -> IngestCounts:
        """Insert or update persons.  Columns: ``person_id`` (uint64, or any integer >= 0), ``home_region``
        (integer, a valid code), ``registered_commuter`` (bool; null means false), ``base_color`` (integer 0..2).

        A person id may appear once per call.  Returns inserted, already present (of which ``updated`` changed).
        """
        clean = _clean_persons(data)

        def work() -> IngestCounts:
            view = self._register(clean)
            try:
                return IngestCounts(*self._upsert(view, len(clean)))
            finally:
                self._unregister(view)

        return self._transaction(work)  # type: ignore[no-any-return]

    def _upsert(self, view: str, n: int) -> tuple[int, int, int]:
        """Upsert from a view with unique person ids: (inserted, already present, updated)."""
        updated = self._count(
            f"UPDATE persons SET home_region = i.home_region, registered_commuter = i.registered_commuter, "
            f"base_color = i.base_color, updated_at = current_timestamp FROM {view} i "
            "WHERE persons.person_id = i.person_id AND (persons.home_region <> i.home_region "
            "OR persons.registered_commuter <> i.registered_commuter OR persons.base_color <> i.base_color)"
        )
        inserted = self._count(
            "INSERT INTO persons SELECT i.person_id, i.home_region, i.registered_commuter, i.base_color, "
            f"current_timestamp FROM {view} i ANTI JOIN persons p ON i.person_id = p.person_id"
        )
        return inserted, n - inserted, updated

    def record_nat_results(self, data: pa.Table | pa.RecordBatch) -> IngestCounts:
        """Append NAT results.  Columns: ``person_id`` (a stored person), ``report_time`` (tz-aware timestamp,
        any unit), ``sample_time`` (tz-aware timestamp, nullable).  Instants are floored to seconds."""
        return self._append(_clean_nat_results(data), "nat_results")

    def record_entries(self, data: pa.Table | pa.RecordBatch) -> IngestCounts:
        """Append Beijing entries.  Columns: ``person_id`` (a stored person), ``t`` (tz-aware timestamp, any unit)."""
        return self._append(_clean_entries(data), "entries")

    def record_visits(self, data: pa.Table | pa.RecordBatch) -> IngestCounts:
        """Append visits.  Columns: ``person_id`` (a stored person), ``region`` (integer, a valid code),
        ``day`` (date32, the local date)."""
        return self._append(_clean_visits(data), "visits")

    def _append(self, clean: pa.Table, kind: str) -> IngestCounts:
        def work(fast: bool) -> IngestCounts:
            view = self._register(clean)
            try:
                self._check_known(view)
                inserted = self._insert_events(kind, view, fast)
            finally:
                self._unregister(view)
            return IngestCounts(inserted, len(clean) - inserted)

        return self._fast_then_safe(work)  # type: ignore[no-any-return]

    def _insert_events(self, kind: str, view: str, fast: bool) -> int:
        """Append the distinct events of ``view`` not stored yet; how many were new."""
        try:
            return sum(self._count(sql) for sql in _event_inserts(kind, view, fast))
        except duckdb.ConstraintException:
            raise _Replay() from None

    def _fast_then_safe(self, work: Callable[[bool], Any]) -> Any:
        """Run ``work(fast=True)`` in a transaction: plain INSERTs of events, which the unique indexes check in
        a few milliseconds.  A replayed event makes one fail (a key conflict): the transaction is rolled back and
        run again with ``fast=False`` (INSERT OR IGNORE, which DuckDB checks far more slowly on large tables)."""
        try:
            return self._transaction(lambda: work(True))
        except _Replay:
            return self._transaction(lambda: work(False))

    # -- group commit ------------------------------------------------------------------------------------------

    @staticmethod
    def prepare_ingest(kind: str, data: pa.Table | pa.RecordBatch) -> pa.Table:
        """The validation of one ingest call of ``kind`` without touching the database (raises :class:`StoreError`
        naming the row and column); pass the result to :meth:`ingest_group` with ``prepared=True``.  Whether the
        persons of events are stored is checked later, in the transaction."""
        if kind not in _CLEANERS:
            raise StoreError(f"unknown ingest kind {kind!r}; the kinds are {', '.join(INGEST_KINDS)}")
        return _CLEANERS[kind](data)

    def ingest_group(
        self,
        items: list[tuple[str, pa.Table | pa.RecordBatch]],
        *,
        prepared: bool = False,
        known: Callable[[np.ndarray], np.ndarray | None] | None = None,
        seen: Callable[[str, pa.Table], np.ndarray | None] | None = None,
    ) -> list[IngestCounts | StoreError]:
        """Several ingest calls (``(kind, table)``, kind one of :data:`INGEST_KINDS`) in ONE transaction.

        Each item is validated on its own, as the single-kind method would (errors name the item's own rows); an
        item that fails gets its :class:`StoreError` in the result list and none of its rows are stored, while the
        others are committed together.  An event whose person is not stored fails its own item only; persons items
        are applied first (in list order), so events may name persons upserted in the same group.

        Counts are per item, as if the items ran one after another in list order: a row present in two items is
        "inserted" for the first and "already present" for the later one (and a persons row upserted twice counts
        as already present, maybe ``updated``, the second time).  A database failure rolls back the whole group
        and raises.  ``prepared=True`` says the tables come from :meth:`prepare_ingest` (validation is skipped).
        ``known(person_ids) -> bool mask`` answers "is this person stored?" from the caller's own complete copy of
        the person ids (the server's in-memory view), instead of a join against all persons in the database; it
        may answer None (not sure) to fall back to the join.  ``seen(kind, events) -> bool mask`` (or None) marks
        events the caller knows are stored already (replays): they are left out of the insert, so the fast plain
        INSERT path does not meet them (see :meth:`_fast_then_safe`).
        """
        results: list[IngestCounts | StoreError | None] = [None] * len(items)
        cleaned: dict[int, pa.Table] = {}
        for i, (kind, data) in enumerate(items):
            if prepared and kind in _CLEANERS and isinstance(data, pa.Table):
                cleaned[i] = data
                continue
            try:
                cleaned[i] = self.prepare_ingest(kind, data)
            except StoreError as exc:
                results[i] = exc
        if cleaned:

            def work(fast: bool) -> dict[int, IngestCounts | StoreError]:
                out: dict[int, IngestCounts | StoreError] = {}
                for i, clean in cleaned.items():
                    if items[i][0] == "persons":
                        view = self._register(clean)
                        try:
                            out[i] = IngestCounts(*self._upsert(view, len(clean)))
                        finally:
                            self._unregister(view)
                upserted = [
                    cleaned[i].column("person_id").to_numpy() for i, res in out.items()
                    if items[i][0] == "persons" and isinstance(res, IngestCounts)
                ]
                group_ids = np.unique(np.concatenate(upserted)) if upserted else np.zeros(0, dtype=np.uint64)

                def stored(pids: np.ndarray) -> np.ndarray | None:
                    answer = None if known is None else known(pids)
                    return None if answer is None else np.asarray(answer, dtype=bool) | np.isin(pids, group_ids)

                for kind in _EVENT_KEYS:
                    subs = [i for i in cleaned if items[i][0] == kind]
                    if subs:
                        out.update(
                            self._group_events(kind, [(i, cleaned[i]) for i in subs], stored, fast, seen)
                        )
                return out

            for i, res in self._fast_then_safe(work).items():
                results[i] = res
        return [r if r is not None else StoreError("internal: item not processed") for r in results]

    def _group_events(
        self,
        kind: str,
        subs: list[tuple[int, pa.Table]],
        stored: Callable[[np.ndarray], np.ndarray | None] | None = None,
        fast: bool = False,
        seen: Callable[[str, pa.Table], np.ndarray | None] | None = None,
    ) -> dict[int, IngestCounts | StoreError]:
        """Append the event items of one kind together (inside the open transaction); counts per item."""
        out: dict[int, IngestCounts | StoreError] = {}
        tagged = pa.concat_tables(
            [t.append_column("_sub", pa.array(np.full(len(t), i, dtype=np.int64))) for i, t in subs]
        )
        view = self._register(tagged)
        try:
            mask = None if stored is None else stored(tagged.column("person_id").to_numpy())
            if mask is None:
                unknown = self._con.execute(
                    f"SELECT i._sub, min(i._row), arg_min(i.person_id, i._row) FROM {view} i "
                    "ANTI JOIN persons p ON i.person_id = p.person_id GROUP BY i._sub"
                ).fetchall()
            else:
                unknown = _first_unknown(tagged, mask)
            if unknown:
                for sub, row, pid in unknown:
                    out[int(sub)] = _row_error(
                        int(row), "person_id", f"person {pid} is not in the store (upsert_persons first)"
                    )
                self._unregister(view)
                bad = pa.array(np.array([int(u[0]) for u in unknown], dtype=np.int64))
                tagged = tagged.filter(pc.invert(pc.is_in(tagged.column("_sub"), value_set=bad)))
                view = self._register(tagged)
            keys = _EVENT_KEYS[kind]
            seen_mask = None if seen is None else seen(kind, tagged)
            if seen_mask is not None and seen_mask.any():
                # Replays the caller knows are stored: left out, so the plain INSERT does not conflict on them.
                self._unregister(view)
                view = self._register(tagged.filter(pa.array(~seen_mask)))
            try:  # INSERT ... RETURNING runs once, here
                parts = [self._con.sql(sql).to_arrow_table() for sql in _event_inserts(kind, view, fast, True)]
            except duckdb.ConstraintException:
                raise _Replay() from None
            new = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        finally:
            self._unregister(view)
        credited = _credit(tagged, new, keys) if new.num_rows else {}
        for i, t in subs:
            if i not in out:
                inserted = int(credited.get(i, 0))
                out[i] = IngestCounts(inserted, len(t) - inserted)
        return out

    # -- bulk load ---------------------------------------------------------------------------------------------

    def load_population(self, data: Any, progress: Callable[[int], None] | None = None) -> LoadSummary:
        """Load a SPEC §3 population (a Table, a RecordBatch or an iterable of batches, e.g. a Parquet stream).

        Each batch is one transaction: persons are upserted (a later row for the same id wins), the NAT pair is
        appended when ``nat_report_time`` is not null, and entries and visits are exploded and appended.  Rows that
        SPEC §4.1 calls invalid are skipped and counted by reason in the summary; schema problems raise
        :class:`SchemaError` before the batch is written.  ``progress(rows)`` is called after each batch.
        """
        summary = LoadSummary()
        for batch in _population_batches(data):
            columns.check_schema(batch.schema)
            columns.validate(batch)
            parts, skipped = _population_rows(batch)
            summary.rows += batch.num_rows
            for reason, k in zip(SKIP_REASONS, skipped, strict=True):
                summary.skipped[reason] += k

            def work(fast: bool, parts: dict[str, pa.Table] = parts) -> tuple[int, ...]:
                views = {k: self._register(v) for k, v in parts.items()}
                try:
                    # A person id twice in one batch: the last row wins (as two upserts in a row would).
                    persons = self._register(
                        self._con.sql(
                            f"SELECT * EXCLUDE (_row) FROM {views['persons']} "
                            "QUALIFY row_number() OVER (PARTITION BY person_id ORDER BY _row DESC) = 1"
                        ).to_arrow_table()
                    )
                    views["_persons"] = persons
                    inserted, _, updated = self._upsert(persons, len(parts["persons"]))
                    return (
                        inserted, updated, self._insert_events("nat_results", views["nat"], fast),
                        self._insert_events("entries", views["entries"], fast),
                        self._insert_events("visits", views["visits"], fast),
                    )  # fmt: skip
                finally:
                    for view in views.values():
                        self._unregister(view)

            persons, updated, nat, entries, visits = self._fast_then_safe(work)
            summary.persons += persons
            summary.persons_updated += updated
            summary.nat_results += nat
            summary.entries += entries
            summary.visits += visits
            if progress is not None:
                progress(batch.num_rows)
        return summary

    # -- read back ---------------------------------------------------------------------------------------------

    def population(self, as_of: _dt.datetime | int | float | str, lookback_days: int) -> pa.Table:
        """The SPEC §3 population at ``as_of`` (``columns.POPULATION_SCHEMA``), one row per person by person_id.

        ``nat_*`` is the latest NAT result whose report_time <= as_of (by report, then sample time); entries are
        those with ``t <= as_of`` and visits those with ``day <= day(as_of)``, both only from the local day
        ``day(as_of) - lookback_days + 1`` on.  Pass the longest window the policy needs (``max(risk.lookback_days,
        commuter_pattern.window_days)``).  Lists are sorted; none in the window gives an empty list.
        """
        if isinstance(lookback_days, bool) or not isinstance(lookback_days, int) or lookback_days < 1:
            raise StoreError(f"lookback_days must be a whole number >= 1, got {lookback_days!r}")
        try:
            t = to_instant(as_of)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"as_of: {exc}") from None
        today = day(t)
        first = today - lookback_days + 1
        # Flat, sorted scans (DuckDB sorts in parallel) put together into list columns here: about twice as fast
        # as aggregating lists in SQL, and no per-person objects anywhere.
        queries = {
            "persons": "SELECT person_id, home_region, registered_commuter, base_color FROM persons ORDER BY person_id",
            "nat": "SELECT person_id, sample_time, report_time FROM nat_results WHERE report_time <= $as_of "
            "QUALIFY row_number() OVER (PARTITION BY person_id ORDER BY report_time DESC, sample_time DESC NULLS LAST) "
            "= 1 ORDER BY person_id",
            "entries": "SELECT person_id, t FROM entries WHERE t >= $t_first AND t <= $as_of ORDER BY person_id, t",
            "visits": "SELECT person_id, region, day FROM visits WHERE day >= $d_first AND day <= $d_today "
            "ORDER BY person_id, day, region",
        }
        params = {"as_of": t, "t_first": midnight(first), "d_first": day_to_date(first), "d_today": day_to_date(today)}
        parts = {}
        with self._lock:
            try:
                for name, sql in queries.items():
                    used = {k: v for k, v in params.items() if f"${k}" in sql}
                    parts[name] = self._con.sql(sql, params=used).to_arrow_table()
            except duckdb.Error as exc:
                raise StoreError(f"{self.path}: cannot read the population: {_first_line(exc)}") from None
        return _assemble_population(parts)

    # -- published statuses and the change log (mass re-evaluation) ---------------------------------------------

    def published(self) -> pa.Table:
        """The last published status of every person ever published (person_id, commuter_badge, entry_permitted,
        reasons, risk_list_version, as_of), by person_id: the checkpoint overridden by the later changes."""
        sql = _PUBLISHED.replace("$upto", str(2**62)) + " ORDER BY person_id"
        with self._lock:
            try:
                return self._con.sql(sql).to_arrow_table()
            except duckdb.Error as exc:
                raise StoreError(f"{self.path}: cannot read the published statuses: {_first_line(exc)}") from None

    def checkpoint_seq(self) -> int:
        """The change-log sequence number the ``statuses`` checkpoint includes (0: none written)."""
        with self._lock:
            return self._count("SELECT coalesce(max(seq), 0) FROM checkpoint")

    def write_checkpoint(self) -> int:
        """Rewrite the ``statuses`` checkpoint as of the change log's current high-water mark (the state
        :meth:`published` gives), in one transaction and entirely inside the database; returns that mark.

        Runs on its own connection, so ingest and publishes go on meanwhile (they write other tables); changes
        appended meanwhile have higher sequence numbers and stay in the tail."""
        with self._checkpoint_lock:
            cur = self._con.cursor()
            try:
                cur.execute("BEGIN")
                try:
                    row = _one(cur.execute("SELECT coalesce(max(seq), 0) FROM change_log"))
                    seq = int(row[0]) if row else 0
                    cur.execute("CREATE TABLE statuses_next AS " + _PUBLISHED.replace("$upto", str(seq)))
                    cur.execute("DROP TABLE statuses")
                    cur.execute("ALTER TABLE statuses_next RENAME TO statuses")
                    cur.execute("INSERT INTO checkpoint VALUES (?, now())", [seq])
                    cur.execute("COMMIT")
                except duckdb.Error as exc:
                    cur.execute("ROLLBACK")
                    raise StoreError(f"{self.path}: cannot write the status checkpoint: {_first_line(exc)}") from None
            finally:
                cur.close()
            return seq

    def high_water_mark(self) -> int:
        """The change log's last sequence number (0 when empty)."""
        with self._lock:
            if self._hwm is None:
                self._hwm = self._count("SELECT coalesce(max(seq), 0) FROM change_log")
            return self._hwm

    def publish(
        self, changes: pa.Table, risk_list: tuple[int, str] | None = None, policy: tuple[int, str] | None = None
    ) -> int:
        """Append status changes to the change log in one transaction, numbered on from the high-water mark in
        the order given; returns the new high-water mark.  ``risk_list`` / ``policy`` ``(version, text)`` are kept
        in the same transaction: the statuses a new list or policy produced are never stored without it, nor it
        without them.

        ``changes`` has the columns ``person_id``, ``old_state`` (null for a first publish), ``new_state`` (see
        :func:`pack_state`), ``risk_list_version`` and ``as_of``.  This process is the store's only writer, so the
        high-water mark is kept in memory and the sequence numbers are made here."""

        def work() -> int:
            if self._hwm is None:
                self._hwm = self._count("SELECT coalesce(max(seq), 0) FROM change_log")
            base = self._hwm
            if changes.num_rows:
                seq = pa.array(np.arange(base + 1, base + 1 + changes.num_rows, dtype=np.int64))
                view = self._register(changes.add_column(0, "seq", seq))
                try:
                    self._con.execute(
                        f"INSERT INTO change_log SELECT seq, person_id, old_state, new_state, risk_list_version, "
                        f"as_of FROM {view}"
                    )
                finally:
                    self._unregister(view)
            if risk_list is not None:
                self._con.execute("INSERT OR REPLACE INTO risk_lists VALUES (?, now(), ?)", list(risk_list))
            if policy is not None:
                self._con.execute("INSERT OR REPLACE INTO policies VALUES (?, now(), ?)", list(policy))
            return base + changes.num_rows

        try:
            hwm = self._transaction(work)
        except BaseException:
            self._hwm = None  # re-read after a failed commit
            raise
        self._hwm = hwm
        return hwm  # type: ignore[no-any-return]

    def record_admin(self, caller: str, action: str, version: int | None, detail: str = "") -> None:
        """Keep who changed what: ``caller`` (a principal name, never a secret), ``action`` (``put_risk_list``,
        ``put_policy``, ``reevaluate``), the resulting version and a short detail."""
        self._transaction(
            lambda: self._con.execute(
                "INSERT INTO admin_log VALUES (now(), ?, ?, ?, ?)", [caller, action, version, detail]
            )
        )

    def changes(self, after: int, limit: int = 10_000) -> pa.Table:
        """Change-log rows with ``seq > after``, in order, at most ``limit`` of them."""
        with self._lock:
            return self._con.sql(
                "SELECT seq, person_id, (old_state & 1) = 1 AS old_badge, (new_state & 1) = 1 AS new_badge, "
                "(old_state & 2) = 2 AS old_entry, (new_state & 2) = 2 AS new_entry, "
                "(old_state >> 2)::USMALLINT AS old_reasons, (new_state >> 2)::USMALLINT AS new_reasons, "
                "risk_list_version, as_of FROM change_log WHERE seq > ? ORDER BY seq LIMIT ?",
                params=[after, limit],
            ).to_arrow_table()

    def record_policy(self, version: int, toml: str) -> None:
        """Keep a policy version (every version is kept)."""
        self._transaction(
            lambda: self._con.execute("INSERT OR REPLACE INTO policies VALUES (?, now(), ?)", [version, toml])
        )

    def latest_policy(self) -> tuple[int, str] | None:
        with self._lock:
            rows = self._con.execute("SELECT version, toml FROM policies ORDER BY version DESC LIMIT 1").fetchall()
        return None if not rows else (int(rows[0][0]), str(rows[0][1]))

    def admin_log(self) -> pa.Table:
        """Who changed what and when (``changed_at``, ``caller``, ``action``, ``version``, ``detail``), in order."""
        with self._lock:
            return self._con.sql("SELECT * FROM admin_log ORDER BY changed_at").to_arrow_table()

    def record_risk_list(self, version: int, csv: str) -> None:
        """Keep a risk-list version (every version is kept)."""
        self._transaction(
            lambda: self._con.execute(
                "INSERT OR REPLACE INTO risk_lists VALUES (?, now(), ?)", [version, csv]
            )
        )

    def latest_risk_list(self) -> tuple[int, str] | None:
        with self._lock:
            rows = self._con.execute("SELECT version, csv FROM risk_lists ORDER BY version DESC LIMIT 1").fetchall()
        return None if not rows else (int(rows[0][0]), str(rows[0][1]))


def pack_state(badge: np.ndarray, entry: np.ndarray, reasons: np.ndarray) -> np.ndarray:
    """A status as the change log stores it: ``badge | entry << 1 | reasons << 2`` (int32)."""
    return (
        np.asarray(badge, dtype=np.int32) | (np.asarray(entry, dtype=np.int32) << 1)
        | (np.asarray(reasons, dtype=np.int32) << 2)
    )  # fmt: skip


def _check_magic(path: str) -> None:
    """Refuse an existing file that is not a DuckDB database (DuckDB would otherwise try to open it anyway)."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"{path}: cannot read the store: {exc.strerror or exc}") from None
    if head and head[8:12] != b"DUCK":
        raise StoreError(f"{path}: not a DuckDB database file; give a new path or an existing store")


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    """Roll back the open transaction; after a fatal I/O error DuckDB may refuse even that (it is then gone)."""
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        pass


def _one(result: duckdb.DuckDBPyConnection) -> tuple[Any, ...] | None:
    """The first row of a result, fetching it whole (DuckDB refuses other work while a result is unfinished)."""
    rows = result.fetchall()
    return tuple(rows[0]) if rows else None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
