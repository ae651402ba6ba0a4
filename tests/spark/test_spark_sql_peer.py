"""The Spark SQL peer (benchmarks/spark_rules.py) agrees with ``healthcode.evaluate`` row for row, on a real local
Spark session: the benchmark compares the Spark job with that SQL, so the SQL must compute the same thing
(a generated population with invalid rows and null lists, the generated risk list, an inactive clock, and both
policy shapes: report-anchored days windows with since_visit matching, sample-anchored hours windows with
on_visit_day matching)."""

from __future__ import annotations

import os
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import variant_policy

import healthcode
from healthcode.generate import DEFAULT_AS_OF, generate_risk_csv, generate_table
from healthcode.rules import engine
from healthcode.rules.timebase import to_instant

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "benchmarks"))
from spark_rules import evaluate_sql

pytestmark = pytest.mark.skipif(engine._kernel is None, reason="the kernel is not built")
COLUMNS = ["commuter_badge", "entry_permitted", "enrolled", "reasons", "badge_valid_until", "entry_valid_until",
           "error"]  # fmt: skip


@pytest.fixture(scope="module")
def population(tmp_path_factory):
    table = generate_table(6000, seed=12, as_of=DEFAULT_AS_OF, batch_rows=2048)
    table = table.append_column("row", pa.array(range(table.num_rows), pa.int64()))
    path = tmp_path_factory.mktemp("peer") / "population.parquet"
    pq.write_table(table, path)
    return table, str(path)


@pytest.mark.parametrize(
    ("timeline", "as_of"),
    [
        (None, DEFAULT_AS_OF),
        ("variant", DEFAULT_AS_OF),
        (None, to_instant("2021-11-16T20:00:00+08:00")),  # before the default policy took effect
    ],
    ids=["default", "variant", "inactive"],
)
def test_the_spark_sql_peer_equals_the_kernel(spark, population, timeline, as_of):
    table, path = population
    timeline = healthcode.default_policy() if timeline is None else variant_policy()
    risk = healthcode.parse_risk_csv(generate_risk_csv(12, DEFAULT_AS_OF))
    policy, active = timeline.select(as_of)
    got = evaluate_sql(spark, spark.read.parquet(path), risk, policy, as_of, active, keep=("row",))
    got = got.toArrow().sort_by("row")
    want = healthcode.evaluate(table.drop_columns(["row"]), risk, timeline, as_of)
    assert got.num_rows == want.num_rows
    assert [None if v is None else int(v) for v in got["person_id"].to_pylist()] == want["person_id"].to_pylist()
    for name in COLUMNS:
        a, b = got[name], want[name]
        if pa.types.is_timestamp(b.type):
            a, b = pc.cast(pc.cast(a, pa.timestamp("us", tz="UTC")), pa.int64()), pc.cast(
                b.cast(pa.timestamp("us", tz="UTC")), pa.int64()
            )
        assert a.cast(b.type).to_pylist() == b.to_pylist(), name
    assert pc.sum(pc.is_valid(want["error"])).as_py() > 0  # invalid rows compared too
    assert (pc.sum(want["commuter_badge"]).as_py() > 0) == active and pc.sum(want["entry_permitted"]).as_py() > 0
