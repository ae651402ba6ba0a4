"""The shedding front: a separate process that owns the public port and refuses calls past the limit.

Why a second process: the server answers on one asyncio event loop, and grpc.aio takes each new call off gRPC
core's queue with a trip through that loop.  Under an overload of cheap calls the loop is busy serving, so the
backlog forms in gRPC core, out of the server's sight, and core can only refuse it with CANCELLED.  The front is a
threaded (sync) gRPC server: its accept thread never waits for the serving loop, so past ``max_concurrent_calls``
data-plane calls in flight it answers RESOURCE_EXHAUSTED at once, at a fraction of the cost of serving a call.

Everything else is forwarded unchanged to the server's private Unix socket: messages as raw bytes, metadata,
deadline, cancellation, status codes and trailing metadata.  Authentication and every other limit stay in the
server.  The front terminates TLS and passes the verified client-certificate names and the peer on in
``x-healthcode-*`` metadata, which it strips from what callers send.  Health checks, reflection and the control
plane (``PutRiskList``, ``PutPolicy``, ``Reevaluate`` and the reads of the list and the policy) are never refused
by the front.

(A little over 500 lines on purpose: the slots, the refusal on the accept thread, the forwarder and the process's
start and stop are one process's job and share its private state; split, each part would reach into the others.)
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, NoReturn

import grpc

from healthcode import logs
from healthcode.errors import HealthcodeError, Unavailable
from healthcode.service import status
from healthcode.service.config import ConfigError, Settings
from healthcode.service.limits import CONTROL_METHODS
from healthcode.service.transport import is_loopback
from healthcode.wire.limits import LimitExceeded

log = logging.getLogger("healthcode.service.front")

CLIENT_NAME = "x-healthcode-client-name"  # one entry per verified certificate name (CN, then SANs)
PEER = "x-healthcode-peer"  # the caller's address as the front saw it
#: Metadata never forwarded: HTTP/2 and gRPC transport headers (and every ``x-healthcode-*`` key a caller sends:
#: those are the front's own, see :meth:`Forwarder._metadata`).
_DROPPED = ("user-agent", "content-type", "te", "grpc-accept-encoding", "grpc-encoding", "grpc-timeout")
#: Threads past the limit: for health checks, the control plane and the refusal of streams (which the handlers
#: refuse).  Past limit + RESERVE calls in the front, gRPC's own limit refuses everything, health checks included.
RESERVE = 64
#: Methods the front never refuses: health and reflection, and the control plane (the server never sheds it).
EXEMPT = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        *(f"/healthcode.v1.HealthCodeService/{name}" for name in CONTROL_METHODS),
    }
)
FORWARDED, REFUSED = 0, 1  # indexes of the shared counters
REPORT_SECONDS = 10.0  # at most one "front_shed" log line this often while calls are refused


def enabled(settings: Settings) -> bool:
    """Whether the server runs behind a front: ``front = "on"``, or ``"auto"`` on a non-loopback address."""
    return settings.front == "on" or (settings.front == "auto" and not is_loopback(settings.listen))


def method_kinds() -> dict[str, tuple[bool, bool]]:
    """Every method the server can serve: path -> (client streaming, server streaming)."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    from healthcode._proto.v1 import healthcode_pb2 as pb

    kinds = {}
    for file in (pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        for service in file.services_by_name.values():
            for method in service.methods:
                kinds[f"/{service.full_name}/{method.name}"] = (method.client_streaming, method.server_streaming)
    return kinds


#: How long a call may take to send its (first) request message before the front cancels it: until then it holds a
#: front thread, or a slot, without having been authenticated by anyone (the server sees it only once forwarded).
FIRST_MESSAGE_SECONDS = 10.0


def _first(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
    """The first message of ``requests`` (``_END`` for an empty stream); a caller that sends none within
    :data:`FIRST_MESSAGE_SECONDS` has its call cancelled, which frees the thread."""
    watchdog = threading.Timer(FIRST_MESSAGE_SECONDS, context.cancel)
    watchdog.daemon = True
    watchdog.start()
    try:
        return next(requests, _END)
    finally:
        watchdog.cancel()


class _Gate:
    """A request stream whose first message is read at once and whose rest waits for :meth:`open` (the server
    answered) and stops at :meth:`close` (the call ended)."""

    def __init__(self, requests: Iterator[Any], context: grpc.ServicerContext) -> None:
        self.source = requests
        self.first = _first(requests, context)
        self.event = threading.Event()
        self.closed = False

    def open(self) -> None:
        self.event.set()

    def close(self) -> None:
        self.closed = True
        self.event.set()

    def requests(self) -> Iterator[Any]:
        if self.first is _END:
            return
        yield self.first
        self.event.wait()
        for request in self.source:
            if self.closed:
                return
            yield request


_END = object()


def _timeout(context: grpc.ServicerContext) -> float | None:
    """What is left of the caller's deadline, for the forwarded call (None: the caller set none)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 365 * 86400 else remaining


class Slots:
    """Data-plane calls in flight through the front, at most ``limit`` (0: no limit)."""

    def __init__(self, limit: int, counters: Any) -> None:
        self.limit = limit
        self.active = 0
        self.counters = counters
        self.lock = threading.Lock()
        self.refusal = LimitExceeded(
            f"the server is at its limit of concurrent calls (max_concurrent_calls = {limit}); retry with back-off"
        )
        self.message = str(self.refusal)
        self.on_accept: frozenset[str] = frozenset()  # methods whose slot install_fast_refusal() takes on accept
        self.started: Callable[[grpc.ServicerContext], None] = lambda context: None  # the request has arrived

    def acquire(self) -> Callable[[], None] | None:
        """A release function, or None when the limit is reached (the refusal is counted)."""
        with self.lock:
            if self.limit and self.active >= self.limit:
                self.counters[REFUSED] += 1
                return None
            self.active += 1
            self.counters[FORWARDED] += 1
        done = False

        def release() -> None:
            nonlocal done
            with self.lock:
                if not done:  # called from the call's end and from its cancellation callback: count it once
                    done = True
                    self.active -= 1

        return release


def install_fast_refusal(slots: Slots) -> bool:
    """Take the slots where grpcio's threaded server accepts a call, and refuse past the limit right there.

    Refused in a handler, a call would cost a hop to a worker thread, a read of its request and a hop back to the
    accept thread: several times what gRPC's own ``maximum_concurrent_rpcs`` refusal costs, which is the whole
    difference under overload.  That refusal cannot exempt health checks, so this wraps grpcio's accept step
    (``grpc._server._handle_call``) to do the same, for the data plane only.  It relies on grpcio internals, so it
    checks their shape first and returns False (the handlers refuse instead, at a higher cost) when they differ;
    ``tests/service/test_front.py`` checks that it is installed with the grpcio this project pins."""
    import inspect

    from grpc import _server
    from grpc._cython import cygrpc

    handle: Any = getattr(_server, "_handle_call", None)
    reject: Any = getattr(_server, "_reject_rpc", None)
    try:
        shape = (list(inspect.signature(handle).parameters), list(inspect.signature(reject).parameters))
    except (TypeError, ValueError):
        return False
    if shape != (
        ["rpc_event", "method_with_handler", "interceptor_pipeline", "thread_pool", "concurrency_exceeded"],
        ["rpc_event", "rpc_state", "status", "details"],
    ) or not hasattr(_server, "_RPCState"):
        return False
    # Calls with a request stream are left to the handler, which reads the first message before it refuses: a
    # caller still writing when its call ends is told INTERNAL by its gRPC library, not our status (grpc#36066).
    fast = frozenset(path for path, (streaming, _) in method_kinds().items() if path not in EXEMPT and not streaming)
    fast_bytes = {path.encode() for path in fast}
    code, text = status.of(slots.refusal)
    refused = cygrpc.StatusCode(code.value[0])  # the same code, as grpcio's core enum
    message = text.encode()

    # A call admitted here holds its slot while its request arrives.  A caller that sends the headers and never the
    # message would hold it (unauthenticated: the server has not seen the call yet) until its deadline, if any; so
    # a call whose handler has not started FIRST_MESSAGE_SECONDS after it was admitted is cancelled.
    waiting: dict[int, tuple[float, Any]] = {}  # id(rpc_event) -> (cancel at, call)

    def handle_call(rpc_event: Any, method_with_handler: Any, *rest: Any) -> tuple[Any, Any]:
        release = None
        key = id(rpc_event)
        if rpc_event.success:
            method = rpc_event.call_details.method or (method_with_handler.name() or "").encode()
            if method in fast_bytes:
                release = slots.acquire()
                if release is None:
                    state = _server._RPCState()
                    reject(rpc_event, state, refused, message)
                    return state, None
                waiting[key] = (time.monotonic() + FIRST_MESSAGE_SECONDS, rpc_event.call)  # before its handler runs
        state, future = handle(rpc_event, method_with_handler, *rest)
        if release is not None:
            if future is None:  # refused for another reason (unknown method, ...): never ran
                waiting.pop(key, None)
                release()
            else:  # the worker's task ends however the call ends (done, failed, cancelled before it started)
                done = release

                def finished(_: Any) -> None:
                    waiting.pop(key, None)
                    done()

                future.add_done_callback(finished)
        return state, future

    def watch() -> None:
        while True:
            time.sleep(1.0)
            now, late = time.monotonic(), 0
            for key, (cancel_at, call) in list(waiting.items()):
                if now >= cancel_at and waiting.pop(key, None) is not None:
                    call.cancel()
                    late += 1
            if late:
                wait = FIRST_MESSAGE_SECONDS
                logs.event(log, "front_no_request", level=logging.WARNING, cancelled=late, seconds=wait)

    _server._handle_call = handle_call
    slots.on_accept = fast
    def started(context: grpc.ServicerContext) -> None:
        waiting.pop(id(getattr(context, "_rpc_event", None)), None)

    slots.started = started
    threading.Thread(target=watch, name="front-watchdog", daemon=True).start()
    return True


def _abort(context: grpc.ServicerContext, exc: HealthcodeError) -> NoReturn:
    """End the call with the status :mod:`healthcode.service.status` gives ``exc`` (abort raises)."""
    context.abort(*status.of(exc))
    raise AssertionError("abort returned")


class Forwarder(grpc.GenericRpcHandler):
    """Forwards every known method to the server; unknown methods get UNIMPLEMENTED from the front itself."""

    def __init__(self, channel: grpc.Channel, slots: Slots, *, client_certificates: bool) -> None:
        self.channel = channel
        self.slots = slots
        self.certificates = client_certificates
        self.handlers = {path: self._handler(path, *kind) for path, kind in method_kinds().items()}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self.handlers.get(handler_call_details.method)

    def _metadata(self, context: grpc.ServicerContext) -> list[tuple[str, Any]]:
        md = [
            (k, v)
            for k, v in context.invocation_metadata()
            if not (k.startswith((":", "x-healthcode-")) or k in _DROPPED)
        ]
        if self.certificates:
            auth = context.auth_context() or {}
            for field in ("x509_common_name", "x509_subject_alternative_name"):
                md.extend((CLIENT_NAME, v.decode("utf-8", "replace")) for v in auth.get(field, ()))
        md.append((PEER, context.peer() or ""))
        return md

    @contextmanager
    def _slot(self, path: str, context: grpc.ServicerContext) -> Iterator[None]:
        if path in EXEMPT or path in self.slots.on_accept:
            yield
            return
        release = self.slots.acquire()
        if release is None:
            _abort(context, self.slots.refusal)
        context.add_callback(release)  # a cancelled call frees its slot even before its thread notices
        try:
            yield
        finally:
            release()

    @staticmethod
    def _fail(context: grpc.ServicerContext, error: grpc.RpcError) -> None:
        """End the caller's call with the server's status, details and trailing metadata."""
        if isinstance(error, grpc.Call):
            trailing = error.trailing_metadata()
            if trailing:
                context.set_trailing_metadata(tuple(trailing))
            context.abort(error.code(), error.details() or "")
        _abort(context, Unavailable("the server did not answer"))

    def _handler(self, path: str, client_streaming: bool, server_streaming: bool) -> grpc.RpcMethodHandler:
        kind = ("stream" if client_streaming else "unary") + "_" + ("stream" if server_streaming else "unary")
        stub = getattr(self.channel, kind)(path)  # raw bytes both ways: no (de)serializer
        forward_one: Callable[..., Any]
        if not server_streaming:

            def forward_one(request: Any, context: grpc.ServicerContext) -> Any:
                self.slots.started(context)
                if client_streaming:  # as in forward_many; no answer comes before the end, so the gate stays open
                    gate = _Gate(request, context)
                    gate.open()
                    request = gate.requests()
                with self._slot(path, context):
                    future = stub.future(request, timeout=_timeout(context), metadata=self._metadata(context))
                    context.add_callback(future.cancel)
                    try:
                        return future.result()
                    except grpc.FutureCancelledError:
                        _abort(context, status.Cancelled("the call was cancelled"))
                    except grpc.RpcError as error:
                        self._fail(context, error)

            forward = forward_one
        else:

            def forward_many(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                self.slots.started(context)
                # A caller whose write is still pending when its call ends is told INTERNAL by its gRPC library
                # instead of the call's status (grpc/grpc#36066).  So the front reads the first message before it
                # may refuse, and sends the server the rest only once the server answered the first (EvaluateArrow
                # answers its options with the evaluation info): a refusal by the server finds nothing in flight.
                gate = _Gate(request, context) if client_streaming else None
                with self._slot(path, context):
                    source = request if gate is None else gate.requests()
                    call = stub(source, timeout=_timeout(context), metadata=self._metadata(context))
                    context.add_callback(call.cancel)
                    try:
                        for response in call:
                            if gate is not None:
                                gate.open()
                            yield response
                    except grpc.RpcError as error:
                        if context.is_active():
                            self._fail(context, error)
                    finally:
                        if gate is not None:
                            gate.close()

            forward = forward_many
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        return make(forward)


def _run(settings: Settings, backend: str, report: Any, counters: Any, parent: int) -> None:
    """The front process: listen, report the bound port (or the error) to the server, forward until SIGTERM or
    until the server process is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which stops the front in order
    from healthcode.service.transport import grpc_options, listen, server_credentials

    logs.configure(settings.log_level)
    # Hand the GIL over more often than every 5 ms, so the accept thread (which refuses) is not kept waiting by
    # the threads that forward.
    sys.setswitchinterval(0.001)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    limit = settings.max_concurrent_calls
    slots = Slots(limit, counters)
    if limit and not install_fast_refusal(slots):
        detail = "grpcio is not the shape the front knows: the handlers refuse calls past the limit, at a higher cost"
        logs.event(log, "front_slow_refusal", level=logging.WARNING, detail=detail)
    channel = grpc.insecure_channel(
        backend,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
        ],
    )
    threads = (limit or settings.max_pending_calls * 4) + RESERVE
    server = grpc.server(
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="front"),
        handlers=[Forwarder(channel, slots, client_certificates=bool(settings.tls_client_ca))],
        # gRPC's default bound on calls queued ahead of the accept thread (1000, all refused past 3000): the accept
        # thread refuses at several thousand calls a second, so a burst waits a little instead of being CANCELLED
        options=[o for o in grpc_options(settings) if not o[0].startswith("grpc.server.max_pending_requests")],
        # gRPC's own limit, past ours: refusals that would queue for a thread are refused by the accept thread.
        maximum_concurrent_rpcs=threads,
    )
    try:
        port = listen(server, settings.listen, server_credentials(settings))
    except (OSError, ConfigError) as exc:
        report.send(("error", str(exc)))
        return
    server.start()
    report.send(("port", port))
    last, reported = 0, time.monotonic()
    while not stop.wait(1.0):
        if os.getppid() != parent:  # the server died (kill -9): nothing is left to forward to
            logs.event(log, "front_orphaned", level=logging.ERROR, detail="the server is gone; the front stops")
            break
        refused = int(counters[REFUSED])
        if refused != last and time.monotonic() - reported >= REPORT_SECONDS:
            logs.event(log, "front_shed", level=logging.WARNING, refused=refused - last, limit=limit)
            last, reported = refused, time.monotonic()
    server.stop(settings.grace_seconds).wait()
    channel.close()


