"""The gRPC server's lifecycle: options, services, start-up, graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from healthcode import logs
from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode.live.control import Control, initial_state
from healthcode.live.ingest import Committed, IngestQueue
from healthcode.live.statusbook import StatusBook
from healthcode.rules import engine
from healthcode.rules.timebase import to_datetime, to_instant
from healthcode.service import front, limits, metrics
from healthcode.service.auth import Authenticator, Guard, load_authenticator
from healthcode.service.config import ConfigError, Settings
from healthcode.service.interceptors import ObservedService, ServiceInterceptor
from healthcode.service.servicer import HealthCodeService
from healthcode.service.transport import check_free, grpc_options, is_loopback, listen, server_credentials
from healthcode.store import Store
from healthcode.wire import limits as wire_limits

log = logging.getLogger("healthcode.service.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["HealthCodeService"].full_name


def _open_control(settings: Settings) -> Control:
    """The snapshot given in the settings, continued from the store's kept versions when there is a store."""
    given = initial_state(settings.policy, settings.risk)
    store = (
        Store(settings.store, memory_limit=settings.store_memory_limit, threads=settings.store_threads)
        if settings.store
        else None
    )
    return Control.open(
        given,
        store,
        settings.now(),
        risk_given=bool(settings.risk),
        policy_given=bool(settings.policy),
        kernel_threads=settings.kernel_threads or None,
        where=str(settings.store),
    )


#: Every RPC of healthcode.v1.HealthCodeService: its handler kind and request class.  Every request arrives as raw bytes
#: and is decoded in one place, by :class:`~healthcode.service.interceptors.ObservedService` (a malformed one is
#: INVALID_ARGUMENT naming the RPC); None: the servicer reads the bytes itself (Evaluate, GetStatus: the kernel's
#: codec; EvaluateArrow: its Arrow IPC in place).
METHODS: dict[str, tuple[str, type[Any] | None]] = {
    "Evaluate": ("unary_unary", None),
    "EvaluateArrow": ("stream_stream", None),
    "PutRiskList": ("unary_unary", pb.PutRiskListRequest),
    "GetRiskList": ("unary_unary", pb.GetRiskListRequest),
    "PutPolicy": ("unary_unary", pb.PutPolicyRequest),
    "GetPolicy": ("unary_unary", pb.GetPolicyRequest),
    "Reevaluate": ("unary_unary", pb.ReevaluateRequest),
    "WatchChanges": ("unary_stream", pb.WatchChangesRequest),
    "WatchChangesArrow": ("unary_stream", pb.WatchChangesArrowRequest),
    "GetStatus": ("unary_unary", None),
    "UpsertPersons": ("unary_unary", pb.UpsertPersonsRequest),
    "RecordNatResults": ("unary_unary", pb.RecordNatResultsRequest),
    "RecordEntries": ("unary_unary", pb.RecordEntriesRequest),
    "RecordVisits": ("unary_unary", pb.RecordVisitsRequest),
}
#: The RPCs whose servicer method returns the serialized responses itself (the kernel's encoder or wire.ipc writes
#: them).
RAW_RESPONSES = frozenset({"Evaluate", "GetStatus", "EvaluateArrow"})
#: What ObservedService decodes each request as.
REQUEST_CLASSES = {name: request_class for name, (_, request_class) in METHODS.items()}


def service_handlers(
    service: HealthCodeService, wrappers: Sequence[ServiceInterceptor] = ()
) -> grpc.GenericRpcHandler:
    """The healthcode.v1.HealthCodeService handlers of :data:`METHODS`: requests as raw bytes (decoded by
    ObservedService), responses serialized from the generated message classes (:data:`RAW_RESPONSES`: returned as
    bytes).

    ``wrappers`` (outermost first) wrap each handler here, once: what an interceptor does, without the coroutine an
    interceptor costs on every call (a quarter of the cost of a one-person call)."""

    def handler(kind: str, method: str, request_class: type[Any] | None) -> grpc.RpcMethodHandler:
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        serializer = None if method in RAW_RESPONSES else (lambda m: m.SerializeToString())
        made: grpc.RpcMethodHandler = make(
            getattr(service, method), request_deserializer=None, response_serializer=serializer
        )
        for wrapper in reversed(wrappers):
            made = wrapper.wrap_handler(f"/{SERVICE_NAME}/{method}", made)
        return made

    return grpc.method_handlers_generic_handler(
        SERVICE_NAME, {name: handler(kind, name, request_class) for name, (kind, request_class) in METHODS.items()}
    )


