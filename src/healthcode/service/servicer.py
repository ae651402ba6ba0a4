"""The healthcode.v1.HealthCode RPCs: thin glue between the wire and the engine.

Validation and evaluation live in the engine; status codes, logging and metrics in :mod:`interceptors`.  The kernel
runs in a thread pool (it releases the GIL), so the event loop keeps serving while it works.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor

import grpc
import numpy as np
import pyarrow as pa

from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode._proto.v1 import healthcode_pb2_grpc as pb_grpc
from healthcode.live.ingest import IngestQueue, QueueClosed, QueueFull, request_table
from healthcode.live.state import Snapshot, State
from healthcode.live.statusbook import StatusBook, Summary
from healthcode.rules import engine
from healthcode.rules.policy import PolicyTimeline, parse_policy
from healthcode.rules.regions import parse_risk_csv
from healthcode.service import auth, metrics
from healthcode.service.config import Settings
from healthcode.service.interceptors import ROWS, Refused
from healthcode.wire.rows import (
    WireError,
    changes_ipc,
    columns_to_batch,
    decode_request,
    encode_output,
    encode_result,
    ipc_chunks,
    read_ipc,
    risk_entries,
    risk_from_entries,
)

log = logging.getLogger("healthcode.admin")

#: Row-form requests up to this size are evaluated on the event loop (about 1,000 persons).
INLINE_REQUEST_BYTES = 128 * 1024
#: Bulk requests evaluated ahead of the one whose results are being sent.
PIPELINE = 2
#: Changes per WatchChangesArrow message (~3 MB of Arrow IPC).
CHANGE_BATCH_ROWS = 100_000


def _timeline(snap: Snapshot, name: str) -> PolicyTimeline:
    """The server's timeline, or only the named policy of it when a request names one."""
    if not name:
        return snap.policy
    for p in snap.policy.policies:
        if p.name == name:
            return PolicyTimeline((p,), snap.policy.source)
    names = ", ".join(p.name for p in snap.policy.policies)
    raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"unknown policy {name!r}; the server's timeline has: {names}")


def _info(ctx: engine.Context, snap: Snapshot) -> pb.EvaluationInfo:
    info = pb.EvaluationInfo(policy=ctx.policy.name, policy_active=ctx.active, risk_list_version=snap.risk_version)
    info.as_of.seconds = ctx.as_of
    return info


def _summary(summary: Summary) -> pb.ReevaluationSummary:
    out = pb.ReevaluationSummary(
        evaluated=summary.evaluated,
        changed=summary.changed,
        badges_lost=summary.badges_lost,
        badges_gained=summary.badges_gained,
        entries_lost=summary.entries_lost,
        entries_gained=summary.entries_gained,
        high_water_mark=summary.high_water_mark,
        risk_list_version=summary.risk_list_version,
        regions_changed=summary.regions_changed,
    )
    out.as_of.seconds = summary.as_of
    return out


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the monotonic clock (None: no deadline)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _check_deadline(deadline: float | None) -> None:
    """Work queued for a call whose deadline has passed is not started (the caller has gone)."""
    if deadline is not None and time.monotonic() >= deadline:
        raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the evaluation finished")


