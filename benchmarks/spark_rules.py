"""SPEC §4 as one Spark SQL query: the honest peer a Spark team would write instead of the healthcode Spark job.

A port of the DuckDB peer (``duckdb_rules.py``), in the idiom of Spark SQL: the population is a temporary view with
a row id, the risk list a small DataFrame expanded (in SQL) to every code each entry overlaps, so a visit matching
an entry is an equi-join, broadcast to the executors; entry days and validation are higher-order functions over the
arrays (``filter``, ``transform``, ``array_distinct``, ``sort_array``), one pass per row; the policy parameters are
SQL literals.  No Python runs per row.

Instants are Spark timestamps (microseconds); ``unix_micros`` floored to seconds where SPEC §4.2 needs a value; days
are local (UTC+08:00) day numbers as in ``healthcode.rules.timebase``.  Checked equal to the kernel row for row by
``tests/spark/test_spark_sql_peer.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from duckdb_rules import _ANCHOR_COLUMN, _MATCH, _lapse  # the same SQL in both dialects

from healthcode.rules.policy import Policy
from healthcode.rules.regions import PROVINCES, UNBOUNDED_END, UNBOUNDED_START, RiskList
from healthcode.rules.results import ERROR_MESSAGES, Reason
from healthcode.rules.timebase import DAY_SECONDS, OFFSET_SECONDS, day, day_to_date, midnight, to_instant

US = 1_000_000


def _valid_code(expr: str) -> str:
    provinces = ", ".join(str(p) for p in PROVINCES)
    return f"({expr} BETWEEN 100000 AND 999999 AND {expr} div 10000 IN ({provinces}))"


def _date(d: int) -> str:
    return f"DATE'{day_to_date(d).isoformat()}'"


def _seconds(column: str) -> str:
    """SQL: a timestamp column as epoch seconds, floored (SPEC §4.2)."""
    return f"CAST(floor(unix_micros({column}) / {US}.0) AS BIGINT)"


def _local_day(us: str) -> str:
    return f"CAST(floor(({us} + {OFFSET_SECONDS * US}) / {DAY_SECONDS * US}.0) AS INT)"


def _text(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _error_text() -> str:
    whens = []
    for code, msg in sorted(ERROR_MESSAGES.items()):
        head, sep, tail = msg.partition("{i}")
        text = f"concat({_text(head)}, CAST(err_i AS STRING), {_text(tail)})" if sep else _text(msg)
        whens.append(f"WHEN {code} THEN {text}")
    return "CASE err " + " ".join(whens) + " END"




def build_sql(policy: Policy, active: bool, as_of: int, keep: tuple[str, ...] = ()) -> str:
    """The query over the views ``population`` (with ``__rn``) and ``risk_list`` (region, start_day, end_day)."""
    today = day(as_of)
    pat = policy.commuter_pattern
    lookback = policy.risk.lookback_days
    ring = ", ".join(str(c) for c in pat.ring_regions)
    a_c = _ANCHOR_COLUMN[policy.commuter_nat.anchor]
    a_e = _ANCHOR_COLUMN[policy.entry_nat.anchor]
    entry_lo_us = midnight(today - pat.window_days + 1) * US
    entry_hi_us = (as_of + 1) * US
    kept = "".join(f", {k}" for k in keep)
    r = Reason
    return f"""