#: How a busy or forbidden metrics port is named in the one-line error.
METRICS_WHAT = " (the metrics endpoint, metrics_listen)"


def _serve_metrics(settings: Settings) -> tuple[Any, str]:
    """Start the Prometheus endpoint: HTTPS with the server's certificate when TLS is configured (and client
    certificates required under mutual TLS) unless metrics_tls is false.  Returns the HTTP server and the scheme;
    raises OSError naming the address when it cannot listen."""
    listen = settings.metrics_listen
    tls = {}
    if settings.tls_cert and settings.metrics_tls:
        tls = {
            "certfile": settings.tls_cert, "keyfile": settings.tls_key, "client_cafile": settings.tls_client_ca,
            "client_auth_required": bool(settings.tls_client_ca),
        }  # fmt: skip
    try:
        return metrics.serve_metrics(listen, **tls), "https" if tls else "http"
    except OSError as exc:  # taken since check_free looked, or a host that is not this machine's
        reason = (exc.strerror or str(exc)).lower()
        raise OSError(f"cannot listen on {listen}{METRICS_WHAT}: {reason}") from None


def _security_warnings(settings: Settings, auth: Authenticator) -> None:
    tls = bool(settings.tls_cert)
    logs.event(
        log,
        "security",
        tls=tls,
        mutual_tls=bool(settings.tls_client_ca),
        token_principals=len(auth.tokens),
        certificate_identities=len(auth.identities),
        max_concurrent_calls=settings.max_concurrent_calls,
        max_concurrent_calls_per_caller=settings.max_concurrent_calls_per_caller,
        max_request_rows=settings.max_request_rows,
        shed_loop_lag_ms=settings.shed_loop_lag_ms,
        front=front.enabled(settings),
    )
    if is_loopback(settings.listen):
        return
    if not tls:
        log.warning(
            "LISTENING WITHOUT TLS ON A NON-LOOPBACK ADDRESS %s: plaintext is for loopback development only; "
            "set tls_cert and tls_key",
            settings.listen,
        )
        if auth.tokens:
            log.warning("BEARER TOKENS TRAVEL IN CLEAR TEXT on %s: anyone on the path can read them", settings.listen)
    if not auth.enabled and not settings.tls_client_ca:
        log.warning(
            "CALLERS ARE NOT AUTHENTICATED on the non-loopback address %s: anyone who reaches it may evaluate, "
            "ingest and replace the risk list and the policy; configure tokens_file (or HEALTHCODE_TOKENS) or "
            "client_roles",
            settings.listen,
        )


async def _demo(control: Control, settings: Settings, executor: ThreadPoolExecutor) -> str:
    """Evaluate the demo population once (make serve), off the event loop; returns a summary line."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = settings.demo_population
    assert path is not None

    def run() -> str:
        started = time.perf_counter()
        snap = control.snapshot
        as_of = to_instant(settings.demo_as_of) if settings.demo_as_of else settings.now()
        try:
            population = pq.read_table(path)
        except pa.ArrowInvalid:
            raise ConfigError(f"{path}: not a Parquet file (demo_population)") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the demo population: {exc.strerror or exc}") from None
        table = engine.evaluate(population, snap.risk, snap.policy, as_of, settings.kernel_threads or None)
        badges = pc.sum(table["commuter_badge"]).as_py() or 0
        entries = pc.sum(table["entry_permitted"]).as_py() or 0
        return (
            f"demo: evaluated {table.num_rows:,} persons of {path} at {to_datetime(as_of).isoformat()} in "
            f"{time.perf_counter() - started:.2f} s: {badges:,} badges, {entries:,} entries permitted"
        )

    return await asyncio.get_running_loop().run_in_executor(executor, run)


async def _demo_lines(
    control: Control, settings: Settings, executor: ThreadPoolExecutor, address: str, book: StatusBook | None
) -> None:
    """The demo's summary and the commands to call the server with (make serve)."""
    print(await _demo(control, settings, executor), flush=True)
    as_of = f" --as-of {settings.demo_as_of}" if settings.demo_as_of else ""
    print(
        "call it:  .venv/bin/healthcode call evaluate --target "
        f"{address} {settings.demo_population}{as_of} --out result.parquet",
        flush=True,
    )
    if book is not None:
        print(
            f"store {settings.store}: {len(book.ids):,} persons; publish their statuses: "
            f".venv/bin/healthcode reevaluate --target {address}",
            flush=True,
        )


