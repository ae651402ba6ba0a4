"""Validation of ingest input (the ``upsert_persons`` / ``record_*`` calls), vectorized, without the database.

Each ``clean_*`` function checks a whole Arrow table with numpy/pyarrow work and returns it in store form (person
ids uint64, regions int32, instants as floored epoch seconds, days as date32, plus ``_row``, the 0-based row of
the call, for events).  An error names that row and the column, and means nothing of the call is stored; whether
the persons of events are stored is checked later, in the transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from healthcode.errors import StoreError
from healthcode.rules.flat import filled, seconds, valid_mask
from healthcode.rules.regions import valid_codes


def row_error(row: int, name: str, what: str) -> StoreError:
    """The error of a bad ingest row: its 0-based row in the call and its column."""
    return StoreError(f"row {row}, column {name!r}: {what}; nothing of this call was stored")


def _as_table(data: pa.Table | pa.RecordBatch, what: str) -> pa.Table:
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, pa.Table):
        return data
    raise StoreError(f"{what} must be a pyarrow Table or RecordBatch, not {type(data).__name__}")


def _column(table: pa.Table, name: str, what: str, needs: str) -> pa.Array:
    if name not in table.column_names:
        raise StoreError(f"column {name!r} is missing; {what} needs {needs}")
    if table.column_names.count(name) > 1:
        raise StoreError(f"column {name!r} appears more than once")
    chunked = table.column(name)
    return chunked.combine_chunks() if chunked.num_chunks != 1 else chunked.chunk(0)


def _no_nulls(arr: pa.Array, name: str) -> None:
    if arr.null_count:
        raise row_error(int(np.flatnonzero(~valid_mask(arr))[0]), name, "is null")


def _first(bad: np.ndarray, name: str, what: str) -> None:
    if bad.any():
        raise row_error(int(np.flatnonzero(bad)[0]), name, what)


def _integers(arr: pa.Array, name: str) -> np.ndarray:
    """The values of an integer column (nulls as 0), as int64 or uint64."""
    if not pa.types.is_integer(arr.type):
        raise StoreError(f"column {name!r} has type {arr.type}; expected an integer type")
    return filled(arr, arr.type.to_pandas_dtype())


def _person_ids(table: pa.Table, what: str) -> pa.Array:
    arr = _column(table, "person_id", what, "person_id (uint64)")
    values = _integers(arr, "person_id")
    _no_nulls(arr, "person_id")
    _first(values < 0, "person_id", "is negative; person ids are uint64")
    return pa.array(values.astype(np.uint64), type=pa.uint64())


def _regions(arr: pa.Array, name: str) -> pa.Array:
    values = _integers(arr, name)
    _no_nulls(arr, name)
    _first(~valid_codes(values), name, "is not a valid region code (six digits with a province-level prefix)")
    return pa.array(values.astype(np.int32), type=pa.int32())


def _seconds(arr: pa.Array, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A tz-aware timestamp column as floored epoch seconds (nulls as 0) and its validity mask."""
    t = arr.type
    if not pa.types.is_timestamp(t):
        raise StoreError(f"column {name!r} has type {t}; expected a timestamp with a time zone")
    if t.tz is None:
        raise StoreError(
            f"column {name!r} has type {t} without a time zone (every row); instants must be tz-aware, "
            "e.g. timestamp[s, tz=UTC]"
        )
    return seconds(arr), valid_mask(arr)


def _required_seconds(arr: pa.Array, name: str) -> pa.Array:
    values, _ = _seconds(arr, name)
    _no_nulls(arr, name)
    return pa.array(values, type=pa.int64())


def _days(arr: pa.Array, name: str) -> pa.Array:
    if not pa.types.is_date(arr.type):
        raise StoreError(f"column {name!r} has type {arr.type}; expected date32 (the local calendar date)")
    _no_nulls(arr, name)
    if pa.types.is_date64(arr.type):  # milliseconds: must be whole days to be a date
        ms = np.asarray(arr.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)
        _first(ms % 86_400_000 != 0, name, "is not a whole day (a date64 value with a time of day)")
    return arr.cast(pa.date32())


