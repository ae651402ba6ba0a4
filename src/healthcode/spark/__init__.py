"""The Spark job: the same evaluation as :func:`healthcode.evaluate`, run by Apache Spark over partitioned Parquet
(an optional extra: ``pip install healthcode[spark]``; nothing else in the package imports it).

The rules are not written again here: every Spark task hands Arrow record batches to the one engine
(:mod:`healthcode.rules.engine`) and its Cython kernel.
"""

from healthcode.spark.dataframe import changes, evaluate_dataframe

__all__ = ["changes", "evaluate_dataframe"]
