"""Service benchmarks (issue 3): client, healthcode server and the transport ceiling in separate processes.

* Bulk: EvaluateArrow rows/s and MB/s for 1M and 10M generated rows, against a raw-bytes echo of the same request
  bytes over the same gRPC stack (``echo_server.py``), as a ratio.
* Gateway: Evaluate with 100-person batches at concurrency 1, 8, 32 from a separate load-generator process (grpc.aio):
  RPC/s, p50/p99 latency; the same load against an empty-handler RPC on the same stack as the ceiling.
* Row form vs Arrow form: rows/s of Evaluate (batches of 1,000) and EvaluateArrow for the same 100k rows.

Figures are reported, never asserted: ``python benchmarks/bench_service.py`` (full, several minutes) or ``--quick``
(CI: small sizes, a few seconds per case).  The machine is shared and noisy: read the ratios from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import grpc
import numpy as np
import pyarrow as pa

from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode._proto.v1 import healthcode_pb2_grpc as pb_grpc
from healthcode.generate import generate_batches, generate_risk_csv
from healthcode.wire.ipc import ipc_chunks
from healthcode.wire.rows import batch_to_persons

AS_OF = 1638244800  # 2021-11-30T12:00:00+08:00
HERE = os.path.dirname(os.path.abspath(__file__))
MESSAGE_BYTES = 4 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MESSAGE_BYTES),
    ("grpc.max_send_message_length", MESSAGE_BYTES),
]


def _start(cmd: Sequence[str], marker: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(marker):
            return proc, line.split()[-1]
    proc.kill()
    raise RuntimeError(f"{cmd[0]} did not start")


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


# -- bulk -----------------------------------------------------------------------------------------------------------


def _bulk_requests(table: pa.Table) -> list[bytes]:
    return [data for data, _rows in ipc_chunks(table, MESSAGE_BYTES - 4096)]


def _evaluate_arrow(channel: grpc.Channel, chunks: list[bytes]) -> tuple[float, int, int]:
    """One EvaluateArrow call on an open channel (a bulk client keeps its channel, as a gateway does)."""
    stub = pb_grpc.HealthCodeServiceStub(channel)

    def requests():  # type: ignore[no-untyped-def]
        options = pb.EvaluateOptions()
        options.as_of.seconds = AS_OF
        yield pb.EvaluateArrowRequest(options=options)
        for data in chunks:
            yield pb.EvaluateArrowRequest(arrow_ipc=data)

    started = time.perf_counter()
    rows = received = 0
    for response in stub.EvaluateArrow(requests(), timeout=600):
        rows += response.rows
        received += len(response.arrow_ipc)
    return time.perf_counter() - started, rows, received


def _echo(channel: grpc.Channel, chunks: list[bytes]) -> tuple[float, int]:
    call = channel.stream_stream("/bench.Echo/Stream", request_serializer=None, response_deserializer=None)
    started = time.perf_counter()
    received = sum(len(r) for r in call(iter(chunks), timeout=600))
    return time.perf_counter() - started, received


def bench_bulk(server: str, echo: str, sizes: Sequence[int], repeats: int) -> list[dict]:
    out = []
    for rows in sizes:
        table = pa.Table.from_batches(list(generate_batches(rows, seed=3)))
        chunks = _bulk_requests(table)
        sent = sum(len(c) for c in chunks)
        del table
        with (
            grpc.insecure_channel(server, options=CHANNEL_OPTIONS) as server_channel,
            grpc.insecure_channel(echo, options=CHANNEL_OPTIONS) as echo_channel,
        ):
            _evaluate_arrow(server_channel, chunks[:1])  # connect and warm up both channels
            _echo(echo_channel, chunks[:1])
            evals = [_evaluate_arrow(server_channel, chunks) for _ in range(repeats)]
            echoes = [_echo(echo_channel, chunks) for _ in range(repeats)]
        t_eval = float(np.median([e[0] for e in evals]))
        t_echo = float(np.median([e[0] for e in echoes]))
        assert all(e[1] == rows for e in evals), "EvaluateArrow returned a different row count"
        out.append(
            {
                "rows": rows,
                "request_MB": round(sent / 1e6, 1),
                "messages": len(chunks),
                "evaluate_arrow_s": round(t_eval, 3),
                "evaluate_arrow_rows_per_s": round(rows / t_eval),
                "evaluate_arrow_MB_per_s": round(sent / t_eval / 1e6, 1),
                "echo_s": round(t_echo, 3),
                "echo_MB_per_s": round(sent / t_echo / 1e6, 1),
                "ratio_to_ceiling": round(t_echo / t_eval, 3),
            }
        )
    return out


# -- gateway --------------------------------------------------------------------------------------------------------


async def _load(target: str, method: str, payload: bytes, concurrency: int, seconds: float) -> tuple[int, list[float]]:
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        await call(payload, timeout=30)  # warm the channel
        stop_at = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                await call(payload, timeout=30)
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return len(latencies), [elapsed, *latencies]


def _load_process(args: tuple[str, str, bytes, int, float], queue: mp.Queue) -> None:
    count, data = asyncio.run(_load(*args))
    queue.put((count, data))


def _run_load(target: str, method: str, payload: bytes, concurrency: int, seconds: float) -> dict:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_load_process, args=((target, method, payload, concurrency, seconds), queue))
    proc.start()
    count, data = queue.get(timeout=seconds + 120)
    proc.join()
    elapsed, latencies = data[0], np.array(data[1:])
    return {
        "rpc_per_s": round(count / elapsed, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 2),
        "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 2),
    }


def bench_gateway(server: str, echo: str, concurrencies: Sequence[int], seconds: float) -> list[dict]:
    batch = next(generate_batches(100, seed=5))
    request = pb.EvaluateRequest(persons=batch_to_persons(batch))
    request.as_of.seconds = AS_OF
    payload = request.SerializeToString()
    out = []
    for c in concurrencies:
        ev = _run_load(server, "/healthcode.v1.HealthCodeService/Evaluate", payload, c, seconds)
        empty = _run_load(echo, "/bench.Echo/Empty", b"", c, seconds)
        out.append(
            {
                "concurrency": c,
                "evaluate_100": ev,
                "empty_handler": empty,
                "ratio_to_ceiling": round(ev["rpc_per_s"] / empty["rpc_per_s"], 3),
            }
        )
    return out


# -- row form vs Arrow form -----------------------------------------------------------------------------------------


def bench_forms(server: str, rows: int, batch_sizes: Sequence[int] = (100, 1000)) -> dict:
    """Rows/s of Evaluate (sequential calls of each batch size) and of EvaluateArrow for the same rows, on one
    channel each; 100 is the gateway benchmark's batch, 1,000 the row form at its most favourable."""
    table = pa.Table.from_batches(list(generate_batches(rows, seed=7)))
    chunks = _bulk_requests(table)
    out: dict = {"rows": rows}
    with grpc.insecure_channel(server, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.HealthCodeServiceStub(channel)
        t_arrow = float(np.median([_evaluate_arrow(channel, chunks)[0] for _ in range(5)]))
        out["arrow_form_rows_per_s"] = round(rows / t_arrow)
        for size in batch_sizes:
            requests = []
            for start in range(0, rows, size):
                r = pb.EvaluateRequest(persons=batch_to_persons(table.slice(start, size)))
                r.as_of.seconds = AS_OF
                requests.append(r)
            stub.Evaluate(requests[0], timeout=60)  # warm up
            started = time.perf_counter()
            for r in requests:
                stub.Evaluate(r, timeout=60)
            t_rows = time.perf_counter() - started
            out[f"row_form_{size}_rows_per_s"] = round(rows / t_rows)
            out[f"arrow_over_row_{size}"] = round(t_rows / t_arrow, 1)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for CI (seconds, not minutes)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    sizes = [200_000] if args.quick else [1_000_000, 10_000_000]
    seconds = 1.0 if args.quick else 5.0
    concurrencies = [1, 8, 32]
    form_rows = 20_000 if args.quick else 100_000
    repeats = 1 if args.quick else 3

    with tempfile.TemporaryDirectory() as tmp:
        risk = os.path.join(tmp, "risk.csv")
        with open(risk, "w") as f:
            f.write(generate_risk_csv(1, AS_OF))
        bin_dir = os.path.dirname(sys.executable)
        server, target = _start(
            [os.path.join(bin_dir, "healthcode"), "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "",
             "--risk", risk],
            "healthcode serving on",
        )  # fmt: skip
        echo, echo_target = _start([sys.executable, os.path.join(HERE, "echo_server.py")], "echo serving on")
        try:
            report = {
                "bulk": bench_bulk(target, echo_target, sizes, repeats),
                "gateway": bench_gateway(target, echo_target, concurrencies, seconds),
                "forms": bench_forms(target, form_rows),
            }
        finally:
            _stop(server)
            _stop(echo)
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
