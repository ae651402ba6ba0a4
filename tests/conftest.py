"""Shared builders and fixtures: populations from Python dicts, policies from keyword overrides, and a way to run
the same test against the plain-Python reference and the Cython kernel.

Instants in tests are written as aware datetimes (``bj(2021, 11, 30, 12)`` is 12:00 Beijing time) and converted to
epoch units here with integer datetime arithmetic, independently of ``healthcode.rules.timebase``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from typing import Any

import pyarrow as pa
import pytest

from healthcode.rules import engine
from healthcode.rules.policy import (
    CommuterPattern,
    NatWindow,
    PolicyTimeline,
    RiskRule,
    default_policy,
    load_policy,
    parse_policy,
)
from healthcode.rules.regions import RiskList, risk_list_from_rows

BJ = dt.timezone(dt.timedelta(hours=8))
UTC = dt.timezone.utc
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
EPOCH_DATE = dt.date(1970, 1, 1)
UNIT_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}

#: The worked examples' clock (SPEC §5).
AS_OF = dt.datetime(2021, 11, 30, 12, 0, tzinfo=BJ)

# Reason bits, written out from the SPEC §4.6 table (not imported, so a wrong bit in results.py is caught).
POLICY_INACTIVE = 1
CODE_NOT_GREEN = 2
NAT_MISSING = 4
NAT_EXPIRED = 8
ENTRY_NAT_MISSING = 16
RISK_TRAVEL = 32
NOT_ENROLLED = 64
PATTERN_NOT_MET = 128
HOME_OUTSIDE_RING = 256
INVALID_INPUT = 32768


def bj(*args: int) -> dt.datetime:
    """An aware datetime in Beijing time: ``bj(2021, 11, 30, 12)``."""
    return dt.datetime(*args, tzinfo=BJ)


def seconds(t: dt.datetime) -> int:
    """Epoch seconds of an aware datetime (floored)."""
    return (t - EPOCH) // dt.timedelta(seconds=1)


def raw(t: dt.datetime | int, unit: str) -> int:
    """The raw Arrow value of instant ``t`` in ``unit``, floored (an int is taken as already raw)."""
    if isinstance(t, int):
        return t
    if t.tzinfo is None:
        raise ValueError("test instants must be aware datetimes")
    micros = (t - EPOCH) // dt.timedelta(microseconds=1)
    return {"s": micros // 1_000_000, "ms": micros // 1_000, "us": micros, "ns": micros * 1_000}[unit]


def day_number(d: dt.date | int) -> int:
    return d if isinstance(d, int) else (d - EPOCH_DATE).days


def _ts_list(values: Sequence[Any] | None, unit: str) -> list[int | None] | None:
    if values is None:
        return None
    return [None if v is None else raw(v, unit) for v in values]


def _visit_list(values: Sequence[Any] | None) -> list[dict[str, int | None] | None] | None:
    if values is None:
        return None
    out: list[dict[str, int | None] | None] = []
    for v in values:
        if v is None:
            out.append(None)
        else:
            region, d = v
            out.append({"region": region, "day": None if d is None else day_number(d)})
    return out


def make_population(
    rows: Iterable[Mapping[str, Any]],
    *,
    unit: str = "s",
    tz: str = "UTC",
    entry_unit: str | None = None,
    entry_tz: str | None = None,
) -> pa.Table:
    """A population table in the SPEC schema from dicts.

    Keys: person_id (default: 1, 2, ... by position), home_region (default 131082), registered_commuter (default
    False), base_color (default 0), nat_sample_time / nat_report_time (aware datetime, raw int or None; default None),
    entry_times (list of aware datetimes / raw ints / None, or None; default []), visits (list of (region, date) pairs
    or None, or None; default []).  A key present with value None gives a null.
    """
    entry_unit = entry_unit or unit
    entry_tz = entry_tz or tz
    rows = list(rows)
    cols: dict[str, list[Any]] = {
        k: []
        for k in (
            "person_id",
            "home_region",
            "registered_commuter",
            "base_color",
            "nat_sample_time",
            "nat_report_time",
            "entry_times",
            "visits",
        )
    }
    for i, r in enumerate(rows):
        cols["person_id"].append(r.get("person_id", i + 1))
        cols["home_region"].append(r.get("home_region", 131082))
        cols["registered_commuter"].append(r.get("registered_commuter", False))
        cols["base_color"].append(r.get("base_color", 0))
        for name in ("nat_sample_time", "nat_report_time"):
            v = r.get(name)
            cols[name].append(None if v is None else raw(v, unit))
        cols["entry_times"].append(_ts_list(r.get("entry_times", []), entry_unit))
        cols["visits"].append(_visit_list(r.get("visits", [])))
    visit_type = pa.struct([pa.field("region", pa.int32()), pa.field("day", pa.date32())])
    return pa.table(
        {
            "person_id": pa.array(cols["person_id"], pa.uint64()),
            "home_region": pa.array(cols["home_region"], pa.int32()),
            "registered_commuter": pa.array(cols["registered_commuter"], pa.bool_()),
            "base_color": pa.array(cols["base_color"], pa.int8()),
            "nat_sample_time": pa.array(cols["nat_sample_time"], pa.timestamp(unit, tz=tz)),
            "nat_report_time": pa.array(cols["nat_report_time"], pa.timestamp(unit, tz=tz)),
            "entry_times": pa.array(cols["entry_times"], pa.list_(pa.timestamp(entry_unit, tz=entry_tz))),
            "visits": pa.array(cols["visits"], pa.list_(visit_type)),
        }
    )


def risk(*rows: tuple[Any, ...] | str) -> RiskList:
    """A risk list from ``(region, start, end, kind)`` tuples or CSV lines; dates as ISO strings or ''."""
    parsed = [tuple(r.split(",")) if isinstance(r, str) else r for r in rows]
    return risk_list_from_rows(parsed)


EMPTY_RISK = risk_list_from_rows([])

# ----------------------------------------------------------------------------------------------------------------
# Policies


DEFAULT_RING = [
    120000,
    130681,
    130623,
    130731,
    130730,
    130732,
    130826,
    130824,
    131082,
    131028,
    131024,
    131003,
    131002,
    131022,
]


def policy_table(
    *,
    name: str = "test",
    effective_from: str = '"2021-11-17T00:00:00+08:00"',
    commuter_nat: tuple[str, str, int] = ("report", "days", 14),
    entry_nat: tuple[str, str, int] = ("report", "hours", 48),
    lookback_days: int = 14,
    match: str = "since_visit",
    ring_regions: Sequence[int] = tuple(DEFAULT_RING),
    window_days: int = 14,
    min_entry_days: int = 4,
) -> str:
    """One ``[[policy]]`` table as TOML text (defaults = the shipped default). ``effective_from`` is raw TOML."""
    return f"""