WITH
risk_codes AS (
    SELECT explode(sequence(region, region + CASE WHEN region % 10000 = 0 THEN 9999
                                                  WHEN region % 100 = 0 THEN 99 ELSE 0 END)) AS code,
           start_day, end_day
    FROM risk_list
    UNION ALL
    SELECT region div 10000 * 10000, start_day, end_day FROM risk_list WHERE region % 10000 <> 0
    UNION ALL
    SELECT region div 100 * 100, start_day, end_day FROM risk_list WHERE region % 100 <> 0 AND region div 100 % 100 <> 0
),
counted_visits AS (
    SELECT __rn AS rn, v.region AS region, v.day AS day
    FROM (SELECT __rn, explode(visits) AS v FROM population)
    WHERE v.day > {_date(today - lookback)} AND v.day <= {_date(today)}
),
risky AS (
    SELECT /*+ BROADCAST(rc) */ DISTINCT v.rn FROM counted_visits v JOIN risk_codes rc
      ON rc.code = v.region AND {_MATCH[policy.risk.match].format(today=_date(today))}
),
base AS (
    SELECT
        p.__rn AS rn,
        person_id{kept},
        home_region,
        coalesce(registered_commuter, false) AS registered,
        base_color,
        {_seconds(a_c)} AS a_c,
        {_seconds(a_e)} AS a_e,
        sort_array(array_distinct(transform(
            filter(entry_times, t -> unix_micros(t) >= {entry_lo_us} AND unix_micros(t) < {entry_hi_us}),
            t -> {_local_day("unix_micros(t)")})), false) AS entry_days,
        array_min(transform(entry_times, (t, i) -> CASE WHEN t IS NULL THEN i END)) AS bad_entry,
        array_min(transform(visits, (v, i) -> CASE
            WHEN v IS NULL THEN {7 << 26} + i
            WHEN v.region IS NULL THEN {8 << 26} + i
            WHEN NOT {_valid_code("v.region")} THEN {9 << 26} + i
            WHEN v.day IS NULL THEN {10 << 26} + i END)) AS bad_visit,
        k.rn IS NOT NULL AS risk
    FROM population p LEFT JOIN risky k ON k.rn = p.__rn
),
checked AS (
    SELECT *,
        CASE WHEN person_id IS NULL THEN 1
             WHEN home_region IS NULL THEN 2
             WHEN NOT {_valid_code("home_region")} THEN 3
             WHEN base_color IS NULL THEN 4
             WHEN base_color NOT IN (0, 1, 2) THEN 5
             WHEN bad_entry IS NOT NULL THEN 6
             WHEN bad_visit IS NOT NULL THEN bad_visit div {1 << 26}
             ELSE 0 END AS err,
        CASE WHEN bad_entry IS NOT NULL THEN bad_entry
             WHEN bad_visit IS NOT NULL THEN bad_visit % {1 << 26}
             ELSE 0 END AS err_i,
        (home_region IN ({ring}) OR home_region div 100 * 100 IN ({ring})
            OR home_region div 10000 * 10000 IN ({ring})) AS ring,
        greatest(coalesce(size(entry_days), 0), 0) AS n_days,
        try_element_at(entry_days, {pat.min_entry_days}) AS kth_day,
        {_lapse("a_c", policy.commuter_nat)} AS lapse_c,
        {_lapse("a_e", policy.entry_nat)} AS lapse_e
    FROM base
),
windows AS (
    SELECT *,
        a_c IS NOT NULL AND a_c <= {as_of} AS c_exists,
        coalesce(a_c IS NOT NULL AND a_c <= {as_of} AND {as_of} < lapse_c, false) AS c_valid,
        coalesce(a_e IS NOT NULL AND a_e <= {as_of} AND {as_of} < lapse_e, false) AS e_valid,
        coalesce(ring, false) AND n_days >= {pat.min_entry_days} AS pattern
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
             ELSE least(lapse_c, (CAST(kth_day AS BIGINT) + {pat.window_days}) * {DAY_SECONDS} - {OFFSET_SECONDS})
             END END AS badge_until
    FROM outcome
)
SELECT
    person_id,
    coalesce(err = 0 AND badge, false) AS commuter_badge,
    coalesce(err = 0 AND entry, false) AS entry_permitted,
    coalesce(err = 0 AND enrolled, false) AS enrolled,
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
    END AS INT) AS reasons,
    timestamp_seconds(CASE WHEN err = 0 THEN badge_until END) AS badge_valid_until,
    timestamp_seconds(CASE WHEN err = 0 AND entry THEN greatest(CASE WHEN e_valid THEN lapse_e END, badge_until) END)
        AS entry_valid_until,
    CASE WHEN err <> 0 THEN {_error_text()} END AS error{kept}
FROM final
"""


def risk_rows(risk: RiskList) -> list[tuple[int, Any, Any]]:
    """The risk list as (region, start date, end date) rows; unbounded ends are None."""
    start = np.asarray(risk.start_day, dtype=np.int64)
    end = np.asarray(risk.end_day, dtype=np.int64)
    rows = zip(np.asarray(risk.region).tolist(), start.tolist(), end.tolist(), strict=True)
    return [
        (int(reg), None if s == UNBOUNDED_START else day_to_date(s), None if e == UNBOUNDED_END else day_to_date(e))
        for reg, s, e in rows
    ]


def evaluate_sql(
    spark: Any, population: Any, risk: RiskList, policy: Policy, as_of: Any, active: bool = True,
    keep: tuple[str, ...] = (),
) -> Any:  # fmt: skip
    """SPEC §4 for every row of the population DataFrame at ``as_of`` under ``policy`` (the one in force: see
    ``PolicyTimeline.select``), as a DataFrame of the SPEC §4 columns (person_id as it came, reasons as int,
    instants as timestamps) plus the ``keep`` columns of the input."""
    from pyspark.sql import functions as F

    as_of = to_instant(as_of)
    population.withColumn("__rn", F.monotonically_increasing_id()).createOrReplaceTempView("population")
    spark.createDataFrame(risk_rows(risk), "region int, start_day date, end_day date").createOrReplaceTempView(
        "risk_list"
    )
    return spark.sql(build_sql(policy, active, as_of, keep))
