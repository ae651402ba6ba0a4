"""Load and overload proof: the gateway path and the bulk path together, then 5x overload, then recovery.

A real ``healthcode serve`` subprocess on loopback (``--max-concurrent-calls 64``, behind its shedding front unless
``--front off``: the setup of an exposed server, ``front = auto``), and separate load-generator
*processes* (multiprocessing, spawn), each with its own grpc.aio channel, kept for the whole run as a gateway keeps
its channel:

* ``--gateway-procs`` gateway processes: ``Evaluate`` with 100-person batches (row form, pre-serialized);
* ``--bulk-procs`` bulk processes: ``EvaluateArrow`` streams of ``--bulk-rows`` rows (Arrow IPC under 4 MiB a
  message), one stream at a time each;
* one health process: ``grpc.health.v1.Health/Check`` every 100 ms, in every phase.

Phases:

a. **sustained**: closed loop, ``--gateway-concurrency`` calls in flight per gateway process, bulk streams back to
   back, for ``--sustained-seconds``.  Gateway RPC/s and rows/s, bulk rows/s, p50/p99 of each, errors by status
   code (must be none: the load stays below every limit), server RSS every 0.5 s (``/proc/PID/status`` VmRSS).
b. **overload**: open loop at ``--overload-factor`` (5) times the gateway RPC/s measured in (a): each gateway
   process fires calls on a fixed schedule without waiting for replies (many in flight, bounded per process), for
   ``--overload-seconds``, while the bulk processes go on as in (a).  Offered and admitted rates,
   RESOURCE_EXHAUSTED count and share, every other code, p50/p99 of admitted calls, health-check successes and p99, RSS.
c. **recovery**: the load of (a) again for ``--recovery-seconds``: error rate (zero again) and p99.

Why 64 concurrent calls: the sustained load keeps ``gateway_procs * gateway_concurrency + bulk_procs`` calls in
flight (3 * 8 + 1 = 25 by default), so 64 leaves 2.5x headroom and (a) and (c) must never be shed; past it, by
Little's law, 64 admitted calls at the few hundred to ~1,500 Evaluate/s this machine serves are ~50-200 ms of work,
so an admitted call's wait inside the handlers would stay bounded while the rest is refused at once.  (The
default, 256, would allow 4x that.)  Behind the front the limit is counted as the front accepts each call; without
it, grpc.aio takes new calls off gRPC core's queue on its event loop, so a backlog of cheap calls forms in core and
is refused there with CANCELLED (see docs/load.md).

Figures are reported, never asserted (the ``checks`` block states the behavioural facts: zero errors below the
limits, shedding with RESOURCE_EXHAUSTED, health always SERVING).  ``python benchmarks/bench_load.py`` (a few
minutes) or ``--quick`` (CI, under 40 s); ``--json FILE`` writes the report.  Everything is bounded: call
deadlines, a per-phase timeout, and the server and load processes are stopped on any exit.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing as mp
import os
import queue as queue_mod
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np

AS_OF = 1638244800  # 2021-11-30T12:00:00+08:00
MESSAGE_BYTES = 4 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MESSAGE_BYTES),
    ("grpc.max_send_message_length", MESSAGE_BYTES),
]
EVALUATE = "/healthcode.v1.HealthCodeService/Evaluate"
EVALUATE_ARROW = "/healthcode.v1.HealthCodeService/EvaluateArrow"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
BATCH = 100  # persons per gateway call
PAYLOADS = 16  # distinct gateway requests cycled by each process
MAX_CONCURRENT_CALLS = 64
READY_TIMEOUT = 120.0


# ================================================================================================================
# Load-generator processes.  Each runs one asyncio loop and one channel, and executes commands from its queue:
# ("closed", start_at, seconds), ("open", start_at, seconds, rate), ("bulk", start_at, seconds),
# ("health", start_at, seconds), ("stop",).  Results go back on the shared result queue as (name, dict).


def _percentiles(seconds: Sequence[float]) -> dict[str, float | None]:
    if not len(seconds):
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    a = np.asarray(seconds) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "max_ms": round(float(a.max()), 2),
    }


class _Tally:
    """Outcomes of one worker's calls in one phase: counts by status code, OK latencies, one message per code."""

    def __init__(self) -> None:
        self.codes: collections.Counter[str] = collections.Counter()
        self.ok: list[float] = []
        self.refused: list[float] = []  # RESOURCE_EXHAUSTED latencies (how fast shedding answers)
        self.failed: dict[str, list[float]] = collections.defaultdict(list)  # latencies of every error code
        self.messages: dict[str, str] = {}

    def error(self, exc: Exception, latency: float) -> None:
        import grpc

        code = exc.code().name if isinstance(exc, grpc.RpcError) else type(exc).__name__
        self.codes[code] += 1
        self.failed[code].append(latency)
        if code == "RESOURCE_EXHAUSTED":
            self.refused.append(latency)
        if code not in self.messages:  # status messages never carry row content; keep them short anyway
            details = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
            self.messages[code] = (details or "")[:200]

    def result(self) -> dict[str, Any]:
        return {"codes": dict(self.codes), "ok": self.ok, "refused": self.refused, "messages": self.messages,
                "failed": dict(self.failed)}  # fmt: skip


