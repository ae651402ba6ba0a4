"""One place for what every RPC gets: its request decoded, one structured log line, metrics, and its exceptions
turned into status codes (through :mod:`healthcode.service.status`).

Every method of the service is registered with a raw-bytes request deserializer (see
:func:`healthcode.service.server.service_handlers`); :class:`ObservedService` decodes the request (each message
of a request stream) with the method's request class, so a malformed request is :class:`~healthcode.errors.BadInput`
naming the RPC (and, in a stream, the message number) like any other bad input.  Log lines carry the method, the row
count, the duration and the status code, never a person id or row content.  Servicer methods report their row
count through :data:`ROWS`; the metrics count it as persons evaluated, as rows ingested (:data:`INGEST`) or as
changes sent (:data:`CHANGE_STREAMS`).  The change streams wait for news for as long as their callers stay, so at
shutdown :class:`ChangeStreams` ends them instead of letting them hold the grace period.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc

from healthcode import logs
from healthcode.errors import BadInput, Unavailable
from healthcode.service import metrics, status

log = logging.getLogger("healthcode.rpc")

#: Rows handled by the current RPC (set by the servicer, read for the log line and metrics).
ROWS: contextvars.ContextVar[int] = contextvars.ContextVar("rows", default=0)
#: The change streams: their rows are changes sent (healthcode_changes_streamed_total); they are ended at shutdown.
CHANGE_STREAMS = frozenset({"WatchChanges", "WatchChangesArrow"})
#: The ingest RPCs: their rows are rows given to the store (healthcode_rows_ingested_total).
INGEST = frozenset({"UpsertPersons", "RecordNatResults", "RecordEntries", "RecordVisits"})
#: What a change stream's caller is told at shutdown (it resumes from the last sequence it got, elsewhere or later).
SHUTTING_DOWN = "server shutting down; resume from the last sequence received"


def _rows_metric(method: str) -> Any:
    """The counter a method's rows go to: persons evaluated unless it ingests or streams changes."""
    if method in CHANGE_STREAMS:
        return metrics.CHANGES_STREAMED
    if method in INGEST:
        return metrics.ROWS_INGESTED
    return metrics.ROWS


def decode(method: str, request_class: Any, data: bytes, index: int | None = None) -> Any:
    """``data`` as a ``request_class`` message; bytes that are not one raise :class:`BadInput` naming the RPC (and
    the message number ``index`` of a request stream, from 0)."""
    try:
        return request_class.FromString(data)
    except MemoryError:
        raise
    except Exception:  # DecodeError, or a nesting too deep: whatever protobuf cannot parse is the caller's input
        where = "the request" if index is None else f"request {index}"
        raise BadInput(f"{method}: {where} is not a well-formed {request_class.DESCRIPTOR.full_name}") from None


async def _decoded(method: str, request_class: Any, requests: AsyncIterator[bytes]) -> AsyncIterator[Any]:
    index = 0
    async for data in requests:
        yield decode(method, request_class, data, index)
        index += 1


