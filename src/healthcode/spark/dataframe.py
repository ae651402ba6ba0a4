"""The evaluation as a DataFrame transformation, and the diff of two runs: ``evaluate_dataframe`` and ``changes``.

``evaluate_dataframe`` is a ``mapInArrow`` over the population DataFrame: every Arrow record batch Spark hands a
Python worker goes through the boundary (:mod:`healthcode.spark.boundary`) to the one engine and back.  The risk
list and the policy are read once on the driver (where a bad one fails before any Spark job starts) and shipped to
the executors as a broadcast; each Python worker folds the region table once per broadcast and keeps it for every
batch and task it runs after.
"""

from __future__ import annotations

import datetime as _dt
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from healthcode.rules import engine
from healthcode.rules.context import Context, PolicyLike, RiskLike, make_context
from healthcode.rules.policy import PolicyTimeline, load_policy
from healthcode.spark import boundary

#: Per Python worker: the context (folded region table) of each broadcast it has seen, by the broadcast's key.
_CONTEXTS: dict[str, Context] = {}


def context_of(broadcast: Any) -> Context:
    """The evaluation context of a broadcast ``(key, risk, policy, as_of)``, built once per Python worker."""
    key, risk, policy, as_of = broadcast.value  # unpickled once per worker (pyspark keeps the value)
    ctx = _CONTEXTS.get(key)
    if ctx is None:
        if len(_CONTEXTS) > 8:
            _CONTEXTS.clear()
        ctx = _CONTEXTS[key] = make_context(risk, policy, as_of)
    return ctx


def prepare(spark: Any, risk: RiskLike, policy: PolicyLike, as_of: _dt.datetime | int | float | str) -> Any:
    """Load and check the risk list, the policy and ``as_of`` on the driver (a bad one raises here, before any
    job), and broadcast them: returns the broadcast."""
    timeline = policy_of(policy)
    ctx = make_context(risk, timeline, as_of)
    return spark.sparkContext.broadcast((uuid.uuid4().hex, ctx.risk, timeline, ctx.as_of))


def policy_of(policy: PolicyLike) -> PolicyTimeline:
    """The timeline itself (a loaded one travels as it is; a path is loaded here, on the driver)."""
    return policy if isinstance(policy, PolicyTimeline) else load_policy(policy)


def _evaluator(broadcast: Any, id_type: pa.DataType, extra: list[str]) -> Any:
    def evaluate_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        ctx = context_of(broadcast)
        for batch in batches:
            (result,) = engine.evaluate_batches([boundary.to_engine(batch)], ctx, 1)
            yield boundary.from_engine(result, id_type, {name: batch.column(name) for name in extra})

    return evaluate_batches


def evaluate_dataframe(
    df: Any,
    risk: RiskLike,
    policy: PolicyLike = None,
    as_of: _dt.datetime | int | float | str | None = None,
) -> Any:
    """Evaluate every person of the population DataFrame ``df`` at ``as_of`` (SPEC §4): a DataFrame of the SPEC §4
    result columns (person_id in the type it came in, instants as UTC timestamps, reasons as int) followed by
    every column of ``df`` beyond the SPEC schema, unchanged (partition columns such as ``province``).

    ``risk`` is a loaded risk list or a CSV path, ``policy`` a loaded timeline, a TOML path or None for the shipped
    default; both are read here, on the driver.  A schema problem raises :class:`healthcode.SchemaError` naming the
    column, at planning time.  Row problems never fail the job: they give INVALID_INPUT rows, as in SPEC §4.1."""
    from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema

    if as_of is None:
        raise ValueError("as_of is required: give the evaluation instant explicitly (SPEC §2)")
    time_zone = df.sparkSession.conf.get("spark.sql.session.timeZone") or "UTC"
    arrow_schema = to_arrow_schema(df.schema, timezone=time_zone)
    id_type, extra = boundary.check(arrow_schema)
    broadcast = prepare(df.sparkSession, risk, policy, as_of)
    out = boundary.result_schema(id_type, pa.schema([arrow_schema.field(n) for n in extra]))
    return df.mapInArrow(_evaluator(broadcast, id_type, extra), from_arrow_schema(out, prefer_timestamp_ntz=False))


#: The columns of a diff row (the change log's fields, for two runs instead of two commits).
CHANGE_COLUMNS = (
    "person_id", "change", "old_badge", "new_badge", "old_entry", "new_entry", "old_reasons", "new_reasons",
)  # fmt: skip


def changes(previous: Any, new: Any) -> Any:
    """The persons whose badge, entry permission or reasons differ between two result DataFrames (two runs):
    ``change`` is ``changed``, ``added`` (a person only ``new`` has: new persons count as changes) or ``removed``
    (only ``previous`` has them), with the old and new values (null where a side has none).  Rows without a
    person_id (invalid input) are left out: they name nobody."""
    from pyspark.sql import functions as F

    def side(df: Any, prefix: str) -> Any:
        return df.where(F.col("person_id").isNotNull()).select(
            F.col("person_id"),
            F.col("commuter_badge").alias(f"{prefix}_badge"),
            F.col("entry_permitted").alias(f"{prefix}_entry"),
            F.col("reasons").cast("int").alias(f"{prefix}_reasons"),
            F.lit(True).alias(f"{prefix}_present"),
        )

    joined = side(previous, "old").join(side(new, "new"), on="person_id", how="full_outer")
    change = (
        F.when(F.col("old_present").isNull(), F.lit("added"))
        .when(F.col("new_present").isNull(), F.lit("removed"))
        .when(
            ~F.col("old_badge").eqNullSafe(F.col("new_badge"))
            | ~F.col("old_entry").eqNullSafe(F.col("new_entry"))
            | ~F.col("old_reasons").eqNullSafe(F.col("new_reasons")),
            F.lit("changed"),
        )
    )
    return joined.withColumn("change", change).where(F.col("change").isNotNull()).select(*CHANGE_COLUMNS)
