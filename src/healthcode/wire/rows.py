"""The protobuf row form (the gateway path) to and from Arrow columns, through the kernel's row-form codec:
EvaluateRequest bytes to the kernel's column views, results to EvaluateResponse bytes; Person messages from
population rows, risk entries to and from a risk list.

Needs the compiled kernel.  The Arrow IPC half of the wire is :mod:`healthcode.wire.ipc` (no kernel).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa

from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode.rules import _kernel  # type: ignore[attr-defined]
from healthcode.rules.columns import (
    POPULATION_SCHEMA,
    BatchColumns,
    Bits,
    bool_view,
    offsets_view,
    validity_view,
    values_view,
)
from healthcode.rules.engine import KernelOutput
from healthcode.rules.regions import RiskList, risk_list_from_rows
from healthcode.rules.results import MESSAGE_HEADS, MESSAGE_TAILS
from healthcode.wire.ipc import WireError
from healthcode.wire.limits import check_rows


def decode_request(data: bytes) -> tuple[BatchColumns, int | None, str]:
    """An EvaluateRequest's serialized bytes as the kernel's column views, its as_of (or None) and policy name.

    Decoded by the kernel's row-form codec straight from the wire format into the arrays the kernel reads: no
    message objects, no Arrow arrays, no Python per person.  Absent optional fields are nulls; an impossible visit
    date is a null day (the row is then INVALID_INPUT).
    """
    try:
        c, as_of, policy = _kernel.decode_evaluate_request(data)
    except _kernel.WireFormatError as exc:
        raise WireError(str(exc)) from None
    check_rows(c["n"], "persons")  # the rows-per-request limit (wire.limits.LimitExceeded: RESOURCE_EXHAUSTED)
    all_valid = Bits(None, 0)
    nat = {"sample": (c["sample"], Bits(c["sample_ok"], 0), 0), "report": (c["report"], Bits(c["report_ok"], 0), 0)}
    cols = BatchColumns(
        n=c["n"],
        person_id_valid=Bits(c["pid_ok"], 0),
        home_region=c["home"],
        home_region_valid=Bits(c["home_ok"], 0),
        registered=Bits(c["registered"], 0),
        registered_valid=all_valid,
        base_color=c["color"],
        base_color_valid=Bits(c["color_ok"], 0),
        nat=nat,
        entries_valid=all_valid,
        entries_offsets=c["entry_off"],
        entry_values=c["entries"],
        entry_values_valid=all_valid,
        entry_unit=0,
        visits_valid=all_valid,
        visits_offsets=c["visit_off"],
        visit_struct_valid=all_valid,
        visit_region=c["region"],
        visit_region_valid=Bits(c["region_ok"], 0),
        visit_day=c["day"],
        visit_day_valid=Bits(c["day_ok"], 0),
        person_ids=c["pid"],
    )
    return cols, as_of, policy


class SmallRequests:
    """Small EvaluateRequests answered in one pass through the kernel (decoded into fixed buffers, evaluated,
    encoded: see ``_kernel.Scratch``), for the gateway's calls of a few persons.  One instance serves one thread."""

    def __init__(self) -> None:
        self._scratch = _kernel.Scratch(MESSAGE_HEADS, MESSAGE_TAILS)

    def respond(
        self, data: bytes, rules_for: Callable[[int | None, str], tuple[object, pb.EvaluationInfo, bytes]]
    ) -> tuple[bytes, int] | None:
        """The serialized EvaluateResponse for request bytes ``data`` and its row count, or None when the request
        is too large for the buffers (the general path then answers it).  ``rules_for(as_of or None, policy)``
        gives the kernel's rules, the EvaluationInfo and the serialized tail of a response without invalid rows."""
        scratch = self._scratch
        try:
            if not scratch.decode(data):
                return None
        except _kernel.WireFormatError as exc:
            raise WireError(str(exc)) from None
        check_rows(scratch.n, "persons")
        rules, info, tail = rules_for(scratch.as_of, scratch.policy)
        statuses, invalid = scratch.encode_evaluation(rules)
        if invalid:
            tail = pb.EvaluateResponse(info=info, invalid_rows=invalid).SerializeToString()
        return statuses + tail, scratch.n