[[policy]]
name = "{name}"
effective_from = {effective_from}
[policy.commuter_nat]
anchor = "{commuter_nat[0]}"
unit = "{commuter_nat[1]}"
length = {commuter_nat[2]}
[policy.entry_nat]
anchor = "{entry_nat[0]}"
unit = "{entry_nat[1]}"
length = {entry_nat[2]}
[policy.risk]
lookback_days = {lookback_days}
match = "{match}"
[policy.commuter_pattern]
ring_regions = [{", ".join(str(c) for c in ring_regions)}]
window_days = {window_days}
min_entry_days = {min_entry_days}
"""


def make_policy(**overrides: Any) -> PolicyTimeline:
    return parse_policy(policy_table(**overrides), "test_policy.toml")


def policy_2022_path() -> str:
    return str(resources.files("healthcode").joinpath("data/policy_2022.toml"))


# ----------------------------------------------------------------------------------------------------------------
# Running an evaluation with one implementation or the other


KERNEL_MISSING = "the Cython kernel healthcode.rules._kernel is not built (run `make build`)"


def kernel_built() -> bool:
    return engine._kernel is not None


Evaluator = Callable[..., list[dict[str, Any]]]


def _evaluator(monkeypatch: pytest.MonkeyPatch, impl: str, n_threads: int = 1) -> Evaluator:
    if impl == "reference":
        monkeypatch.setenv(engine.REFERENCE_ENV, "1")
    else:
        monkeypatch.delenv(engine.REFERENCE_ENV, raising=False)

    def run(
        rows: Iterable[Mapping[str, Any]] | pa.Table | pa.RecordBatch,
        *,
        as_of: dt.datetime | int = AS_OF,
        risk: RiskList = EMPTY_RISK,
        policy: PolicyTimeline | str | None = None,
        unit: str = "s",
    ) -> list[dict[str, Any]]:
        table = rows if isinstance(rows, (pa.Table, pa.RecordBatch)) else make_population(rows, unit=unit)
        timeline = default_policy() if policy is None else policy
        result = engine.evaluate(table, risk, timeline, as_of=as_of, n_threads=n_threads)
        return result.to_pylist()

    return run


@pytest.fixture(autouse=True)
def _no_orphaned_servers() -> Iterable[None]:
    """A test that fails before stopping the servers it started (service_helpers.ServerProcess) does not leave them
    running; servers of wider-scoped fixtures (started before this) are left to their fixtures."""
    import sys

    helpers = sys.modules.get("service_helpers")
    before = set(helpers.RUNNING) if helpers is not None else set()
    yield
    helpers = sys.modules.get("service_helpers")
    if helpers is not None:
        helpers.stop_leftover_servers(keep=before)


@pytest.fixture(params=["reference", "kernel"])
def impl(request: pytest.FixtureRequest) -> str:
    if request.param == "kernel" and not kernel_built():
        pytest.skip(KERNEL_MISSING)
    return request.param


@pytest.fixture
def evaluate(monkeypatch: pytest.MonkeyPatch, impl: str) -> Evaluator:
    """``evaluate(rows, as_of=..., risk=..., policy=...)`` -> result rows as dicts, with each implementation."""
    return _evaluator(monkeypatch, impl)


@pytest.fixture
def evaluate_reference(monkeypatch: pytest.MonkeyPatch) -> Evaluator:
    return _evaluator(monkeypatch, "reference")


@pytest.fixture(scope="session")
def timeline_2022() -> PolicyTimeline:
    return load_policy(policy_2022_path())


def spread_null_lists(table: pa.Table, seed: int = 0) -> pa.Table:
    """The same table, but every null ``entry_times`` / ``visits`` slot spans child elements in its offsets.

    Arrow allows a null list slot to cover children; they must be ignored (a null list is an empty list).  The junk
    children are taken from other rows and include nulls, invalid codes and risky visits, so reading them shows.
    """
    import random

    rng = random.Random(seed)
    out = table.combine_chunks()
    for name, junk in (
        ("entry_times", [None, 0, seconds(AS_OF) - 3600]),
        (
            "visits",
            [
                None,
                {"region": 190000, "day": 18950},
                {"region": 451481, "day": 18955},
                {"region": None, "day": 18955},
                {"region": 131082, "day": None},
            ],
        ),
    ):
        col = out.column(name).combine_chunks()
        value_type = raw_type = col.type.value_type
        if pa.types.is_timestamp(value_type):  # work on raw integers (sub-second values survive)
            raw_type = pa.int64()
            rows = col.cast(pa.list_(raw_type)).to_pylist()
            junk = [None if j is None else j * UNIT_PER_SECOND[value_type.unit] for j in junk]
        else:
            rows = col.to_pylist()
        offsets, values, mask = [0], [], []
        for r in rows:
            if r is None:
                values.extend(rng.choice(junk) for _ in range(rng.randint(1, 3)))
            else:
                values.extend(r)
            offsets.append(len(values))
            mask.append(r is None)
        flat = pa.array(values, raw_type).cast(value_type)
        arr = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), flat, mask=pa.array(mask, pa.bool_()))
        assert arr.type == col.type, (arr.type, col.type)
        out = out.set_column(out.schema.get_field_index(name), name, arr)
    return out


@pytest.fixture(scope="session")
def spark():
    """One local Spark session (``local[2]``) shared by every Spark test; skipped where pyspark or Java is missing."""
    import shutil

    pytest.importorskip("pyspark")
    if shutil.which("java") is None:
        pytest.skip("Java is not installed (the Spark tests need a JVM: apt-get install openjdk-17-jre-headless)")
    from healthcode.spark.session import session

    s = session("local[2]", "healthcode-tests", **{"spark.sql.shuffle.partitions": "4"})
    yield s
    s.stop()


def variant_policy() -> PolicyTimeline:
    """The SQL peers' second policy shape, for the other branches: sample anchors, an hours commuter window, a days
    entry window, on_visit_day matching."""
    base = default_policy().policies[0]
    policy = dataclasses.replace(
        base,
        name="variant",
        commuter_nat=NatWindow(anchor="sample", unit="hours", length=72),
        entry_nat=NatWindow(anchor="sample", unit="days", length=2),
        risk=RiskRule(lookback_days=7, match="on_visit_day"),
        commuter_pattern=CommuterPattern(
            ring_regions=(120100, 131000, 130681), window_days=10, min_entry_days=3
        ),
    )
    return PolicyTimeline((policy,), "variant")
