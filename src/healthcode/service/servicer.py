"""The healthcode.v1.HealthCodeService RPCs: thin glue, each RPC decoded, handed to the layer that does the work,
encoded.

Evaluation runs in the rules (:mod:`healthcode.rules.engine`); every change of the risk list or the policy and
every re-evaluation goes through the control layer (:mod:`healthcode.live.control`); ingest through the ingest
queue.  Requests arrive decoded (:mod:`healthcode.service.interceptors`); errors are raised from the one hierarchy
(:mod:`healthcode.errors`) and become status codes in the interceptor, with logging and metrics.  The kernel runs
in a thread pool (it releases the GIL), so the event loop keeps serving while it works.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor

import grpc
import numpy as np
import pyarrow as pa

from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode._proto.v1 import healthcode_pb2_grpc as pb_grpc
from healthcode.errors import BadInput, Exhausted, Expired, Precondition
from healthcode.live.control import NO_STORE, Change, Control
from healthcode.live.ingest import IngestQueue
from healthcode.live.state import Snapshot
from healthcode.live.statusbook import Summary
from healthcode.rules import engine
from healthcode.rules.policy import PolicyTimeline, parse_policy
from healthcode.rules.regions import parse_risk_csv
from healthcode.service import auth, metrics
from healthcode.service.config import Settings
from healthcode.service.interceptors import ROWS, decode
from healthcode.wire.ingest import request_table, store_form
from healthcode.wire.ipc import WireError, arrow_response, changes_ipc, ipc_chunks, read_ipc, split_arrow_request
from healthcode.wire.rows import (
    SmallRequests,
    columns_to_batch,
    decode_request,
    decode_status_request,
    encode_output,
    encode_result,
    encode_status_response,
    risk_entries,
    risk_from_entries,
)

#: Row-form requests up to this size are evaluated on the event loop (about 1,000 persons).
INLINE_REQUEST_BYTES = 128 * 1024
#: Evaluation contexts kept for reuse (see HealthCodeService._evaluation).
EVALUATIONS_KEPT = 16
#: Bulk requests evaluated ahead of the one whose results are being sent.
PIPELINE = 2
#: Changes per WatchChangesArrow message (~3 MB of Arrow IPC).
CHANGE_BATCH_ROWS = 100_000
#: Changes per WatchChanges message.
CHANGES_PER_MESSAGE = 1_000

#: An evaluation's context, the EvaluationInfo of its responses, and the serialized tail of one without invalid rows.
_Evaluation = tuple[engine.Context, pb.EvaluationInfo, bytes]
_Counts = pb.UpsertPersonsResponse | pb.RecordNatResultsResponse | pb.RecordEntriesResponse | pb.RecordVisitsResponse


def _timeline(snap: Snapshot, name: str) -> PolicyTimeline:
    """The server's timeline, or only the named policy of it when a request names one."""
    if not name:
        return snap.policy
    for p in snap.policy.policies:
        if p.name == name:
            return PolicyTimeline((p,), snap.policy.source)
    names = ", ".join(p.name for p in snap.policy.policies)
    raise BadInput(f"unknown policy {name!r}; the server's timeline has: {names}")


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
        raise Expired("the deadline passed before the evaluation finished")


