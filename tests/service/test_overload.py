"""Overload against a real ``healthcode serve`` with ``--max-concurrent-calls 4``: slow bulk streams and many
gateway calls at once.  Calls past the limit end at once with RESOURCE_EXHAUSTED naming the limit, admitted calls
succeed (no other code), health keeps answering SERVING throughout, and once the overload stops the server is
back by itself: a burst at a normal rate has no error at all.

Behaviour only, never times.  The load and overload figures are ``benchmarks/bench_load.py``; the slow test at the
end runs its ``--quick`` pass (``pytest -m slow tests/service/test_overload.py``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pytest
from grpc_health.v1 import health_pb2
from service_helpers import ServerProcess

from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode.generate import generate_batches, generate_risk_csv
from healthcode.wire.ipc import ipc_chunks
from healthcode.wire.rows import batch_to_persons

AS_OF = 1638244800  # 2021-11-30T12:00:00+08:00
LIMIT = 4
MESSAGE_BYTES = 4 * 1024 * 1024
BULK_ROWS = 300_000
OVERLOAD_SECONDS = 4.0
EVALUATE = "/healthcode.v1.HealthCodeService/Evaluate"
EVALUATE_ARROW = "/healthcode.v1.HealthCodeService/EvaluateArrow"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
OPTIONS = [("grpc.max_receive_message_length", MESSAGE_BYTES), ("grpc.max_send_message_length", MESSAGE_BYTES)]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Any:
    srv = ServerProcess(
        tmp_path_factory.mktemp("overload"),
        risk_csv=generate_risk_csv(1, AS_OF),
        extra_args=["--max-concurrent-calls", str(LIMIT)],
        name="overload",
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def payloads() -> dict[str, Any]:
    gateway = []
    batch = next(generate_batches(800, seed=21))
    for i in range(8):
        request = pb.EvaluateRequest(persons=batch_to_persons(batch.slice(i * 100, 100)))
        request.as_of.seconds = AS_OF
        gateway.append(request.SerializeToString())
    table = pa.Table.from_batches(list(generate_batches(BULK_ROWS, seed=22)))
    options = pb.EvaluateOptions()
    options.as_of.seconds = AS_OF
    bulk = [pb.EvaluateArrowRequest(options=options).SerializeToString()]
    bulk += [pb.EvaluateArrowRequest(arrow_ipc=data).SerializeToString()
             for data, _n in ipc_chunks(table, MESSAGE_BYTES - 4096)]  # fmt: skip
    return {"gateway": gateway, "bulk": bulk}


class Outcomes:
    """Status codes seen, with one message per code and every RESOURCE_EXHAUSTED message."""

    def __init__(self) -> None:
        self.codes: collections.Counter[str] = collections.Counter()
        self.messages: dict[str, str] = {}
        self.exhausted: list[str] = []

    def error(self, exc: grpc.RpcError) -> str:
        code = exc.code().name
        self.codes[code] += 1
        self.messages.setdefault(code, exc.details() or "")
        if code == "RESOURCE_EXHAUSTED":
            self.exhausted.append(exc.details() or "")
        return code


async def _evaluate(call: Any, payload: bytes, out: Outcomes) -> str:
    try:
        reply = pb.EvaluateResponse.FromString(await call(payload, timeout=30))
    except grpc.RpcError as exc:
        return out.error(exc)
    assert len(reply.statuses) == 100
    out.codes["OK"] += 1
    return "OK"


async def _bulk(call: Any, requests: list[bytes], out: Outcomes) -> str:
    """One EvaluateArrow stream, sending the data only once the server answered the options with its info (the
    call is admitted): a refused stream then ends with the server's RESOURCE_EXHAUSTED.  (A grpc.aio client still
    writing when the server ends the stream reports INTERNAL "Internal error from Core" instead of the server's
    status: grpc/grpc#36066.)"""
    admitted = asyncio.Event()

    async def gated() -> Any:
        yield requests[0]
        await admitted.wait()
        for request in requests[1:]:
            yield request

    try:
        rows = 0
        async for response in call(gated(), timeout=60):
            if response.HasField("info"):
                admitted.set()
            rows += response.rows
    except grpc.RpcError as exc:
        return out.error(exc)
    finally:
        admitted.set()
    assert rows == BULK_ROWS
    out.codes["OK"] += 1
    return "OK"


