"""The Cython kernel must agree with the plain-Python reference bit for bit (SPEC §4), on seeded random populations
full of edge cases, at instants before, at and after every effective_from, for 1 and 2 threads."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest
from conftest import (
    KERNEL_MISSING,
    UNIT_PER_SECOND,
    bj,
    kernel_built,
    make_policy,
    make_population,
    policy_2022_path,
    seconds,
    spread_null_lists,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from healthcode.rules import engine
from healthcode.rules.policy import default_policy, load_policy
from healthcode.rules.regions import RiskList, risk_list_from_rows

pytestmark = pytest.mark.skipif(not kernel_built(), reason=KERNEL_MISSING)

DAY = 86400
HOMES = [
    120104,
    120116,
    120000,
    131082,
    131028,
    131024,
    131081,
    130681,
    130623,
    130731,
    131022,
    131003,  # ring-ish
    110105,
    110108,
    110101,
    130102,
    130600,
    131000,
    451481,
    310101,
    469001,
    139999,  # elsewhere
]
BAD_CODES = [999999, 100000, 99999, 1000000, 0, -131082, 720000, 160101]
VISIT_REGIONS = [
    131082,
    131081,
    131000,
    130000,
    131028,
    130102,
    130100,
    130600,
    130681,
    120104,
    120116,
    120100,
    120000,
    110105,
    110100,
    110000,
    451481,
    451400,
    450000,
    310101,
    130001,
]
RISK_REGIONS = [130102, 131000, 131028, 120116, 130600, 451481, 110105, 130000, 120100, 451400]


def random_rows(rng: np.random.Generator, n: int, as_of: int, unit: str, entry_unit: str) -> list[dict]:
    """``n`` people around ``as_of`` with raw timestamp values in the given units (sub-second parts included)."""
    per, eper = UNIT_PER_SECOND[unit], UNIT_PER_SECOND[entry_unit]
    today = (as_of + 28800) // DAY

    def instant(p: int, lo_days: float, hi_days: float) -> int:
        # Mostly whole hours (so that lapses land on exact boundaries), sometimes any sub-second instant.
        if rng.random() < 0.5:
            t = as_of + int(rng.integers(int(lo_days * 24), int(hi_days * 24) + 1)) * 3600
            t -= (as_of + 28800) % 3600 if rng.random() < 0.5 else 0
            return t * p + (int(rng.integers(0, p)) if rng.random() < 0.3 else 0)
        return int(rng.integers(int((as_of + lo_days * DAY) * p), int((as_of + hi_days * DAY) * p) + 1))

    rows = []
    for i in range(n):
        r: dict = {"person_id": i + 1}
        u = rng.random()
        r["home_region"] = None if u < 0.01 else int(rng.choice(BAD_CODES)) if u < 0.02 else int(rng.choice(HOMES))
        r["registered_commuter"] = [True, False, None][int(rng.choice(3, p=[0.3, 0.65, 0.05]))]
        u = rng.random()
        r["base_color"] = (
            None if u < 0.005 else int(rng.choice([3, -1, 7])) if u < 0.01 else int(rng.choice(3, p=[0.9, 0.06, 0.04]))
        )
        if rng.random() < 0.003:
            r["person_id"] = None
        for name in ("nat_sample_time", "nat_report_time"):
            u = rng.random()
            r[name] = None if u < 0.12 else instant(per, 0.0, 1.5) if u < 0.18 else instant(per, -20.0, 0.0)
        # entries: a commuting pattern, sporadic ones, some after as_of, rare nulls
        u = rng.random()
        if u < 0.06:
            r["entry_times"] = None
        else:
            k = int(rng.integers(0, 12)) if u < 0.7 else int(rng.integers(0, 3))
            entries = [instant(eper, -rng.integers(1, 66), 0.0) for _ in range(k)]
            if rng.random() < 0.1:
                entries.append(instant(eper, 0.0, 2.0))  # after as_of
            if rng.random() < 0.05:
                entries.append(as_of * eper)  # exactly as_of
            if rng.random() < 0.01:
                entries.insert(int(rng.integers(0, len(entries) + 1)), None)
            r["entry_times"] = entries
        # visits near the risk regions
        u = rng.random()
        if u < 0.06:
            r["visits"] = None
        else:
            visits: list = []
            for _ in range(int(rng.integers(0, 6))):
                v = rng.random()
                d = int(today - rng.integers(-2, 22))
                if v < 0.006:
                    visits.append(None)
                elif v < 0.012:
                    visits.append((None, d))
                elif v < 0.018:
                    visits.append((int(rng.choice(BAD_CODES)), d))
                elif v < 0.024:
                    visits.append((int(rng.choice(VISIT_REGIONS)), None))
                else:
                    visits.append((int(rng.choice(VISIT_REGIONS)), d))
            r["visits"] = visits
        rows.append(r)
    return rows


def random_risk(rng: np.random.Generator, as_of: int) -> RiskList:
    today = (as_of + 28800) // DAY
    rows = []
    for _ in range(int(rng.integers(0, 9))):
        c = int(rng.choice(RISK_REGIONS))
        if c in (451481, 451400) and rng.random() < 0.7:
            rows.append((str(c), "", "", "border_port"))
            continue
        s = None if rng.random() < 0.2 else int(today + rng.integers(-25, 4))
        e = None if rng.random() < 0.4 else int((s if s is not None else today - 20) + rng.integers(0, 15))
        rows.append((str(c), _iso(s), _iso(e), "local_case"))
    return risk_list_from_rows(rows)


def _iso(d: int | None) -> str:
    return "" if d is None else (dt.date(1970, 1, 1) + dt.timedelta(days=d)).isoformat()


def run_both(monkeypatch, table, risk, policy, as_of, threads=(1, 2)):
    """Evaluate with the reference and with the kernel; return (reference, [kernel per thread count])."""
    monkeypatch.setenv(engine.REFERENCE_ENV, "1")
    ref = engine.evaluate(table, risk, policy, as_of=as_of)
    monkeypatch.delenv(engine.REFERENCE_ENV)
    kernels = [engine.evaluate(table, risk, policy, as_of=as_of, n_threads=t) for t in threads]
    return ref, kernels


def assert_same(ref: pa.Table, got: pa.Table, table: pa.Table, label: str) -> None:
    assert got.schema == ref.schema, label
    if got.equals(ref):
        return
    a, b = ref.to_pylist(), got.to_pylist()
    diffs = [i for i in range(len(a)) if a[i] != b[i]]
    i = diffs[0]
    pytest.fail(
        f"{label}: kernel and reference disagree on {len(diffs)} of {len(a)} rows; first at row {i}\n"
        f"input:     {_input_row(table, i)}\nreference: {a[i]}\nkernel:    {b[i]}"
    )


def _input_row(table: pa.Table, i: int) -> dict:
    """Row ``i`` of a population with timestamps as raw integers (ns values have no Python datetime)."""
    out = {}
    for name, col in zip(table.column_names, table.slice(i, 1).columns, strict=True):
        t = col.type
        if pa.types.is_timestamp(t):
            col, name = col.cast(pa.int64()), f"{name}[{t.unit}]"
        elif pa.types.is_list(t) and pa.types.is_timestamp(t.value_type):
            col, name = col.cast(pa.list_(pa.int64())), f"{name}[{t.value_type.unit}]"
        out[name] = col.to_pylist()[0]
    return out


TIMELINES = {"default": default_policy, "policy_2022": lambda: load_policy(policy_2022_path())}


def as_of_cases(timeline_name: str) -> list[int]:
    timeline = TIMELINES[timeline_name]()
    out = []
    for p in timeline.policies:
        out += [p.effective_from - 1, p.effective_from, p.effective_from + 3 * DAY + 7 * 3600 + 17]
    if timeline_name == "default":
        out.append(seconds(bj(2021, 11, 30, 12)))
    return out


CASES = [(name, i) for name in TIMELINES for i in range(len(as_of_cases(name)))]


@pytest.mark.parametrize("timeline_name, case", CASES)
def test_random_population(monkeypatch, timeline_name, case):
    as_of = as_of_cases(timeline_name)[case]
    rng = np.random.default_rng([2021_11_30, case, len(timeline_name)])
    units = ["s", "ms", "us", "ns"]
    unit, entry_unit = units[case % 4], units[(case + 1 + len(timeline_name)) % 4]
    table = make_population(
        random_rows(rng, 1500, as_of, unit, entry_unit),
        unit=unit,
        entry_unit=entry_unit,
        tz=["UTC", "Asia/Shanghai"][case % 2],
    )
    if case % 2:
        table = spread_null_lists(table, seed=case)
    risk = random_risk(rng, as_of)
    timeline = TIMELINES[timeline_name]()
    ref, kernels = run_both(monkeypatch, table, risk, timeline, as_of)
    label = f"{timeline_name} as_of={as_of} units={unit}/{entry_unit} risk={risk.rows()}"
    for threads, got in zip((1, 2), kernels, strict=True):
        assert_same(ref, got, table, f"{label} n_threads={threads}")
    # The population is not degenerate: it exercises most outcomes.
    reasons = ref.column("reasons").to_numpy()
    assert (reasons == 0x8000).sum() > 0
    assert ref.column("entry_permitted").to_numpy(zero_copy_only=False).any()
    if any(p.effective_from <= as_of for p in timeline.policies):
        assert ref.column("commuter_badge").to_numpy(zero_copy_only=False).any()


def test_random_population_sliced_and_chunked(monkeypatch):
    as_of = seconds(bj(2021, 11, 30, 12))
    rng = np.random.default_rng(7)
    table = spread_null_lists(make_population(random_rows(rng, 2000, as_of, "ms", "ns"), unit="ms", entry_unit="ns"))
    risk = random_risk(rng, as_of)
    pieces = [table.slice(0, 333), table.slice(333, 1), table.slice(334, 1000), table.slice(1334)]
    chunked = pa.concat_tables(pieces)
    assert chunked.column(0).num_chunks == 4
    ragged = pa.table(
        {
            name: pa.chunked_array(
                [col.combine_chunks().slice(0, 100 + 97 * j), col.combine_chunks().slice(100 + 97 * j)]
            )
            for j, (name, col) in enumerate(zip(table.column_names, table.columns, strict=True))
        }
    )
    ref, _ = run_both(monkeypatch, table, risk, None, as_of, threads=())
    for name, t in (("chunked", chunked), ("ragged", ragged), ("slice", table.slice(517, 901))):
        _, kernels = run_both(monkeypatch, t, risk, None, as_of)
        expected = ref.slice(517, 901) if name == "slice" else ref
        for threads, got in zip((1, 2), kernels, strict=True):
            assert_same(expected.combine_chunks(), got.combine_chunks(), t, f"{name} n_threads={threads}")


def test_pre_1970_population(monkeypatch):
    # Everything before the epoch, under a policy in force since 1960: negative instants must floor.
    policy = make_policy(effective_from='"1960-01-01T00:00:00+08:00"', window_days=9, min_entry_days=2)
    as_of = -5 * DAY + 12345
    rng = np.random.default_rng(1969)
    table = make_population(random_rows(rng, 800, as_of, "ns", "us"), unit="ns", entry_unit="us")
    risk = random_risk(rng, as_of)
    ref, kernels = run_both(monkeypatch, table, risk, policy, as_of)
    for threads, got in zip((1, 2), kernels, strict=True):
        assert_same(ref, got, table, f"pre-1970 n_threads={threads}")


def test_large_list_population(monkeypatch):
    as_of = seconds(bj(2021, 11, 30, 12))
    rng = np.random.default_rng(64)
    table = make_population(random_rows(rng, 600, as_of, "s", "s"))
    entries = table.column("entry_times").cast(pa.large_list(table.schema.field("entry_times").type.value_type))
    visits = table.column("visits").cast(pa.large_list(table.schema.field("visits").type.value_type))
    large = table.set_column(6, "entry_times", entries).set_column(7, "visits", visits)
    ref, kernels = run_both(monkeypatch, table, random_risk(rng, as_of), None, as_of)
    for got in kernels:
        assert_same(ref, got, table, "list")
    ref_large, kernels = run_both(monkeypatch, large, random_risk(np.random.default_rng(64), as_of), None, as_of)
    for got in kernels:
        assert_same(ref_large, got, large, "large_list")


# ----------------------------------------------------------------------------------------------------------------
# A property test: random small populations under random policies.

AS_OF_BASE = seconds(bj(2021, 11, 30, 12))


@st.composite
def policies(draw):
    nat = st.tuples(st.sampled_from(["report", "sample"]), st.sampled_from(["days", "hours"]), st.integers(1, 80))
    return make_policy(
        effective_from=f'"{draw(st.sampled_from(["2021-11-17T00:00:00+08:00", "2021-11-30T12:00:00+08:00"]))}"',
        commuter_nat=draw(nat),
        entry_nat=draw(nat),
        lookback_days=draw(st.integers(1, 20)),
        match=draw(st.sampled_from(["since_visit", "on_visit_day"])),
        ring_regions=draw(st.lists(st.sampled_from([120000, 131082, 131000, 130000, 110105, 131081]), max_size=3)),
        window_days=draw(st.integers(1, 64)),
        min_entry_days=draw(st.integers(1, 6)),
    )


@st.composite
def populations(draw):
    as_of = AS_OF_BASE + draw(st.integers(-2 * DAY, 2 * DAY))
    unit = draw(st.sampled_from(["s", "ms", "us", "ns"]))
    per = UNIT_PER_SECOND[unit]
    offset = st.integers(-70 * DAY * per, 2 * DAY * per)  # raw, relative to as_of
    hours = st.integers(-70 * 24, 48).map(lambda h: h * 3600 * per)
    rel = st.one_of(offset, hours, st.sampled_from([0, -1, 1, -per, per]))
    maybe_instant = st.one_of(st.none(), rel.map(lambda x: as_of * per + x))
    today = (as_of + 28800) // DAY
    region = st.sampled_from(VISIT_REGIONS * 4 + BAD_CODES[:2] + [None])
    day = st.integers(today - 25, today + 2)
    visit = st.one_of(
        st.tuples(region, st.one_of(day, day, day, day, st.none())), *[st.tuples(region, day)] * 8, st.none()
    )
    entry = st.one_of(*[rel.map(lambda x: as_of * per + x)] * 12, st.none())
    row = st.fixed_dictionaries(
        {
            "home_region": st.sampled_from(HOMES * 4 + BAD_CODES[:3] + [None]),
            "registered_commuter": st.sampled_from([True, False, False, None]),
            "base_color": st.sampled_from([0] * 10 + [1, 2, 3, -1, None]),
            "nat_sample_time": maybe_instant,
            "nat_report_time": maybe_instant,
            "entry_times": st.one_of(st.none(), st.lists(entry, max_size=12)),
            "visits": st.one_of(st.none(), st.lists(visit, max_size=5)),
        }
    )
    rows = draw(st.lists(row, min_size=1, max_size=25))
    for i, r in enumerate(rows):
        r["person_id"] = i
    risk_rows = draw(
        st.lists(
            st.tuples(
                st.sampled_from(RISK_REGIONS),
                st.one_of(st.none(), st.integers(today - 25, today + 3)),
                st.one_of(st.none(), st.integers(0, 20)),
            ),
            max_size=5,
        )
    )
    risk = risk_list_from_rows(
        [
            (str(c), _iso(s), _iso(None if n is None else (s if s is not None else today - 20) + n), "local_case")
            for c, s, n in risk_rows
        ]
    )
    table = make_population(rows, unit=unit)
    if draw(st.booleans()):
        table = spread_null_lists(table, seed=draw(st.integers(0, 100)))
    return table, risk, as_of


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=populations(), policy=policies())
def test_property_kernel_equals_reference(data, policy):
    table, risk, as_of = data
    with pytest.MonkeyPatch.context() as mp:
        ref, kernels = run_both(mp, table, risk, policy, as_of)
    for threads, got in zip((1, 2), kernels, strict=True):
        assert_same(ref, got, table, f"property n_threads={threads} policy={policy.policies[0]}")


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_extreme_values(monkeypatch, unit):
    # int64 extremes for every instant, int32 extremes for visit days: nothing may overflow differently.
    extremes = [-(2**63), -(2**63) + 1, -(2**62), -1, 0, 1, 2**62, 2**63 - 1]
    days = [-(2**31), -(2**31) + 1, -1, 0, 2**31 - 1]
    rows = []
    for i, v in enumerate(extremes):
        for j, w in enumerate(extremes):
            rows.append(
                {
                    "home_region": HOMES[(i + j) % len(HOMES)],
                    "registered_commuter": (i + j) % 3 == 0,
                    "nat_sample_time": v,
                    "nat_report_time": w,
                    "entry_times": [v, w, v],
                    "visits": [(VISIT_REGIONS[j], days[(i + j) % len(days)])],
                }
            )
    table = make_population(rows, unit=unit)
    risk = risk_list_from_rows([("131000", "", "", "local_case"), ("451481", "", "", "border_port")])
    for policy in (None, make_policy(commuter_nat=("sample", "hours", 1), window_days=64, min_entry_days=1)):
        for as_of in (seconds(bj(2021, 11, 30, 12)), -1, 0, 2**62):
            ref, kernels = run_both(monkeypatch, table, risk, policy, as_of)
            for got in kernels:
                assert_same(ref, got, table, f"extremes unit={unit} as_of={as_of}")


@pytest.mark.parametrize("itineraries", ["beijing", "country"])
@pytest.mark.parametrize("timeline_name", list(TIMELINES))
@pytest.mark.parametrize("entry_unit", ["s", "ms", "ns"])
def test_generated_population_mostly_clean_blocks(monkeypatch, timeline_name, entry_unit, itineraries):
    """The kernel evaluates blocks of 64 rows with no null list element and no invalid visit region in two flat
    passes, and other blocks row by row: on generated data (0.1% invalid rows) nearly every block takes the first
    path, some the second, and both must equal the reference."""
    from healthcode.generate import generate_batches, generate_risk_csv
    from healthcode.rules.regions import parse_risk_csv

    as_of = seconds(bj(2021, 11, 30, 12)) if timeline_name == "default" else seconds(bj(2022, 5, 3, 9, 30))
    table = pa.Table.from_batches(list(generate_batches(6000, seed=17, as_of=as_of, itineraries=itineraries)))
    instant = pa.timestamp(entry_unit, tz="UTC")
    index = table.schema.get_field_index("entry_times")
    table = table.set_column(index, "entry_times", table["entry_times"].cast(pa.list_(instant)))
    risk = parse_risk_csv(generate_risk_csv(17, as_of))
    ref, kernels = run_both(monkeypatch, table, risk, TIMELINES[timeline_name](), as_of)
    for threads, got in zip((1, 2), kernels, strict=True):
        assert_same(ref, got, table, f"{timeline_name} {itineraries} entry unit {entry_unit} n_threads={threads}")
    assert 0 < ref.column("error").null_count < table.num_rows
