"""The Spark session the job runs in: the environment's master (``spark-submit``), or a local one for a command
line, a test or a benchmark.

A local session is set up for this package's needs: its Python workers run this interpreter (so they import the
same healthcode, pyarrow and kernel), the session time zone is UTC (instants cross the boundary as UTC
microseconds), Arrow batches are the exchange format, and the web UI stays off.
"""

from __future__ import annotations

import os
import sys
from typing import Any

#: Settings every session of this package gets (``spark-submit --conf`` or the builder may override them).
DEFAULTS: dict[str, str] = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.execution.arrow.maxRecordsPerBatch": "200000",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
}


def session(master: str | None = None, app_name: str = "healthcode", **conf: str) -> Any:
    """The active Spark session, or a new one on ``master`` (None: the master from the environment, as under
    ``spark-submit``; ``local[2]`` for two local cores).  Extra ``conf`` settings are applied as given."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None and master is None:
        return active
    # Local workers must run this very interpreter (the venv with healthcode and its kernel), not python3 on PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if master is not None:
        builder = builder.master(master)
    for key, value in {**DEFAULTS, **conf}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    # Spark's own INFO/WARN lines drown a command's output; HEALTHCODE_SPARK_LOG_LEVEL=WARN (or INFO) brings them back.
    spark.sparkContext.setLogLevel(os.environ.get("HEALTHCODE_SPARK_LOG_LEVEL", "ERROR"))
    return spark