#: How much lower the server's threads run than its front (``nice``): under a saturated CPU the front still gets to
#: accept and refuse at once, and the server serves with what is left.
SERVER_NICENESS = 5


def yield_cpu_to_front(increment: int = SERVER_NICENESS, keep: frozenset[int] = frozenset()) -> int:
    """Lower the priority of every thread of this process (the server) but those in ``keep`` (native thread ids) by
    ``increment`` (Linux: each thread has its own nice value; threads and processes started later by a thread
    inherit its value).  Lowering one's own priority needs no privilege, raising it back does.  Returns the number of
    threads changed (0 where the platform has no per-thread priorities)."""
    if not hasattr(os, "setpriority") or not os.path.isdir("/proc/self/task"):
        return 0
    changed = 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) in keep:
            continue
        try:
            current = os.getpriority(os.PRIO_PROCESS, int(tid))
            os.setpriority(os.PRIO_PROCESS, int(tid), min(19, current + increment))
            changed += 1
        except (OSError, ValueError):  # the thread ended meanwhile
            pass
    return changed


class Front:
    """The server's handle on its front process."""

    def __init__(self, settings: Settings, backend: str) -> None:
        self._ctx = mp.get_context("spawn")  # a fresh interpreter: no gRPC state inherited across fork
        self.counters = self._ctx.Array("q", 2, lock=False)
        self.backend = backend
        # Every front process is started from this one thread, which the server leaves at its first priority
        # (yield_cpu_to_front(keep=...)): a process inherits the nice value of the thread that starts it, so a
        # front started to replace a dead one keeps its head start over the server too.
        self.spawner = ThreadPoolExecutor(1, thread_name_prefix="healthcode-front-spawner")
        self.spawner_thread_id: int = self.spawner.submit(threading.get_native_id).result()
        self._prepare(settings)

    def _prepare(self, settings: Settings) -> None:
        self.settings = settings
        self._report, self._child = self._ctx.Pipe(duplex=False)
        self.process = self._ctx.Process(
            target=_run, args=(settings, self.backend, self._child, self.counters, os.getpid()), name="healthcode-front"
        )

    def restart(self, address: str) -> int:
        """A new front process on ``address`` (the port the last one had bound) after it died."""
        import dataclasses

        self._prepare(dataclasses.replace(self.settings, listen=address))
        return self.start()

    def start(self, timeout: float = 60.0) -> int:
        """Start the front and wait until it listens; returns the bound port.  Raises OSError when it cannot."""
        self.process.start()
        self._child.close()  # the front's end only: a front that dies before it reports is seen at once (EOF)
        if not self._report.poll(timeout):
            self.stop(0)
            raise OSError(f"the front process did not start listening on {self.settings.listen} in {timeout:g} s")
        try:
            kind, value = self._report.recv()
        except EOFError:
            raise OSError(f"the front process exited (code {self.process.exitcode}) before listening") from None
        if kind == "error":
            self.process.join(5)
            raise OSError(value)
        return int(value)

    def stop(self, grace: float) -> None:
        """SIGTERM: the front stops accepting and waits up to ``grace`` for the calls it forwards.  The last call:
        it also ends the thread that fronts are started from."""
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(grace + 5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self.spawner.shutdown(wait=False)

    @property
    def forwarded(self) -> int:
        return int(self.counters[FORWARDED])

    @property
    def refused(self) -> int:
        return int(self.counters[REFUSED])