def _server_codes(log: str) -> dict[str, collections.Counter[str]]:
    """Status codes by method from the server's one-line-per-request log."""
    out: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in log.splitlines():
        if '"event": "rpc"' in line:
            record = json.loads(line[line.index("{"):])
            out[record["method"]][record["code"]] += 1
    return out


async def _overload_then_recover(address: str, payloads: dict[str, Any]) -> dict[str, Any]:
    gateway, bulk = payloads["gateway"], payloads["bulk"]
    ev_out, bulk_out = Outcomes(), Outcomes()
    health: collections.Counter[str] = collections.Counter()
    async with (
        grpc.aio.insecure_channel(address, options=OPTIONS) as gw_channel,
        grpc.aio.insecure_channel(address, options=OPTIONS) as bulk_channel,
        grpc.aio.insecure_channel(address) as health_channel,
    ):
        evaluate = gw_channel.unary_unary(EVALUATE, request_serializer=None, response_deserializer=None)
        arrow = bulk_channel.stream_stream(EVALUATE_ARROW, request_serializer=None,
                                           response_deserializer=pb.EvaluateArrowResponse.FromString)  # fmt: skip
        check = health_channel.unary_unary(HEALTH_CHECK,
                                           request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                           response_deserializer=health_pb2.HealthCheckResponse.FromString)  # fmt: skip
        assert await _evaluate(evaluate, gateway[0], ev_out) == "OK"  # connected and warm
        ev_out.codes.clear()
        stop_at = time.monotonic() + OVERLOAD_SECONDS

        async def gateway_caller(k: int) -> None:
            while time.monotonic() < stop_at:
                if await _evaluate(evaluate, gateway[k % len(gateway)], ev_out) != "OK":
                    await asyncio.sleep(0.005)

        async def bulk_caller() -> None:
            while time.monotonic() < stop_at:
                if await _bulk(arrow, bulk, bulk_out) != "OK":
                    await asyncio.sleep(0.02)

        async def health_checker() -> None:
            while time.monotonic() < stop_at:
                for service in ("", "healthcode.v1.HealthCodeService"):
                    try:
                        reply = await check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                        health[health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)] += 1
                    except grpc.RpcError as exc:
                        health[exc.code().name] += 1
                await asyncio.sleep(0.1)

        # 6 bulk streams of 300k rows and 24 gateway callers: far more than 4 calls want to be in flight.
        await asyncio.wait_for(
            asyncio.gather(*(bulk_caller() for _ in range(6)), *(gateway_caller(k) for k in range(24)),
                           health_checker()),
            timeout=OVERLOAD_SECONDS + 60,
        )  # fmt: skip
        overload = {"evaluate": ev_out, "bulk": bulk_out, "health": health}

        # The load drops: the server is back by itself (a slot of a finished stream is released asynchronously,
        # so wait for the first success), then a burst at a normal rate, below the limit, sees no error at all.
        deadline = time.monotonic() + 10
        probe = Outcomes()
        while await _evaluate(evaluate, gateway[0], probe) != "OK":
            assert time.monotonic() < deadline, f"not recovered after the overload: {dict(probe.codes)}"
            await asyncio.sleep(0.05)
        burst_ev, burst_bulk = Outcomes(), Outcomes()

        async def steady(k: int) -> None:
            for i in range(60):
                await _evaluate(evaluate, gateway[(k + i) % len(gateway)], burst_ev)

        async def bulk_twice() -> None:
            for _ in range(2):
                await _bulk(arrow, bulk, burst_bulk)

        # At most 3 calls in flight, one below the limit (a slot may be released a moment after its call ended).
        await asyncio.wait_for(asyncio.gather(steady(0), steady(1), bulk_twice()), timeout=60)
        reply = await check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        after = {"evaluate": burst_ev, "bulk": burst_bulk, "health": reply.status}
    return {"overload": overload, "after": after}


