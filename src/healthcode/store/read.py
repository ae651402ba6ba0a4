"""The population inside a window, read back from the store as SPEC §3 rows.

Flat, sorted scans (DuckDB sorts in parallel) are put together into list columns by
:func:`healthcode.rules.flat.assemble_sorted`: about twice as fast as aggregating lists in SQL, and no per-person
objects anywhere.
"""

from __future__ import annotations

import datetime as _dt

import duckdb
import pyarrow as pa

from healthcode.errors import StoreError
from healthcode.rules.flat import assemble_sorted
from healthcode.rules.timebase import date_to_day, day, day_to_date, midnight, to_instant
from healthcode.store.connection import Connection, first_line, one

_QUERIES = {
    "persons": "SELECT person_id, home_region, registered_commuter, base_color FROM persons ORDER BY person_id",
    "nat": "SELECT person_id, sample_time, report_time FROM nat_results WHERE report_time <= $as_of "
    "QUALIFY row_number() OVER (PARTITION BY person_id ORDER BY report_time DESC, sample_time DESC NULLS LAST) "
    "= 1 ORDER BY person_id",
    "entries": "SELECT person_id, t FROM entries WHERE t >= $t_first AND t <= $as_of ORDER BY person_id, t",
    "visits": "SELECT person_id, region, day FROM visits WHERE day >= $d_first AND day <= $d_today "
    "ORDER BY person_id, day, region",
}


def population(db: Connection, as_of: _dt.datetime | int | float | str, lookback_days: int) -> pa.Table:
    """The population at ``as_of`` with ``lookback_days`` of events (see :meth:`Store.population`)."""
    if isinstance(lookback_days, bool) or not isinstance(lookback_days, int) or lookback_days < 1:
        raise StoreError(f"lookback_days must be a whole number >= 1, got {lookback_days!r}")
    try:
        t = to_instant(as_of)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"as_of: {exc}") from None
    today = day(t)
    first = today - lookback_days + 1
    params = {"as_of": t, "t_first": midnight(first), "d_first": day_to_date(first), "d_today": day_to_date(today)}
    parts = {}
    with db.lock:
        try:
            for name, sql in _QUERIES.items():
                used = {k: v for k, v in params.items() if f"${k}" in sql}
                parts[name] = db.con.sql(sql, params=used).to_arrow_table()
        except duckdb.Error as exc:
            raise StoreError(f"{db.path}: cannot read the population: {first_line(exc)}") from None
    return assemble_sorted(parts["persons"], parts["nat"], parts["entries"], parts["visits"])


#: Rows per population table and the last person update (epoch microseconds): every committed write that changes
#: the population changes one of them (an insert a count, a changing upsert ``updated_at``).  DuckDB answers all five
#: from table statistics, without a scan.
_MARK = (
    "SELECT (SELECT count(*) FROM persons), (SELECT count(*) FROM nat_results), (SELECT count(*) FROM entries), "
    "(SELECT count(*) FROM visits), (SELECT coalesce(epoch_us(max(updated_at)), 0) FROM persons)"
)


def population_mark(db: Connection) -> tuple[int, int, int, int, int]:
    """The store's population fingerprint (see :meth:`Store.population_mark`)."""
    with db.lock:
        try:
            row = one(db.con.execute(_MARK))
        except duckdb.Error as exc:
            raise StoreError(f"{db.path}: cannot read the population mark: {first_line(exc)}") from None
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2]), int(row[3]), int(row[4])


_EVENTS_AFTER = {
    "nat_results": "SELECT person_id, sample_time, report_time FROM nat_results "
    "WHERE report_time > $after AND report_time <= $as_of ORDER BY person_id",
    "entries": "SELECT person_id, t FROM entries WHERE t > $after AND t <= $as_of ORDER BY person_id",
    "visits": "SELECT person_id, region, day FROM visits WHERE day > $d_after AND day <= $d_today "
    "ORDER BY person_id",
}


def events_after(db: Connection, after: int, as_of: int) -> list[tuple[str, pa.Table]]:
    """The NAT results reported, entries made and visits on days in ``(after, as_of]`` (store form)."""
    params = {"after": after, "as_of": as_of, "d_after": day_to_date(day(after)), "d_today": day_to_date(day(as_of))}
    out = []
    with db.lock:
        try:
            for kind, sql in _EVENTS_AFTER.items():
                used = {k: v for k, v in params.items() if f"${k}" in sql}
                out.append((kind, db.con.sql(sql, params=used).to_arrow_table()))
        except duckdb.Error as exc:
            raise StoreError(f"{db.path}: cannot read the events after {after}: {first_line(exc)}") from None
    return out


_FIRST_AFTER = (
    "SELECT (SELECT min(report_time) FROM nat_results WHERE report_time > $as_of), "
    "(SELECT min(t) FROM entries WHERE t > $as_of), (SELECT min(day) FROM visits WHERE day > $d_today)"
)


def first_event_after(db: Connection, as_of: int) -> int | None:
    """The earliest instant of a stored event later than ``as_of`` (a visit's is its day's midnight), or None."""
    params = {"as_of": as_of, "d_today": day_to_date(day(as_of))}
    with db.lock:
        try:
            row = one(db.con.execute(_FIRST_AFTER, params))
        except duckdb.Error as exc:
            raise StoreError(f"{db.path}: cannot read the first event after {as_of}: {first_line(exc)}") from None
    assert row is not None
    found = [int(row[0])] if row[0] is not None else []
    found += [int(row[1])] if row[1] is not None else []
    found += [midnight(date_to_day(row[2]))] if row[2] is not None else []
    return min(found) if found else None


def latest_changes_after(db: Connection, after: int) -> pa.Table:
    """The latest change-log status of each person changed after sequence number ``after``."""
    sql = (
        "SELECT person_id, (new_state & 1) = 1 AS commuter_badge, (new_state & 2) = 2 AS entry_permitted, "
        "(new_state >> 2)::USMALLINT AS reasons FROM change_log WHERE seq > $after "
        "QUALIFY row_number() OVER (PARTITION BY person_id ORDER BY seq DESC) = 1"
    )
    with db.lock:
        try:
            return db.con.sql(sql, params={"after": after}).to_arrow_table()
        except duckdb.Error as exc:
            raise StoreError(f"{db.path}: cannot read the change log after {after}: {first_line(exc)}") from None


def drop_cached_blocks(db: Connection) -> None:
    """Make DuckDB give back the table blocks it keeps cached after a big read (lowering its memory limit for a
    moment evicts them; the limit in force is restored)."""
    with db.lock:
        try:
            row = one(db.con.execute("SELECT current_setting('memory_limit')"))
            assert row is not None
            db.con.execute("SET memory_limit = '64MB'")
            db.con.execute("SET memory_limit = $limit", {"limit": str(row[0])})
        except duckdb.Error as exc:
            raise StoreError(f"{db.path}: cannot release cached blocks: {first_line(exc)}") from None