def _rows(n: int) -> pa.Array:
    return pa.array(np.arange(n, dtype=np.int64))


# ---------------------------------------------------------------------------------------------------------------
# Each ingest kind.


def clean_persons(data: pa.Table | pa.RecordBatch) -> pa.Table:
    """Validated ``upsert_persons`` input: unique uint64 ids, int32 regions, bool, int8 colors."""
    table = _as_table(data, "persons")
    what, needs = "persons", "person_id, home_region, registered_commuter, base_color"
    pid = _person_ids(table, what)
    home = _regions(_column(table, "home_region", what, needs), "home_region")
    reg = _column(table, "registered_commuter", what, needs)
    if not pa.types.is_boolean(reg.type):
        raise StoreError(f"column 'registered_commuter' has type {reg.type}; expected bool")
    color_arr = _column(table, "base_color", what, needs)
    color = _integers(color_arr, "base_color")
    _no_nulls(color_arr, "base_color")
    _first((color < 0) | (color > 2), "base_color", "is not 0 (green), 1 (yellow) or 2 (red)")
    ids = pid.to_numpy()
    if len(ids) > 1:
        order = np.argsort(ids, kind="stable")
        dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
        if len(dup):
            second = int(np.min(order[dup + 1]))
            raise row_error(second, "person_id", f"person {ids[second]} appears more than once in this call")
    clean = pa.table(
        {
            "person_id": pid,
            "home_region": home,
            "registered_commuter": reg.fill_null(False),
            "base_color": pa.array(color.astype(np.int8), type=pa.int8()),
        }
    )
    return clean


def clean_nat_results(data: pa.Table | pa.RecordBatch) -> pa.Table:
    """Validated ``record_nat_results`` input: ``_row``, person_id, sample_time and report_time in seconds."""
    table = _as_table(data, "NAT results")
    what, needs = "NAT results", "person_id, sample_time, report_time"
    pid = _person_ids(table, what)
    sample_arr = _column(table, "sample_time", what, needs)
    sample, sample_ok = _seconds(sample_arr, "sample_time")
    report = _required_seconds(_column(table, "report_time", what, needs), "report_time")
    clean = pa.table(
        {
            "_row": _rows(len(pid)),
            "person_id": pid,
            "sample_time": pa.array(sample, type=pa.int64(), mask=~sample_ok),
            "report_time": report,
        }
    )
    return clean


def clean_entries(data: pa.Table | pa.RecordBatch) -> pa.Table:
    """Validated ``record_entries`` input: ``_row``, person_id, t in seconds."""
    table = _as_table(data, "entries")
    pid = _person_ids(table, "entries")
    t = _required_seconds(_column(table, "t", "entries", "person_id, t"), "t")
    clean = pa.table({"_row": _rows(len(pid)), "person_id": pid, "t": t})
    return clean


def clean_visits(data: pa.Table | pa.RecordBatch) -> pa.Table:
    """Validated ``record_visits`` input: ``_row``, person_id, region, day."""
    table = _as_table(data, "visits")
    what, needs = "visits", "person_id, region, day"
    pid = _person_ids(table, what)
    region = _regions(_column(table, "region", what, needs), "region")
    days = _days(_column(table, "day", what, needs), "day")
    clean = pa.table({"_row": _rows(len(pid)), "person_id": pid, "region": region, "day": days})
    return clean


#: The ingest kinds :meth:`Store.ingest_group` takes, with each kind's validation.
INGEST_KINDS = ("persons", "nat_results", "entries", "visits")
CLEANERS: dict[str, Callable[[Any], pa.Table]] = {
    "persons": clean_persons,
    "nat_results": clean_nat_results,
    "entries": clean_entries,
    "visits": clean_visits,
}