async def _sleep_until(start_at: float) -> None:
    delay = start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


def _gateway_payloads(seed: int) -> list[bytes]:
    from healthcode._proto.v1 import healthcode_pb2 as pb
    from healthcode.generate import generate_batches
    from healthcode.wire.rows import batch_to_persons

    batch = next(generate_batches(BATCH * PAYLOADS, seed=seed))
    out = []
    for i in range(PAYLOADS):
        request = pb.EvaluateRequest(persons=batch_to_persons(batch.slice(i * BATCH, BATCH)))
        request.as_of.seconds = AS_OF
        out.append(request.SerializeToString())
    return out


def _bulk_payloads(rows: int, seed: int) -> list[bytes]:
    import pyarrow as pa

    from healthcode._proto.v1 import healthcode_pb2 as pb
    from healthcode.generate import generate_batches
    from healthcode.wire.ipc import ipc_chunks

    table = pa.Table.from_batches(list(generate_batches(rows, seed=seed)))
    options = pb.EvaluateOptions()
    options.as_of.seconds = AS_OF
    out = [pb.EvaluateArrowRequest(options=options).SerializeToString()]
    for data, _n in ipc_chunks(table, MESSAGE_BYTES - 4096):
        out.append(pb.EvaluateArrowRequest(arrow_ipc=data).SerializeToString())
    return out


async def _closed_loop(call: Any, payloads: list[bytes], concurrency: int, start_at: float, seconds: float,
                       timeout: float) -> dict[str, Any]:  # fmt: skip
    """``concurrency`` callers, each sending its next call when the previous one is answered."""
    tally = _Tally()
    await _sleep_until(start_at)
    started = time.perf_counter()
    stop_at = started + seconds

    async def caller(k: int) -> None:
        i = k
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                await call(payloads[i % len(payloads)], timeout=timeout)
                tally.ok.append(time.perf_counter() - t0)
            except Exception as exc:
                tally.error(exc, time.perf_counter() - t0)
                await asyncio.sleep(0.01)  # back off a little instead of spinning on an error
            i += concurrency

    await asyncio.gather(*(caller(k) for k in range(concurrency)))
    return {**tally.result(), "elapsed": time.perf_counter() - started, "rows_per_call": BATCH}