def test_overload_sheds_keeps_health_and_recovers(server, payloads):
    result = asyncio.run(_overload_then_recover(server.address, payloads))
    ev, bulk, health = (result["overload"][k] for k in ("evaluate", "bulk", "health"))

    # Past the limit: RESOURCE_EXHAUSTED at once, naming the limit; admitted calls all succeed (no other code).
    shed = ev.codes["RESOURCE_EXHAUSTED"] + bulk.codes["RESOURCE_EXHAUSTED"]
    assert shed > 0, f"nothing was shed: {dict(ev.codes)} {dict(bulk.codes)}"
    for message in ev.exhausted + bulk.exhausted:
        assert "max_concurrent_calls" in message and str(LIMIT) in message, message
    assert set(ev.codes) <= {"OK", "RESOURCE_EXHAUSTED"}, (dict(ev.codes), ev.messages)
    assert set(bulk.codes) <= {"OK", "RESOURCE_EXHAUSTED"}, (dict(bulk.codes), bulk.messages)
    assert ev.codes["OK"] > 0 and bulk.codes["OK"] > 0, (dict(ev.codes), dict(bulk.codes))

    # Health is never shed: every check during the overload answered SERVING.
    assert set(health) == {"SERVING"}, dict(health)
    assert health["SERVING"] >= 10

    # After the overload: a burst below the limit has zero errors.
    after = result["after"]
    assert dict(after["evaluate"].codes) == {"OK": 120}, (dict(after["evaluate"].codes), after["evaluate"].messages)
    assert dict(after["bulk"].codes) == {"OK": 2}, (dict(after["bulk"].codes), after["bulk"].messages)
    assert after["health"] == health_pb2.HealthCheckResponse.SERVING

    # The server's own log agrees: its calls ended OK or RESOURCE_EXHAUSTED, nothing else.  Behind the shedding
    # front (HEALTHCODE_TEST_FRONT=on) the refusals happen there, and the metrics count them.
    logged = _server_codes(server.stderr())
    front = re.search(r'healthcode_front_calls_total\{outcome="refused"\} (\d+)', server.metrics())
    refused = sum(codes["RESOURCE_EXHAUSTED"] for codes in logged.values()) + (int(front.group(1)) if front else 0)
    assert refused > 0, (dict(logged), front)
    for method, codes in logged.items():
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, (method, dict(codes))


@pytest.mark.slow
def test_bench_load_quick(tmp_path):
    """``benchmarks/bench_load.py --quick``: zero errors in the sustained and recovery phases, the excess refused
    at once in the overload phase, health SERVING throughout."""
    report_path = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_load.py"), "--quick", "--json", str(report_path)],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    for phase in ("sustained", "recovery"):
        assert report[phase]["error_rate"] == 0, report[phase]
        assert report[phase]["gateway"]["ok"] > 0 and report[phase]["bulk"]["ok"] > 0
    overload = report["overload"]
    # bench_load serves behind the shedding front (as an exposed server does): the excess is refused with
    # RESOURCE_EXHAUSTED naming the limit, never left to gRPC core's queue (CANCELLED) or to its deadline.
    assert overload["resource_exhausted"] > 0 and overload["ok"] > 0, {k: overload[k] for k in ("ok", "other_codes")}
    assert overload["other_codes"] == {}, (overload["other_codes"], overload["messages"])
    assert report["checks"]["shed_with_resource_exhausted"], overload["messages"]
    assert report["checks"]["health_always_serving"], [report[p]["health"] for p in ("sustained", "overload")]