class HealthCodeService(pb_grpc.HealthCodeServiceServicer):
    def __init__(
        self, control: Control, settings: Settings, executor: Executor, ingest: IngestQueue | None = None
    ) -> None:
        self.control = control
        self.settings = settings
        self.executor = executor
        self.ingest = ingest
        self._published = asyncio.Condition()  # notified after each commit to the change log
        try:  # the loop the server runs on: change notifications come from worker threads and wake it
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # built outside a loop (in-process tests, the fuzz harnesses): nobody to wake
            self._loop = None
        self.kernel_threads = settings.kernel_threads or engine.default_threads()
        # (snapshot id, as_of, policy) -> (snapshot, its evaluation): see _evaluation.  Plain dict operations
        # only, atomic for the event loop and the pool's threads alike.
        self._evaluations: dict[tuple[int, int, str], tuple[Snapshot, _Evaluation]] = {}
        self._small = SmallRequests()  # the event loop's (small requests are answered there)
        self._versions(control.snapshot)
        control.subscribe(self._changed)

    @staticmethod
    def _versions(snap: Snapshot) -> None:
        metrics.RISK_VERSION.set(snap.risk_version)
        metrics.POLICY_VERSION.set(snap.policy_version)

    def _changed(self, change: Change) -> None:
        """The control layer made a change (on an executor thread): update the gauges, wake the change streams."""
        self._versions(change.snapshot)
        if change.summary is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._wake()))

    async def _wake(self) -> None:
        async with self._published:
            self._published.notify_all()

    @staticmethod
    def _rows(change: Change) -> None:
        ROWS.set(0 if change.summary is None else change.summary.evaluated)

    def _context(self, snap: Snapshot, as_of: int | None, policy: str) -> engine.Context:
        return self._evaluation(snap, as_of, policy)[0]

    def _evaluation(
        self, snap: Snapshot, as_of: int | None, policy: str
    ) -> _Evaluation:
        """The context of an evaluation at ``as_of`` (None: now) under ``policy`` of ``snap``, what the response
        says was used, and the serialized tail of a response without invalid rows (the info alone: a
        GetStatusResponse lays it out as an EvaluateResponse does).  Gateway calls come by the
        thousand a second with the same few: each is made once (the kernel's rules with it), then reused."""
        instant = self.settings.now() if as_of is None else as_of
        key = (id(snap), instant, policy)
        known = self._evaluations.get(key)
        if known is not None and known[0] is snap:
            return known[1]
        ctx = engine.make_context(snap.risk, _timeline(snap, policy), instant)
        info = _info(ctx, snap)
        made = (ctx, info, pb.EvaluateResponse(info=info).SerializeToString())
        if len(self._evaluations) >= EVALUATIONS_KEPT:
            self._evaluations.clear()
        self._evaluations[key] = (snap, made)
        return made

    async def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- gateway path ---------------------------------------------------------------------------------------------

    def _evaluate_rows(self, request: bytes, deadline: float | None = None) -> tuple[bytes, int]:
        """Decode, evaluate and encode one row-form request (bytes in, bytes out: see healthcode.wire.rows)."""
        _check_deadline(deadline)
        try:
            cols, as_of, policy = decode_request(request)
        except WireError as exc:
            raise BadInput(f"Evaluate: {exc}") from None
        snap = self.control.snapshot
        ctx, info, _ = self._evaluation(snap, as_of, policy)
        if engine.use_reference():
            (result,) = engine.evaluate_batches([columns_to_batch(cols)], ctx, 1)
            return encode_result(result, info), cols.n
        threads = 1 if cols.n <= self.settings.gateway_threads_rows else self.kernel_threads
        return encode_output(cols, engine.evaluate_columns(ctx, cols, threads), info), cols.n

    def _small_rules(self, as_of: int | None, policy: str) -> tuple[object, pb.EvaluationInfo, bytes]:
        ctx, info, tail = self._evaluation(self.control.snapshot, as_of, policy)
        return engine.kernel_rules(ctx), info, tail

    async def Evaluate(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Gateway path.  Registered with raw-bytes (de)serializers: the kernel's codec reads the request and writes
        the response.  Small requests are handled on the event loop (a thread hop would cost more than the work)."""
        if len(request) <= INLINE_REQUEST_BYTES:
            small = None if engine.use_reference() else self._small.respond(request, self._small_rules)
            response, rows = self._evaluate_rows(request) if small is None else small
        else:
            response, rows = await self._run(self._evaluate_rows, request, _deadline(context))
        ROWS.set(rows)
        if len(response) > self.settings.max_message_bytes:
            raise Exhausted(
                f"the response for {rows:,} persons is {len(response):,} bytes, over the "
                f"{self.settings.max_message_bytes:,}-byte message limit; send fewer persons per call, or use "
                "EvaluateArrow for bulk work",
            )
        return response

    # -- bulk path ------------------------------------------------------------------------------------------------

    def _evaluate_ipc(
        self, data: bytes | memoryview, ctx: engine.Context, index: int, deadline: float | None = None
    ) -> list[tuple[bytes, int]]:
        _check_deadline(deadline)
        _schema, batches = read_ipc(data, f"request {index}: arrow_ipc")
        out: list[tuple[bytes, int]] = []
        for result in engine.evaluate_batches(batches, ctx, self.kernel_threads):
            chunks = ipc_chunks(result, self.settings.max_message_bytes - 1024)
            out.extend((arrow_response(data, n), n) for data, n in chunks)
            _check_deadline(deadline)  # a long request stops between batches once nobody waits for it
        return out

    async def EvaluateArrow(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """The bulk path: each request's Arrow IPC evaluated in the pool (PIPELINE ahead of the one being sent).
        Requests arrive as bytes, their Arrow IPC read where it lies (wire.ipc.split_arrow_request, no copy); the
        responses are serialized where they are made (wire.ipc.arrow_response), off the event loop."""
        snap = self.control.snapshot
        ctx = None
        rows = 0
        # Request k + 1 is evaluated while the results of request k are sent: at most PIPELINE requests are in
        # flight, so a fast sender cannot make the server buffer without bound.
        pending: collections.deque[asyncio.Future[list[tuple[bytes, int]]]] = collections.deque()
        try:
            index = 0
            async for raw in request_iterator:
                options, arrow_ipc = _arrow_request(raw, index)
                if ctx is None:
                    options = options or pb.EvaluateOptions()
                    as_of = options.as_of.seconds if options.HasField("as_of") else None
                    ctx = self._context(snap, as_of, options.policy)
                    yield pb.EvaluateArrowResponse(info=_info(ctx, snap)).SerializeToString()
                elif options is not None:
                    raise BadInput(f"request {index}: options belong in the first request only")
                if len(arrow_ipc):
                    loop = asyncio.get_running_loop()
                    pending.append(
                        loop.run_in_executor(
                            self.executor, self._evaluate_ipc, arrow_ipc, ctx, index, _deadline(context)
                        )
                    )
                while pending and (len(pending) >= PIPELINE or pending[0].done()):
                    for message, n in await pending.popleft():
                        rows += n
                        ROWS.set(rows)
                        yield message
                index += 1
            while pending:
                for message, n in await pending.popleft():
                    rows += n
                    ROWS.set(rows)
                    yield message
        finally:
            for future in pending:  # abandoned (error, deadline, cancellation): drop work not yet started
                future.cancel()
        if ctx is None:
            raise BadInput("the stream carried no request (the first one holds the options)")

    # -- the control plane: risk list, policy, re-evaluation (all through the control layer) ----------------

    async def PutRiskList(
        self, request: pb.PutRiskListRequest, context: grpc.aio.ServicerContext
    ) -> pb.PutRiskListResponse:
        source = request.WhichOneof("source")
        if source == "csv":
            risk = await self._run(parse_risk_csv, request.csv, "csv")
        elif source == "entries":
            risk = await self._run(risk_from_entries, request.entries.entries)
        else:
            raise BadInput("give the new list as csv or as entries")
        change = await self._run(self.control.put_risk_list, risk, self.settings.now(), auth.caller(context))
        self._rows(change)
        response = pb.PutRiskListResponse(version=change.snapshot.risk_version, entries=len(risk))
        if change.summary is not None:
            response.reevaluation.CopyFrom(_summary(change.summary))
        return response

    async def PutPolicy(
        self, request: pb.PutPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.PutPolicyResponse:
        timeline = await self._run(parse_policy, request.toml, "toml")
        change = await self._run(
            self.control.put_policy, timeline, request.toml, self.settings.now(), auth.caller(context)
        )
        self._rows(change)
        snap = change.snapshot
        response = pb.PutPolicyResponse(toml=snap.policy_text, names=_names(snap), version=snap.policy_version)
        if change.summary is not None:
            response.reevaluation.CopyFrom(_summary(change.summary))
        return response

    async def Reevaluate(
        self, request: pb.ReevaluateRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReevaluateResponse:
        as_of = request.as_of.seconds if request.HasField("as_of") else self.settings.now()
        change = await self._run(self.control.reevaluate, as_of, auth.caller(context))
        self._rows(change)
        assert change.summary is not None
        return pb.ReevaluateResponse(reevaluation=_summary(change.summary))

    async def GetRiskList(
        self, request: pb.GetRiskListRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRiskListResponse:
        snap = self.control.snapshot
        return pb.GetRiskListResponse(version=snap.risk_version, entries=risk_entries(snap.risk))

    async def GetPolicy(
        self, request: pb.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPolicyResponse:
        snap = self.control.snapshot
        return pb.GetPolicyResponse(toml=snap.policy_text, names=_names(snap), version=snap.policy_version)

    # -- the store: mass re-evaluation, change stream, status lookup ----------------------------------------------

    async def _ingest(self, kind: str, request: object, response: type[_Counts]) -> _Counts:
        if self.ingest is None:
            raise Precondition(NO_STORE)
        ready = store_form(kind, request)  # a single-event call: built in store form, nothing left to validate
        table = request_table(kind, request) if ready is None else ready
        ROWS.set(table.num_rows)
        counts = await self.ingest.submit(kind, table, prepared=ready is not None)
        return response(inserted=counts.inserted, already_present=counts.already_present, updated=counts.updated)

    async def UpsertPersons(
        self, request: pb.UpsertPersonsRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpsertPersonsResponse:
        return await self._ingest("persons", request, pb.UpsertPersonsResponse)

    async def RecordNatResults(
        self, request: pb.RecordNatResultsRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordNatResultsResponse:
        return await self._ingest("nat_results", request, pb.RecordNatResultsResponse)

    async def RecordEntries(
        self, request: pb.RecordEntriesRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordEntriesResponse:
        return await self._ingest("entries", request, pb.RecordEntriesResponse)

    async def RecordVisits(
        self, request: pb.RecordVisitsRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordVisitsResponse:
        return await self._ingest("visits", request, pb.RecordVisitsResponse)

    async def WatchChanges(
        self, request: pb.WatchChangesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchChangesResponse]:
        sent = 0
        async for page in self._change_pages(request.from_sequence, CHANGES_PER_MESSAGE):
            yield await self._run(_change_message, page)
            sent += page.num_rows
            ROWS.set(sent)

    async def WatchChangesArrow(
        self, request: pb.WatchChangesArrowRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchChangesArrowResponse]:
        sent = 0
        async for page in self._change_pages(request.from_sequence, CHANGE_BATCH_ROWS):
            first, last = page.column("seq")[0].as_py(), page.column("seq")[-1].as_py()
            data = await self._run(changes_ipc, page)
            yield pb.WatchChangesArrowResponse(first_sequence=first, last_sequence=last, arrow_ipc=data)
            sent += page.num_rows
            ROWS.set(sent)

    async def _change_pages(self, after: int, limit: int) -> AsyncIterator[pa.Table]:
        """Change-log pages after sequence number ``after``, then live ones as commits publish them (forever)."""
        book = self.control.need_book()
        while True:
            page = await self._run(book.store.changes, after, limit)
            if page.num_rows == 0:
                async with self._published:
                    if book.high_water_mark <= after:
                        await self._published.wait()
                continue
            after = page.column("seq")[-1].as_py()
            yield page

    def _statuses(self, ids: np.ndarray, as_of: int) -> bytes:
        """The serialized GetStatusResponse for stored persons ``ids`` at ``as_of`` (see wire.rows)."""
        book = self.control.need_book()
        snap = self.control.snapshot
        ctx, _, tail = self._evaluation(snap, as_of, "")
        slots, flags, reasons, until = book.statuses(ids, ctx)
        return encode_status_response(ids, slots, flags, reasons, until, tail)

    async def GetStatus(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """The checkpoint scan: the status of stored persons, evaluated from the live view at ``as_of`` (the kernel on
        the persons' rows in place, no copy).  A few ids on the event loop (a thread hop costs more than the work),
        more in the pool; the request is read and the response written by the kernel's codec."""
        try:
            ids, as_of = decode_status_request(request)
        except WireError as exc:
            raise BadInput(str(exc)) from None
        book = self.control.need_book()
        if book.stale:
            await self._run(self.control.refresh, self.settings.now())
        if as_of is None:
            as_of = self.settings.now()
        if book.cheap_lookup(len(ids)):
            response = self._statuses(ids, as_of)
        else:
            response = await self._run(self._statuses, ids, as_of)
        ROWS.set(len(ids))
        if len(response) > self.settings.max_message_bytes:
            raise Exhausted(
                f"the response for {len(ids):,} persons is {len(response):,} bytes, over the "
                f"{self.settings.max_message_bytes:,}-byte message limit; ask for fewer persons per call"
            )
        return response


def _arrow_request(raw: bytes, index: int) -> tuple[pb.EvaluateOptions | None, bytes | memoryview]:
    """Request ``index`` of an EvaluateArrow stream as (its options or None, its Arrow IPC): read in place for the
    plain shape, by protobuf otherwise (a malformed one is INVALID_ARGUMENT naming the request)."""
    parts = split_arrow_request(raw)
    if parts is not None:
        options_bytes, arrow_ipc = parts
        if options_bytes is None:
            return None, arrow_ipc
        try:
            return pb.EvaluateOptions.FromString(options_bytes), arrow_ipc
        except Exception:  # malformed options: protobuf's reading of the whole request says so, naming it
            pass
    message = decode("EvaluateArrow", pb.EvaluateArrowRequest, raw, index)
    return (message.options if message.HasField("options") else None), message.arrow_ipc


def _names(snap: Snapshot) -> list[str]:
    return [p.name for p in snap.policy.policies]


def _reason_list(mask: int, cache: dict[int, list[int]]) -> list[int]:
    """The Reason values of a mask (each value is its bit), lowest first."""
    names = cache.get(mask)
    if names is None:
        names = cache[mask] = [1 << k for k in range(16) if mask >> k & 1]
    return names


def _change_message(page: pa.Table) -> pb.WatchChangesResponse:
    """One page of the change log as a WatchChangesResponse (the old_* fields absent on a first publish)."""
    cols = [
        page.column(name).to_pylist()
        for name in (
            "seq", "person_id", "old_badge", "new_badge", "old_entry", "new_entry", "old_reasons", "new_reasons",
            "risk_list_version", "as_of",
        )
    ]  # fmt: skip
    message = pb.WatchChangesResponse()
    cache: dict[int, list[int]] = {}
    for seq, pid, ob, nb, oe, ne, orr, nr, version, as_of in zip(*cols, strict=True):
        change = message.changes.add(
            sequence=seq, person_id=pid, new_badge=nb, new_entry=ne, new_reasons_mask=nr, risk_list_version=version,
            new_reasons=_reason_list(nr, cache),
        )  # fmt: skip
        if orr is not None:
            change.old_badge, change.old_entry, change.old_reasons_mask = ob, oe, orr
            change.old_reasons.extend(_reason_list(orr, cache))
        change.as_of.seconds = as_of
    return message