def columns_to_batch(cols: BatchColumns) -> pa.RecordBatch:
    """Decoded row-form columns as an Arrow population batch (the reference path)."""
    n = cols.n
    assert cols.person_ids is not None, "decode_request keeps the person ids"

    def arr(type_: pa.DataType, values: np.ndarray, valid: Bits, length: int) -> pa.Array:
        bitmap = None if valid.data is None else pa.py_buffer(valid.data)
        return pa.Array.from_buffers(type_, length, [bitmap, pa.py_buffer(values)])

    instant = POPULATION_SCHEMA.field("nat_sample_time").type
    visits_n = len(cols.visit_region)
    visits = pa.StructArray.from_arrays(
        [
            arr(pa.int32(), cols.visit_region, cols.visit_region_valid, visits_n),
            arr(pa.date32(), cols.visit_day, cols.visit_day_valid, visits_n),
        ],
        fields=list(POPULATION_SCHEMA.field("visits").type.value_type),
    )
    sample, sample_ok, _ = cols.nat["sample"]
    report, report_ok, _ = cols.nat["report"]
    return pa.RecordBatch.from_arrays(
        [
            arr(pa.uint64(), cols.person_ids, cols.person_id_valid, n),
            arr(pa.int32(), cols.home_region, cols.home_region_valid, n),
            pa.Array.from_buffers(pa.bool_(), n, [None, pa.py_buffer(cols.registered.data)]),
            arr(pa.int8(), cols.base_color, cols.base_color_valid, n),
            arr(instant, sample, sample_ok, n),
            arr(instant, report, report_ok, n),
            pa.ListArray.from_arrays(pa.array(cols.entries_offsets), pa.array(cols.entry_values, instant)),
            pa.ListArray.from_arrays(pa.array(cols.visits_offsets), visits),
        ],
        schema=POPULATION_SCHEMA,
    )


def _encode(
    pid: np.ndarray,
    pid_valid: Bits,
    flags: Sequence[Bits],
    reasons: np.ndarray,
    until: np.ndarray | Sequence[np.ndarray],
    errors: pa.Array,
    info: pb.EvaluationInfo,
) -> bytes:
    # The valid-until columns are valid exactly where badge and entry are true (SPEC §4.5): the codec uses those bits.
    statuses = _kernel.encode_statuses(
        pid, pid_valid, flags[0], flags[1], flags[2], reasons, until[0], until[1],
        offsets_view(errors), np.frombuffer(errors.buffers()[2] or b"", dtype=np.uint8), Bits(*validity_view(errors)),
    )  # fmt: skip
    tail = pb.EvaluateResponse(info=info, invalid_rows=len(errors) - errors.null_count).SerializeToString()
    return statuses + tail


def encode_output(cols: BatchColumns, out: KernelOutput, info: pb.EvaluationInfo) -> bytes:
    """The serialized EvaluateResponse straight from the kernel's buffers (the gateway path)."""
    flags = [Bits(out.bits[k].view(np.uint8), 0) for k in range(3)]
    assert cols.person_ids is not None, "decode_request keeps the person ids"
    return _encode(cols.person_ids, cols.person_id_valid, flags, out.reasons, out.until, out.errors, info)


def decode_status_request(data: bytes) -> tuple[np.ndarray, int | None]:
    """A GetStatusRequest's serialized bytes as its person ids (uint64, in order) and as_of (None: absent), read by
    the kernel's codec (no message object, no Python int per id); the ids are counted against the rows limit."""
    try:
        ids, as_of = _kernel.decode_status_request(data)
    except _kernel.WireFormatError as exc:
        raise WireError(f"GetStatus: {exc}") from None
    check_rows(len(ids), "GetStatus: person_ids")
    return ids, as_of


#: The error of a GetStatus id the store does not hold.
NOT_IN_STORE = "person_id is not in the store"


