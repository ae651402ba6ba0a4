"""`healthcode generate`: the single file by default, a hive-partitioned directory with --partitions/--partition-by."""

from __future__ import annotations

import os
import re
import subprocess

import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from service_helpers import healthcode_cmd

from healthcode.cli.main import EXIT_USAGE, main
from healthcode.rules.columns import POPULATION_SCHEMA


def _read_hive(path: str):  # type: ignore[no-untyped-def]
    return ds.dataset(path, format="parquet", partitioning="hive").to_table()


def _canonical(table):  # type: ignore[no-untyped-def]
    table = table.select(POPULATION_SCHEMA.names).cast(POPULATION_SCHEMA)
    return table.sort_by([("person_id", "ascending"), ("home_region", "ascending"), ("nat_sample_time", "ascending")])


def test_partitions_writes_the_same_rows_as_the_single_file(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--rows", "4000", "--seed", "3"]) == 0
    single = capsys.readouterr().out
    assert "generated 4,000 persons (seed 3)" in single and "population.parquet" in single
    assert main(["generate", str(tmp_path), "--rows", "4000", "--seed", "3", "--partitions", "6"]) == 0
    captured = capsys.readouterr()
    assert re.search(r"generated 4,000 persons \(seed 3\) in [\d.]+ s: .*population/ \(6 partitions by bucket, "
                     r"6 files\), .*risk\.csv", captured.out), captured.out  # fmt: skip
    assert captured.err == ""  # no progress bar off a terminal (and for so few rows)
    population = os.path.join(tmp_path, "population")
    assert sorted(os.listdir(population)) == [f"bucket={k}" for k in range(6)]
    read = _read_hive(population)
    assert _canonical(read).equals(_canonical(pq.read_table(tmp_path / "population.parquet")))


def test_partition_by_province(tmp_path, capsys):
    args = ["generate", str(tmp_path), "--rows", "4000", "--partition-by", "province", "--files-per-partition", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    match = re.search(r"\(([\d,]+) partitions by province, ([\d,]+) files\)", out)
    assert match, out
    names = os.listdir(tmp_path / "population")
    assert "province=11" in names and len(names) == int(match[1])
    files = [f for name in names for f in os.listdir(tmp_path / "population" / name)]
    assert len(files) == int(match[2]) and set(files) <= {"part-00000.parquet", "part-00001.parquet"}
    read = _read_hive(str(tmp_path / "population"))
    assert read.num_rows == 4000 and set(read.column("province").drop_null().to_pylist()) >= {11, 12, 13}


def test_progress_bar_when_asked(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--rows", "2000", "--partitions", "2", "--progress"]) == 0
    assert "rows" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--partitions", "0"], "--partitions must be at least 1, got 0"),
        (["--partitions", "two"], "--partitions: expected a whole number, got 'two'"),
        (["--partitions", "3", "--files-per-partition", "0"], "--files-per-partition must be at least 1"),
        (["--partition-by", "province", "--partitions", "3"], "leave --partitions out"),
        (["--partition-by", "bucket"], "--partition-by bucket needs --partitions N"),
        (["--files-per-partition", "2"], "--files-per-partition needs --partitions N"),
    ],
)
def test_bad_partition_arguments_are_one_line_usage_errors(tmp_path, capsys, extra, message):
    assert main(["generate", str(tmp_path / "out"), "--rows", "100", *extra]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("healthcode generate: error: ") and message in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "out")  # nothing written


def test_the_command(tmp_path):
    run = subprocess.run(
        [*healthcode_cmd(), "generate", str(tmp_path), "--rows", "1500", "--partitions", "3"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "(3 partitions by bucket, 3 files)" in run.stdout and run.stderr == ""
    bad = subprocess.run(
        [*healthcode_cmd(), "generate", str(tmp_path), "--rows", "10", "--partitions", "-1"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert bad.returncode == EXIT_USAGE
    assert bad.stderr == "healthcode generate: error: --partitions must be at least 1, got -1\n"


def test_no_progress_bar_into_a_log(tmp_path):
    """A bar is drawn only on a terminal (or with --progress): stderr going to a pipe or a log file gets none, even
    for as many rows as would show one on a terminal."""
    run = subprocess.run(
        [*healthcode_cmd(), "generate", str(tmp_path), "--rows", "500000"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, check=False,  # stderr: a pipe
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "it/s" not in run.stderr and "rows/s" not in run.stderr and "%|" not in run.stderr
    assert run.stderr == ""
    forced = subprocess.run(
        [*healthcode_cmd(), "generate", str(tmp_path), "--rows", "1000", "--progress"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert forced.returncode == 0 and "%|" in forced.stderr, forced.stderr


def test_country_itineraries(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--rows", "3000", "--seed", "2", "--itineraries", "country"]) == 0
    visits = pq.read_table(tmp_path / "population.parquet").column("visits")
    regions = pc.list_flatten(visits).combine_chunks().field("region").to_numpy(zero_copy_only=False)
    assert len(set(regions.tolist())) > 2000
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(tmp_path), "--rows", "10", "--itineraries", "world"])
    assert exit_info.value.code == EXIT_USAGE
    assert "invalid choice: 'world'" in capsys.readouterr().err
