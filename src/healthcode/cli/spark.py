"""``healthcode spark evaluate``: the evaluation as a Spark job over Parquet files, with a diff against a previous run.

Runs on the Spark master from the environment (as under ``spark-submit``) or on ``--master``.  pyspark is an optional
extra (``pip install healthcode[spark]``): it is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from typing import Any

from healthcode.cli.common import parse_instant
from healthcode.errors import Precondition, UsageError


def add_parser(sub: Any) -> None:
    """The ``spark`` command and its ``evaluate`` subcommand."""
    spark = sub.add_parser(
        "spark", help="run the evaluation as an Apache Spark job (healthcode[spark])",
        description="Run the evaluation as an Apache Spark job over partitioned Parquet: every task reads its "
        "files with pyarrow and hands them to the same engine and kernel as 'healthcode evaluate'.",
    )  # fmt: skip
    spark_sub = spark.add_subparsers(dest="spark_command", metavar="COMMAND", required=True)
    ev = spark_sub.add_parser(
        "evaluate", help="evaluate a Parquet file or directory into a directory of result files",
        description="Evaluate every person of INPUT (a Parquet file, or a directory of them; hive-partitioned "
        "directories such as province=11/ give partition columns) at --as-of, and write SPEC §4 result files "
        "(timestamps as UTC instants, person_id as UINT_64) plus the input's partition and extra columns to OUTDIR, "
        "partitioned like the input unless --partition-by says otherwise. With --previous, the persons whose badge, "
        "entry permission or reasons changed since that run (and the added and removed ones) go to --changes.",
    )  # fmt: skip
    ev.add_argument("input", metavar="INPUT", help="Parquet file or directory (local path, or a URI pyarrow reads)")
    ev.add_argument("--risk", required=True, help="risk-list CSV (read once, on the driver)")
    ev.add_argument("--policy", help="policy timeline TOML (default: the shipped 2021-11-17 policy)")
    ev.add_argument("--as-of", required=True, help="evaluation instant, ISO-8601 with an offset")
    ev.add_argument("--out", required=True, metavar="OUTDIR", help="directory for the result files (new or empty)")
    ev.add_argument("--overwrite", action="store_true", help="replace what OUTDIR holds")
    ev.add_argument("--previous", metavar="PREV_OUTDIR", help="the OUTDIR of an earlier run to diff against")
    ev.add_argument("--changes", metavar="CHANGES_DIR", help="directory for the diff (with --previous)")
    ev.add_argument(
        "--master", help="Spark master, e.g. local[2] (default: the environment's, as set by spark-submit)"
    )  # fmt: skip
    ev.add_argument(
        "--partition-by", action="append", metavar="COLUMN",
        help="partition the results by this column (a partition or extra column of the input; repeatable)",
    )  # fmt: skip
    ev.set_defaults(func=cmd_spark_evaluate)


def cmd_spark_evaluate(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if (args.previous is None) != (args.changes is None):
        raise UsageError("--previous and --changes go together: give both, or neither")
    as_of = parse_instant(args.as_of)
    if importlib.util.find_spec("pyspark") is None:
        raise Precondition("the Spark job needs pyspark (and Java 17+): pip install 'healthcode[spark]'")
    from healthcode.rules.context import make_context
    from healthcode.rules.regions import load_risk_list
    from healthcode.spark import files
    from healthcode.spark.dataframe import changes, policy_of
    from healthcode.spark.session import session

    # A bad list, policy, instant or input fails here, before Spark starts; the loaded ones are what the job ships.
    risk, timeline = load_risk_list(args.risk), policy_of(args.policy)
    make_context(risk, timeline, as_of)
    files.discover(args.input)
    spark = session(args.master, "healthcode spark evaluate")
    summary = files.run(spark, args.input, args.out, risk, timeline, as_of, args.partition_by, args.overwrite)
    changed = ""
    if args.previous is not None:
        previous = spark.read.parquet(args.previous)
        diff = changes(previous, spark.read.parquet(args.out))
        diff.write.mode("overwrite").parquet(args.changes)
        counts = {row["change"]: row["count"] for row in spark.read.parquet(args.changes).groupBy("change").count()
                  .collect()}  # fmt: skip
        changed = (
            f"; {sum(counts.values()):,} changes ({counts.get('changed', 0):,} changed, {counts.get('added', 0):,} "
            f"added, {counts.get('removed', 0):,} removed) written to {args.changes}"
        )
    print(
        f"{summary.rows:,} rows, {summary.badges:,} commuter badges, {summary.entries:,} entries permitted, "
        f"{summary.invalid:,} invalid rows from {summary.files_in:,} files in {time.perf_counter() - started:.2f} s "
        f"on {spark.sparkContext.master}; wrote {summary.files_out:,} files to {args.out}{changed}"
    )
    return 0
