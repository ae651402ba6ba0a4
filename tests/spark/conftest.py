"""One local Spark session (``local[2]``) shared by every Spark test; skipped where pyspark or Java is missing."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def spark():
    pytest.importorskip("pyspark")
    if shutil.which("java") is None:
        pytest.skip("Java is not installed (the Spark tests need a JVM: apt-get install openjdk-17-jre-headless)")
    from healthcode.spark.session import session

    s = session("local[2]", "healthcode-tests", **{"spark.sql.shuffle.partitions": "4"})
    yield s
    s.stop()