class _Call:
    def __init__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.method = method
        self.context = context
        self.started = time.perf_counter()
        self.rows: int | None = None  # taken from ROWS in the handler's own context when it ends
        ROWS.set(0)

    def fail(self, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        return status.of(exc, self.method)

    def finish(self, code: grpc.StatusCode) -> None:
        seconds = time.perf_counter() - self.started
        rows = ROWS.get() if self.rows is None else self.rows
        requests, latency, rows_total = _series(self.method, code)
        requests.inc()
        latency.observe(seconds)
        if rows:
            rows_total.inc(rows)
        logs.call_event(log, "rpc", method=self.method, rows=rows, ms=round(seconds * 1000, 3), code=code.name)

    def cancelled_code(self) -> grpc.StatusCode:
        remaining = self.context.time_remaining()
        return (
            grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
        )


_SERIES: dict[tuple[str, grpc.StatusCode], tuple[Any, Any, Any]] = {}


def _series(method: str, code: grpc.StatusCode) -> tuple[Any, Any, Any]:
    """The metric children of a method and code (label lookups cost more than the increments)."""
    found = _SERIES.get((method, code))
    if found is None:
        found = _SERIES[(method, code)] = (
            metrics.REQUESTS.labels(method, code.name),
            metrics.LATENCY.labels(method),
            _rows_metric(method).labels(method),
        )
    return found


class ChangeStreams:
    """The open change streams, which wait for the next published change for as long as their callers stay.

    :meth:`end` (at shutdown) ends each with UNAVAILABLE :data:`SHUTTING_DOWN` and refuses new ones the same way:
    a stream waiting for news is interrupted (its task cancelled while it waits on the servicer, never while gRPC
    sends), one being sent to ends after its current message.  The calls doing work keep the grace period."""

    def __init__(self) -> None:
        self.ending = False
        self._open: dict[asyncio.Task[Any], bool] = {}  # each open stream's task -> waiting for its next message

    def end(self) -> None:
        self.ending = True
        for task, waiting in list(self._open.items()):
            if waiting:
                task.cancel()

    async def follow(self, responses: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """The messages of one change stream, until it ends or :meth:`end` ends it."""
        task = asyncio.current_task()
        assert task is not None
        self._open[task] = False
        try:
            while not self.ending:
                self._open[task] = True
                try:
                    response = await anext(responses)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if not self.ending:  # the caller went away
                        raise
                    break
                self._open[task] = False
                yield response
            raise Unavailable(SHUTTING_DOWN)
        finally:
            del self._open[task]
            await responses.aclose()  # type: ignore[attr-defined]


def _wrap_unary(
    method: str, behavior: Callable[..., Awaitable[Any]], request_class: Any = None
) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _Call(method, context)
        try:
            if request_class is not None:
                request = decode(method, request_class, request)
            response = await behavior(request, context)
        except asyncio.CancelledError:
            call.finish(call.cancelled_code())
            raise
        except grpc.aio.AbortError:
            call.finish(context.code() or grpc.StatusCode.UNKNOWN)
            raise
        except Exception as exc:
            code, message = call.fail(exc)
            call.finish(code)
            await context.abort(code, message)
        call.finish(grpc.StatusCode.OK)
        return response

    return handler


def _wrap_stream(
    method: str,
    behavior: Callable[..., AsyncIterator[Any]],
    request_class: Any = None,
    streaming_request: bool = False,
    change_streams: ChangeStreams | None = None,
) -> Callable[..., AsyncIterator[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        call = _Call(method, context)
        outcome: list[grpc.StatusCode] = []

        def done(_: Any) -> None:
            # Decided when the RPC is over: a request stream that simply ended may have been a cancellation, which
            # the context only knows by then.
            code = outcome[0] if outcome else grpc.StatusCode.UNKNOWN
            if code == grpc.StatusCode.OK and context.cancelled():
                code = call.cancelled_code()
            call.finish(code)

        context.add_done_callback(done)
        try:
            if request_class is not None:
                request = (
                    _decoded(method, request_class, request)
                    if streaming_request
                    else decode(method, request_class, request)
                )
            responses = behavior(request, context)
            if change_streams is not None and method in CHANGE_STREAMS:
                responses = change_streams.follow(responses)
            async for response in responses:
                yield response
            outcome.append(call.cancelled_code() if _expired(context) else grpc.StatusCode.OK)
        except (asyncio.CancelledError, GeneratorExit):
            outcome.append(call.cancelled_code())
            raise
        except grpc.aio.AbortError:
            outcome.append(context.code() or grpc.StatusCode.UNKNOWN)
            raise
        except Exception as exc:
            code, message = call.fail(exc)
            outcome.append(code)
            await context.abort(code, message)
        finally:
            call.rows = ROWS.get()  # the done callback runs outside this context

    return handler


def _expired(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return context.cancelled() or (remaining is not None and remaining <= 0)


class ServiceInterceptor:
    """Wraps the behaviour of every method of the healthcode service (health and reflection are left as they are):
    subclasses give :meth:`wrap_unary` and :meth:`wrap_stream`; the (de)serializers are kept.  The server wraps each
    handler once, when it registers it (:func:`healthcode.service.server.service_handlers`): a grpc.aio interceptor
    would cost a coroutine on every call."""

    def wrap_unary(self, method: str, behavior: Any) -> Any:
        raise NotImplementedError

    def wrap_stream(self, method: str, behavior: Any, streaming_request: bool) -> Any:
        """Server- and bidirectional-streaming methods (the service has no client-streaming-only one)."""
        raise NotImplementedError

    def wrap_handler(self, path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` of method ``path`` wrapped."""
        method = path.rsplit("/", 1)[-1]
        de, ser = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self.wrap_unary(method, handler.unary_unary), de, ser)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self.wrap_stream(method, handler.unary_stream, False), de, ser)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(self.wrap_stream(method, handler.stream_stream, True), de, ser)
        return handler


class ObservedService(ServiceInterceptor):
    """Decodes the request of every healthcode RPC, logs, counts and times the call, and maps its exceptions to
    status codes (:func:`healthcode.service.status.of`).

    ``requests``: method name -> request message class, for the methods registered with raw-bytes request
    deserializers (None, or a method left out: the servicer takes the raw bytes, as Evaluate does).
    :attr:`change_streams`: the open change streams, for the server to end at shutdown."""

    def __init__(self, requests: Mapping[str, Any]) -> None:
        self.requests = dict(requests)
        self.change_streams = ChangeStreams()

    def wrap_unary(self, method: str, behavior: Any) -> Any:
        return _wrap_unary(method, behavior, self.requests.get(method))

    def wrap_stream(self, method: str, behavior: Any, streaming_request: bool) -> Any:
        return _wrap_stream(method, behavior, self.requests.get(method), streaming_request, self.change_streams)