def encode_status_response(
    person_ids: np.ndarray,
    slots: np.ndarray,
    flags: np.ndarray,
    reasons: np.ndarray,
    until: np.ndarray,
    tail: bytes,
) -> bytes:
    """The serialized GetStatusResponse (laid out as EvaluateResponse: statuses 1, info 2, not_found 3) for the
    ids of a lookup: ``slots`` -1 where the store has no such person (a Status with only its id and
    :data:`NOT_IN_STORE`), and the known ones' ``flags`` (1 badge, 2 entry, 4 enrolled), ``reasons`` and
    ``until`` (int64[2, known]) in request order, as :meth:`~healthcode.live.statusbook.StatusBook.statuses`
    gives them; ``tail`` is the serialized GetStatusResponse of the info alone (not_found is added here)."""
    statuses = _kernel.encode_lookup(
        np.ascontiguousarray(person_ids, dtype=np.uint64), np.ascontiguousarray(slots, dtype=np.int64),
        np.ascontiguousarray(flags, dtype=np.uint8), np.ascontiguousarray(reasons, dtype=np.uint16),
        np.ascontiguousarray(until, dtype=np.int64), _NOT_IN_STORE,
    )  # fmt: skip
    missing = len(person_ids) - len(flags)
    return statuses + tail + (pb.GetStatusResponse(not_found=missing).SerializeToString() if missing else b"")


_NOT_IN_STORE = NOT_IN_STORE.encode()


def encode_result(result: pa.RecordBatch, info: pb.EvaluationInfo) -> bytes:
    """The serialized EvaluateResponse for an Arrow result batch (the reference path)."""
    col = result.column
    flags = [Bits(*bool_view(col(k))) for k in (1, 2, 3)]
    until = [values_view(col(5), np.int64), values_view(col(6), np.int64)]
    pid = values_view(col(0), np.uint64)
    return _encode(pid, Bits(*validity_view(col(0))), flags, values_view(col(4), np.uint16), until, col(7), info)


def batch_to_persons(batch: pa.RecordBatch | pa.Table) -> list[pb.Person]:
    """Population rows as Person messages (row form; for clients, tests and benchmarks, not bulk work).

    A null element of ``entry_times`` has no row-form equivalent (a repeated Timestamp cannot be null) and is
    dropped; a null visit becomes an empty Visit (no region, no day), which the server treats as invalid."""
    seconds = pa.int64()
    cols = {
        name: batch.column(name).cast(seconds) if name.startswith("nat_") else batch.column(name)
        for name in POPULATION_SCHEMA.names
    }
    entry_type = pa.list_(seconds)
    entries = cols["entry_times"].cast(entry_type).to_pylist()
    visits = cols["visits"].to_pylist()
    out = []
    for i, (pid, home, reg, color, sample, report) in enumerate(
        zip(
            *(cols[n].to_pylist() for n in POPULATION_SCHEMA.names[:6]),
            strict=True,
        )
    ):
        p = pb.Person(registered_commuter=bool(reg))
        if pid is not None:
            p.person_id = pid
        if home is not None:
            p.home_region = home
        if color is not None:
            p.base_color = color
        if sample is not None:
            p.nat_sample_time.seconds = sample
        if report is not None:
            p.nat_report_time.seconds = report
        for t in entries[i] or ():
            if t is not None:
                p.entry_times.add(seconds=t)
        for v in visits[i] or ():
            visit = p.visits.add()
            if v is None:
                continue  # an empty Visit: no region, no day
            if v["region"] is not None:
                visit.region = v["region"]
            if v["day"] is not None:
                d = v["day"]
                visit.day.year, visit.day.month, visit.day.day = d.year, d.month, d.day
        out.append(p)
    return out


def risk_entries(risk: RiskList) -> list[pb.RiskEntry]:
    return [pb.RiskEntry(region=r, start_date=s, end_date=e, kind=k) for r, s, e, k in risk.rows()]


def risk_from_entries(entries: Sequence[pb.RiskEntry]) -> RiskList:
    return risk_list_from_rows((e.region, e.start_date, e.end_date, e.kind) for e in entries)
