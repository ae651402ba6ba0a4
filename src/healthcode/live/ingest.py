"""Event ingest for the gRPC service: protobuf rows (or Arrow IPC) to Arrow tables, and group commit to the store.

* :func:`persons_table`, :func:`nat_results_table`, :func:`entries_table`, :func:`visits_table` turn the row form of
  the ingest requests into the Arrow tables the :class:`~healthcode.store.Store` methods take; :func:`request_table`
  picks the request's ``arrow_ipc`` stream or its rows.
* :class:`IngestQueue` commits concurrent submissions together: one writer task takes everything queued (up to a row
  and byte cap), the store validates each submission on its own and writes the good ones in ONE DuckDB transaction
  (:meth:`Store.ingest_group`) on a single worker thread, so the event loop keeps serving.  ``submit`` returns only
  after the transaction committed.  DuckDB appends each commit to its write-ahead log and syncs it before COMMIT
  returns (the WAL is folded into the database file at checkpoints, automatically past ``checkpoint_threshold``
  and on close), so an acknowledged submission survives a crash of the process.

Counts with overlapping rows in one group follow queue order: the first submission holding a row "inserts" it and a
later one in the same group sees it "already present", exactly as if they had been committed one after another.
Persons submissions of a group are applied before its events, so an event may name a person upserted alongside.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as _dt
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode.errors import StoreError
from healthcode.store import INGEST_KINDS, IngestCounts, Store
from healthcode.store import row_error as _row_error
from healthcode.wire.rows import WireError, read_stream

log = logging.getLogger(__name__)

#: Arrow type of instants built from protobuf Timestamps (floored to seconds, as the store keeps them).
TIMESTAMP = pa.timestamp("s", tz="UTC")
_NANOS = 1_000_000_000
#: Submissions up to this many rows are validated in the event loop; larger ones on a worker thread.
INLINE_VALIDATION_ROWS = 4096

#: The repeated row field of each kind's request.
_ROW_FIELDS = {"persons": "persons", "nat_results": "results", "entries": "entries", "visits": "visits"}


# ---------------------------------------------------------------------------------------------------------------
# Row form -> Arrow


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
            raise _row_error(row, "day", f"{d.year:04d}-{d.month:02d}-{d.day:02d} is not a date ({exc})") from None
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


def read_arrow_ipc(data: bytes) -> pa.Table:
    """All batches of an Arrow IPC stream as one table; malformed bytes raise ``StoreError("arrow_ipc: ...")``."""
    try:
        schema, batches = read_stream(data, "arrow_ipc")
    except WireError as exc:
        raise StoreError(str(exc)) from None  # ingest errors are the store's (same status code either way)
    return pa.Table.from_batches(batches, schema=schema)


def request_table(kind: str, request: Any) -> pa.Table:
    """The Arrow table of an ingest request of ``kind`` (one of :data:`~healthcode.store.database.INGEST_KINDS`): its
    ``arrow_ipc`` stream when set, else its rows.  Both set raises :class:`StoreError`."""
    if kind not in _CONVERTERS:
        raise StoreError(f"unknown ingest kind {kind!r}; the kinds are {', '.join(INGEST_KINDS)}")
    field = _ROW_FIELDS[kind]
    rows = getattr(request, field)
    if request.arrow_ipc:
        if len(rows):
            raise StoreError(f"give either {field} rows or arrow_ipc, not both")
        return read_arrow_ipc(request.arrow_ipc)
    return _CONVERTERS[kind](rows)


# ---------------------------------------------------------------------------------------------------------------
# Group commit


class QueueFull(RuntimeError):
    """More than ``max_pending`` submissions are waiting; the caller should retry later (RESOURCE_EXHAUSTED)."""


class QueueClosed(RuntimeError):
    """The queue is closing or closed and takes no more submissions (UNAVAILABLE)."""


@dataclass(frozen=True)
class Committed:
    """One submission of a committed group, as passed to ``on_commit``."""

    kind: str
    table: pa.Table
    counts: IngestCounts


@dataclass
class _Pending:
    kind: str
    table: pa.Table
    rows: int
    nbytes: int
    future: asyncio.Future[IngestCounts]


class IngestQueue:
    """Group commit of ingest submissions to a :class:`Store`, for an asyncio server.

    ``await submit(kind, table)`` returns the submission's :class:`IngestCounts` once it is committed, or raises
    its :class:`StoreError` (row numbers relative to its own table; other submissions of the group are unaffected).
    Submissions that arrive while a commit runs wait and go into the next group; a group holds at least one
    submission and stops growing past ``max_group_rows`` rows or ``max_group_bytes`` bytes.  At most
    ``max_pending`` submissions may wait; past that :meth:`submit` raises :class:`QueueFull`.

    Store work runs on a single worker thread owned by the queue.  ``on_commit(items)`` is called on that thread
    after each committed group with its successful submissions (:class:`Committed`, in queue order) and before
    their callers are answered; its errors are logged, never passed to the callers.  :meth:`close` commits what is
    queued and stops; the store stays open (its owner closes it).  ``commits`` counts transactions run,
    ``groups`` groups taken.  ``known(person_ids) -> bool mask`` (optional) tells the store which persons are
    stored without a database join, ``seen(kind, events) -> bool mask`` which events are stored already (see
    :meth:`Store.ingest_group`).
    """

    def __init__(
        self,
        store: Store,
        *,
        max_pending: int = 4096,
        max_group_rows: int = 100_000,
        max_group_bytes: int = 64 << 20,
        on_commit: Callable[[list[Committed]], None] | None = None,
        known: Callable[[np.ndarray], np.ndarray | None] | None = None,
        seen: Callable[[str, pa.Table], np.ndarray | None] | None = None,
    ) -> None:
        if max_pending < 1 or max_group_rows < 1 or max_group_bytes < 1:
            raise ValueError("max_pending, max_group_rows and max_group_bytes must be >= 1")
        self.store = store
        self.max_pending = max_pending
        self.max_group_rows = max_group_rows
        self.max_group_bytes = max_group_bytes
        self.on_commit = on_commit
        self.known = known
        self.seen = seen
        self.commits = 0
        self.groups = 0
        self.submitted = 0
        self._pending: collections.deque[_Pending] = collections.deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="healthcode-ingest")
        self._wake: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def pending(self) -> int:
        """Submissions waiting for a group (not counting the one being committed)."""
        return len(self._pending)

    async def submit(self, kind: str, table: pa.Table | pa.RecordBatch) -> IngestCounts:
        """Validate ``table`` for ``kind``, queue it and wait until it is committed: its counts, or its
        :class:`StoreError` (validation errors are raised before queueing; an unknown person at commit time).

        The submitted table is the validated store form (``committed`` items carry that form: ``_row``,
        ``person_id`` as uint64, instants as int64 epoch seconds)."""
        if self._closing:
            raise QueueClosed("the ingest queue is closed")
        if kind not in INGEST_KINDS:
            raise StoreError(f"unknown ingest kind {kind!r}; the kinds are {', '.join(INGEST_KINDS)}")
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if not isinstance(table, pa.Table):
            raise StoreError(f"{kind} must be a pyarrow Table or RecordBatch, not {type(table).__name__}")
        if len(self._pending) >= self.max_pending:
            raise QueueFull(f"{len(self._pending)} ingest submissions are waiting (max_pending {self.max_pending})")
        loop = asyncio.get_running_loop()
        # Validate before queueing (a bad submission fails at once, alone): small tables inline, large ones on the
        # default thread pool (Arrow and numpy release the GIL) so the loop is not held up.
        if table.num_rows <= INLINE_VALIDATION_ROWS:
            table = Store.prepare_ingest(kind, table)
        else:
            table = await loop.run_in_executor(None, Store.prepare_ingest, kind, table)
        if self._closing:
            raise QueueClosed("the ingest queue is closed")
        if len(self._pending) >= self.max_pending:
            raise QueueFull(f"{len(self._pending)} ingest submissions are waiting (max_pending {self.max_pending})")
        if self._writer is None:
            self._wake = asyncio.Event()
            self._writer = loop.create_task(self._run(), name="healthcode-ingest-writer")
        assert self._wake is not None
        fut: asyncio.Future[IngestCounts] = loop.create_future()
        self._pending.append(_Pending(kind, table, table.num_rows, table.nbytes, fut))
        self.submitted += 1
        self._wake.set()
        return await fut

    def _take(self) -> list[_Pending]:
        group: list[_Pending] = []
        rows = nbytes = 0
        while self._pending:
            p = self._pending[0]
            if p.future.cancelled():  # the caller gave up before its group was taken: drop it
                self._pending.popleft()
                continue
            if group and (rows + p.rows > self.max_group_rows or nbytes + p.nbytes > self.max_group_bytes):
                break
            self._pending.popleft()
            group.append(p)
            rows += p.rows
            nbytes += p.nbytes
        return group

    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            group = self._take()
            if not group:
                continue
            self.groups += 1
            items = [(p.kind, p.table) for p in group]
            try:
                results = await loop.run_in_executor(self._executor, self._ingest, items)
            except Exception as exc:  # the transaction failed as a whole: every caller of the group sees it
                log.warning("ingest group of %d submissions failed: %s", len(group), exc)
                for p in group:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            committed = [
                Committed(p.kind, p.table, res) for p, res in zip(group, results, strict=True)
                if isinstance(res, IngestCounts)
            ]
            if committed:
                self.commits += 1
                if self.on_commit is not None:
                    # Before the callers hear back, so what they wrote is visible to their next read.
                    await loop.run_in_executor(self._executor, self._notify, committed)
            for p, res in zip(group, results, strict=True):
                if p.future.done():
                    continue
                if isinstance(res, IngestCounts):
                    p.future.set_result(res)
                else:
                    p.future.set_exception(res)

    def _notify(self, committed: list[Committed]) -> None:
        assert self.on_commit is not None
        try:
            self.on_commit(committed)
        except Exception:
            log.exception("ingest on_commit callback failed")

    def _ingest(self, items: list[tuple[str, pa.Table]]) -> list[IngestCounts | StoreError]:
        return self.store.ingest_group(  # type: ignore[arg-type]
            items, prepared=True, known=self.known, seen=self.seen
        )

    async def close(self) -> None:
        """Refuse new submissions, commit everything queued, stop the writer and its thread."""
        self._closing = True
        if self._writer is not None:
            assert self._wake is not None
            self._wake.set()
            await self._writer
        self._executor.shutdown(wait=True)

    async def __aenter__(self) -> IngestQueue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
