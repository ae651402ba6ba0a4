"""Event ingest for the gRPC service: group commit of Arrow tables to the store.

(The ingest requests' conversion to Arrow tables is :mod:`healthcode.wire.ingest`.)

:class:`IngestQueue` commits concurrent submissions together: one writer task takes everything queued (up to a row
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
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from healthcode.errors import Exhausted, StoreError, Unavailable
from healthcode.logs import event
from healthcode.store import INGEST_KINDS, IngestCounts, Store

log = logging.getLogger(__name__)

#: Submissions up to this many rows are validated in the event loop; larger ones on a worker thread.
INLINE_VALIDATION_ROWS = 4096
#: Loop passes the writer lets run before it takes a group: handlers of calls that have arrived queue theirs
#: first, so concurrent single-event calls share one commit instead of each paying for one.
GATHER_PASSES = 2

# ---------------------------------------------------------------------------------------------------------------
# Group commit


class QueueFull(Exhausted):
    """More than ``max_pending`` submissions are waiting; the caller should retry later (RESOURCE_EXHAUSTED)."""


class QueueClosed(Unavailable):
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
        self.commit_seconds = self.commit_cpu_seconds = 0.0  # the worker's time in groups: wall, its own CPU
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

    async def submit(self, kind: str, table: pa.Table | pa.RecordBatch, *, prepared: bool = False) -> IngestCounts:
        """Validate ``table`` for ``kind``, queue it and wait until it is committed: its counts, or its
        :class:`StoreError` (validation errors are raised before queueing; an unknown person at commit time).

        The submitted table is the validated store form (``committed`` items carry that form: ``_row``,
        ``person_id`` as uint64, instants as int64 epoch seconds).  ``prepared``: ``table`` is that form already
        (:func:`healthcode.wire.ingest.store_form` built it), so it is queued as it is."""
        if self._closing:
            raise QueueClosed("the server is shutting down; retry on another")
        if kind not in INGEST_KINDS:
            raise StoreError(f"unknown ingest kind {kind!r}; the kinds are {', '.join(INGEST_KINDS)}")
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if not isinstance(table, pa.Table):
            raise StoreError(f"{kind} must be a pyarrow Table or RecordBatch, not {type(table).__name__}")
        if len(self._pending) >= self.max_pending:
            raise QueueFull(
                f"the ingest queue is full ({len(self._pending)} submissions waiting, max_pending "
                f"{self.max_pending}); retry with back-off"
            )
        loop = asyncio.get_running_loop()
        # Validate before queueing (a bad submission fails at once, alone): small tables inline, large ones on the
        # default thread pool (Arrow and numpy release the GIL) so the loop is not held up.
        if prepared:
            pass
        elif table.num_rows <= INLINE_VALIDATION_ROWS:
            table = Store.prepare_ingest(kind, table)
        else:
            table = await loop.run_in_executor(None, Store.prepare_ingest, kind, table)
        if self._closing:
            raise QueueClosed("the server is shutting down; retry on another")
        if len(self._pending) >= self.max_pending:
            raise QueueFull(
                f"the ingest queue is full ({len(self._pending)} submissions waiting, max_pending "
                f"{self.max_pending}); retry with back-off"
            )
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
            # Calls whose requests have arrived already are handled first (their handlers are ready to run on the
            # loop): they join this group instead of waiting for the next commit.
            for _ in range(GATHER_PASSES):
                await asyncio.sleep(0)
            group = self._take()
            if not group:
                continue
            self.groups += 1
            items = [(p.kind, p.table) for p in group]
            try:
                results = await loop.run_in_executor(self._executor, self._commit, items)
            except Exception as exc:  # the transaction failed as a whole: every caller of the group sees it
                log.warning("ingest group of %d submissions failed: %s", len(group), exc)
                for p in group:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            for p, res in zip(group, results, strict=True):
                if p.future.done():
                    continue
                if isinstance(res, IngestCounts):
                    p.future.set_result(res)
                else:
                    p.future.set_exception(res)

    def _commit(self, items: list[tuple[str, pa.Table]]) -> list[IngestCounts | StoreError]:
        """One group on the worker thread: its transaction, then ``on_commit`` with its successful submissions
        (before the callers hear back, so what they wrote is visible to their next read)."""
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            return self._commit_group(items)
        finally:
            self.commit_seconds += time.perf_counter() - started
            self.commit_cpu_seconds += time.thread_time() - cpu

    def _commit_group(self, items: list[tuple[str, pa.Table]]) -> list[IngestCounts | StoreError]:
        results = self._ingest(items)
        committed = [
            Committed(kind, table, res) for (kind, table), res in zip(items, results, strict=True)
            if isinstance(res, IngestCounts)
        ]  # fmt: skip
        if committed:
            self.commits += 1
            if self.on_commit is not None:
                self._notify(committed)
        return results

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
        event(
            log, "ingest_closed", submitted=self.submitted, groups=self.groups, commits=self.commits,
            commit_seconds=round(self.commit_seconds, 3), commit_cpu_seconds=round(self.commit_cpu_seconds, 3),
        )  # fmt: skip

    async def __aenter__(self) -> IngestQueue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
