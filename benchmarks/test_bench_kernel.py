"""The kernel (``healthcode.evaluate`` over an in-memory Arrow table) against the same rules in DuckDB SQL.

Run with ``pytest benchmarks --benchmark-enable --benchmark-only [-s] [--quick] [--rows 1000000,...]``; the
summary (rows/s, kernel/DuckDB ratio, 2-thread scaling, bytes read per row) is printed at the end.
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


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2], ids=["1thread", "2threads"])
def test_kernel(benchmark, populations, risk_list, timeline, record, record_bytes, bench_rounds, rows, threads):
    table = populations.get(rows)
    benchmark.group = f"evaluate {rows:,} rows"
    benchmark.extra_info.update(rows=rows, threads=threads)
    result = benchmark.pedantic(
        healthcode.evaluate,
        args=(table, risk_list, timeline, AS_OF),
        kwargs={"n_threads": threads},
        rounds=bench_rounds(rows),
        warmup_rounds=1,
        iterations=1,
    )
    assert result.num_rows == rows
    record("kernel", rows, threads, benchmark)
    policy, _ = timeline.select(AS_OF)
    anchors = {policy.commuter_nat.anchor, policy.entry_nat.anchor}
    record_bytes(rows, kernel_bytes(table, anchors) / rows, kernel_bytes(table, {"report", "sample"}) / rows)


def test_duckdb(benchmark, populations, risk_list, timeline, record, bench_rounds, small_rows):
    table = populations.get(small_rows)
    policy, active = timeline.select(AS_OF)
    benchmark.group = f"evaluate {small_rows:,} rows"
    benchmark.extra_info.update(rows=small_rows, threads=1)
    result = benchmark.pedantic(
        evaluate_duckdb,
        args=(table, risk_list, policy, active, AS_OF),
        kwargs={"threads": 1},
        rounds=bench_rounds(small_rows),
        warmup_rounds=1,
        iterations=1,
    )
    record("duckdb", small_rows, 1, benchmark)
    if kernel_built():  # both sides of the comparison do the same work
        assert result.equals(healthcode.evaluate(table, risk_list, timeline, AS_OF))
