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
from healthcode.store.connection import Connection, first_line

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
