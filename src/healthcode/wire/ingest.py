"""The ingest RPCs' requests as Arrow tables: the row form of each kind (protobuf rows) converted field by field,
or the request's ``arrow_ipc`` stream read whole; the tables are the ones the
:class:`~healthcode.store.Store` ingest methods take.

No kernel import, and no store import: errors are :class:`~healthcode.errors.StoreError` (the store's status for
bad ingest input), with the store's wording.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode.errors import StoreError
from healthcode.wire.ipc import WireError, read_stream

#: Arrow type of instants built from protobuf Timestamps (floored to seconds, as the store keeps them).
TIMESTAMP = pa.timestamp("s", tz="UTC")
_NANOS = 1_000_000_000

#: The repeated row field of each kind's request.
_ROW_FIELDS = {"persons": "persons", "nat_results": "results", "entries": "entries", "visits": "visits"}


def _seconds(msg: Any, name: str) -> int | None:
    """A message's Timestamp field as floored epoch seconds, or None when absent."""
    if not msg.HasField(name):
        return None
    ts = getattr(msg, name)
    return int(ts.seconds) + int(ts.nanos) // _NANOS


def persons_table(msgs: Sequence[pb.PersonRecord]) -> pa.Table:
    """``PersonRecord`` rows as the ``upsert_persons`` table (person_id, home_region, registered_commuter,
    base_color).  Proto3 has no absent scalars: an unset region is 0, which the store rejects as not a code."""
    return pa.table(
        {
            "person_id": pa.array([m.person_id for m in msgs], type=pa.uint64()),
            "home_region": pa.array([m.home_region for m in msgs], type=pa.int32()),
            "registered_commuter": pa.array([m.registered_commuter for m in msgs], type=pa.bool_()),
            "base_color": pa.array([m.base_color for m in msgs], type=pa.int32()),
        }
    )


def nat_results_table(msgs: Sequence[pb.NatResult]) -> pa.Table:
    """``NatResult`` rows as the ``record_nat_results`` table; an absent Timestamp is null (the store requires
    ``report_time``; ``sample_time`` may be null)."""
    return pa.table(
        {
            "person_id": pa.array([m.person_id for m in msgs], type=pa.uint64()),
            "sample_time": pa.array([_seconds(m, "sample_time") for m in msgs], type=TIMESTAMP),
            "report_time": pa.array([_seconds(m, "report_time") for m in msgs], type=TIMESTAMP),
        }
    )


def entries_table(msgs: Sequence[pb.EntryEvent]) -> pa.Table:
    """``EntryEvent`` rows as the ``record_entries`` table (person_id, t); an absent time is null."""
    return pa.table(
        {
            "person_id": pa.array([m.person_id for m in msgs], type=pa.uint64()),
            "t": pa.array([_seconds(m, "time") for m in msgs], type=TIMESTAMP),
        }
    )


def visits_table(msgs: Sequence[pb.VisitEvent]) -> pa.Table:
    """``VisitEvent`` rows as the ``record_visits`` table (person_id, region, day as date32).  An absent day is
    null (the store rejects it); a day that is not a calendar date raises :class:`StoreError` naming the row."""
    days: list[_dt.date | None] = []
    for row, m in enumerate(msgs):
        if not m.HasField("day"):
            days.append(None)
            continue
        d = m.day
        try:
            days.append(_dt.date(d.year, d.month, d.day))
        except ValueError as exc:
            what = f"{d.year:04d}-{d.month:02d}-{d.day:02d} is not a date ({exc})"
            raise StoreError(f"row {row}, column 'day': {what}; nothing of this call was stored") from None
    return pa.table(
        {
            "person_id": pa.array([m.person_id for m in msgs], type=pa.uint64()),
            "region": pa.array([m.region for m in msgs], type=pa.int32()),
            "day": pa.array(days, type=pa.date32()),
        }
    )


_CONVERTERS: dict[str, Callable[[Any], pa.Table]] = {
    "persons": persons_table,
    "nat_results": nat_results_table,
    "entries": entries_table,
    "visits": visits_table,
}
#: The ingest kinds, in the order of :data:`healthcode.store.INGEST_KINDS` (a test holds them equal).
KINDS = tuple(_CONVERTERS)


#: Row-form entries requests up to this many rows are converted straight to the store form (:func:`store_form`).
STORE_FORM_ROWS = 64
#: The store form of entries (what :meth:`Store.prepare_ingest` makes of an ``entries_table``).
STORE_ENTRIES = pa.schema([("_row", pa.int64()), ("person_id", pa.uint64()), ("t", pa.int64())])


def store_form(kind: str, request: Any) -> pa.Table | None:
    """The validated store form of a small row-form ``RecordEntries`` request whose rows are all well-formed (a
    time in every row, its nanos in range): the table validating ``request_table(kind, request)`` gives, built
    directly (a single-event call then costs no Arrow conversion and validation of its own).  None for anything
    else; the caller takes the general path, which also names a bad row."""
    if kind != "entries" or request.arrow_ipc:
        return None
    rows = request.entries
    n = len(rows)
    if n == 0 or n > STORE_FORM_ROWS:
        return None
    pids: list[int] = []
    times: list[int] = []
    for m in rows:
        if not m.HasField("time"):
            return None
        ts = m.time
        if not 0 <= ts.nanos < _NANOS:
            return None
        pids.append(m.person_id)
        times.append(ts.seconds)
    return pa.Table.from_pydict({"_row": list(range(n)), "person_id": pids, "t": times}, schema=STORE_ENTRIES)


def read_arrow_ipc(data: bytes) -> pa.Table:
    """All batches of an Arrow IPC stream as one table; malformed bytes raise ``StoreError("arrow_ipc: ...")``."""
    try:
        schema, batches = read_stream(data, "arrow_ipc")
    except WireError as exc:
        raise StoreError(str(exc)) from None  # ingest errors are the store's (same status code either way)
    return pa.Table.from_batches(batches, schema=schema)


def request_table(kind: str, request: Any) -> pa.Table:
    """The Arrow table of an ingest request of ``kind`` (one of :data:`KINDS`): its
    ``arrow_ipc`` stream when set, else its rows.  Both set raises :class:`StoreError`."""
    if kind not in _CONVERTERS:
        raise StoreError(f"unknown ingest kind {kind!r}; the kinds are {', '.join(KINDS)}")
    field = _ROW_FIELDS[kind]
    rows = getattr(request, field)
    if request.arrow_ipc:
        if len(rows):
            raise StoreError(f"give either {field} rows or arrow_ipc, not both")
        return read_arrow_ipc(request.arrow_ipc)
    return _CONVERTERS[kind](rows)