class HealthCodeService(pb_grpc.HealthCodeServicer):
    def __init__(
        self,
        state: State,
        settings: Settings,
        executor: Executor,
        book: StatusBook | None = None,
        ingest: IngestQueue | None = None,
    ) -> None:
        self.state = state
        self.settings = settings
        self.executor = executor
        self.book = book
        self.ingest = ingest
        self._admin = asyncio.Lock()  # risk-list replacements and re-evaluations, one at a time
        self._published = asyncio.Condition()  # notified after each commit to the change log
        self.kernel_threads = settings.kernel_threads or engine.default_threads()
        metrics.RISK_VERSION.set(state.snapshot.risk_version)
        metrics.POLICY_VERSION.set(state.snapshot.policy_version)

    def _context(self, snap: Snapshot, as_of: int | None, policy: str) -> engine.Context:
        return engine.make_context(snap.risk, _timeline(snap, policy), self.settings.now() if as_of is None else as_of)

    async def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- gateway path ---------------------------------------------------------------------------------------------

    def _evaluate_rows(self, request: bytes, deadline: float | None = None) -> tuple[bytes, int]:
        """Decode, evaluate and encode one row-form request (bytes in, bytes out: see wire.py)."""
        _check_deadline(deadline)
        try:
            cols, as_of, policy = decode_request(request)
        except WireError as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        snap = self.state.snapshot
        ctx = self._context(snap, as_of, policy)
        info = _info(ctx, snap)
        if engine.use_reference():
            (result,) = engine.evaluate_batches([columns_to_batch(cols)], ctx, 1)
            return encode_result(result, info), cols.n
        threads = 1 if cols.n <= self.settings.gateway_threads_rows else self.kernel_threads
        return encode_output(cols, engine.evaluate_columns(ctx, cols, threads), info), cols.n

    async def Evaluate(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Gateway path.  Registered with raw-bytes (de)serializers: the kernel's codec reads the request and writes
        the response.  Small requests are handled on the event loop (a thread hop would cost more than the work)."""
        if len(request) <= INLINE_REQUEST_BYTES:
            response, rows = self._evaluate_rows(request)
        else:
            response, rows = await self._run(self._evaluate_rows, request, _deadline(context))
        ROWS.set(rows)
        if len(response) > self.settings.max_message_bytes:
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the response for {rows:,} persons is {len(response):,} bytes, over the "
                f"{self.settings.max_message_bytes:,}-byte message limit; send fewer persons per call, or use "
                "EvaluateArrow for bulk work",
            )
        return response

    # -- bulk path ------------------------------------------------------------------------------------------------

    def _evaluate_ipc(
        self, data: bytes, ctx: engine.Context, index: int, deadline: float | None = None
    ) -> list[tuple[bytes, int]]:
        _check_deadline(deadline)
        try:
            _schema, batches = read_ipc(data, f"request {index}: arrow_ipc")
        except WireError as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        out: list[tuple[bytes, int]] = []
        for result in engine.evaluate_batches(batches, ctx, self.kernel_threads):
            out.extend(ipc_chunks(result, self.settings.max_message_bytes - 1024))
            _check_deadline(deadline)  # a long request stops between batches once nobody waits for it
        return out

    async def EvaluateArrow(
        self, request_iterator: AsyncIterator[pb.EvaluateArrowRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EvaluateArrowResponse]:
        snap = self.state.snapshot
        ctx = None
        rows = 0
        # Request k + 1 is evaluated while the results of request k are sent: at most PIPELINE requests are in
        # flight, so a fast sender cannot make the server buffer without bound.
        pending: collections.deque[asyncio.Future[list[tuple[bytes, int]]]] = collections.deque()
        try:
            index = 0
            async for request in request_iterator:
                if ctx is None:
                    options = request.options
                    as_of = options.as_of.seconds if options.HasField("as_of") else None
                    ctx = self._context(snap, as_of, options.policy)
                    yield pb.EvaluateArrowResponse(info=_info(ctx, snap))
                elif request.HasField("options"):
                    raise Refused(
                        grpc.StatusCode.INVALID_ARGUMENT, f"request {index}: options belong in the first request only"
                    )
                if request.arrow_ipc:
                    loop = asyncio.get_running_loop()
                    pending.append(
                        loop.run_in_executor(
                            self.executor, self._evaluate_ipc, request.arrow_ipc, ctx, index, _deadline(context)
                        )
                    )
                while pending and (len(pending) >= PIPELINE or pending[0].done()):
                    for data, n in await pending.popleft():
                        rows += n
                        ROWS.set(rows)
                        yield pb.EvaluateArrowResponse(arrow_ipc=data, rows=n)
                index += 1
            while pending:
                for data, n in await pending.popleft():
                    rows += n
                    ROWS.set(rows)
                    yield pb.EvaluateArrowResponse(arrow_ipc=data, rows=n)
        finally:
            for future in pending:  # abandoned (error, deadline, cancellation): drop work not yet started
                future.cancel()
        if ctx is None:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT, "the stream carried no request (the first one holds the options)"
            )

    # -- risk list and policy -------------------------------------------------------------------------------------

    async def PutRiskList(
        self, request: pb.PutRiskListRequest, context: grpc.aio.ServicerContext
    ) -> pb.PutRiskListResponse:
        source = request.WhichOneof("source")
        if source == "csv":
            risk = await self._run(parse_risk_csv, request.csv, "csv")
        elif source == "entries":
            risk = await self._run(risk_from_entries, request.entries.entries)
        else:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "give the new list as csv or as entries")
        async with self._admin:
            summary = None
            if self.book is not None:
                # Re-evaluate the persons the change can affect, commit their statuses and change log, then publish
                # the new list: an evaluation sees the old list or the new one, never a mix.
                old = self.state.snapshot
                new = risk.with_version(old.risk_version + 1)
                book = self.book
                now = self.settings.now()
                await self._run(book.refresh, old.policy, now)
                summary = await self._run(book.reevaluate_risk_change, old.risk, new, old.policy, now, True)
                await self._audit(context, "put_risk_list", new.version, f"{len(risk)} entries", summary)
            snap = self.state.put_risk_list(risk)
        if summary is not None:
            await self._notify()
        metrics.RISK_VERSION.set(snap.risk_version)
        log.info(f'{{"event": "risk_list_replaced", "version": {snap.risk_version}, "entries": {len(risk)}}}')
        response = pb.PutRiskListResponse(version=snap.risk_version, entries=len(risk))
        if summary is not None:
            response.reevaluation.CopyFrom(_summary(summary))
        return response

    # -- the store: mass re-evaluation, change stream, status lookup ----------------------------------------------

    def _need_book(self) -> StatusBook:
        if self.book is None:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this server has no store: start it with --store PATH (or HEALTHCODE_STORE) to use this RPC",
            )
        return self.book

    async def _audit(
        self, context: grpc.aio.ServicerContext, action: str, version: int | None, detail: str, summary: Summary | None
    ) -> None:
        """Keep who made an admin change, and what it did, in the store (SPEC-free: issue 5's audit trail)."""
        assert self.book is not None
        if summary is not None:
            detail = (
                f"{detail}; evaluated {summary.evaluated}, changed {summary.changed}, high-water mark "
                f"{summary.high_water_mark}"
            )
        await self._run(self.book.store.record_admin, auth.caller(context), action, version, detail)

    async def _notify(self) -> None:
        async with self._published:
            self._published.notify_all()

    async def _ingest(self, kind: str, request: object) -> pb.IngestResponse:
        if self.ingest is None:
            self._need_book()  # raises: no store
            raise AssertionError("a store without an ingest queue")
        table = request_table(kind, request)
        ROWS.set(table.num_rows)
        try:
            counts = await self.ingest.submit(kind, table)
        except QueueFull:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "the ingest queue is full; retry with back-off") from None
        except QueueClosed:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another") from None
        return pb.IngestResponse(
            inserted=counts.inserted, already_present=counts.already_present, updated=counts.updated
        )

    async def UpsertPersons(
        self, request: pb.UpsertPersonsRequest, context: grpc.aio.ServicerContext
    ) -> pb.IngestResponse:
        return await self._ingest("persons", request)

    async def RecordNatResults(
        self, request: pb.RecordNatResultsRequest, context: grpc.aio.ServicerContext
    ) -> pb.IngestResponse:
        return await self._ingest("nat_results", request)

    async def RecordEntries(
        self, request: pb.RecordEntriesRequest, context: grpc.aio.ServicerContext
    ) -> pb.IngestResponse:
        return await self._ingest("entries", request)

    async def RecordVisits(
        self, request: pb.RecordVisitsRequest, context: grpc.aio.ServicerContext
    ) -> pb.IngestResponse:
        return await self._ingest("visits", request)

    async def Reevaluate(
        self, request: pb.ReevaluateRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReevaluationSummary:
        book = self._need_book()
        as_of = request.as_of.seconds if request.HasField("as_of") else self.settings.now()
        async with self._admin:
            snap = self.state.snapshot
            await self._run(book.refresh, snap.policy, as_of)
            summary = await self._run(book.reevaluate, snap.risk, snap.policy, as_of)
            await self._audit(context, "reevaluate", snap.risk_version, f"as_of {as_of}", summary)
        await self._notify()
        ROWS.set(summary.evaluated)
        log.info(f'{{"event": "reevaluated", "evaluated": {summary.evaluated}, "changed": {summary.changed}}}')
        return _summary(summary)

    async def WatchChanges(
        self, request: pb.WatchChangesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StatusChange]:
        sent = 0
        async for page in self._change_pages(request.from_sequence, 10_000):
            cols = [
                page.column(name).fill_null(False if page.schema.field(name).type == pa.bool_() else 0).to_pylist()
                for name in (
                    "seq", "person_id", "old_badge", "new_badge", "old_entry", "new_entry", "old_reasons",
                    "new_reasons", "risk_list_version", "as_of",
                )
            ]  # fmt: skip
            for seq, pid, ob, nb, oe, ne, orr, nr, version, as_of in zip(*cols, strict=True):
                change = pb.StatusChange(
                    sequence=seq, person_id=pid, old_badge=ob, new_badge=nb, old_entry=oe, new_entry=ne,
                    old_reasons=orr, new_reasons=nr, risk_list_version=version,
                )  # fmt: skip
                change.as_of.seconds = as_of
                yield change
            sent += page.num_rows
            ROWS.set(sent)

    async def WatchChangesArrow(
        self, request: pb.WatchChangesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ChangeBatch]:
        sent = 0
        async for page in self._change_pages(request.from_sequence, CHANGE_BATCH_ROWS):
            first, last = page.column("seq")[0].as_py(), page.column("seq")[-1].as_py()
            data = await self._run(changes_ipc, page)
            yield pb.ChangeBatch(first_sequence=first, last_sequence=last, arrow_ipc=data)
            sent += page.num_rows
            ROWS.set(sent)

    async def _change_pages(self, after: int, limit: int) -> AsyncIterator[pa.Table]:
        """Change-log pages after sequence number ``after``, then live ones as commits publish them (forever)."""
        book = self._need_book()
        while True:
            page = await self._run(book.store.changes, after, limit)
            if page.num_rows == 0:
                async with self._published:
                    if book.high_water_mark <= after:
                        await self._published.wait()
                continue
            after = page.column("seq")[-1].as_py()
            yield page

    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> pb.EvaluateResponse:
        book = self._need_book()
        snap = self.state.snapshot
        as_of = request.as_of.seconds if request.HasField("as_of") else self.settings.now()
        ids = np.asarray(request.person_ids, dtype=np.uint64)
        if book.stale:
            async with self._admin:
                await self._run(book.refresh, snap.policy, self.settings.now())
        rows, result = await self._run(book.lookup, ids, snap.risk, snap.policy, as_of)
        found = rows >= 0
        ctx = self._context(snap, as_of, "")
        response = pb.EvaluateResponse(info=_info(ctx, snap))
        statuses: list[pb.Status] = []
        if found.any():
            encoded = encode_result(result.combine_chunks().to_batches()[0], response.info)
            statuses = list(pb.EvaluateResponse.FromString(encoded).statuses)
        known = iter(statuses)
        for pid, ok in zip(ids.tolist(), found.tolist(), strict=True):
            if ok:
                response.statuses.append(next(known))
            else:
                response.statuses.add(person_id=pid, error="person_id is not in the store")
        ROWS.set(len(ids))
        return response

    async def GetRiskList(self, request: pb.GetRiskListRequest, context: grpc.aio.ServicerContext) -> pb.RiskList:
        snap = self.state.snapshot
        return pb.RiskList(version=snap.risk_version, entries=risk_entries(snap.risk))

    async def PutPolicy(self, request: pb.PutPolicyRequest, context: grpc.aio.ServicerContext) -> pb.PolicyTimeline:
        timeline = await self._run(parse_policy, request.toml, "toml")
        summary = None
        async with self._admin:
            if self.book is not None:
                # Everyone under the new policy (windows and rules change for all), committed, then published.
                book = self.book
                current = self.state.snapshot
                now = self.settings.now()
                await self._run(book.refresh, timeline, now)
                kept = (current.policy_version + 1, request.toml)
                summary = await self._run(
                    functools.partial(book.reevaluate, current.risk, timeline, now, keep_policy=kept)
                )
                await self._audit(
                    context, "put_policy", current.policy_version + 1, f"{len(timeline.policies)} policies", summary
                )
            snap = self.state.put_policy(timeline, request.toml)
        if summary is not None:
            await self._notify()
        metrics.POLICY_VERSION.set(snap.policy_version)
        log.info(
            f'{{"event": "policy_replaced", "version": {snap.policy_version}, "policies": {len(timeline.policies)}}}'
        )
        response = self._policy(snap)
        if summary is not None:
            response.reevaluation.CopyFrom(_summary(summary))
        return response

    async def GetPolicy(self, request: pb.GetPolicyRequest, context: grpc.aio.ServicerContext) -> pb.PolicyTimeline:
        return self._policy(self.state.snapshot)

    @staticmethod
    def _policy(snap: Snapshot) -> pb.PolicyTimeline:
        return pb.PolicyTimeline(
            toml=snap.policy_text, names=[p.name for p in snap.policy.policies], version=snap.policy_version
        )
