"""Conversions between the wire (protobuf messages, Arrow IPC bytes) and Arrow columns.

Row form (the gateway path) converts field by field, which is fine for batches of a few thousand; the bulk path
never touches rows: Arrow IPC bytes are read zero-copy and written back as IPC bytes.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterator, Sequence
from functools import lru_cache

import numpy as np
import pyarrow as pa

from ._proto.v1 import healthcode_pb2 as pb
from .columns import POPULATION_SCHEMA, check_schema
from .errors import SchemaError
from .regions import RiskList, risk_list_from_rows
from .results import Reason
from .timebase import date_to_day

_EPOCH = _dt.date(1970, 1, 1).toordinal()


class WireError(ValueError):
    """A request's bytes or fields cannot be read; the message says what and where."""


def _visit_day(v: pb.Visit) -> int | None:
    if v.HasField("day"):
        d = v.day
        try:
            return _dt.date(d.year, d.month, d.day).toordinal() - _EPOCH
        except ValueError:
            return None  # an impossible date is treated as no date: the row becomes INVALID_INPUT
    if v.day_iso:
        try:
            return date_to_day(_dt.date.fromisoformat(v.day_iso))
        except ValueError:
            return None
    return None


def persons_to_batch(persons: Sequence[pb.Person]) -> pa.RecordBatch:
    """Row-form persons as a population batch in the SPEC schema; absent fields become nulls."""
    n = len(persons)
    pid = np.zeros(n, dtype=np.uint64)
    pid_ok = np.ones(n, dtype=bool)
    home = np.zeros(n, dtype=np.int32)
    home_ok = np.ones(n, dtype=bool)
    color = np.zeros(n, dtype=np.int8)
    color_ok = np.ones(n, dtype=bool)
    registered = np.zeros(n, dtype=bool)
    sample = np.zeros(n, dtype=np.int64)
    sample_ok = np.zeros(n, dtype=bool)
    report = np.zeros(n, dtype=np.int64)
    report_ok = np.zeros(n, dtype=bool)
    entry_off = np.zeros(n + 1, dtype=np.int32)
    visit_off = np.zeros(n + 1, dtype=np.int32)
    entries: list[int] = []
    regions: list[int | None] = []
    days: list[int | None] = []
    for i, p in enumerate(persons):
        if p.HasField("person_id"):
            pid[i] = p.person_id
        else:
            pid_ok[i] = False
        if p.HasField("home_region"):
            home[i] = p.home_region
        else:
            home_ok[i] = False
        if p.HasField("base_color"):
            # Out-of-range colours stay out of range (INVALID_INPUT), never wrap into 0..2.
            color[i] = p.base_color if -128 <= p.base_color <= 127 else -1
        else:
            color_ok[i] = False
        registered[i] = p.registered_commuter
        if p.HasField("nat_sample_time"):
            sample[i] = p.nat_sample_time.seconds
            sample_ok[i] = True
        if p.HasField("nat_report_time"):
            report[i] = p.nat_report_time.seconds
            report_ok[i] = True
        entries.extend(t.seconds for t in p.entry_times)
        entry_off[i + 1] = len(entries)
        for v in p.visits:
            regions.append(v.region if v.HasField("region") else None)
            days.append(_visit_day(v))
        visit_off[i + 1] = len(regions)
    instant = POPULATION_SCHEMA.field("nat_sample_time").type
    visit_values = pa.StructArray.from_arrays(
        [pa.array(regions, pa.int32()), pa.array(days, pa.int32()).cast(pa.date32())],
        fields=list(POPULATION_SCHEMA.field("visits").type.value_type),
    )
    return pa.RecordBatch.from_arrays(
        [
            pa.array(pid, mask=~pid_ok),
            pa.array(home, mask=~home_ok),
            pa.array(registered),
            pa.array(color, mask=~color_ok),
            pa.array(sample, instant, mask=~sample_ok),
            pa.array(report, instant, mask=~report_ok),
            pa.ListArray.from_arrays(pa.array(entry_off), pa.array(np.asarray(entries, dtype=np.int64), instant)),
            pa.ListArray.from_arrays(pa.array(visit_off), visit_values),
        ],
        schema=POPULATION_SCHEMA,
    )


