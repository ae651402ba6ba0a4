"""The Spark job against the in-process engine, on a real local[2] session: the file job and ``evaluate_dataframe``
give ``healthcode.evaluate``'s results row for row (multi-file, hive-partitioned input with invalid rows, ids above
2^63, null lists and ms/us/ns timestamps), ``changes`` equals an in-process diff, and bad input fails on the driver
with the engine's message."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from conftest import policy_2022_path, spread_null_lists

import healthcode
from healthcode.errors import BadInput, RiskListError, SchemaError
from healthcode.generate import DEFAULT_AS_OF, generate_risk_csv, generate_table
from healthcode.rules import engine
from healthcode.rules.columns import POPULATION_SCHEMA
from healthcode.rules.results import RESULT_SCHEMA

pytestmark = pytest.mark.skipif(engine._kernel is None, reason="the kernel is not built")

UNITS = ("ms", "us", "ns", "ms")
RESULT_COLUMNS = ["commuter_badge", "entry_permitted", "enrolled", "reasons", "badge_valid_until",
                  "entry_valid_until", "error"]  # fmt: skip


def _in_units(table: pa.Table, unit: str) -> pa.Table:
    """The same population with its instants in ``unit`` (the generator writes seconds)."""
    instant = pa.timestamp(unit, tz="UTC")
    schema = POPULATION_SCHEMA
    for name in ("nat_sample_time", "nat_report_time"):
        schema = schema.set(schema.get_field_index(name), pa.field(name, instant))
    schema = schema.set(schema.get_field_index("entry_times"), pa.field("entry_times", pa.list_(instant)))
    return table.select(POPULATION_SCHEMA.names).cast(schema).append_column("row", table["row"])


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    """Four files under province=11/ and province=12/, each in its own timestamp unit, with a ``row`` column."""
    root = tmp_path_factory.mktemp("lake")
    parts, start = [], 0
    for i, unit in enumerate(UNITS):
        table = spread_null_lists(generate_table(1500, seed=40 + i, as_of=DEFAULT_AS_OF), seed=i)
        table = table.append_column("row", pa.array(range(start, start + table.num_rows), pa.int64()))
        start += table.num_rows
        folder = root / "population" / f"province={11 + i // 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(_in_units(table, unit), folder / f"part-{i}.parquet")
        parts.append(table)
    population = pa.concat_tables(parts)
    assert pc.sum(pc.greater(population["person_id"], pa.scalar(2**63, pa.uint64()))).as_py() > 100  # ids >= 2^63
    (root / "risk.csv").write_text(generate_risk_csv(5, DEFAULT_AS_OF), encoding="utf-8")
    (root / "other-risk.csv").write_text(generate_risk_csv(6, DEFAULT_AS_OF), encoding="utf-8")
    return root, population


def _expected(population: pa.Table, risk: str, policy: str | None) -> pa.Table:
    result = healthcode.evaluate(population.select(POPULATION_SCHEMA.names), risk, policy, DEFAULT_AS_OF)
    return result.append_column("row", population["row"]).sort_by("row")


def _same(got: pa.Table, want: pa.Table) -> None:
    assert got.num_rows == want.num_rows
    assert got["row"].to_pylist() == want["row"].to_pylist()
    assert [None if v is None else int(v) for v in got["person_id"].to_pylist()] == want["person_id"].to_pylist()
    for name in RESULT_COLUMNS:
        a, b = got[name], want[name]
        if pa.types.is_timestamp(b.type):
            a, b = pc.cast(a, pa.int64()), pc.cast(b.cast(pa.timestamp("us", tz="UTC")), pa.int64())
        assert a.cast(b.type).to_pylist() == b.to_pylist(), name
    assert pc.sum(pc.is_valid(want["error"])).as_py() > 0  # invalid rows were compared too


@pytest.mark.parametrize("policy", [None, "2022"])
def test_the_file_job_equals_the_engine_row_for_row(spark, lake, tmp_path, policy):
    from healthcode.spark import files

    root, population = lake
    policy_path = policy_2022_path() if policy else None
    out = tmp_path / "out"
    summary = files.run(spark, str(root / "population"), str(out), str(root / "risk.csv"), policy_path, DEFAULT_AS_OF)
    want = _expected(population, str(root / "risk.csv"), policy_path)
    assert (summary.rows, summary.files_in, summary.files_out) == (population.num_rows, 4, 4)
    assert summary.invalid == pc.sum(pc.is_valid(want["error"])).as_py()
    assert summary.badges == pc.sum(want["commuter_badge"]).as_py()
    got = ds.dataset(out, format="parquet", partitioning="hive").to_table().sort_by("row")
    _same(got, want)
    # The partition column passes through; person_id is written as UINT_64; nothing temporary is left.
    by_row = dict(zip(got["row"].to_pylist(), got["province"].to_pylist(), strict=True))
    assert by_row[0] == 11 and by_row[population.num_rows - 1] == 12
    assert pq.read_schema(next(out.glob("province=11/*.parquet"))).field("person_id").type == pa.uint64()
    assert sorted(os.listdir(out)) == ["_SUCCESS", "province=11", "province=12"]


def test_a_retried_task_replaces_its_own_file(spark, lake, tmp_path):
    """Two attempts of one task (a retry, or speculation) leave one file under the final name, with one copy of
    the rows."""
    import pyarrow.fs as pafs

    from healthcode.rules.context import make_context
    from healthcode.spark import files

    root, _ = lake
    fs, found = files.discover(str(root / "population"))
    ctx = make_context(str(root / "risk.csv"), None, DEFAULT_AS_OF)
    local = pafs.LocalFileSystem()
    for attempt in ("first", "second"):
        files.evaluate_file(ctx, fs, local, str(tmp_path), found[0], 0, None, ["row"], attempt)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.parquet"))
    assert [w for w in written if not w.startswith("_temporary")] == ["province=11/part-00000.parquet"]
    assert pq.read_table(tmp_path / written[-1]).num_rows == pq.read_metadata(found[0].path).num_rows


def test_partition_by_an_extra_column_and_bad_partition_names(spark, lake, tmp_path):
    from healthcode.spark import files

    root, _ = lake
    with pytest.raises(BadInput, match=r"--partition-by nope: not a partition or extra column .*province, row"):
        files.run(spark, str(root / "population"), str(tmp_path / "x"), str(root / "risk.csv"), None, DEFAULT_AS_OF,
                  partition_by=["nope"])  # fmt: skip
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.txt").write_text("x")
    with pytest.raises(BadInput, match="exists and is not empty"):
        files.run(spark, str(root / "population"), str(tmp_path / "full"), str(root / "risk.csv"), None,
                  DEFAULT_AS_OF)  # fmt: skip


def test_evaluate_dataframe_equals_the_engine_and_passes_columns_through(spark, lake):
    from healthcode.spark import evaluate_dataframe

    root, population = lake
    # Spark 4 reads Parquet TIMESTAMP(NANOS) only as longs: the DataFrame path takes the ms and us files.
    paths = [str(p) for p in sorted((root / "population").rglob("*.parquet")) if "part-2" not in p.name]
    df = spark.read.parquet(*paths)
    df = df.withColumn("province", df["person_id"] * 0 + 11)  # an extra column of another type passes through too
    result = evaluate_dataframe(df, str(root / "risk.csv"), None, DEFAULT_AS_OF)
    assert result.columns == ["person_id", *RESULT_COLUMNS, "row", "province"]
    got = result.toArrow().sort_by("row")
    keep = pc.is_in(population["row"], got["row"])
    _same(got, _expected(population.filter(keep), str(root / "risk.csv"), None))


def test_changes_equal_an_in_process_diff(spark, lake, tmp_path):
    from healthcode.spark import changes, evaluate_dataframe

    root, population = lake
    df = spark.read.parquet(str(root / "population" / "province=11" / "part-0.parquet"))
    old = evaluate_dataframe(df, str(root / "risk.csv"), None, DEFAULT_AS_OF)
    new = evaluate_dataframe(df.where("row % 10 != 0"), str(root / "other-risk.csv"), None, DEFAULT_AS_OF + 86400)
    got = {(int(r["person_id"]), r["change"]): r for r in changes(old, new).collect()}

    first = population.filter(pc.less(population["row"], 1500))
    before = healthcode.evaluate(first.select(POPULATION_SCHEMA.names), str(root / "risk.csv"), None, DEFAULT_AS_OF)
    kept = first.filter(pc.not_equal(pc.remainder(first["row"], 10), 0))
    after = healthcode.evaluate(kept.select(POPULATION_SCHEMA.names), str(root / "other-risk.csv"), None,
                                DEFAULT_AS_OF + 86400)  # fmt: skip

    def status(t: pa.Table) -> dict[int, tuple]:
        return {r["person_id"]: (r["commuter_badge"], r["entry_permitted"], r["reasons"])
                for r in t.to_pylist() if r["person_id"] is not None}  # fmt: skip

    a, b = status(before), status(after)
    want = {(p, "removed") for p in a.keys() - b.keys()}
    want |= {(p, "added") for p in b.keys() - a.keys()}
    want |= {(p, "changed") for p in a.keys() & b.keys() if a[p] != b[p]}
    assert set(got) == want and len(want) > 100
    assert {c for _, c in want} == {"removed", "changed"}
    for (p, change), row in got.items():
        if change == "changed":
            assert (row["old_badge"], row["old_entry"], row["old_reasons"]) == a[p]
            assert (row["new_badge"], row["new_entry"], row["new_reasons"]) == b[p]


def test_problems_fail_on_the_driver_with_the_engines_message(spark, lake, tmp_path):
    from healthcode.spark import evaluate_dataframe, files

    root, population = lake
    df = spark.read.parquet(str(root / "population" / "province=11" / "part-0.parquet"))
    with pytest.raises(SchemaError, match="column 'visits' is missing"):
        evaluate_dataframe(df.drop("visits"), str(root / "risk.csv"), None, DEFAULT_AS_OF)
    with pytest.raises(SchemaError, match=r"column 'person_id' has type string; expected decimal\(20,0\)"):
        evaluate_dataframe(df.withColumn("person_id", df["person_id"].cast("string")), str(root / "risk.csv"),
                           None, DEFAULT_AS_OF)  # fmt: skip
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(population.slice(0, 10).drop_columns(["home_region"]), bad / "part-0.parquet")
    with pytest.raises(SchemaError, match=r"part-0\.parquet: column 'home_region' is missing"):
        files.run(spark, str(bad), str(tmp_path / "out"), str(root / "risk.csv"), None, DEFAULT_AS_OF)
    (tmp_path / "bad-risk.csv").write_text("region,start_date,end_date,kind\n999999,2021-11-01,,local_case\n")
    with pytest.raises(RiskListError):
        evaluate_dataframe(df, str(tmp_path / "bad-risk.csv"), None, DEFAULT_AS_OF)


def test_the_command_line_evaluates_and_diffs(spark, lake, tmp_path, capsys):
    from healthcode.cli.main import main

    root, population = lake
    common = ["spark", "evaluate", str(root / "population"), "--as-of", "2021-11-30T12:00:00+08:00",
              "--master", "local[2]"]  # fmt: skip
    assert main([*common, "--risk", str(root / "risk.csv"), "--out", str(tmp_path / "a")]) == 0
    first = capsys.readouterr().out
    assert f"{population.num_rows:,} rows" in first and "from 4 files" in first and "invalid rows" in first
    assert main([*common, "--risk", str(root / "other-risk.csv"), "--out", str(tmp_path / "b"),
                 "--previous", str(tmp_path / "a"), "--changes", str(tmp_path / "c")]) == 0  # fmt: skip
    second = capsys.readouterr().out
    assert " changes (" in second and "0 added, 0 removed" in second
    n = int(second.split(" changes (")[0].rsplit("; ", 1)[-1].replace(",", ""))
    assert n == ds.dataset(tmp_path / "c", format="parquet").count_rows() > 0


def test_the_command_line_refuses_bad_input_before_spark_starts(tmp_path, lake, capsys):
    from healthcode.cli.main import main

    root, _ = lake
    bogus = "spark://127.0.0.1:9"  # a session on this master could never start: the errors come first
    (tmp_path / "bad-risk.csv").write_text("region,start\n")
    base = ["spark", "evaluate", str(root / "population"), "--as-of", "2021-11-30T12:00:00+08:00", "--master", bogus]
    assert main([*base, "--risk", str(tmp_path / "bad-risk.csv"), "--out", str(tmp_path / "o")]) == 1
    assert "bad-risk.csv" in capsys.readouterr().err
    assert main(["spark", "evaluate", str(tmp_path / "none"), "--risk", str(root / "risk.csv"), "--as-of",
                 "2021-11-30T12:00:00+08:00", "--out", str(tmp_path / "o"), "--master", bogus]) == 1  # fmt: skip
    assert "no such file or directory" in capsys.readouterr().err
    assert main([*base, "--risk", str(root / "risk.csv"), "--out", str(tmp_path / "o"), "--previous", "x"]) == 2
    assert "--previous and --changes go together" in capsys.readouterr().err
    naive = ["spark", "evaluate", str(root / "population"), "--as-of", "2021-11-30T12:00", "--master", bogus]
    assert main([*naive, "--risk", str(root / "risk.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "--as-of: 2021-11-30T12:00 has no UTC offset" in capsys.readouterr().err
    assert RESULT_SCHEMA.names[0] == "person_id"
