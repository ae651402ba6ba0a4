"""SPEC §4 as one DuckDB SQL query: the honest peer a data team would write instead of the Cython kernel.

The population Arrow table is registered with an in-memory DuckDB connection (zero-copy scan) with a
row-number column appended (so the result keeps the input order); the risk list is a small registered
table; the policy parameters are SQL literals.  The region hierarchy is handled in SQL: each risk entry
is expanded to every code it overlaps (the codes it contains, plus its prefecture and province), so
matching a visit is an equi-join; both match modes are join conditions.  Entry days and validation use
DuckDB list lambdas, one pass per row.

Instants are compared in microseconds (DuckDB's TIMESTAMPTZ resolution) and floored to seconds where
SPEC §4.2 needs a value; days are local (UTC+08:00) day numbers as in ``healthcode.rules.timebase``.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa

from healthcode.rules.policy import NatWindow, Policy
from healthcode.rules.regions import PROVINCES, UNBOUNDED_END, UNBOUNDED_START, RiskList
from healthcode.rules.results import ERROR_MESSAGES, RESULT_SCHEMA, Reason
from healthcode.rules.timebase import DAY_SECONDS, OFFSET_SECONDS, day, day_to_date, midnight, to_instant

US = 1_000_000
_POP_COLUMNS = (
    "person_id", "home_region", "registered_commuter", "base_color",
    "nat_sample_time", "nat_report_time", "entry_times", "visits",
)  # fmt: skip
_ANCHOR_COLUMN = {"report": "nat_report_time", "sample": "nat_sample_time"}


def _valid_code(expr: str) -> str:
    """SQL: ``expr`` is a syntactically valid GB/T 2260 code (SPEC §3)."""
    provinces = ", ".join(str(p) for p in PROVINCES)
    return f"({expr} BETWEEN 100000 AND 999999 AND {expr} // 10000 IN ({provinces}))"


def _date(d: int) -> str:
    return f"DATE '{day_to_date(d).isoformat()}'"


def _epoch_us(expr: str) -> str:
    """SQL: microseconds since the epoch of a tz-aware timestamp of any unit (ns columns arrive as
    TIMESTAMPTZ_NS; the cast truncates them to microseconds, which is a floor for instants after 1970)."""
    return f"epoch_us(CAST({expr} AS TIMESTAMPTZ))"


def _seconds(column: str) -> str:
    """SQL: a TIMESTAMPTZ column as epoch seconds, floored (SPEC §4.2)."""
    return f"CAST(floor({_epoch_us(column)} / {US}.0) AS BIGINT)"


def _lapse(anchor: str, w: NatWindow) -> str:
    """SQL: the instant the window anchored at ``anchor`` (epoch seconds) lapses (SPEC §4.2)."""
    if w.unit == "days":
        return (f"((CAST(floor(({anchor} + {OFFSET_SECONDS}) / {DAY_SECONDS}.0) AS BIGINT) + {w.length})"
                f" * {DAY_SECONDS} - {OFFSET_SECONDS})")  # fmt: skip
    return f"({anchor} + {w.length * 3600})"


def _sql_text(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _error_text() -> str:
    """SQL: the message for ``err`` (code) and ``err_i`` (0-based element index), as in ERROR_MESSAGES."""
    whens = []
    for code, msg in sorted(ERROR_MESSAGES.items()):
        head, sep, tail = msg.partition("{i}")
        text = f"{_sql_text(head)} || CAST(err_i AS VARCHAR) || {_sql_text(tail)}" if sep else _sql_text(msg)
        whens.append(f"WHEN {code} THEN {text}")
    return "CASE err " + " ".join(whens) + " END"


_MATCH = {
    # a risk entry (rc) hits a counted visit (v) under each match mode (SPEC §4.3); NULL dates are unbounded
    "since_visit": "(rc.start_day IS NULL OR rc.start_day <= {today})"
    " AND (rc.end_day IS NULL OR rc.end_day >= v.day)",
    "on_visit_day": "(rc.start_day IS NULL OR rc.start_day <= v.day)"
    " AND (rc.end_day IS NULL OR v.day <= rc.end_day)",
}


def build_sql(policy: Policy, active: bool, as_of: int) -> str:
    """The query over tables ``population`` (with ``__rn``) and ``risk_list`` (region, start_day, end_day)."""
    today = day(as_of)
    pat = policy.commuter_pattern
    lookback = policy.risk.lookback_days
    ring = ", ".join(str(c) for c in pat.ring_regions)
    a_c = _ANCHOR_COLUMN[policy.commuter_nat.anchor]
    a_e = _ANCHOR_COLUMN[policy.entry_nat.anchor]
    # Entries counted for the pattern: t <= as_of (floored) and day(t) in (today - window_days, today].
    entry_lo_us = midnight(today - pat.window_days + 1) * US
    entry_hi_us = (as_of + 1) * US
    r = Reason
    return f"""