def _inserted(done: list[Committed]) -> dict[str, int]:
    """Rows newly stored per ingest kind in a committed group."""
    out: dict[str, int] = {}
    for c in done:
        out[c.kind] = out.get(c.kind, 0) + c.counts.inserted
    return out


async def serve(settings: Settings, ready: asyncio.Event | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit code."""
    logs.configure(settings.log_level)
    log_flusher = asyncio.get_running_loop().create_task(logs.flush_periodically(), name="healthcode-log-flush")
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        # Past a file-size limit a write should fail (the store answers UNAVAILABLE), not kill the server.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    auth = load_authenticator(settings)  # bad security settings fail before the (slow) store is opened
    credentials = server_credentials(settings)  # behind a front, only checked here (before the slow store opens)
    if settings.demo_population and not os.path.isfile(settings.demo_population):
        raise ConfigError(f"{settings.demo_population}: no such file (demo_population)")
    check_free(settings.listen)  # a busy port, too: one line naming it (listen() and the front check again)
    if settings.metrics_listen:
        check_free(settings.metrics_listen, METRICS_WHAT)
    control = _open_control(settings)
    book = control.book
    ingest = (
        None
        if book is None
        else IngestQueue(
            book.store,
            on_commit=lambda done: book.ingested(
                [(c.kind, c.table) for c in done], settings.now(), _inserted(done)
            ),
            known=book.knows,
            seen=lambda kind, events: book.stored_events(kind, events, settings.now()),
        )
    )
    wire_limits.configure(settings.max_request_rows)
    concurrency = limits.Concurrency(settings.max_concurrent_calls, settings.max_concurrent_calls_per_caller)
    overload = limits.Overload(settings.shed_loop_lag_ms / 1000)
    behind_front = front.enabled(settings)
    guard = Guard(
        auth, concurrency, client_certificates=bool(settings.tls_client_ca), overload=overload, forwarded=behind_front
    )
    executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="evaluate")
    # ObservedService outermost: calls the guard refuses are logged and counted with their code.
    observed = ObservedService(REQUEST_CLASSES)
    server = grpc.aio.server(options=grpc_options(settings, public=not behind_front))
    service = HealthCodeService(control, settings, executor, ingest)
    server.add_generic_rpc_handlers((service_handlers(service, (observed, guard)),))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
    if settings.reflection:
        names.append(reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    sockets = None
    shedder: front.Front | None = None
    collector: metrics.FrontCollector | None = None
    http = None
    try:
        if behind_front:
            # The server listens only on a socket in a fresh 0700 folder: the front is its one caller, so the client
            # names and peer the front passes on in metadata can be trusted.
            sockets = tempfile.mkdtemp(prefix="healthcode-")
            backend = f"unix:{sockets}/server.sock"
            server.add_insecure_port(backend)
        else:
            port = listen(server, settings.listen, credentials)
        _security_warnings(settings, auth)
        await server.start()
        overload.start()
        if sockets is not None:
            shedder = front.Front(settings, backend)
            port = await asyncio.get_running_loop().run_in_executor(shedder.spawner, shedder.start)
            front.yield_cpu_to_front(keep=frozenset({shedder.spawner_thread_id}))
            collector = metrics.FrontCollector(shedder)
            metrics.REGISTRY.register(collector)
            logs.event(log, "front", pid=shedder.process.pid, limit=settings.max_concurrent_calls)
        for name in (SERVICE_NAME, ""):
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        http, scheme = _serve_metrics(settings) if settings.metrics_listen else (None, "")
        host = settings.listen.rpartition(":")[0]
        address = f"{host}:{port}"
        print(f"healthcode serving on {address}", flush=True)
        if http is not None:
            metrics_host = settings.metrics_listen.rpartition(":")[0]
            print(f"metrics on {scheme}://{metrics_host}:{http.server_port}/metrics", flush=True)
        if settings.demo_population:
            await _demo_lines(control, settings, executor, address, book)
    except BaseException:
        # Nothing is left half-started: no traceback from a gRPC server collected after its loop closed, no lock
        # left on the store.
        if shedder is not None:
            shedder.stop(0)
        if collector is not None:
            metrics.REGISTRY.unregister(collector)
        if http is not None:
            http.shutdown()
            http.server_close()
        await _close(server, 0, sockets, overload, executor, ingest, book)
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if book is not None:  # an operator (or a benchmark) asks for the checkpoint now
        loop.add_signal_handler(signal.SIGUSR1, book.checkpoint_now)
    failed: list[str] = []
    watcher = None
    if shedder is not None:
        watcher = asyncio.create_task(_watch_front(shedder, address, stop, failed))
    if ready is not None:
        ready.set()
    await stop.wait()
    logs.flush()
    print(
        f"healthcode: stopping, finishing in-flight calls (up to {settings.grace_seconds:g} s)",
        file=sys.stderr,
        flush=True,
    )
    for name in (SERVICE_NAME, ""):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if watcher is not None:
        watcher.cancel()
    # The change streams only wait for news: they end now (UNAVAILABLE, the caller resumes elsewhere or later)
    # instead of holding the grace period, which is for the calls doing work.  Before the front stops: it waits
    # for the calls it forwards.
    observed.change_streams.end()
    if shedder is not None:  # the front stops taking calls and waits for the ones it forwards
        await loop.run_in_executor(None, shedder.stop, settings.grace_seconds)
        assert collector is not None
        metrics.REGISTRY.unregister(collector)
    await _close(server, settings.grace_seconds, sockets, overload, executor, ingest, book)
    if http is not None:
        http.shutdown()
        http.server_close()
    log_flusher.cancel()
    logs.flush()
    print("healthcode: stopped", file=sys.stderr, flush=True)
    if failed:
        print(f"healthcode: error: {failed[0]}", file=sys.stderr, flush=True)
        return 1
    return 0


async def _close(
    server: grpc.aio.Server,
    grace: float,
    sockets: str | None,
    overload: limits.Overload,
    executor: ThreadPoolExecutor,
    ingest: IngestQueue | None,
    book: StatusBook | None,
) -> None:
    """Stop serving (calls in flight get ``grace`` seconds), then release everything in the order it depends on."""
    await server.stop(grace)
    if sockets is not None:
        shutil.rmtree(sockets, ignore_errors=True)
    overload.stop()
    executor.shutdown(wait=True, cancel_futures=True)
    if ingest is not None:
        await ingest.close()  # commits what is still queued before the store closes
    if book is not None:
        book.close()  # a background checkpoint or view compaction finishes first
        book.store.close()


async def _watch_front(shedder: front.Front, address: str, stop: asyncio.Event, failed: list[str]) -> None:
    """If the front process dies, start a new one on the same address; if that fails, stop the server (exit 1)
    so that its supervisor restarts it, rather than serve nobody."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        await loop.run_in_executor(None, shedder.process.join, 1.0)
        if shedder.process.is_alive() or stop.is_set():
            continue
        logs.event(
            log, "front_exited", level=logging.ERROR, code=shedder.process.exitcode, detail="starting a new front"
        )
        try:
            await loop.run_in_executor(shedder.spawner, shedder.restart, address)
        except OSError as exc:
            failed.append(f"the front process exited and a new one could not start: {exc}")
            stop.set()
        else:
            logs.event(log, "front", pid=shedder.process.pid, restarted=True)
