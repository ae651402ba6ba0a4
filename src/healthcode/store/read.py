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
from healthcode.rules.timebase import day, day_to_date, midnight, to_instant
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


def population(
    db: Connection, as_of: _dt.datetime | int | float | str, lookback_days: int, future: bool = False
) -> pa.Table:
    """The population at ``as_of`` with ``lookback_days`` of events (see :meth:`Store.population`); ``future``:
    entries and visits dated after ``as_of`` too."""
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
                if future:
                    sql = sql.replace(" AND t <= $as_of", "").replace(" AND day <= $d_today", "")
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


_NAT_AFTER = (
    "SELECT person_id, sample_time, report_time FROM nat_results WHERE report_time > $after AND report_time <= $as_of "
    "ORDER BY person_id"
)


def nat_results_after(db: Connection, after: int, as_of: int) -> pa.Table:
    """The NAT results reported in ``(after, as_of]`` (store form): the events the view left out for being later
    than its clock then, due now (it keeps future-dated entries and visits)."""
    with db.lock:
        try:
            return db.con.sql(_NAT_AFTER, params={"after": after, "as_of": as_of}).to_arrow_table()
        except duckdb.Error as exc:
            raise StoreError(f"{db.path}: cannot read the NAT results after {after}: {first_line(exc)}") from None


def first_nat_after(db: Connection, as_of: int) -> int | None:
    """The earliest report time of a stored NAT result later than ``as_of`` (what a view read at ``as_of`` leaves
    out until then), or None."""
    with db.lock:
        try:
            row = one(db.con.execute("SELECT min(report_time) FROM nat_results WHERE report_time > ?", [as_of]))
        except duckdb.Error as exc:
            raise StoreError(f"{db.path}: cannot read the first NAT result after {as_of}: {first_line(exc)}") from None
    return int(row[0]) if row is not None and row[0] is not None else None


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
