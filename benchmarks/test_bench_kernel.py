"""The kernel (the public ``healthcode.evaluate`` over an in-memory Arrow table) against the same rules in DuckDB SQL.

Both populations of the generator (``beijing`` and ``country`` itineraries), each with the risk list given as its
CSV path (as a user calls it; DuckDB reads the same CSV in its query) and as a list loaded once.  Run with
``pytest benchmarks --benchmark-enable --benchmark-only [-s] [--quick] [--rows 1000000,...]``; the summary (rows/s,
kernel/DuckDB ratio per population and form, 2-thread scaling, bytes read per row, DuckDB's version) is printed at
the end.
"""

from __future__ import annotations

import functools

import pyarrow as pa
import pytest

import healthcode
from benchmarks.duckdb_rules import evaluate_duckdb
from healthcode.generate import DEFAULT_AS_OF, generate_risk_csv, generate_table
from healthcode.rules import engine

AS_OF = DEFAULT_AS_OF


@functools.cache
def kernel_built() -> bool:
    """The compiled kernel is importable, selected, and evaluates a few rows."""
    if engine.use_reference():
        return False
    try:
        risk = healthcode.parse_risk_csv(generate_risk_csv(1))
        healthcode.evaluate(generate_table(64, seed=1), risk, None, AS_OF)
    except Exception:  # a half-built or stale extension: report it as a skip, the tests catch the error
        return False
    return True


needs_kernel = pytest.mark.skipif(not kernel_built(), reason="the Cython kernel is not built (make build)")


def kernel_bytes(table: pa.Table, anchors: set[str]) -> int:
    """Bytes of the Arrow buffers the kernel reads: validity of person_id; validity and values of the
    scalar columns and of the NAT columns named in ``anchors``; validity, offsets and all child buffers of the
    two list columns."""
    names = ["home_region", "registered_commuter", "base_color", "entry_times", "visits"]
    names += sorted({"report": "nat_report_time", "sample": "nat_sample_time"}[a] for a in anchors)
    total = 0
    for chunk in table.column("person_id").chunks:
        validity = chunk.buffers()[0]
        total += validity.size if validity is not None else 0
    for name in names:
        for chunk in table.column(name).chunks:
            total += sum(b.size for b in chunk.buffers() if b is not None)
    return total


#: How the caller gives the risk list: its CSV path (as a user does; DuckDB reads the same file in its query) or
#: a list loaded once (RiskList; DuckDB gets the same rows as a registered table).
FORMS = ("csv", "loaded")
ITINERARIES = ("beijing", "country")


def _risk(form: str, risk_list: healthcode.RiskList, risk_csv_path: str) -> healthcode.RiskList | str:
    return risk_csv_path if form == "csv" else risk_list


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2], ids=["1thread", "2threads"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("itineraries", ITINERARIES)
def test_kernel(benchmark, populations, risk_list, risk_csv_path, timeline, record, record_bytes, bench_rounds,
                rows, threads, form, itineraries):  # fmt: skip
    table = populations.get(rows, itineraries)
    benchmark.group = f"evaluate {rows:,} rows, {itineraries} itineraries, risk list {form}"
    benchmark.extra_info.update(rows=rows, threads=threads, itineraries=itineraries, form=form)
    result = benchmark.pedantic(
        healthcode.evaluate,
        args=(table, _risk(form, risk_list, risk_csv_path), timeline, AS_OF),
        kwargs={"n_threads": threads},
        rounds=bench_rounds(rows),
        warmup_rounds=1,
        iterations=1,
    )
    assert result.num_rows == rows
    record("kernel", rows, threads, benchmark, itineraries, form)
    if form == "loaded" and threads == 1:
        policy, _ = timeline.select(AS_OF)
        anchors = {policy.commuter_nat.anchor, policy.entry_nat.anchor}
        per_row = kernel_bytes(table, anchors) / rows, kernel_bytes(table, {"report", "sample"}) / rows
        record_bytes(rows, itineraries, *per_row)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("itineraries", ITINERARIES)
def test_duckdb(benchmark, populations, risk_list, risk_csv_path, timeline, record, bench_rounds, rows, form,
                itineraries):  # fmt: skip
    table = populations.get(rows, itineraries)
    policy, active = timeline.select(AS_OF)
    benchmark.group = f"evaluate {rows:,} rows, {itineraries} itineraries, risk list {form}"
    benchmark.extra_info.update(rows=rows, threads=1, itineraries=itineraries, form=form)
    result = benchmark.pedantic(
        evaluate_duckdb,
        args=(table, _risk(form, risk_list, risk_csv_path), policy, active, AS_OF),
        kwargs={"threads": 1},
        rounds=bench_rounds(rows),
        warmup_rounds=1,
        iterations=1,
    )
    record("duckdb", rows, 1, benchmark, itineraries, form)
    if kernel_built() and rows <= 1_000_000:  # both sides of the comparison do the same work
        assert result.equals(healthcode.evaluate(table, risk_list, timeline, AS_OF))
