"""Population columns (SPEC §3): check the Arrow schema and hand the kernel zero-copy views of the buffers.

List offsets and flat child values are exactly the CSR arrays the kernel wants; validity bitmaps are passed as
bytes plus a bit offset so slices and nulls cost nothing per row.  Only whole-column work happens here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from healthcode.errors import CorruptDataError, SchemaError

TIMESTAMP_UNITS = {"s": 0, "ms": 1, "us": 2, "ns": 3}  # the kernel's unit codes
UNIT_DIVISORS = (1, 1_000, 1_000_000, 1_000_000_000)

VISIT_TYPE = pa.struct([pa.field("region", pa.int32()), pa.field("day", pa.date32())])
#: The population schema as this package writes it (any timestamp unit and time zone is accepted on input).
POPULATION_SCHEMA = pa.schema(
    [
        pa.field("person_id", pa.uint64()),
        pa.field("home_region", pa.int32()),
        pa.field("registered_commuter", pa.bool_()),
        pa.field("base_color", pa.int8()),
        pa.field("nat_sample_time", pa.timestamp("s", tz="UTC")),
        pa.field("nat_report_time", pa.timestamp("s", tz="UTC")),
        pa.field("entry_times", pa.list_(pa.timestamp("s", tz="UTC"))),
        pa.field("visits", pa.list_(VISIT_TYPE)),
    ]
)
_SCALARS = {
    "person_id": pa.uint64(),
    "home_region": pa.int32(),
    "registered_commuter": pa.bool_(),
    "base_color": pa.int8(),
}
_TIMESTAMPS = ("nat_sample_time", "nat_report_time")


def _timestamp_problem(t: pa.DataType) -> str | None:
    if not pa.types.is_timestamp(t):
        return f"has type {t}; expected a timestamp with a time zone, e.g. timestamp[s, tz=UTC]"
    if t.tz is None:
        return (
            f"has type {t} without a time zone; instants must be tz-aware (cast with an explicit tz, "
            "e.g. timestamp[s, tz=Asia/Shanghai] for Beijing wall-clock times)"
        )
    return None


def check_schema(schema: pa.Schema) -> None:
    """Raise :class:`SchemaError` naming the first column that is missing or of the wrong type."""
    if schema not in _CHECKED:
        _check_schema(schema)
        if len(_CHECKED) > 64:
            _CHECKED.clear()
        _CHECKED.add(schema)


_CHECKED: set[pa.Schema] = set()  # schemas that passed: the gateway path sends the same one again and again


def _check_schema(schema: pa.Schema) -> None:
    names = set(schema.names)
    for name in POPULATION_SCHEMA.names:
        if name not in names:
            raise SchemaError(f"column {name!r} is missing; the population needs {', '.join(POPULATION_SCHEMA.names)}")
        if schema.names.count(name) > 1:
            raise SchemaError(f"column {name!r} appears more than once")
    for name, expected in _SCALARS.items():
        t = schema.field(name).type
        if t != expected:
            raise SchemaError(f"column {name!r} has type {t}; expected {expected}")
    for name in _TIMESTAMPS:
        problem = _timestamp_problem(schema.field(name).type)
        if problem:
            raise SchemaError(f"column {name!r} {problem}")
    t = schema.field("entry_times").type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        raise SchemaError(f"column 'entry_times' has type {t}; expected list<timestamp with time zone>")
    problem = _timestamp_problem(t.value_type)
    if problem:
        raise SchemaError(f"column 'entry_times' element {problem}")
    t = schema.field("visits").type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type):
        raise SchemaError(f"column 'visits' has type {t}; expected list<struct<region: int32, day: date32>>")
    struct = t.value_type
    for child, expected in (("region", pa.int32()), ("day", pa.date32())):
        idx = struct.get_field_index(child)
        if idx < 0:
            raise SchemaError(
                f"column 'visits' struct has no field {child!r}; expected struct<region: int32, day: date32>"
            )
        if struct.field(idx).type != expected:
            raise SchemaError(f"column 'visits' field {child!r} has type {struct.field(idx).type}; expected {expected}")


def validity_view(arr: pa.Array) -> tuple[np.ndarray | None, int]:
    """The validity bitmap as bytes and its bit offset, or None when the array has no nulls."""
    if arr.null_count == 0:
        return None, 0
    buf = arr.buffers()[0]
    return np.frombuffer(buf, dtype=np.uint8), arr.offset


def values_view(arr: pa.Array, dtype: type[np.generic]) -> np.ndarray:
    """The fixed-width values of ``arr`` as a zero-copy numpy view (slice offset applied)."""
    buf = arr.buffers()[1]
    if buf is None or len(arr) == 0:
        return np.zeros(0, dtype=dtype)
    return np.frombuffer(buf, dtype=dtype, count=len(arr), offset=arr.offset * np.dtype(dtype).itemsize)


def bool_view(arr: pa.Array) -> tuple[np.ndarray, int]:
    """A boolean column's value bits (an all-false bitmap when Arrow omitted the buffer)."""
    buf = arr.buffers()[1]
    if buf is None:
        return np.zeros((len(arr) + 7) // 8 + 1, dtype=np.uint8), 0
    return np.frombuffer(buf, dtype=np.uint8), arr.offset


def _as_list(arr: pa.Array) -> pa.ListArray:
    if pa.types.is_large_list(arr.type):
        try:
            return pc.cast(arr, pa.list_(arr.type.value_type))
        except pa.ArrowInvalid as exc:
            raise SchemaError(f"large_list column has more than 2^31 elements in one batch: {exc}") from None
    return arr


@dataclass
class Bits:
    """An Arrow bitmap: bytes (None = all set) and the bit offset of element 0."""

    data: np.ndarray | None
    offset: int


@dataclass
class BatchColumns:
    """Zero-copy views of one population record batch, as the kernel reads them."""

    n: int
    person_id_valid: Bits
    home_region: np.ndarray  # int32
    home_region_valid: Bits
    registered: Bits  # values
    registered_valid: Bits
    base_color: np.ndarray  # int8
    base_color_valid: Bits
    nat: dict[str, tuple[np.ndarray, Bits, int]]  # "sample"/"report" -> (int64 values, validity, unit code)
    entries_valid: Bits  # list validity
    entries_offsets: np.ndarray  # int32[n + 1]
    entry_values: np.ndarray  # int64, raw units
    entry_values_valid: Bits
    entry_unit: int
    visits_valid: Bits
    visits_offsets: np.ndarray  # int32[n + 1]
    visit_struct_valid: Bits
    visit_region: np.ndarray  # int32
    visit_region_valid: Bits
    visit_day: np.ndarray  # int32 (date32)
    visit_day_valid: Bits
    keep_alive: tuple[object, ...] = ()  # arrays whose buffers the views point into
    person_ids: np.ndarray | None = None  # uint64 values, when decoded from row form (for the response)


def batch_columns(batch: pa.RecordBatch) -> BatchColumns:
    """Views of a batch whose schema passed :func:`check_schema`."""
    col = batch.column
    names = batch.schema.names
    home = col(names.index("home_region"))
    reg = col(names.index("registered_commuter"))
    color = col(names.index("base_color"))
    nat = {}
    for anchor, name in (("sample", "nat_sample_time"), ("report", "nat_report_time")):
        a = col(names.index(name))
        nat[anchor] = (values_view(a, np.int64), Bits(*validity_view(a)), TIMESTAMP_UNITS[a.type.unit])
    entries = _as_list(col(names.index("entry_times")))
    entry_values = entries.values
    visits = _as_list(col(names.index("visits")))
    structs = visits.values
    region = structs.field("region")
    day = structs.field("day")
    return BatchColumns(
        n=batch.num_rows,
        person_id_valid=Bits(*validity_view(col(names.index("person_id")))),
        home_region=values_view(home, np.int32),
        home_region_valid=Bits(*validity_view(home)),
        registered=Bits(*bool_view(reg)),
        registered_valid=Bits(*validity_view(reg)),
        base_color=values_view(color, np.int8),
        base_color_valid=Bits(*validity_view(color)),
        nat=nat,
        entries_valid=Bits(*validity_view(entries)),
        entries_offsets=offsets_view(entries),
        entry_values=values_view(entry_values, np.int64),
        entry_values_valid=Bits(*validity_view(entry_values)),
        entry_unit=TIMESTAMP_UNITS[entry_values.type.unit],
        visits_valid=Bits(*validity_view(visits)),
        visits_offsets=offsets_view(visits),
        visit_struct_valid=Bits(*validity_view(structs)),
        visit_region=values_view(region, np.int32),
        visit_region_valid=Bits(*validity_view(region)),
        visit_day=values_view(day, np.int32),
        visit_day_valid=Bits(*validity_view(day)),
        keep_alive=(batch, entries, visits),
    )


def offsets_view(arr: pa.ListArray) -> np.ndarray:
    """List or string offsets (n + 1 of them, slice applied), indexing into the child values or the data."""
    buf = arr.buffers()[1]
    if buf is None:
        return np.zeros(len(arr) + 1, dtype=np.int32)
    return np.frombuffer(buf, dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4)


def validate(batch: pa.RecordBatch) -> None:
    """Check the buffers of the columns the kernel reads (offsets in range and ascending, sizes consistent).

    The kernel trusts its inputs, so data from outside (IPC bytes, hand-built arrays) is checked here first;
    this is a linear pass in C++, a few per cent of an evaluation.
    """
    for name in POPULATION_SCHEMA.names:
        try:
            batch.column(batch.schema.get_field_index(name)).validate(full=True)
        except (pa.ArrowInvalid, pa.ArrowException) as exc:
            raise CorruptDataError(f"column {name!r} is not valid Arrow data: {exc}") from None


def to_batches(population: pa.Table | pa.RecordBatch) -> list[pa.RecordBatch]:
    """Check the schema and split the population into record batches (zero-copy)."""
    if isinstance(population, pa.RecordBatch):
        check_schema(population.schema)
        return [population]
    if isinstance(population, pa.Table):
        check_schema(population.schema)
        return population.to_batches()
    raise SchemaError(f"population must be a pyarrow Table or RecordBatch, not {type(population).__name__}")