@lru_cache(maxsize=4096)
def reason_list(mask: int) -> tuple[int, ...]:
    """The proto Reason values of the bits set in ``mask`` (value = bit index + 1)."""
    return tuple(r.value.bit_length() for r in Reason if mask & r.value)


def results_to_statuses(result: pa.Table | pa.RecordBatch) -> list[pb.Status]:
    """Result rows as Status messages (absent valid-until when null, error only on INVALID_INPUT rows)."""
    cols = {name: result.column(name) for name in result.schema.names}
    pid = cols["person_id"].to_numpy(zero_copy_only=False).tolist() if len(result) else []
    badge = cols["commuter_badge"].to_pylist()
    entry = cols["entry_permitted"].to_pylist()
    enrolled = cols["enrolled"].to_pylist()
    reasons = cols["reasons"].to_pylist()
    seconds = pa.int64()
    bu = cols["badge_valid_until"].cast(seconds).to_pylist()
    eu = cols["entry_valid_until"].cast(seconds).to_pylist()
    errors = cols["error"].to_pylist()
    out = []
    for i in range(len(badge)):
        s = pb.Status(
            person_id=int(pid[i] or 0),
            commuter_badge=badge[i],
            entry_permitted=entry[i],
            enrolled=enrolled[i],
            reasons=reason_list(reasons[i]),
            reasons_mask=reasons[i],
        )
        if bu[i] is not None:
            s.badge_valid_until.seconds = bu[i]
        if eu[i] is not None:
            s.entry_valid_until.seconds = eu[i]
        if errors[i] is not None:
            s.error = errors[i]
        out.append(s)
    return out


def read_ipc(data: bytes, what: str = "arrow_ipc") -> tuple[pa.Schema, list[pa.RecordBatch]]:
    """Read a complete Arrow IPC stream zero-copy; a population schema problem names the column."""
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
        batches = list(reader)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise WireError(f"{what}: not a readable Arrow IPC stream ({exc})") from None
    try:
        check_schema(reader.schema)
    except SchemaError as exc:
        raise WireError(f"{what}: {exc}") from None
    return reader.schema, batches


def read_ipc_results(data: bytes) -> list[pa.RecordBatch]:
    """Result batches from a response's Arrow IPC stream."""
    try:
        return list(pa.ipc.open_stream(pa.py_buffer(data)))
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise WireError(f"response arrow_ipc: not a readable Arrow IPC stream ({exc})") from None


def write_ipc(batches: Sequence[pa.RecordBatch], schema: pa.Schema) -> bytes:
    """Batches as one complete Arrow IPC stream."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        for b in batches:
            writer.write_batch(b)
    return sink.getvalue().to_pybytes()


def ipc_chunks(batch: pa.RecordBatch | pa.Table, limit: int) -> Iterator[tuple[bytes, int]]:
    """``batch`` as IPC streams of at most about ``limit`` bytes each, with their row counts."""
    rows = batch.num_rows
    if rows == 0:
        yield write_ipc(batch.to_batches() if isinstance(batch, pa.Table) else [batch], batch.schema), 0
        return
    per_row = max(1.0, batch.nbytes / rows)
    step = max(1, int(limit * 0.8 / per_row))
    start = 0
    while start < rows:
        piece = batch.slice(start, step)
        parts = piece.to_batches() if isinstance(piece, pa.Table) else [piece]
        data = write_ipc(parts, batch.schema)
        if len(data) > limit and step > 1:
            step = max(1, step // 2)  # denser rows than estimated: retry this slice smaller
            continue
        yield data, piece.num_rows
        start += piece.num_rows


def risk_entries(risk: RiskList) -> list[pb.RiskEntry]:
    return [pb.RiskEntry(region=r, start_date=s, end_date=e, kind=k) for r, s, e, k in risk.rows()]


def risk_from_entries(entries: Sequence[pb.RiskEntry]) -> RiskList:
    return risk_list_from_rows((e.region, e.start_date, e.end_date, e.kind) for e in entries)