WITH
risk_codes AS (  -- every code a risk entry overlaps: the codes it contains, its prefecture and its province
    SELECT unnest(range(region, region + CASE WHEN region % 10000 = 0 THEN 10000
                                              WHEN region % 100 = 0 THEN 100 ELSE 1 END)) AS code,
           start_day, end_day
    FROM risk_list
    UNION ALL
    SELECT region // 10000 * 10000, start_day, end_day FROM risk_list WHERE region % 10000 <> 0
    UNION ALL
    SELECT region // 100 * 100, start_day, end_day FROM risk_list
    WHERE region % 100 <> 0 AND region // 100 % 100 <> 0
),
counted_visits AS (  -- visits inside the lookback window
    SELECT rn, v.region AS region, v.day AS day
    FROM (SELECT __rn AS rn, unnest(visits) AS v FROM population)
    WHERE v.day > {_date(today - lookback)} AND v.day <= {_date(today)}
),
risky AS (
    SELECT v.rn FROM counted_visits v JOIN risk_codes rc
      ON rc.code = v.region AND {_MATCH[policy.risk.match].format(today=_date(today))}
),
base AS (
    SELECT
        __rn AS rn,
        person_id,
        home_region,
        coalesce(registered_commuter, false) AS registered,
        base_color,
        {_seconds(a_c)} AS a_c,
        {_seconds(a_e)} AS a_e,
        -- distinct local days of the entries in the pattern window, most recent first
        list_sort(list_distinct(list_transform(
            list_filter(entry_times, lambda t: {_epoch_us("t")} >= {entry_lo_us} AND {_epoch_us("t")} < {entry_hi_us}),
            lambda t: CAST(({_epoch_us("t")} + {OFFSET_SECONDS * US}) // {DAY_SECONDS * US} AS INTEGER))), 'DESC')
            AS entry_days,
        -- validation (SPEC §4.1, in the order of results.ERROR_MESSAGES): the first null entry (1-based), and
        -- the first failing visit check as code * 2^26 + 0-based index (each check runs over the whole list
        -- before the next, so the smallest code wins, then the smallest index)
        list_position(entry_times, NULL) AS bad_entry,
        list_min(list_transform(visits, lambda v, i: CASE
            WHEN v IS NULL THEN {7 << 26} + i - 1
            WHEN v.region IS NULL THEN {8 << 26} + i - 1
            WHEN NOT {_valid_code("v.region")} THEN {9 << 26} + i - 1
            WHEN v.day IS NULL THEN {10 << 26} + i - 1 END)) AS bad_visit,
        __rn IN (SELECT rn FROM risky) AS risk
    FROM population
),
checked AS (
    SELECT *,
        CASE WHEN person_id IS NULL THEN 1
             WHEN home_region IS NULL THEN 2
             WHEN NOT {_valid_code("home_region")} THEN 3
             WHEN base_color IS NULL THEN 4
             WHEN base_color NOT IN (0, 1, 2) THEN 5
             WHEN bad_entry IS NOT NULL THEN 6
             WHEN bad_visit IS NOT NULL THEN bad_visit // {1 << 26}
             ELSE 0 END AS err,
        CASE WHEN bad_entry IS NOT NULL THEN bad_entry - 1
             WHEN bad_visit IS NOT NULL THEN bad_visit % {1 << 26}
             ELSE 0 END AS err_i,
        (list_contains([{ring}], home_region) OR list_contains([{ring}], home_region // 100 * 100)
            OR list_contains([{ring}], home_region // 10000 * 10000)) AS ring,
        coalesce(len(entry_days), 0) AS n_days,
        entry_days[{pat.min_entry_days}] AS kth_day,
        {_lapse("a_c", policy.commuter_nat)} AS lapse_c,
        {_lapse("a_e", policy.entry_nat)} AS lapse_e
    FROM base
),
windows AS (
    SELECT *,
        a_c IS NOT NULL AND a_c <= {as_of} AS c_exists,
        a_c IS NOT NULL AND a_c <= {as_of} AND {as_of} < lapse_c AS c_valid,
        a_e IS NOT NULL AND a_e <= {as_of} AND {as_of} < lapse_e AS e_valid,
        ring AND n_days >= {pat.min_entry_days} AS pattern
    FROM checked
),
outcome AS (
    SELECT *,
        registered OR pattern AS enrolled,
        {str(active).upper()} AND base_color = 0 AND (registered OR pattern) AND c_valid AND NOT risk AS badge
    FROM windows
),
final AS (
    SELECT *,
        base_color = 0 AND NOT risk AND (e_valid OR badge) AS entry,
        CASE WHEN badge THEN CASE WHEN registered THEN lapse_c
             ELSE least(lapse_c, (kth_day + {pat.window_days}) * {DAY_SECONDS} - {OFFSET_SECONDS}) END END
            AS badge_until
    FROM outcome
)
SELECT
    person_id,
    err = 0 AND badge AS commuter_badge,
    err = 0 AND entry AS entry_permitted,
    err = 0 AND enrolled AS enrolled,
    CAST(CASE WHEN err <> 0 THEN {int(r.INVALID_INPUT)} ELSE
          {0 if active else int(r.POLICY_INACTIVE)}
        + CASE WHEN base_color <> 0 THEN {int(r.CODE_NOT_GREEN)} ELSE 0 END
        + CASE WHEN NOT c_exists THEN {int(r.NAT_MISSING)} ELSE 0 END
        + CASE WHEN c_exists AND NOT c_valid THEN {int(r.NAT_EXPIRED)} ELSE 0 END
        + CASE WHEN NOT e_valid THEN {int(r.ENTRY_NAT_MISSING)} ELSE 0 END
        + CASE WHEN risk THEN {int(r.RISK_TRAVEL)} ELSE 0 END
        + CASE WHEN NOT enrolled THEN {int(r.NOT_ENROLLED)} ELSE 0 END
        + CASE WHEN n_days < {pat.min_entry_days} THEN {int(r.PATTERN_NOT_MET)} ELSE 0 END
        + CASE WHEN NOT ring THEN {int(r.HOME_OUTSIDE_RING)} ELSE 0 END
    END AS USMALLINT) AS reasons,
    CASE WHEN err = 0 THEN badge_until END AS badge_valid_until,
    CASE WHEN err = 0 AND entry THEN greatest(CASE WHEN e_valid THEN lapse_e END, badge_until) END
        AS entry_valid_until,
    CASE WHEN err <> 0 THEN {_error_text()} END AS error
FROM final
ORDER BY rn
"""


def risk_table(risk: RiskList) -> pa.Table:
    """The risk list as a small Arrow table; unbounded ends are NULL dates."""
    start = np.asarray(risk.start_day, dtype=np.int32)
    end = np.asarray(risk.end_day, dtype=np.int32)
    return pa.table(
        {
            "region": pa.array(np.asarray(risk.region, dtype=np.int32), type=pa.int32()),
            "start_day": pa.array(start, type=pa.date32(), mask=start == UNBOUNDED_START),
            "end_day": pa.array(end, type=pa.date32(), mask=end == UNBOUNDED_END),
        }
    )


#: The risk-list CSV read by DuckDB itself (the same file a user gives healthcode): empty dates are unbounded.
_RISK_CSV_VIEW = """
CREATE VIEW risk_list AS
SELECT CAST(trim(region) AS INTEGER) AS region,
       CAST(NULLIF(trim(start_date), '') AS DATE) AS start_day,
       CAST(NULLIF(trim(end_date), '') AS DATE) AS end_day
FROM read_csv($path, header = true, all_varchar = true)
"""


def evaluate_duckdb(
    table: pa.Table, risk: RiskList | str, policy: Policy, active: bool, as_of: int, threads: int = 1
) -> pa.Table:
    """SPEC §4 for every row of ``table`` at ``as_of`` under ``policy`` (``active``: in force).

    ``risk`` is a loaded list (registered as a small table) or the path of its CSV file (read by DuckDB in the
    query, as a data team would).  ``policy`` and ``active`` are what ``PolicyTimeline.select(as_of)`` returns;
    ``as_of`` is anything ``timebase.to_instant`` takes.  The result is in RESULT_SCHEMA.
    """
    as_of = to_instant(as_of)
    pop = table.select(list(_POP_COLUMNS))
    pop = pop.append_column("__rn", pa.array(np.arange(pop.num_rows, dtype=np.int64)))
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"SET threads = {int(threads)}")
        con.execute("SET enable_progress_bar = false")
        con.register("population", pop)
        if isinstance(risk, str):
            con.execute(_RISK_CSV_VIEW.replace("$path", "'" + risk.replace("'", "''") + "'"))
        else:
            con.register("risk_list", risk_table(risk))
        out = con.sql(build_sql(policy, active, as_of)).to_arrow_table()
    finally:
        con.close()
    ts = pa.timestamp("s", tz="UTC")
    columns = [
        out.column("person_id").cast(pa.uint64()),
        out.column("commuter_badge"),
        out.column("entry_permitted"),
        out.column("enrolled"),
        out.column("reasons").cast(pa.uint16()),
        out.column("badge_valid_until").cast(pa.int64()).cast(ts),
        out.column("entry_valid_until").cast(pa.int64()).cast(ts),
        out.column("error").cast(pa.string()),
    ]
    return pa.Table.from_arrays(columns, schema=RESULT_SCHEMA)