async def _open_loop(call: Any, payloads: list[bytes], rate: float, max_in_flight: int, start_at: float,
                     seconds: float, timeout: float) -> dict[str, Any]:  # fmt: skip
    """Fire calls on a fixed schedule (``rate`` per second) without waiting for replies; at most ``max_in_flight``
    unanswered (a call due while that many are out is counted as ``not_sent``, never queued)."""
    tally = _Tally()
    tasks: set[asyncio.Task[None]] = set()
    in_flight = [0]

    async def one(payload: bytes) -> None:
        t0 = time.perf_counter()
        try:
            await call(payload, timeout=timeout)
            tally.ok.append(time.perf_counter() - t0)
        except Exception as exc:
            tally.error(exc, time.perf_counter() - t0)
        finally:
            in_flight[0] -= 1

    await _sleep_until(start_at)
    total = int(rate * seconds)
    sent = not_sent = 0
    started = time.perf_counter()
    stop_firing = started + seconds + 1.0  # a generator that falls behind stops on time, not on count
    max_seen = 0
    while sent + not_sent < total:
        now = time.perf_counter()
        if now >= stop_firing:
            break
        due = min(total, int((now - started) * rate) + 1)
        while sent + not_sent < due:
            if in_flight[0] >= max_in_flight:
                not_sent += 1
                continue
            in_flight[0] += 1
            sent += 1
            task = asyncio.create_task(one(payloads[sent % len(payloads)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        max_seen = max(max_seen, in_flight[0])
        await asyncio.sleep(0.002)
    fired = time.perf_counter() - started
    if tasks:
        await asyncio.wait(set(tasks), timeout=timeout + 5)
    drained = time.perf_counter() - started  # the last answer: admitted calls may finish after the firing stopped
    for task in list(tasks):  # still unanswered past the deadline (should not happen): cancel and count
        task.cancel()
    unanswered = len(tasks)
    return {
        **tally.result(),
        "elapsed": fired,
        "drained": drained,
        "sent": sent,
        "not_sent": not_sent + (total - sent - not_sent),
        "unanswered": unanswered,
        "max_in_flight": max_seen,
        "target_rate": rate,
    }


async def _bulk_loop(channel: Any, payloads: list[bytes], rows: int, start_at: float, seconds: float,
                     timeout: float) -> dict[str, Any]:  # fmt: skip
    from healthcode._proto.v1 import healthcode_pb2 as pb

    call = channel.stream_stream(EVALUATE_ARROW, request_serializer=None,
                                 response_deserializer=pb.EvaluateArrowResponse.FromString)  # fmt: skip
    tally = _Tally()
    rows_done = 0
    await _sleep_until(start_at)
    started = time.perf_counter()
    stop_at = started + seconds
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        admitted = asyncio.Event()

        async def gated(admitted: asyncio.Event = admitted) -> Any:
            # The data goes out once the server answered the options (the call is admitted): a refused stream then
            # ends with the server's status; a grpc.aio client still writing when the server ends the stream
            # reports INTERNAL "Internal error from Core" instead (grpc/grpc#36066).
            yield payloads[0]
            await admitted.wait()
            for p in payloads[1:]:
                yield p

        try:
            got = 0
            async for response in call(gated(), timeout=timeout):
                if response.HasField("info"):
                    admitted.set()
                got += response.rows
            if got != rows:
                raise RuntimeError(f"EvaluateArrow returned {got} rows for {rows}")
            rows_done += got
            tally.ok.append(time.perf_counter() - t0)
        except Exception as exc:
            tally.error(exc, time.perf_counter() - t0)
            await asyncio.sleep(0.05)
        finally:
            admitted.set()
    return {**tally.result(), "elapsed": time.perf_counter() - started, "rows": rows_done}


async def _health_loop(channel: Any, start_at: float, seconds: float, interval: float) -> dict[str, Any]:
    from grpc_health.v1 import health_pb2

    call = channel.unary_unary(HEALTH_CHECK, request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                               response_deserializer=health_pb2.HealthCheckResponse.FromString)  # fmt: skip
    tally = _Tally()
    statuses: collections.Counter[str] = collections.Counter()
    await _sleep_until(start_at)
    started = time.perf_counter()
    next_at = started
    while next_at < started + seconds:
        t0 = time.perf_counter()
        try:
            reply = await call(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
            statuses[health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)] += 1
            tally.ok.append(time.perf_counter() - t0)
        except Exception as exc:
            tally.error(exc, time.perf_counter() - t0)
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    return {**tally.result(), "elapsed": time.perf_counter() - started, "statuses": dict(statuses)}


async def _warm_up(evaluate: Any, payloads: list[bytes], seconds: float = 60.0) -> None:
    """Connect and send a few calls, as a client should: a call shed while the server is still busy starting
    (RESOURCE_EXHAUSTED, "retry with back-off") or not yet reachable (UNAVAILABLE) is retried with back-off."""
    import grpc

    deadline = time.monotonic() + seconds
    for p in payloads:
        backoff = 0.05
        while True:
            try:
                await evaluate(p, timeout=30)
                break
            except grpc.aio.AioRpcError as exc:
                retry = exc.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
                if not retry or time.monotonic() + backoff > deadline:
                    raise
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)


async def _worker_main(role: str, name: str, target: str, opts: dict[str, Any], commands: Any, results: Any) -> None:
    import grpc

    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        evaluate = channel.unary_unary(EVALUATE, request_serializer=None, response_deserializer=None)
        payloads: list[bytes] = []
        if role == "gateway":
            payloads = _gateway_payloads(seed=opts["seed"])
            await _warm_up(evaluate, payloads[:4])
        elif role == "bulk":
            payloads = _bulk_payloads(opts["bulk_rows"], seed=opts["seed"])
            await channel.channel_ready()
        else:
            await channel.channel_ready()
        results.put((name, {"ready": True}))
        while True:
            cmd = await loop.run_in_executor(None, commands.get)
            kind = cmd[0]
            if kind == "stop":
                return
            if kind == "closed":
                out = await _closed_loop(evaluate, payloads, opts["concurrency"], cmd[1], cmd[2], timeout=30)
            elif kind == "open":
                out = await _open_loop(evaluate, payloads, cmd[3], opts["max_in_flight"], cmd[1], cmd[2],
                                       timeout=opts["overload_timeout"])  # fmt: skip
            elif kind == "bulk":
                out = await _bulk_loop(channel, payloads, opts["bulk_rows"], cmd[1], cmd[2], timeout=120)
            elif kind == "health":
                out = await _health_loop(channel, cmd[1], cmd[2], interval=0.1)
            else:
                out = {"error": f"unknown command {kind!r}"}
            results.put((name, out))


def _worker(role: str, name: str, target: str, opts: dict[str, Any], commands: Any, results: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    _die_with_parent()  # and if it dies without stopping us, SIGTERM ends this process too
    try:
        asyncio.run(_worker_main(role, name, target, opts, commands, results))
    except Exception as exc:  # report instead of dying silently (the parent would only see a timeout)
        results.put((name, {"fatal": f"{type(exc).__name__}: {exc}"[:500]}))


# ================================================================================================================
# The parent: server, workers, RSS sampling, phases, report.


def _die_with_parent() -> None:
    """In the server's child process: SIGTERM when this benchmark dies, even by SIGKILL (Linux prctl)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


class Server:
    """``healthcode serve`` on free ports, stdout and stderr to files in ``workdir``; :meth:`stop` is idempotent."""

    def __init__(self, workdir: str, extra: Sequence[str], command: str | None = None) -> None:
        risk = os.path.join(workdir, "risk.csv")
        from healthcode.generate import generate_risk_csv

        with open(risk, "w", encoding="utf-8") as f:
            f.write(generate_risk_csv(1, AS_OF))
        exe = os.path.join(os.path.dirname(sys.executable), "healthcode")
        cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "healthcode.cli"]
        if command:
            cmd = command.split()
        cmd += ["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--risk", risk, *extra]
        self.out_path = os.path.join(workdir, "server.stdout")
        self.err_path = os.path.join(workdir, "server.stderr")
        env = {k: v for k, v in os.environ.items() if not k.startswith("HEALTHCODE_")}
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                         preexec_fn=_die_with_parent)  # fmt: skip
        self.pid = self.proc.pid
        self.target = self.metrics = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = open(self.out_path, encoding="utf-8", errors="replace").read()
            serving = re.search(r"^healthcode serving on (\S+)\s*$", text, re.M)
            metrics = re.search(r"^metrics on (\S+)\s*$", text, re.M)
            if serving and metrics:
                self.target, self.metrics = serving.group(1), metrics.group(1)
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"healthcode serve did not start; stderr tail: {self.stderr_tail()}")

    def stderr_tail(self, lines: int = 5) -> str:
        try:
            with open(self.err_path, encoding="utf-8", errors="replace") as f:
                return "".join(collections.deque(f, maxlen=lines))
        except OSError:
            return ""

    def requests_total(self) -> dict[str, dict[str, float]]:
        """``healthcode_requests_total`` by method and code, from the metrics endpoint ({} if unavailable)."""
        try:
            with urllib.request.urlopen(self.metrics, timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return {}
        out: dict[str, dict[str, float]] = collections.defaultdict(dict)
        for m in re.finditer(r"^healthcode_requests_total\{([^}]*)\} (\S+)$", text, re.M):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out[labels.get("method", "?")][labels.get("code", "?")] = float(m.group(2))
        return dict(out)

    def log_summary(self) -> dict[str, Any]:
        """Codes by method from the server's one-line-per-request log, and its unexpected errors by type."""
        codes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        errors: collections.Counter[str] = collections.Counter()
        with open(self.err_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if '"event": "rpc"' in line:
                    m = re.search(r'"method": "(\w+)".*"code": "(\w+)"', line)
                    if m:
                        codes[m.group(1)][m.group(2)] += 1
                elif '"event": "rpc_error"' in line:
                    m = re.search(r'"method": "(\w+)", "error": "(\w+)"', line)
                    errors[f"{m.group(1)}: {m.group(2)}" if m else line.strip()[-120:]] += 1
                elif "Traceback" in line or " ERROR " in line:
                    errors[line.strip()[-160:]] += 1
        return {"codes": {k: dict(v) for k, v in codes.items()}, "errors": dict(errors)}

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        return 0


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc/*/stat)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        todo += kids
    return found


class RssSampler(threading.Thread):
    """VmRSS of ``pid`` and its children (the front) every ``interval`` seconds, tagged with the current phase;
    also the CPU time of the server and of the load processes (``load_pids``), to tell how the two shared cores
    were split."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.load_pids: list[int] = []
        self.phase = "start"
        self.samples: list[tuple[float, str, float, float, float, float]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                pids = [self.pid, *_children(self.pid)]  # the server and its shedding front
                kb = sum(_rss_kb(p) for p in pids)
                load = sum(_cpu_seconds(p) for p in self.load_pids)
                cpu = sum(_cpu_seconds(p) for p in pids)
                front = cpu - _cpu_seconds(self.pid)  # the children: the shedding front
                self.samples.append((time.time(), self.phase, kb / 1024.0, cpu, load, front))
            except (OSError, StopIteration, ValueError):
                pass
            self.done.wait(self.interval)

    def summary(self, phase: str) -> dict[str, Any]:
        rows = [s for s in self.samples if s[1] == phase]
        if not rows:
            return {"samples": 0}
        mb = [s[2] for s in rows]
        out = {"samples": len(mb), "min_mb": round(min(mb), 1), "median_mb": round(float(np.median(mb)), 1),
               "max_mb": round(max(mb), 1), "first_mb": round(mb[0], 1), "last_mb": round(mb[-1], 1)}  # fmt: skip
        span = rows[-1][0] - rows[0][0]
        if span >= 120:  # a soak: is memory growing?  The median RSS of each minute
            minutes: dict[int, list[float]] = collections.defaultdict(list)
            for row in rows:
                minutes[int((row[0] - rows[0][0]) // 60)].append(row[2])
            out["median_mb_by_minute"] = [round(float(np.median(v)), 1) for _, v in sorted(minutes.items())]
        if span > 0:
            out["server_cores"] = round((rows[-1][3] - rows[0][3]) / span, 2)
            out["load_generator_cores"] = round((rows[-1][4] - rows[0][4]) / span, 2)
            out["front_cores"] = round((rows[-1][5] - rows[0][5]) / span, 2)  # included in server_cores
        return out


class Pool:
    """The load-generator processes and their command queues."""

    def __init__(self, target: str, args: argparse.Namespace) -> None:
        self.ctx = mp.get_context("spawn")
        self.results: Any = self.ctx.Queue()
        self.workers: dict[str, tuple[str, Any, Any]] = {}  # name -> (role, process, command queue)
        specs = [("gateway", f"gateway-{i}") for i in range(args.gateway_procs)]
        specs += [("bulk", f"bulk-{i}") for i in range(args.bulk_procs)]
        specs += [("health", "health")]
        for i, (role, name) in enumerate(specs):
            opts = {"seed": 11 + i, "concurrency": args.gateway_concurrency, "bulk_rows": args.bulk_rows,
                    "max_in_flight": args.max_in_flight, "overload_timeout": args.overload_timeout}  # fmt: skip
            commands = self.ctx.Queue()
            proc = self.ctx.Process(target=_worker, args=(role, name, target, opts, commands, self.results),
                                    daemon=True, name=f"load-{name}")  # fmt: skip
            proc.start()
            self.workers[name] = (role, proc, commands)
        self.collect(list(self.workers), READY_TIMEOUT)

    def names(self, role: str) -> list[str]:
        return [n for n, (r, _p, _q) in self.workers.items() if r == role]

    def send(self, name: str, command: tuple) -> None:
        self.workers[name][2].put(command)

    def collect(self, names: Sequence[str], timeout: float) -> dict[str, dict[str, Any]]:
        got: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(names):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no result from {sorted(set(names) - set(got))} within {timeout:.0f} s")
            try:
                name, out = self.results.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                dead = [n for n in names if n not in got and not self.workers[n][1].is_alive()]
                if dead:
                    raise RuntimeError(f"load process {dead} died") from None
                continue
            if "fatal" in out:
                raise RuntimeError(f"load process {name}: {out['fatal']}")
            got[name] = out
        return got

    def stop(self) -> None:
        for _role, proc, commands in self.workers.values():
            if proc.is_alive():
                try:
                    commands.put(("stop",))
                except (OSError, ValueError):
                    pass
        deadline = time.monotonic() + 5
        for _role, proc, _q in self.workers.values():
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()


def _merge(outs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    codes: collections.Counter[str] = collections.Counter()
    messages: dict[str, str] = {}
    ok: list[float] = []
    refused: list[float] = []
    failed: dict[str, list[float]] = collections.defaultdict(list)
    for o in outs:
        codes.update(o["codes"])
        for k, v in o["failed"].items():
            failed[k] += v
        ok += o["ok"]
        refused += o["refused"]
        for k, v in o["messages"].items():
            messages.setdefault(k, v)
    return {"codes": codes, "messages": messages, "ok": ok, "refused": refused, "failed": failed,
            "elapsed": max((o["elapsed"] for o in outs), default=0.0)}  # fmt: skip


def _closed_report(outs: Sequence[dict[str, Any]], rows_per_call: int | None = None) -> dict[str, Any]:
    m = _merge(outs)
    n_ok, n_err = len(m["ok"]), sum(m["codes"].values())
    elapsed = m["elapsed"] or 1e-9
    rows = sum(o.get("rows", 0) for o in outs) if rows_per_call is None else n_ok * rows_per_call
    return {
        "calls": n_ok + n_err,
        "ok": n_ok,
        "rpc_per_s": round(n_ok / elapsed, 1),
        "rows_per_s": round(rows / elapsed),
        **_percentiles(m["ok"]),
        "errors": dict(m["codes"]),
        "error_rate": round(n_err / max(1, n_ok + n_err), 6),
        "error_messages": m["messages"],
    }


def _health_report(out: dict[str, Any]) -> dict[str, Any]:
    n_ok, n_err = len(out["ok"]), sum(out["codes"].values())
    return {"checks": n_ok + n_err, "serving": out["statuses"].get("SERVING", 0), "statuses": out["statuses"],
            "errors": out["codes"], **_percentiles(out["ok"])}  # fmt: skip


def _codes_delta(before: dict, after: dict, method: str) -> dict[str, int]:
    b, a = before.get(method, {}), after.get(method, {})
    return {code: int(v - b.get(code, 0)) for code, v in a.items() if v - b.get(code, 0)}


def _closed_phase(pool: Pool, server: Server, rss: RssSampler, phase: str, seconds: float) -> dict[str, Any]:
    before = server.requests_total()
    rss.phase = phase
    start_at = time.time() + 0.5
    gateways, bulks = pool.names("gateway"), pool.names("bulk")
    for n in gateways:
        pool.send(n, ("closed", start_at, seconds))
    for n in bulks:
        pool.send(n, ("bulk", start_at, seconds))
    pool.send("health", ("health", start_at, seconds))
    outs = pool.collect([*gateways, *bulks, "health"], seconds + 180)
    rss.phase = "between"
    after = server.requests_total()
    gateway = _closed_report([outs[n] for n in gateways], rows_per_call=BATCH)
    bulk = _closed_report([outs[n] for n in bulks]) if bulks else {}
    calls = gateway["calls"] + bulk.get("calls", 0)
    errors = sum(gateway["errors"].values()) + sum(bulk.get("errors", {}).values())
    return {
        "seconds": seconds,
        "gateway": gateway,
        "bulk": bulk,
        "health": _health_report(outs["health"]),
        "error_rate": round(errors / max(1, calls), 6),
        "rss": rss.summary(phase),
        "server_codes": {m: _codes_delta(before, after, m) for m in ("Evaluate", "EvaluateArrow")},
    }


def _overload_phase(pool: Pool, server: Server, rss: RssSampler, rate: float, seconds: float) -> dict[str, Any]:
    before = server.requests_total()
    rss.phase = "overload"
    start_at = time.time() + 0.5
    gateways, bulks = pool.names("gateway"), pool.names("bulk")
    for n in gateways:
        pool.send(n, ("open", start_at, seconds, rate / len(gateways)))
    for n in bulks:  # the bulk load of (a) goes on: 5x is relative to the same mix
        pool.send(n, ("bulk", start_at, seconds))
    pool.send("health", ("health", start_at, seconds))
    outs = pool.collect([*gateways, *bulks, "health"], seconds + 240)
    rss.phase = "between"
    after = server.requests_total()
    g = [outs[n] for n in gateways]
    m = _merge(g)
    sent = sum(o["sent"] for o in g)
    elapsed = m["elapsed"] or 1e-9
    n_ok = len(m["ok"])
    exhausted = m["codes"].get("RESOURCE_EXHAUSTED", 0)
    other = {c: n for c, n in m["codes"].items() if c != "RESOURCE_EXHAUSTED"}
    return {
        "seconds": seconds,
        "target_rpc_per_s": round(rate, 1),
        "offered_rpc_per_s": round(sent / elapsed, 1),
        "sent": sent,
        "not_sent_client_bound": sum(o["not_sent"] for o in g),
        "unanswered": sum(o["unanswered"] for o in g),
        "client_max_in_flight": sum(o["max_in_flight"] for o in g),
        "ok": n_ok,
        "admitted_ok_rpc_per_s": round(n_ok / max(o["drained"] for o in g), 1),
        "resource_exhausted": exhausted,
        "resource_exhausted_share": round(exhausted / max(1, sent), 4),
        "other_codes": other,
        "messages": m["messages"],
        "admitted": _percentiles(m["ok"]),
        "refused": _percentiles(m["refused"]),
        "error_latency": {code: _percentiles(v) for code, v in m["failed"].items()},
        "bulk": _closed_report([outs[n] for n in bulks]) if bulks else {},
        "health": _health_report(outs["health"]),
        "rss": rss.summary("overload"),
        "server_codes": {m: _codes_delta(before, after, m) for m in ("Evaluate", "EvaluateArrow")},
    }


def _table(report: dict[str, Any]) -> str:
    def f(x: Any, spec: str = ",.0f") -> str:
        return "-" if x is None else format(x, spec)

    lines = []
    s, o, r = report["sustained"], report["overload"], report["recovery"]
    lines.append(f"server: front {report['config']['front']}, "
                 f"max_concurrent_calls={report['config']['max_concurrent_calls']}, "
                 f"{report['config']['gateway_procs']} gateway procs x {report['config']['gateway_concurrency']} "
                 f"in flight, {report['config']['bulk_procs']} bulk proc(s) x {report['config']['bulk_rows']:,} "
                 f"rows/stream; {os.cpu_count()} cores")  # fmt: skip
    lines.append("")
    lines.append(f"{'phase':<10} {'gateway RPC/s':>13} {'rows/s':>9} {'p50/p99 ms':>15} {'bulk rows/s':>12} "
                 f"{'bulk p50/p99 ms':>16} {'errors':>7} {'health ok/n':>11} {'RSS MB min/med/max':>20}")  # fmt: skip
    for name, p in (("sustained", s), ("recovery", r)):
        g, b, h, m = p["gateway"], p["bulk"], p["health"], p["rss"]
        lines.append(
            f"{name:<10} {f(g['rpc_per_s']):>13} {f(g['rows_per_s']):>9} "
            f"{f(g['p50_ms'], '.1f') + '/' + f(g['p99_ms'], '.1f'):>15} {f(b.get('rows_per_s')):>12} "
            f"{f(b.get('p50_ms'), '.0f') + '/' + f(b.get('p99_ms'), '.0f'):>16} "
            f"{sum(g['errors'].values()) + sum(b.get('errors', {}).values()):>7} "
            f"{str(h['serving']) + '/' + str(h['checks']):>11} "
            f"{f(m.get('min_mb'), '.0f') + '/' + f(m.get('median_mb'), '.0f') + '/' + f(m.get('max_mb'), '.0f'):>20}"
        )
    lines.append("")
    lines.append(f"overload: target {f(o['target_rpc_per_s'])} RPC/s ({report['config']['overload_factor']}x "
                 f"sustained), offered {f(o['offered_rpc_per_s'])} RPC/s ({o['sent']:,} calls, "
                 f"{o['not_sent_client_bound']:,} not sent: client in-flight bound)")  # fmt: skip
    lines.append(f"  admitted OK {f(o['admitted_ok_rpc_per_s'])} RPC/s, p50/p99 {f(o['admitted']['p50_ms'], '.1f')}/"
                 f"{f(o['admitted']['p99_ms'], '.1f')} ms; RESOURCE_EXHAUSTED {o['resource_exhausted']:,} "
                 f"({o['resource_exhausted_share']:.1%}), answered in p50/p99 {f(o['refused']['p50_ms'], '.1f')}/"
                 f"{f(o['refused']['p99_ms'], '.1f')} ms; other codes {o['other_codes'] or 'none'}")  # fmt: skip
    ob = o.get("bulk") or {}
    if ob:
        lines.append(f"  bulk (same load as sustained): {f(ob['rows_per_s'])} rows/s, p50/p99 "
                     f"{f(ob['p50_ms'], '.0f')}/{f(ob['p99_ms'], '.0f')} ms, "
                     f"codes {ob['errors'] or 'none'}")  # fmt: skip
    h, m = o["health"], o["rss"]
    lines.append(f"  health {h['serving']}/{h['checks']} SERVING, p50/p99 {f(h['p50_ms'], '.1f')}/"
                 f"{f(h['p99_ms'], '.1f')} ms, errors {h['errors'] or 'none'}; RSS MB "
                 f"{f(m.get('min_mb'), '.0f')}/{f(m.get('median_mb'), '.0f')}/{f(m.get('max_mb'), '.0f')}")  # fmt: skip
    cores = {p: report[p]["rss"].get("server_cores") for p in ("sustained", "overload", "recovery")}
    load = {p: report[p]["rss"].get("load_generator_cores") for p in ("sustained", "overload", "recovery")}
    front = {p: report[p]["rss"].get("front_cores") for p in ("sustained", "overload", "recovery")}
    lines.append(f"CPU cores used by the server {cores} (of which its front {front}), by the load generators {load}")
    lines.append(f"checks: {report['checks']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        extra = ["--max-concurrent-calls", str(args.max_concurrent_calls), "--front", args.front]
        server = Server(tmp, extra, args.serve_command)
        pool: Pool | None = None
        rss = RssSampler(server.pid)
        rss.start()
        try:
            pool = Pool(server.target, args)
            rss.load_pids = [proc.pid for _role, proc, _q in pool.workers.values()]
            rss.phase = "idle"
            time.sleep(1.0)
            sustained = _closed_phase(pool, server, rss, "sustained", args.sustained_seconds)
            rate = args.overload_factor * sustained["gateway"]["rpc_per_s"]
            overload = _overload_phase(pool, server, rss, rate, args.overload_seconds)
            recovery = _closed_phase(pool, server, rss, "recovery", args.recovery_seconds)
            rss.phase = "end"
            time.sleep(1.0)
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
            rss.done.set()
            try:
                if pool is not None:
                    pool.stop()
            finally:
                code = server.stop()
            server_log = server.log_summary()
            if args.keep_server_log:
                import shutil

                shutil.copyfile(server.err_path, args.keep_server_log)
        if code not in (0, None):
            print(f"warning: the server exited with {code}; stderr tail: {server.stderr_tail()}", file=sys.stderr)
    shed_message = overload["messages"].get("RESOURCE_EXHAUSTED", "")
    report = {
        "config": {
            "quick": args.quick,
            "cores": os.cpu_count(),
            "max_concurrent_calls": args.max_concurrent_calls,
            "front": args.front,
            "gateway_procs": args.gateway_procs,
            "gateway_concurrency": args.gateway_concurrency,
            "persons_per_call": BATCH,
            "bulk_procs": args.bulk_procs,
            "bulk_rows": args.bulk_rows,
            "overload_factor": args.overload_factor,
            "max_in_flight_per_overload_proc": args.max_in_flight,
            "overload_call_timeout_s": args.overload_timeout,
        },
        "rss_idle": rss.summary("idle"),
        "sustained": sustained,
        "overload": overload,
        "recovery": recovery,
        "rss_end": rss.summary("end"),
        "server_log": server_log,
        "server_exit_code": code,
    }
    health = [p["health"] for p in (sustained, overload, recovery)]
    offered_ratio = overload["offered_rpc_per_s"] / max(1e-9, sustained["gateway"]["rpc_per_s"])
    report["checks"] = {
        "sustained_error_rate": sustained["error_rate"],
        "recovery_error_rate": recovery["error_rate"],
        "shed_with_resource_exhausted": overload["resource_exhausted"] > 0 and "max_concurrent_calls" in shed_message,
        "overload_other_codes": overload["other_codes"],
        "health_always_serving": all(h["serving"] == h["checks"] > 0 for h in health),
        "overload_offered_over_sustained": round(offered_ratio, 2),
    }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI sizes: the whole run under 40 s")
    parser.add_argument("--json", help="also write the report to this file")
    parser.add_argument("--max-concurrent-calls", type=int, default=MAX_CONCURRENT_CALLS)
    parser.add_argument(
        "--front", choices=("on", "off"), default="on",
        help="serve behind the shedding front (the setting for an exposed server; default on), or without it",
    )  # fmt: skip
    parser.add_argument("--gateway-procs", type=int, default=3)
    parser.add_argument("--gateway-concurrency", type=int, default=8, help="calls in flight per gateway process")
    parser.add_argument("--bulk-procs", type=int, default=1)
    parser.add_argument("--bulk-rows", type=int, default=None, help="rows per EvaluateArrow stream")
    parser.add_argument("--sustained-seconds", type=float, default=None)
    parser.add_argument("--overload-seconds", type=float, default=None)
    parser.add_argument("--recovery-seconds", type=float, default=None)
    parser.add_argument("--overload-factor", type=float, default=5.0)
    parser.add_argument("--max-in-flight", type=int, default=2000, help="unanswered calls per overload process")
    parser.add_argument("--overload-timeout", type=float, default=5.0, help="deadline of each overload call (s)")
    parser.add_argument("--keep-server-log", help="copy the server's stderr (one JSON line per request) here")
    parser.add_argument("--serve-command", help="run this instead of the venv's 'healthcode' (experiments)")
    args = parser.parse_args(argv)
    quick = {"bulk_rows": 100_000, "sustained_seconds": 5.0, "overload_seconds": 5.0, "recovery_seconds": 4.0}
    full = {"bulk_rows": 200_000, "sustained_seconds": 60.0, "overload_seconds": 30.0, "recovery_seconds": 20.0}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    def terminate(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through run()'s finally: workers and server stopped

    signal.signal(signal.SIGTERM, terminate)
    started = time.perf_counter()
    report = run(args)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(_table(report))
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
