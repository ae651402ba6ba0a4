"""rules/flat.py: population rows <-> flat event arrays (SPEC §3), both directions and the round trip."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa

from healthcode.generate import generate_batches
from healthcode.rules.columns import POPULATION_SCHEMA, VISIT_TYPE
from healthcode.rules.flat import assemble, assemble_sorted, explode, list_elements
from healthcode.rules.regions import is_valid_code, valid_codes

TS = pa.timestamp("s", tz="UTC")
D = dt.date(2021, 11, 28)


def _rows() -> pa.Table:
    """Five rows: nulls in every scalar, empty lists, lists with several (sorted, distinct) events."""
    return pa.table(
        {
            "person_id": pa.array([1, None, 3, 4, 5], pa.uint64()),
            "home_region": pa.array([110101, 110105, None, 310101, 120104], pa.int32()),
            "registered_commuter": pa.array([True, None, False, True, False]),
            "base_color": pa.array([0, 1, 2, None, 0], pa.int8()),
            "nat_sample_time": pa.array([100, None, 300, None, 500], pa.int64()).cast(TS),
            "nat_report_time": pa.array([200, 250, None, None, 600], pa.int64()).cast(TS),
            "entry_times": pa.array([[10, 20], [], [5], [], [1, 2, 3]], pa.list_(pa.int64())).cast(pa.list_(TS)),
            "visits": pa.array(
                [
                    [{"region": 110101, "day": D}, {"region": 110105, "day": D + dt.timedelta(days=1)}],
                    [],
                    [],
                    [{"region": 310101, "day": D}],
                    [{"region": 110101, "day": D}, {"region": 120104, "day": D}],
                ],
                pa.list_(VISIT_TYPE),
            ),
        },
        schema=POPULATION_SCHEMA,
    )


def test_round_trip_keeps_nulls_and_empty_lists() -> None:
    rows = _rows()
    f = explode(rows)
    assert len(f) == 5
    assert f.e_row.tolist() == [0, 0, 2, 4, 4, 4]
    assert f.v_row.tolist() == [0, 0, 3, 4, 4]
    assert f.ids_ok is not None and f.ids_ok.tolist() == [True, False, True, True, True]
    assert f.nat_report_ok.tolist() == [True, True, False, False, True]
    back = assemble(f)
    assert back.schema == POPULATION_SCHEMA
    assert back.equals(rows)


def test_round_trip_of_generated_rows() -> None:
    rows = pa.Table.from_batches(list(generate_batches(2000, seed=5))).combine_chunks()
    # The generator writes invalid rows (null events) on purpose; keep the rows whose events are all valid.
    f = explode(rows)
    bad = np.zeros(len(f), dtype=bool)
    if f.e_ok is not None:
        bad[f.e_row[~f.e_ok]] = True
    if f.v_ok is not None:
        bad[f.v_row[~f.v_ok]] = True
    clean = rows.filter(pa.array(~bad)).cast(POPULATION_SCHEMA)
    back = assemble(explode(clean))
    for name in POPULATION_SCHEMA.names[:6]:
        assert back.column(name).equals(clean.column(name)), name
    # Events come back sorted and without repeats, per row.
    got, want = back.column("entry_times").to_pylist(), clean.column("entry_times").to_pylist()
    assert got == [sorted(set(w or [])) for w in want]
    got, want = back.column("visits").to_pylist(), clean.column("visits").to_pylist()
    assert [[(v["day"], v["region"]) for v in g] for g in got] == [
        sorted({(v["day"], v["region"]) for v in w or []}) for w in want
    ]


def test_assemble_sorts_and_drops_repeats_and_null_events() -> None:
    rows = pa.table(
        {
            "person_id": pa.array([7, 8], pa.uint64()),
            "home_region": pa.array([110101, 110101], pa.int32()),
            "registered_commuter": pa.array([True, False]),
            "base_color": pa.array([0, 0], pa.int8()),
            "nat_sample_time": pa.array([None, None], TS),
            "nat_report_time": pa.array([None, None], TS),
            "entry_times": pa.array([[30, 10, 30, None], None], pa.list_(pa.int64())).cast(pa.list_(TS)),
            "visits": pa.array(
                [[{"region": 120104, "day": D}, {"region": 110101, "day": D}, {"region": 110101, "day": D}], None],
                pa.list_(VISIT_TYPE),
            ),
        },
        schema=POPULATION_SCHEMA,
    )
    f = explode(rows)
    assert f.e_ok is not None and f.e_ok.tolist() == [True, True, True, False]
    back = assemble(f)
    assert back.column("entry_times").to_pylist() == [
        [dt.datetime(1970, 1, 1, 0, 0, s, tzinfo=dt.timezone.utc) for s in (10, 30)],
        [],
    ]
    assert back.column("visits").to_pylist() == [[{"region": 110101, "day": D}, {"region": 120104, "day": D}], []]


def test_explode_floors_any_unit_to_seconds() -> None:
    ms = pa.timestamp("ms", tz="Asia/Shanghai")
    rows = _rows()
    rows = rows.set_column(6, "entry_times", pa.array([[-1500, 2500], [], [], [], []], pa.list_(pa.int64())).cast(
        pa.list_(ms)))  # fmt: skip
    f = explode(rows)
    assert f.e_t.tolist() == [-2, 2]  # SPEC §2: floored, not truncated


def test_null_lists_spanning_values_are_empty() -> None:
    values = pa.array([1, 2, 3], pa.int64())
    lst = pa.ListArray.from_arrays(pa.array([0, 2, 3], pa.int32()), values, mask=pa.array([True, False]))
    parents, elements = list_elements(lst)
    assert parents.tolist() == [1]
    assert elements.to_pylist() == [3]


def test_assemble_sorted_builds_the_same_rows() -> None:
    rows = _rows().filter(pa.array([True, False, True, True, True]))  # no null ids: rows keyed by id
    rows = rows.set_column(1, "home_region", pa.array([110101, 110105, 310101, 120104], pa.int32()))
    rows = rows.set_column(2, "registered_commuter", pa.array([True, False, True, False]))
    rows = rows.set_column(3, "base_color", pa.array([0, 2, 1, 0], pa.int8()))
    # A store keeps a NAT sample time only with its report time.
    rows = rows.set_column(4, "nat_sample_time", pa.array([100, None, None, 500], pa.int64()).cast(TS))
    f = explode(rows)
    nat = f.nat_report_ok
    got = assemble_sorted(
        pa.table({"person_id": f.ids, "home_region": f.home, "registered_commuter": f.registered,
                  "base_color": f.color}),
        pa.table({"person_id": f.ids[nat], "sample_time": pa.array(f.nat_sample[nat], mask=~f.nat_sample_ok[nat]),
                  "report_time": f.nat_report[nat]}),
        pa.table({"person_id": f.ids[f.e_row], "t": f.e_t}),
        pa.table({"person_id": f.ids[f.v_row], "region": f.v_region,
                  "day": pa.array(f.v_day, pa.int32()).cast(pa.date32())}),
    )  # fmt: skip
    assert got.equals(rows)


def test_valid_codes_is_is_valid_code() -> None:
    codes = np.array([0, 99999, 100000, 110000, 110101, 199999, 710000, 820000, 999999, 1000000, -110101])
    assert valid_codes(codes).tolist() == [is_valid_code(int(c)) for c in codes]
