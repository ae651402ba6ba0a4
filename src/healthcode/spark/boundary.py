"""Spark's type rules at the boundary: Spark columns to the SPEC §3 population the engine takes, and the engine's
SPEC §4 results back to types Spark accepts.

* **person_id.** Spark has no unsigned integers.  A Parquet ``UINT_64`` column reads as ``decimal(20,0)``; a column
  Spark wrote itself is ``bigint``.  Both are accepted.  ``decimal(20,0)`` values are cast exactly; a value outside
  0 .. 2^64 - 1 (or with a fraction) becomes null, so that row is INVALID_INPUT as SPEC §4.1 says for a missing id.
  A ``bigint`` is read as the same 64 bits: an id above 2^63 - 1 that Spark stored as a negative ``bigint`` (two's
  complement) comes back as itself.  Results carry ``person_id`` in the type it came in, so nothing is lost either
  way: ``decimal(20,0)`` holds every uint64, and ``bigint`` the same bits.
* **Timestamps.** Spark hands ``timestamp`` columns to Python as microseconds in the session time zone and accepts
  only microseconds back: the engine reads any unit and time zone, and the result instants go back as
  ``timestamp[us, UTC]``.  ``timestamp_ntz`` columns have no time zone and are refused (SPEC §2: instants).
* **Other columns.** ``home_region int``, ``base_color tinyint``, ``visits array<struct<region:int, day:date>>``
  (``date32`` inside the struct) cross unchanged; ``reasons`` (uint16) goes back as ``int``.

Columns beyond the SPEC schema (partition columns such as ``province``) pass through to the results unchanged.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from healthcode.errors import SchemaError
from healthcode.rules import columns
from healthcode.rules.columns import POPULATION_SCHEMA
from healthcode.rules.results import RESULT_SCHEMA

ID_DECIMAL = pa.decimal128(20, 0)
ID_TYPES = (ID_DECIMAL, pa.int64(), pa.uint64())
_MAX_ID = Decimal(2**64 - 1)
#: The result columns as Spark takes them back (person_id is added in the input's type).
RESULT_TYPES: dict[str, pa.DataType] = {
    "commuter_badge": pa.bool_(),
    "entry_permitted": pa.bool_(),
    "enrolled": pa.bool_(),
    "reasons": pa.int32(),
    "badge_valid_until": pa.timestamp("us", tz="UTC"),
    "entry_valid_until": pa.timestamp("us", tz="UTC"),
    "error": pa.string(),
}


def check(schema: pa.Schema, where: str = "the population") -> tuple[pa.DataType, list[str]]:
    """Check an (Arrow form of a) Spark population schema the way :func:`healthcode.evaluate` does, with Spark's
    person_id types allowed; returns the person_id type and the pass-through columns.  Raises
    :class:`SchemaError` naming the column."""
    if "person_id" in schema.names:
        id_type = schema.field("person_id").type
        if id_type not in ID_TYPES:
            raise SchemaError(
                f"{where}: column 'person_id' has type {id_type}; expected decimal(20,0) (a Parquet UINT_64 as "
                "Spark reads it) or bigint (Spark has no unsigned integers)"
            )
        schema = schema.set(schema.get_field_index("person_id"), pa.field("person_id", pa.uint64()))
    else:
        id_type = ID_DECIMAL
    try:
        columns.check_schema(schema)
    except SchemaError as exc:
        raise SchemaError(f"{where}: {exc}") from None
    return id_type, [n for n in schema.names if n not in POPULATION_SCHEMA.names]


def ids_to_engine(arr: pa.Array) -> pa.Array:
    """A Spark person_id column as uint64 (see the module docstring)."""
    t = arr.type
    if t == pa.uint64():
        return arr
    if t == pa.int64():
        return arr.view(pa.uint64())
    ok = pc.and_kleene(pc.greater_equal(arr, pa.scalar(Decimal(0), t)), pc.less_equal(arr, pa.scalar(_MAX_ID, t)))
    return pc.cast(pc.if_else(ok, arr, pa.scalar(None, t)), pa.uint64())


def ids_from_engine(arr: pa.Array, id_type: pa.DataType) -> pa.Array:
    """uint64 ids back in the type they came in (lossless: decimal(20,0) holds every uint64, bigint the bits)."""
    if id_type == pa.uint64():
        return arr
    if id_type == pa.int64():
        return arr.view(pa.int64())
    return pc.cast(arr, id_type)


def to_engine(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The SPEC §3 columns of a Spark batch, with person_id as uint64, in the population's column order."""
    arrays = []
    for name in POPULATION_SCHEMA.names:
        arr = batch.column(name)
        arrays.append(ids_to_engine(arr) if name == "person_id" else arr)
    return pa.RecordBatch.from_arrays(arrays, names=list(POPULATION_SCHEMA.names))


def from_engine(result: pa.RecordBatch, id_type: pa.DataType, extra: dict[str, Any] | None = None) -> pa.RecordBatch:
    """SPEC §4 results in types Spark accepts, with ``extra`` (pass-through columns) after them."""
    arrays = [ids_from_engine(result.column("person_id"), id_type)]
    names = ["person_id"]
    for name, t in RESULT_TYPES.items():
        arrays.append(result.column(name).cast(t))
        names.append(name)
    for name, arr in (extra or {}).items():
        arrays.append(arr)
        names.append(name)
    return pa.RecordBatch.from_arrays(arrays, names=names)


def result_schema(id_type: pa.DataType, extra: pa.Schema | None = None) -> pa.Schema:
    """The Arrow schema :func:`from_engine` produces."""
    fields = [pa.field("person_id", id_type)] + [pa.field(n, t) for n, t in RESULT_TYPES.items()]
    return pa.schema(fields + (list(extra) if extra is not None else []))


assert set(RESULT_TYPES) | {"person_id"} == set(RESULT_SCHEMA.names), "boundary types cover every result column"
