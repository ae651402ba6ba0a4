"""Spark benchmarks (the scale-out issue): the healthcode Spark job against the Spark SQL job a Spark team would
write instead, on one local Spark session, same input, same run.

Input: ``--rows`` generated persons (default 10M) in ``--files`` Parquet files (default 16), hive-partitioned as
``bucket=K/`` (written once per size under ``--data``, reused).  Then, each ``--repeat`` times, alternating:

1. ``healthcode spark evaluate`` as a user runs it (``healthcode.spark.files.run``: the tasks read their files with
   pyarrow, hand them to the kernel and write their result files) - rows/s end to end, results written;
2. the same rules as Spark SQL (``benchmarks/spark_rules.py``: higher-order functions, a broadcast join for the
   risk list), results written to Parquet the same way;
3. ``evaluate_dataframe`` (a plain ``mapInArrow`` around the kernel: Spark converts the nested columns JVM row <->
   Arrow) with ``df.write.parquet``;
4. the in-process engine on the same files (``healthcode.evaluate`` file by file, one thread per file over a pool
   of ``--cores`` threads), so Spark's own overhead is visible.

Printed: medians in seconds and rows/s per path, the ratio SQL / job (target >= 5x), the per-core rate of the job,
and the versions of pyspark, Java and pyarrow.  ``--quick`` (CI): 200k rows in 4 files, one repeat; figures are
reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from healthcode import evaluate
from healthcode.generate import DEFAULT_AS_OF, generate_batches, generate_risk_csv
from healthcode.rules.policy import default_policy
from healthcode.rules.regions import load_risk_list


def _data(root: str, rows: int, files: int) -> tuple[str, str]:
    """The partitioned population (``bucket=K/part-0.parquet``, one file per bucket) and its risk list."""
    os.makedirs(root, exist_ok=True)
    folder = os.path.join(root, f"population-{rows}-{files}")
    risk = os.path.join(root, "risk.csv")
    if not os.path.exists(risk):
        with open(risk, "w", encoding="utf-8") as f:
            f.write(generate_risk_csv(1, DEFAULT_AS_OF))
    if os.path.exists(os.path.join(folder, "_DONE")):
        return folder, risk
    shutil.rmtree(folder, ignore_errors=True)
    per_file = -(-rows // files)
    for k in range(files):
        n = min(per_file, rows - k * per_file)
        os.makedirs(os.path.join(folder, f"bucket={k}"), exist_ok=True)
        batches = generate_batches(n, seed=100 + k, as_of=DEFAULT_AS_OF, batch_rows=min(n, 500_000))
        first = next(batches)
        with pq.ParquetWriter(os.path.join(folder, f"bucket={k}", "part-0.parquet"), first.schema,
                              compression="zstd") as writer:  # fmt: skip
            writer.write_batch(first)
            for batch in batches:
                writer.write_batch(batch)
    open(os.path.join(folder, "_DONE"), "w").close()
    return folder, risk


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cores", type=int, default=2, help="local[N] and the in-process pool (default 2)")
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "healthcode-bench-spark"))
    parser.add_argument("--no-dataframe", action="store_true", help="skip the evaluate_dataframe path")
    parser.add_argument("--quick", action="store_true", help="CI: 200k rows in 4 files, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.files, args.repeat = 200_000, 4, 1
    try:
        import pyspark
    except ImportError:
        print("bench_spark: pyspark is not installed (pip install 'healthcode[spark]'); skipped")
        return
    if shutil.which("java") is None:
        print("bench_spark: no Java on this machine (the Spark job needs Java 17+); skipped")
        return
    from spark_rules import evaluate_sql  # beside this script (python benchmarks/bench_spark.py)

    from healthcode.spark import evaluate_dataframe
    from healthcode.spark import files as job
    from healthcode.spark.session import session

    os.makedirs(args.data, exist_ok=True)
    started = time.perf_counter()
    population, risk = _data(args.data, args.rows, args.files)
    generated = time.perf_counter() - started
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(population) for f in fs if f.endswith(".parquet"))
    spark = session(f"local[{args.cores}]", "healthcode bench_spark", **{"spark.sql.shuffle.partitions": "16"})
    out = tempfile.mkdtemp(prefix="bench-spark-out-")
    risk_list = load_risk_list(risk)
    policy = default_policy()
    chosen = policy.select(DEFAULT_AS_OF)[0]

    def run_job() -> None:
        job.run(spark, population, f"{out}/job", risk, None, DEFAULT_AS_OF, overwrite=True)

    def run_sql() -> None:
        df = spark.read.parquet(population)
        evaluate_sql(spark, df, risk_list, chosen, DEFAULT_AS_OF).write.mode("overwrite").parquet(f"{out}/sql")

    def run_dataframe() -> None:
        df = spark.read.parquet(population)
        evaluate_dataframe(df, risk_list, policy, DEFAULT_AS_OF).write.mode("overwrite").parquet(f"{out}/df")

    def run_in_process() -> None:
        def one(path: str) -> None:
            pq.write_table(evaluate(pq.read_table(path), risk_list, policy, DEFAULT_AS_OF, 1),
                           os.path.join(out, "inproc", path.replace("/", "_")))  # fmt: skip

        os.makedirs(os.path.join(out, "inproc"), exist_ok=True)
        with ThreadPoolExecutor(args.cores) as pool:
            list(pool.map(one, paths))

    paths_to_time = {"job": run_job, "spark_sql": run_sql, "in_process": run_in_process}
    if not args.no_dataframe:
        paths_to_time["evaluate_dataframe"] = run_dataframe
    run_job()  # warm-up: the JVM, the Python workers, the page cache
    times: dict[str, list[float]] = {name: [] for name in paths_to_time}
    for _ in range(args.repeat):
        for name, fn in paths_to_time.items():
            times[name].append(_timed(fn))
    medians = {name: statistics.median(t) for name, t in times.items()}
    java = subprocess.run(["java", "-version"], capture_output=True, text=True, check=False).stderr.splitlines()
    report = {
        "rows": args.rows,
        "files": len(paths),
        "input_bytes": sum(os.path.getsize(p) for p in paths),
        "cores": args.cores,
        "repeat": args.repeat,
        "generate_seconds": round(generated, 1),
        "seconds": {name: [round(x, 2) for x in t] for name, t in times.items()},
        "median_seconds": {name: round(m, 2) for name, m in medians.items()},
        "rows_per_second": {name: round(args.rows / m) for name, m in medians.items()},
        "job_rows_per_second_per_core": round(args.rows / medians["job"] / args.cores),
        "ratio_spark_sql_over_job": round(medians["spark_sql"] / medians["job"], 2),
        "ratio_job_over_in_process": round(medians["job"] / medians["in_process"], 2),
        "versions": {"pyspark": pyspark.__version__, "pyarrow": pa.__version__, "java": java[0] if java else "?"},
    }
    if "evaluate_dataframe" in medians:
        report["ratio_evaluate_dataframe_over_job"] = round(medians["evaluate_dataframe"] / medians["job"], 2)
    print(json.dumps(report, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    spark.stop()


if __name__ == "__main__":
    main()
