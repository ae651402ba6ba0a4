"""One place for what every RPC gets: exception → status code mapping, one structured log line, and metrics.

Log lines carry the method, the row count, the duration and the status code, never a person id or row content.
Servicer methods report their row count through :data:`ROWS`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from healthcode.errors import HealthcodeError
from healthcode.service import metrics
from healthcode.service.limits import LimitExceeded

log = logging.getLogger("healthcode.rpc")

#: Rows handled by the current RPC (set by the servicer, read for the log line and metrics).
ROWS: contextvars.ContextVar[int] = contextvars.ContextVar("rows", default=0)


class Refused(Exception):
    """Raised by servicer code to end a call with ``code`` and a message for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _status(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status a servicer exception maps to; None for exceptions gRPC handles itself."""
    if isinstance(exc, (Refused, LimitExceeded)):
        return exc.code, str(exc)
    if isinstance(exc, HealthcodeError):
        return grpc.StatusCode[exc.status], str(exc)
    if isinstance(exc, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "the server ran out of memory for this request; send smaller batches"
    return None


class _Call:
    def __init__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.method = method
        self.context = context
        self.started = time.perf_counter()
        self.rows: int | None = None  # taken from ROWS in the handler's own context when it ends
        ROWS.set(0)

    def fail(self, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        mapped = _status(exc)
        if mapped is None:
            # Unexpected: log the type only (a message could quote row content), answer INTERNAL.
            log.error(f'{{"event": "rpc_error", "method": "{self.method}", "error": "{type(exc).__name__}"}}')
            return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); the server log has the time"
        return mapped

    def finish(self, code: grpc.StatusCode) -> None:
        seconds = time.perf_counter() - self.started
        rows = ROWS.get() if self.rows is None else self.rows
        requests, latency, rows_total = _series(self.method, code)
        requests.inc()
        latency.observe(seconds)
        if rows:
            rows_total.inc(rows)
        if log.isEnabledFor(logging.INFO):
            # Method names and codes are identifiers: the line is valid JSON without an encoder.
            log.info(
                f'{{"event": "rpc", "method": "{self.method}", "rows": {rows}, "ms": {seconds * 1000:.3f}, '
                f'"code": "{code.name}"}}'
            )

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
            metrics.ROWS.labels(method),
        )
    return found


def _wrap_unary(method: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _Call(method, context)
        try:
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


def _wrap_stream(method: str, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
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
            async for response in behavior(request, context):
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


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the behaviour of every method of the healthcode service (health and reflection are left as they are):
    subclasses give :meth:`wrap_unary` and :meth:`wrap_stream`; the (de)serializers are kept."""

    def __init__(self, service_prefix: str = "/healthcode.v1.") -> None:
        self.prefix = service_prefix

    def wrap_unary(self, method: str, behavior: Any) -> Any:
        raise NotImplementedError

    def wrap_stream(self, method: str, behavior: Any, streaming_request: bool) -> Any:
        """Server- and bidirectional-streaming methods (the service has no client-streaming-only one)."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        de, ser = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self.wrap_unary(method, handler.unary_unary), de, ser)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self.wrap_stream(method, handler.unary_stream, False), de, ser)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(self.wrap_stream(method, handler.stream_stream, True), de, ser)
        return handler


class ObservedService(ServiceInterceptor):
    """Logs, counts and times every healthcode RPC, and maps its exceptions to status codes."""

    def wrap_unary(self, method: str, behavior: Any) -> Any:
        return _wrap_unary(method, behavior)

    def wrap_stream(self, method: str, behavior: Any, streaming_request: bool) -> Any:
        return _wrap_stream(method, behavior)
