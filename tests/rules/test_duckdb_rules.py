"""The DuckDB SQL peer (benchmarks/duckdb_rules.py) agrees with ``healthcode.evaluate`` row for row.

The benchmark compares the kernel with that SQL, so the SQL must compute the same thing: a generated
population (every rule exercised, invalid rows included), the generated risk list, several clocks and two
policies.
"""

from __future__ import annotations

import os
import sys

import pyarrow as pa
import pytest
from conftest import variant_policy

import healthcode
from healthcode.generate import DEFAULT_AS_OF, generate_risk_csv, generate_table
from healthcode.rules.results import RESULT_SCHEMA
from healthcode.rules.timebase import to_instant

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "benchmarks"))
from duckdb_rules import evaluate_duckdb

ROWS = 20_000
SEED = 11
AS_OFS = {
    "article": DEFAULT_AS_OF,  # 2021-11-30 12:00 +08:00, the clock the data is generated around
    "earlier": to_instant("2021-11-25T07:30:00+08:00"),  # part of the data is in the future
    "inactive": to_instant("2021-11-16T20:00:00+08:00"),  # before the default policy took effect
}


@pytest.fixture(scope="module")
def population() -> pa.Table:
    return generate_table(ROWS, seed=SEED, batch_rows=8_192)


@pytest.fixture(scope="module")
def risk() -> healthcode.RiskList:
    return healthcode.parse_risk_csv(generate_risk_csv(SEED))


def assert_tables_equal(expected: pa.Table, actual: pa.Table, population: pa.Table) -> None:
    """Column by column; on a difference, show the first mismatching row of both and its input."""
    assert actual.schema == expected.schema, f"schema differs:\n{actual.schema}\nvs\n{expected.schema}"
    assert actual.num_rows == expected.num_rows
    for name in expected.column_names:
        want = expected.column(name).to_pylist()
        got = actual.column(name).to_pylist()
        if want != got:
            i = next(k for k, (a, b) in enumerate(zip(want, got, strict=True)) if a != b)
            pytest.fail(
                f"column {name!r} differs first at row {i}: "
                f"evaluate gives {want[i]!r}, DuckDB gives {got[i]!r}\n"
                f"  evaluate: {expected.slice(i, 1).to_pylist()[0]}\n"
                f"  DuckDB:   {actual.slice(i, 1).to_pylist()[0]}\n"
                f"  input:    {population.slice(i, 1).to_pylist()[0]}"
            )


@pytest.mark.parametrize("clock", sorted(AS_OFS))
@pytest.mark.parametrize("policy_name", ["default", "variant"])
def test_duckdb_equals_evaluate(population, risk, clock, policy_name):
    as_of = AS_OFS[clock]
    timeline = healthcode.default_policy() if policy_name == "default" else variant_policy()
    policy, active = timeline.select(as_of)
    expected = healthcode.evaluate(population, risk, timeline, as_of)
    actual = evaluate_duckdb(population, risk, policy, active, as_of)
    assert_tables_equal(expected, actual, population)


def test_duckdb_covers_every_rule(population, risk):
    """The comparison above is only as good as the data: every reason bit and outcome occurs."""
    policy, active = healthcode.default_policy().select(DEFAULT_AS_OF)
    out = evaluate_duckdb(population, risk, policy, active, DEFAULT_AS_OF)
    reasons = out.column("reasons").to_pylist()
    for bit in healthcode.Reason:
        if bit is healthcode.Reason.POLICY_INACTIVE:
            continue
        assert any(r & bit for r in reasons), f"no row carries {bit.name}"
    for name in ("commuter_badge", "entry_permitted", "enrolled"):
        assert set(out.column(name).to_pylist()) == {True, False}, name
    assert out.column("badge_valid_until").null_count < out.num_rows
    assert out.schema == RESULT_SCHEMA


def test_duckdb_threads_agree(population, risk):
    policy, active = healthcode.default_policy().select(DEFAULT_AS_OF)
    one = evaluate_duckdb(population, risk, policy, active, DEFAULT_AS_OF, threads=1)
    two = evaluate_duckdb(population, risk, policy, active, DEFAULT_AS_OF, threads=2)
    assert one.equals(two)
